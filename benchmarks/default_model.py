"""Figures of the embedded default: the judge on renders and VAE reconstructions, the teacher per steps.

    python benchmarks/default_model.py [--model default] [--per-family 32] [--student RUN/11-quantize] [--out docs/]

Prints Markdown tables (and writes JSON under --out): GenEval-style pass rates per family and
overall (the mean of the families) on the in-distribution and held-out prompt splits, for the
reference renders, their VAE reconstructions, and the teacher at each step count with guidance.
With --student (a 1-step student, e.g. the quickstart's quantized one) it is scored at 1 step too,
and `default-grid.png` shows teacher (25 steps) and student (1 step) for the same prompts and seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pocketdiff import modelio
from pocketdiff.apps.evaluate import SPLITS, load_judge, prompt_set, score
from pocketdiff.apps.generate import generate_images, labelled_grid
from pocketdiff.compress.saved import load_shipped_pipeline
from pocketdiff.distill.scenes import FAMILIES, SHOWCASE_PROMPTS

@torch.no_grad()
def reconstructions(vae, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def row(label: str, split: str, scores: dict) -> str:
    families = " | ".join(f"{scores['families'][f]:.2f}" if f in scores["families"] else "" for f in FAMILIES)
    return f"| {label} | {split} | **{scores['overall']:.3f}** | {families} | {scores['frechet_distance']:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--per-family", type=int, default=32)
    parser.add_argument("--steps", default="1,4,25")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--student", type=Path, help="A 1-step student folder, scored at 1 step and drawn in the grid.")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    judge, began = load_judge("default"), time.perf_counter()
    pipe = modelio.load_pipeline(modelio.open_model(args.model))
    student = load_shipped_pipeline(modelio.open_model(args.student)) if args.student else None
    results = {}
    for split in SPLITS:
        prompts = prompt_set(split, args.per_family)
        results[f"{split}/renders"] = score(judge, prompts.images, prompts)
        results[f"{split}/vae reconstructions"] = score(judge, reconstructions(pipe.vae, prompts.images), prompts)
        for steps in (int(s) for s in args.steps.split(",")):
            images = generate_images(pipe, prompts.captions, steps, args.guidance, seed=0)
            results[f"{split}/teacher {steps} steps"] = score(judge, images, prompts)
        if student:
            images = generate_images(student, prompts.captions, 1, args.guidance, seed=0)
            results[f"{split}/student 1 step"] = score(judge, images, prompts)
    seconds = time.perf_counter() - began

    print(f"| images | prompts | overall | {' | '.join(FAMILIES)} | Fréchet |")
    print("|---" * (len(FAMILIES) + 4) + "|")
    for key, scores in results.items():
        split, label = key.split("/")
        print(row(label, split, scores))
    print(f"\n({seconds:.0f} s on {torch.get_num_threads()} threads; guidance {args.guidance:g}, "
          f"{args.per_family} prompts per family, seeds 0+i)")
    (args.out / "default-model-scores.json").write_text(json.dumps(results, indent=2))

    if student:
        teacher_images = generate_images(pipe, SHOWCASE_PROMPTS, 25, args.guidance, seed=0)
        student_images = generate_images(student, SHOWCASE_PROMPTS, 1, args.guidance, seed=0)
        labels = [f"teacher: {p}" for p in SHOWCASE_PROMPTS] + [f"1-step int8: {p}" for p in SHOWCASE_PROMPTS]
        grid = labelled_grid(np.concatenate([teacher_images, student_images]), labels,
                             title=f"pocketdiff default: teacher 25 steps (top), {args.student.name} 1 step (bottom), "
                                   f"guidance {args.guidance:g}, seeds 0-15")
        grid.save(args.out / "default-grid.png")


if __name__ == "__main__":
    main()
