"""Distillation data as cached latents: image–caption sets encoded once, or the teacher's own samples.

Training never touches pixels: the VAE encodes each image once (posterior mean and std, so every
step still draws a fresh latent), and the result is cached under pocketdiff's cache folder, keyed
by the VAE's weights, the data and the resolution, so every student of one teacher reuses it.
Users with a model but no images give captions only: the teacher samples each caption and its
latents become the data (std 0), keyed by the teacher's weights and the sampling settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from .. import modelio
from ..errors import UserError
from ..folderhash import hash_model_folder
from ..progress import tracked
from . import data, scenes
from .conditions import caption_ids
from .trainer import epoch_batches


class DataSettings(BaseModel):
    """Where a distillation run's latents come from: an image–caption set, or captions the teacher samples."""

    data: str = Field("scenes", description="'scenes' (the default's procedural set), 'openmoji', or a folder of "
                                            "images with metadata.jsonl.")
    captions: str | None = Field(
        None, description="Data-free instead: a captions file (one per line); the teacher's samples become the data.")
    teacher_steps: int = Field(25, ge=1, description="Data-free: sampling steps of the teacher.")
    teacher_guidance: float = Field(7.5, ge=0, description="Data-free: guidance of the teacher.")


@dataclass(frozen=True)
class LatentSet:
    """Posterior mean and std of each training latent (unscaled, as the VAE gives them) and its caption."""

    mean: torch.Tensor
    std: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of images in [-1, 1], (N, 3, H, W)."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(images[start:start + batch].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    # contiguous: the VAE's output can come channels-last, and a fresh set must train exactly like a cached one
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def folder_rows(folder: Path) -> list[tuple[Path, str]]:
    """(image path, caption) of each line of a Hugging Face ImageFolder's metadata.jsonl (file_name, text)."""
    metadata = Path(folder) / "metadata.jsonl"
    if not metadata.exists():
        raise UserError(f"{folder}: no metadata.jsonl (one JSON line per image: {{\"file_name\": ..., \"text\": ...}})")
    rows = []
    for number, line in enumerate(metadata.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            path, caption = Path(folder) / row["file_name"], str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{metadata}:{number}: expected {{\"file_name\": ..., \"text\": ...}}") from None
        if not path.exists():
            raise UserError(f"{metadata}:{number}: {path.name} is not in {folder}")
        rows.append((path, caption))
    if not rows:
        raise UserError(f"{metadata} lists no images")
    return rows


def image_folder(folder: Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Images and captions of a folder in the Hugging Face ImageFolder layout (metadata.jsonl: file_name, text)."""
    from PIL import Image, ImageOps

    images, captions = [], []
    for path, caption in folder_rows(folder):
        with Image.open(path) as image:
            fitted = ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
        images.append(np.asarray(fitted))
        captions.append(caption)
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return tensor, captions


SCENE_POOL = 8192  # scenes a distillation run draws from: more than the quickstart's students see


def image_set(source: str, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] and captions: 'scenes', 'openmoji' (training splits) or an ImageFolder-layout folder."""
    if source == "scenes":
        pool = scenes.training_set(SCENE_POOL, resolution=resolution)
        return pool.tensors(), pool.captions
    if source == "openmoji":
        emoji = data.load_emoji(resolution, "train")
        return emoji.tensors(), emoji.captions
    if not Path(source).is_dir():
        raise UserError(f"data {source!r}: give 'scenes', 'openmoji' or a folder with images and metadata.jsonl")
    return image_folder(Path(source), resolution)


def held_out_images(source: str, resolution: int, count: int = 256) -> torch.Tensor:
    """Images no training split holds, for reconstruction figures: evaluation scenes, or OpenMoji's validation."""
    if source == "scenes":
        return scenes.render_set(scenes.evaluation_scenes(per_family=-(-count // len(scenes.FAMILIES))),
                                 resolution).tensors()[:count]
    return data.load_emoji(resolution, "validation").tensors()[:count]


def digest_of(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def _files_digest(folder: Path) -> str:
    """Every file's name and bytes: an image folder's identity (the model hash skips images)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _cached(key: str, build) -> LatentSet:
    """The latent set stored under `key`, built (and written atomically) the first time."""
    path = data.cache_dir() / "latents" / f"{key}.safetensors"
    if path.exists():
        tensors = load_file(path)
        captions = json.loads(path.with_suffix(".json").read_text())
        return LatentSet(tensors["mean"], tensors["std"], captions)
    latents = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(latents.captions))
    save_atomic({"mean": latents.mean.contiguous(), "std": latents.std.contiguous()}, path)
    return latents


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors cache file whole or not at all: an interrupted run leaves no half file to load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp)
    tmp.replace(path)


def image_latents(pipe, vae_folder: Path, source: str, resolution: int) -> LatentSet:
    """Latents of an image–caption set: 'scenes', 'openmoji' (training splits) or an ImageFolder-layout folder."""
    def build() -> LatentSet:
        images, captions = image_set(source, resolution)
        mean, std = encode_images(pipe.vae, images)
        return LatentSet(mean, std, captions)

    folder_id = (source, SCENE_POOL) if source == "scenes" else source if source == "openmoji" else _files_digest(Path(source))
    return _cached("images-" + digest_of(hash_model_folder(vae_folder), folder_id, resolution), build)


def teacher_latents(pipe, teacher_folder: Path, captions: list[str], steps: int, guidance: float, seed: int,
                    batch: int = 32) -> LatentSet:
    """Data-free: the teacher samples every caption (seed + index) and its latents are the data."""
    def build() -> LatentSet:
        scale = pipe.vae.config.scaling_factor
        means = []
        for start in tracked(range(0, len(captions), batch), "teacher samples"):
            chunk = captions[start:start + batch]
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            with torch.no_grad():
                latents = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                               generator=generators).images
            means.append(latents.float().cpu() / scale)
        mean = torch.cat(means)
        return LatentSet(mean, torch.zeros_like(mean), list(captions))

    if not captions:
        raise UserError("data-free distillation needs at least one caption")
    return _cached("teacher-" + digest_of(hash_model_folder(teacher_folder), captions, steps, guidance, seed), build)


def read_captions(path: Path) -> list[str]:
    """One caption per line; blank lines ignored."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such captions file (one caption per line)")
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def training_latents(pipe, teacher, settings: DataSettings, seed: int) -> LatentSet:
    """A distillation run's data: the teacher's samples of a captions file (data-free), else an image set."""
    if settings.captions:
        return teacher_latents(pipe, teacher.path, read_captions(Path(settings.captions)), settings.teacher_steps,
                               settings.teacher_guidance, seed)
    resolution = pipe.unet.config.sample_size * modelio.vae_scale_factor(teacher)
    return image_latents(pipe, teacher.path / "vae", settings.data, resolution)


def training_batches(pipe, teacher, settings: DataSettings, seed: int, batch: int) -> tuple[LatentSet, Callable[[int], dict]]:
    """A run's latent set and its batches as a function of the step (latents, std and each text encoder's token ids)."""
    from accelerate import PartialState

    with PartialState().main_process_first():  # one process builds the latent cache, the others read it
        latents = training_latents(pipe, teacher, settings, seed)
    ids = caption_ids(pipe, latents.captions)
    pick = epoch_batches(len(latents), min(batch, len(latents)), seed)

    def batch_for(step: int) -> dict:
        index = pick(step)
        return {"mean": latents.mean[index], "std": latents.std[index], **{k: v[index] for k, v in ids.items()}}

    return latents, batch_for
