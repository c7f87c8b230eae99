"""Text → image with a diffusers pipeline, and labelled grids a person can look at.

Each prompt gets its own generator seeded `seed + i`, so an image does not change with the batch
it was generated in; that is what lets every stage compare students to the teacher image by image.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def sampling_calls(prompts: int, steps: int, batch: int = 64) -> int:
    """How many denoising steps `generate_images` takes: the length of its progress bar."""
    return steps * -(-prompts // batch)


def generate_images(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0,
                    batch: int = 64, on_step=None) -> np.ndarray:
    """uint8 images (N, H, W, 3), one per prompt, prompt i from a generator seeded `seed + i`.

    `on_step()`, if given, is called after every denoising step (a progress bar's advance).
    """
    import torch  # here, not at the top: the grid and PNG helpers serve the torch-free exported pipelines too

    outputs = []
    callback = {"callback_on_step_end": lambda _pipe, _i, _t, kwargs: on_step() or kwargs} if on_step else {}
    if prompts:  # as many chunks as `batch` makes, sizes within one: an int8 UNet builds a graph per batch shape
        chunks = -(-len(prompts) // batch)
        batch = -(-len(prompts) // chunks)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        result = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="np", **callback)
        outputs.append((np.clip(result.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(outputs)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return (lines + [line])[:3]


def labelled_grid(images: np.ndarray, labels: list[str], columns: int = 8, cell: int = 128,
                  title: str | None = None) -> Image.Image:
    """Images upscaled (nearest, so pixels stay honest) to `cell` px, each with its label beneath."""
    font = ImageFont.load_default()
    rows = -(-len(images) // columns)
    label_h, title_h = 40, 24 if title else 0
    grid = Image.new("RGB", (columns * cell, title_h + rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((6, 5), title, fill="black", font=font)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * cell, title_h + (i // columns) * (cell + label_h)
        grid.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(_wrap(label, cell // 6)):
            draw.text((x + 3, y + cell + 2 + 12 * j), line, fill="black", font=font)
    return grid


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def save_images(images: np.ndarray, prompts: list[str], out: Path, seed: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        path = out / f"{i:03d}-{slug(prompt)}-seed{seed + i}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths
