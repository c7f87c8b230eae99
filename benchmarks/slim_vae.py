"""A slim VAE for the embedded default: cost, fidelity to the teacher VAE, and the images it makes.

    python benchmarks/slim_vae.py [--model default] [--width 0.5] [--layers-per-block 1] [--steps 1000]
                                  [--per-family 32] [--work vae-bench] [--json F]

Distils the slim VAE (`pocketdiff distill vae`), then reports, measured in this run: decoder and
encoder parameters and MACs before and after; decoder latency on this host's CPU (torch eager, one
latent, the fastest of 50) slim ÷ teacher; the slim decoder's PSNR against the teacher's on
held-out images' latents (evaluation scenes) and both autoencoders' reconstruction PSNR; the judge's
scores of the pipeline with each VAE (in-distribution prompts, 25 DDIM steps, guidance 7.5:
GenEval-style overall, each family's pass rate, Fréchet distance). It also sizes the same slimming
on SD-1.5's VAE config at 512 px (architecture only: MACs, no training).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from pocketdiff import modelio
from pocketdiff.apps.evaluate import headline, load_judge
from pocketdiff.apps.stages import EvaluateConfig, evaluate_model
from pocketdiff.devices.timing import call_times
from pocketdiff.macs import count
from pocketdiff.distill.scenes import FAMILIES
from pocketdiff.distill.vae import SlimVAEConfig, distill_vae, slim_config

SD15_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "latent_channels": 4, "in_channels": 3, "out_channels": 3, "sample_size": 512,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


@torch.no_grad()
def decoder_ms(vae, latent: int, repeats: int = 50) -> float:
    z = torch.randn(1, vae.config.latent_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    return min(call_times(lambda: vae.decode(z), repeats, warmup=5))


def decoder_macs(config: dict, latent: int) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
        z = torch.randn(1, 4, latent, latent)
        census = count(vae, lambda m: m.decode(z), "vae_decoder", tuple(z.shape))
    return sum(b.macs for k, b in census.blocks.items() if k.startswith(("decoder", "post_quant_conv")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--per-family", type=int, default=32)
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    ref = modelio.open_model(args.model)
    out = Path(args.work or tempfile.mkdtemp(prefix="vae-bench-")) / "slim"
    config = SlimVAEConfig(width=args.width, layers_per_block=args.layers_per_block, steps=args.steps)
    report = distill_vae(ref, config, out, log=lambda _: None)
    slim_ref = modelio.open_model(out)
    teacher_pipe, slim_pipe = modelio.load_pipeline(ref), modelio.load_pipeline(slim_ref)
    latent = teacher_pipe.unet.config.sample_size
    teacher_ms, slim_ms = decoder_ms(teacher_pipe.vae, latent), decoder_ms(slim_pipe.vae, latent)
    judge = load_judge("default")
    evaluation = EvaluateConfig(per_family=args.per_family, steps=[25], guidance=[7.5])
    key = "in_distribution/steps=25/guidance=7.5"
    scores = {name: evaluate_model(pipe, judge, evaluation, seed=0, log=lambda _: None)[key]
              for name, pipe in (("teacher VAE", teacher_pipe), ("slim VAE", slim_pipe))}
    sd_before = decoder_macs(SD15_VAE, 64)
    sd_after = decoder_macs(slim_config(SD15_VAE, args.width, args.layers_per_block), 64)

    print(f"{args.model}: width {args.width}, {args.layers_per_block} layer(s) per block, {args.steps} steps × "
          f"batch {config.batch}, distillation {report['wall_time_s']:.0f} s on {torch.get_num_threads()} CPU threads\n")
    print("| | before | after | ratio |\n| --- | --- | --- | --- |")
    for half in ("vae_decoder", "vae_encoder"):
        for what in ("params", "macs"):
            before, after = report[f"{half}_{what}_before"], report[f"{half}_{what}_after"]
            print(f"| {half} {what} | {before:,} | {after:,} | {after / before:.3f} |")
    print(f"| decoder latency (ms, CPU, 1 latent) | {teacher_ms:.2f} | {slim_ms:.2f} | {slim_ms / teacher_ms:.3f} |")
    print(f"| SD-1.5 VAE decoder MACs at 512 px (G) | {sd_before / 1e9:.1f} | {sd_after / 1e9:.1f} | "
          f"{sd_after / sd_before:.3f} |")
    print(f"\nslim decoder vs the teacher's on held-out latents: {report['decoder_psnr_db']} dB; reconstruction "
          f"of held-out images: slim {report['student_recon_psnr_db']} dB, teacher {report['teacher_recon_psnr_db']} dB")
    print(f"\n| pipeline ({args.per_family} prompts per family) | overall | {' | '.join(FAMILIES)} | Fréchet |")
    print("| --- " * (len(FAMILIES) + 3) + "|")
    for name, q in scores.items():
        families = " | ".join(f"{q['families'][f]:.2f}" for f in FAMILIES)
        print(f"| {name} | {headline(q):.3f} | {families} | {q['frechet_distance']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"report": report, "scores": scores, "decoder_ms": [teacher_ms, slim_ms],
                                               "sd15_decoder_macs": [sd_before, sd_after]}, indent=2))


if __name__ == "__main__":
    main()
