"""Slim VAE decoders for the embedded default: cost, latency in ExecuTorch, fidelity, and the images they make.

    python benchmarks/slim_vae.py [--model default] [--widths 0.25:4,0.125:2] [--layers-per-block 1]
                                  [--steps 2000] [--lr 2e-3] [--student FOLDER] [--per-family 16]
                                  [--rounds 3] [--work vae-bench] [--json F]

Distils one slim VAE per `--widths` entry (width:norm groups; `pocketdiff distill vae`), then reports,
measured in this run on this host, per decoder beside the teacher's: channels, decoder parameters and
MACs (÷ the teacher's), decoder latency for one latent in ExecuTorch (XNNPACK, as the export lowers
it; fastest of 100 calls, the least over `--rounds` rounds in which the decoders take turns) and in
torch eager; the slim decoder's PSNR against the teacher's on held-out images' latents (evaluation
scenes) and its autoencoder's reconstruction PSNR; the judge's GenEval-style overall and Fréchet
distance (in-distribution prompts, guidance 7.5) of the teacher pipeline at 25 steps with each VAE
and, with `--student`, of that one-step student at 1 step with each; and the same slimming's decoder
MACs on SD-1.5's VAE config at 512 px (architecture only).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from pocketdiff import modelio
from pocketdiff.apps.evaluate import load_judge
from pocketdiff.apps.stages import EvaluateConfig, evaluate_model
from pocketdiff.compress.saved import load_shipped_pipeline
from pocketdiff.devices.timing import call_times
from pocketdiff.distill.vae import SlimVAEConfig, distill_vae, slim_config
from pocketdiff.export.components import VaeDecoder
from pocketdiff.export.executorch import lower
from pocketdiff.macs import count

SD15_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "latent_channels": 4, "in_channels": 3, "out_channels": 3, "sample_size": 512,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


def decoder_macs(config: dict, latent: int) -> int:
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
        z = torch.randn(1, 4, latent, latent)
        census = count(vae, lambda m: m.decode(z), "vae_decoder", tuple(z.shape))
    return sum(b.macs for k, b in census.blocks.items() if k.startswith(("decoder", "post_quant_conv")))


class DecoderTimer:
    """One decoder as an ExecuTorch program and in torch eager, timed in turns with the others."""

    def __init__(self, vae, latent: int):
        from executorch.runtime import Runtime

        self.vae, self.z = vae.eval(), torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
        self.program = lower(VaeDecoder(self.vae), (self.z,))  # held: the runtime reads these bytes
        self.method = Runtime.get().load_program(self.program).load_method("forward")
        self.executorch_ms = self.eager_ms = float("inf")

    @torch.no_grad()
    def turn(self) -> None:
        self.executorch_ms = min(self.executorch_ms, min(call_times(lambda: self.method.execute([self.z]), 100, 10)))
        self.eager_ms = min(self.eager_ms, min(call_times(lambda: self.vae.decode(self.z), 50, 5)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--widths", default="0.25:4,0.125:2", help="width:norm groups, comma-separated")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--student", default=None, help="a one-step student of the same VAE, scored at 1 step")
    parser.add_argument("--per-family", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    ref, work = modelio.open_model(args.model), Path(args.work or tempfile.mkdtemp(prefix="vae-bench-"))
    teacher_pipe = modelio.load_pipeline(ref)
    student_pipe = load_shipped_pipeline(modelio.open_model(args.student)) if args.student else None
    latent, judge = teacher_pipe.unet.config.sample_size, load_judge("default")
    rows = {"teacher": {"vae": teacher_pipe.vae, "channels": list(teacher_pipe.vae.config.block_out_channels),
                        "groups": teacher_pipe.vae.config.norm_num_groups}}
    sd15_before = decoder_macs(SD15_VAE, 64)
    for entry in args.widths.split(","):
        width, groups = entry.split(":")
        config = SlimVAEConfig(width=float(width), norm_groups=int(groups), layers_per_block=args.layers_per_block,
                               steps=args.steps, lr=args.lr)
        folder = work / f"width-{width}-groups-{groups}"
        report = distill_vae(ref, config, folder, log=lambda _: None)
        vae = AutoencoderKL.from_pretrained(folder / "vae")
        sd15 = decoder_macs(slim_config(SD15_VAE, float(width), args.layers_per_block, int(groups)), 64)
        rows[f"width {width}, {groups} groups"] = {
            "vae": vae, "channels": list(vae.config.block_out_channels), "groups": int(groups), "report": report,
            "macs": report["vae_decoder_macs_after"] / report["vae_decoder_macs_before"],
            "params": report["vae_decoder_params_after"] / report["vae_decoder_params_before"],
            "sd15_macs": sd15 / sd15_before}
    timers = {name: DecoderTimer(row["vae"], latent) for name, row in rows.items()}
    for _ in range(args.rounds):
        for timer in timers.values():
            timer.turn()
    scored = [("teacher", teacher_pipe, 25)] + ([("student", student_pipe, 1)] if student_pipe else [])
    for name, row in rows.items():
        for who, pipe, steps in scored:
            pipe.vae = row["vae"]
            evaluation = EvaluateConfig(per_family=args.per_family, steps=[steps], guidance=[7.5])
            row[who] = evaluate_model(pipe, judge, evaluation, seed=0, log=lambda _: None)[
                f"in_distribution/steps={steps}/guidance=7.5"]

    print(f"{args.model}: {args.layers_per_block} layer(s) per block, {args.steps} steps × batch {config.batch} at lr "
          f"{args.lr}, on {torch.get_num_threads()} CPU threads; {args.per_family} prompts per family\n")
    header = "| decoder | channels | groups | params | MACs | ExecuTorch ms | eager ms | PSNR vs teacher | recon PSNR |"
    header += " teacher 25 steps |" + (" student 1 step |" if student_pipe else "") + " SD-1.5 MACs |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    summary, teacher_recon = {}, next(r["report"]["teacher_recon_psnr_db"] for r in rows.values() if "report" in r)
    for name, row in rows.items():
        report, timer = row.get("report"), timers[name]
        cells = [name, "/".join(map(str, row["channels"])), str(row["groups"]), f"{row.get('params', 1):.3f}",
                 f"{row.get('macs', 1):.3f}", f"{timer.executorch_ms:.3f}", f"{timer.eager_ms:.3f}",
                 f"{report['decoder_psnr_db']} dB" if report else "–",
                 f"{report['student_recon_psnr_db'] if report else teacher_recon} dB"]
        cells += [f"{row[who]['overall']:.3f} ({row[who]['frechet_distance']:.2f})" for who, _, _ in scored]
        cells.append(f"{row.get('sd15_macs', 1):.3f}")
        print("| " + " | ".join(cells) + " |")
        summary[name] = {k: v for k, v in row.items() if k != "vae"} | {"executorch_ms": timer.executorch_ms,
                                                                        "eager_ms": timer.eager_ms}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
