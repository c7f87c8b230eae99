"""Figures of the embedded default: VAE reconstruction, the judge's ceiling, the teacher per steps × guidance.

    python benchmarks/default_model.py [--model default] [--prompts 256] [--out docs/]

Prints a Markdown table (and writes JSON plus a labelled grid under --out). Quality is the judge's:
prompt score, Fréchet distance to the real images of the same captions, caption retrieval among all
prompts of the split; "ratio" is retrieval relative to the real images' retrieval.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pocketdiff import modelio
from pocketdiff.apps.evaluate import load_judge
from pocketdiff.apps.generate import generate_images, labelled_grid
from pocketdiff.apps.stages import EvaluateConfig, evaluate_model
from pocketdiff.distill import data

GRID_PROMPTS = ["red apple", "grinning face", "dog face", "rocket", "slice of pizza", "snowman", "ghost", "rainbow",
                "watermelon", "penguin", "butterfly", "cactus", "sun with face", "banana", "fire", "hot beverage"]


@torch.no_grad()
def vae_psnr(vae, split: str = "validation") -> float:
    images = data.load_emoji(32, split).tensors()
    recon = torch.cat([vae.decode(vae.encode(images[i:i + 256]).latent_dist.mean).sample
                       for i in range(0, len(images), 256)])
    mse = ((recon.clamp(-1, 1) - images) / 2).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--steps", default="1,2,4,8,25")
    parser.add_argument("--guidance", default="1,7.5")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    pipe = modelio.load_pipeline(modelio.open_model(args.model))
    began = time.perf_counter()
    psnr = {split: vae_psnr(pipe.vae, split) for split in ("validation", "train")}
    config = EvaluateConfig(split="both", prompts=args.prompts, steps=[int(s) for s in args.steps.split(",")],
                            guidance=[float(g) for g in args.guidance.split(",")])
    results = evaluate_model(pipe, load_judge("default"), config, seed=0)
    seconds = time.perf_counter() - began

    images = generate_images(pipe, GRID_PROMPTS, 25, 7.5, seed=0)
    real = data.load_emoji(32)
    reference = np.stack([real.images[real.captions.index(p)] for p in GRID_PROMPTS])
    grid = labelled_grid(np.concatenate([images, reference]), GRID_PROMPTS + [f"(real) {p}" for p in GRID_PROMPTS],
                         title="pocketdiff default: 25 DDIM steps, guidance 7.5, seeds 0-15 (top); real OpenMoji (bottom)")
    grid.save(args.out / "default-grid.png")

    print(f"VAE reconstruction PSNR: validation {psnr['validation']:.2f} dB, train {psnr['train']:.2f} dB")
    print("\n| split | sampler | prompt score | Fréchet distance | retrieval | ratio to real |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, value in results.items():
        split, *setting = key.split("/")
        ceiling = results[f"{split}/real"]["retrieval_accuracy"]
        print(f"| {split} | {' '.join(setting) or 'real images'} | {value['prompt_score']:.4f} | "
              f"{value['frechet_distance']:.3f} | {value['retrieval_accuracy']:.3f} | "
              f"{value['retrieval_accuracy'] / ceiling:.2f} |")
    print(f"\n({seconds:.0f} s on {torch.get_num_threads()} threads)")
    (args.out / "default-model-scores.json").write_text(json.dumps({"vae_psnr_db": psnr, "scores": results}, indent=2))


if __name__ == "__main__":
    main()
