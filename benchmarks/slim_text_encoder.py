"""A slim text encoder for the embedded default: cost, fidelity to the teacher's states, and the images it makes.

    python benchmarks/slim_text_encoder.py [--model default] [--layers 1,2,3] [--steps 300] [--per-family 32]
                                           [--work te-bench] [--json F]

For each layer count, distils the slim text encoder (`pocketdiff distill text-encoder`), then reports,
measured in this run: parameters and MACs before and after; latency on this host's CPU (torch eager,
one prompt, the fastest of 50) slim ÷ teacher; the held-out relative error of the last hidden states
at the start (the teacher's own layers, evenly spaced) and after; the judge's scores of the pipeline
with each encoder (in-distribution prompts, 25 DDIM steps, guidance 7.5: GenEval-style overall, each
family's pass rate, Fréchet distance). It also sizes the same cut on SD-1.5's text encoder (CLIP
ViT-L/14's, 12 layers, 77 tokens; architecture only).
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
from pocketdiff.distill.scenes import FAMILIES
from pocketdiff.distill.text_encoder import SlimTextEncoderConfig, distill_text_encoder
from pocketdiff.macs import count


@torch.no_grad()
def encoder_ms(encoder, tokens: int, repeats: int = 50) -> float:
    """The fastest of `repeats` calls on one prompt: on a shared 2-core host the minimum is the repeatable figure."""
    ids = torch.zeros(1, tokens, dtype=torch.long)
    return min(call_times(lambda: encoder(ids), repeats, warmup=5))


def sd15_text_encoder_macs(layers: int) -> int:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                                             num_attention_heads=12, max_position_embeddings=77))
        ids = torch.zeros(1, 77, dtype=torch.long)
        return count(model, lambda m: m(ids), "text_encoder", (1, 77)).macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--layers", default="1,2,3")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--per-family", type=int, default=32)
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    ref = modelio.open_model(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="te-bench-"))
    teacher_pipe = modelio.load_pipeline(ref)
    tokens = teacher_pipe.tokenizer.model_max_length
    judge = load_judge("default")
    evaluation = EvaluateConfig(per_family=args.per_family, steps=[25], guidance=[7.5])
    key = "in_distribution/steps=25/guidance=7.5"

    def scored(pipe) -> dict:
        return evaluate_model(pipe, judge, evaluation, seed=0, log=lambda _: None)[key]

    rows = {"teacher": {"report": None, "ms": encoder_ms(teacher_pipe.text_encoder, tokens), "scores": scored(teacher_pipe)}}
    for layers in (int(n) for n in args.layers.split(",")):
        config = SlimTextEncoderConfig(layers=layers, steps=args.steps)
        report = distill_text_encoder(ref, config, work / f"layers-{layers}", log=lambda _: None)
        pipe = modelio.load_pipeline(modelio.open_model(work / f"layers-{layers}"))
        rows[f"{layers} layers"] = {"report": report, "ms": encoder_ms(pipe.text_encoder, tokens), "scores": scored(pipe)}

    base = rows["teacher"]
    first = next(row["report"] for row in rows.values() if row["report"])
    teacher_layers = teacher_pipe.text_encoder.config.num_hidden_layers
    print(f"{args.model}: text encoder of {teacher_layers} layers, {tokens} tokens; {args.steps} steps × batch "
          f"{SlimTextEncoderConfig().batch} per student, {torch.get_num_threads()} CPU threads\n")
    print(f"| text encoder | layers kept | params | MACs | CPU ms (ratio) | rel. error start → end | overall | "
          f"{' | '.join(FAMILIES)} | Fréchet |")
    print("| --- " * (len(FAMILIES) + 8) + "|")
    for name, row in rows.items():
        report, q = row["report"], row["scores"]
        kept = report["kept_layers"] if report else list(range(teacher_layers))
        params, macs = (report["params_after"], report["macs_after"]) if report else (first["params_before"],
                                                                                   first["macs_before"])
        error = (f"{report['relative_error_start']:.3f} → {report['relative_error']:.4f} ({report['wall_time_s']:.0f} s)"
                 if report else "–")
        families = " | ".join(f"{q['families'][f]:.2f}" for f in FAMILIES)
        print(f"| {name} | {kept} | {params:,} | {macs:,} | {row['ms']:.2f} ({row['ms'] / base['ms']:.2f}) | "
              f"{error} | {headline(q):.3f} | {families} | {q['frechet_distance']:.3f} |")
    full = sd15_text_encoder_macs(12)
    print(f"\nSD-1.5's text encoder (12 layers, 77 tokens): {full / 1e9:.1f} G MACs; 6 layers "
          f"{sd15_text_encoder_macs(6) / 1e9:.1f} G, 3 layers {sd15_text_encoder_macs(3) / 1e9:.1f} G")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
