"""A slim VAE distilled from the pipeline's own: the decoder is what a one-step generator pays for.

At one step the VAE decoder costs more than the UNet (SD-1.5's: about 1,240 G MACs at 512 px,
3.7× one UNet forward). SnapFusion distils a slimmer decoder from the original on the original's
latents; we do the same, and distil the encoder alongside (to the teacher's posterior), so the
result is a complete stock `AutoencoderKL`, with fewer channels (`width`) and layers
(`layers_per_block`), that any diffusers pipeline takes in place of the old one. The latent space
does not change: the UNet, the scaling factor and every other component stay as they are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from pydantic import Field

from .. import modelio
from ..errors import UserError
from ..folderhash import hash_model_folder
from ..macs import census_model
from . import latents as latent_data
from .trainer import RunSettings, Trainer, epoch_batches


class SlimVAEConfig(RunSettings):
    width: float = Field(0.5, gt=0, le=1, description="Share of the channels each VAE stage keeps (rounded to a "
                                                      "multiple of the norm groups).")
    layers_per_block: int | None = Field(None, ge=1, description="Resnets per stage (default: the teacher's).")
    norm_groups: int | None = Field(
        None, ge=1, description="Groups of every GroupNorm (default: the teacher's, 32 in SD). Each stage keeps a "
                                "multiple of it; a narrow one needs fewer groups, with several channels each: a group "
                                "of one channel normalises away that channel's mean, its colour.")
    steps: int = Field(1000, ge=1, description="Optimiser steps.")
    batch: int = Field(32, ge=1, description="Images per step.")
    lr: float = Field(5e-4, gt=0, description="Learning rate.")
    warmup_steps: int = Field(50, ge=0, description="Steps of linear learning-rate warm-up.")
    data: str = Field("scenes", description="'scenes', 'openmoji', or a folder of images with metadata.jsonl.")
    samples: int = Field(0, ge=0, description="Also distil the decoder on this many of the pipeline's own samples of "
                                              "training captions, the latents it decodes in use (a one-step "
                                              "student's lie off the encoder's); sampled once, cached; each step "
                                              "then takes half its batch from them. Their teacher-decoded images "
                                              "stay in memory in fp16: 2,048 at 512 px take 3.2 GB.")
    sample_steps: int = Field(25, ge=1, description="Sampling steps of those samples: 1 for a one-step student.")
    sample_guidance: float = Field(7.5, ge=0, description="Guidance of those samples.")
    checkpoint_every: int = Field(200, ge=1, description="Steps between checkpoints a killed run resumes from.")


def slim_config(teacher: dict, width: float, layers_per_block: int | None, norm_groups: int | None = None) -> dict:
    """The teacher VAE's config with `width` of its channels (multiples of the norm groups, the teacher's or
    `norm_groups`) and fewer layers."""
    groups = norm_groups or teacher.get("norm_num_groups", 32)
    config = {k: v for k, v in teacher.items() if not k.startswith("_")}
    config["block_out_channels"] = [max(groups, round(c * width / groups) * groups) for c in teacher["block_out_channels"]]
    config["layers_per_block"] = layers_per_block or teacher["layers_per_block"]
    config["norm_num_groups"] = groups
    return config


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1]."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean().item() / 4.0  # range 2 → normalised to [0, 1]
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


@torch.no_grad()
def fidelity(teacher, student, images: torch.Tensor, batch: int = 64) -> dict:
    """Slim decoder vs the teacher's on the teacher's latents; each autoencoder's reconstruction of the images."""
    pairs: dict[str, list] = {"decoder": [], "student_recon": [], "teacher_recon": []}
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        z = teacher.encode(x).latent_dist.mean
        reference = teacher.decode(z).sample
        pairs["decoder"].append((student.decode(z).sample, reference))
        pairs["teacher_recon"].append((reference, x))
        pairs["student_recon"].append((student.decode(student.encode(x).latent_dist.mean).sample, x))
    return {f"{name}_psnr_db": round(psnr(torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])), 2)
            for name, v in pairs.items()}


def own_samples(pipe, ref: modelio.ModelRef, captions: list[str], config: SlimVAEConfig, processes) -> torch.Tensor:
    """The pipeline's own unscaled latents for the first `config.samples` captions, as it generates them."""
    with processes.main_process_first():  # one process samples the cache, the others read it
        return latent_data.teacher_latents(pipe, ref.path, captions[:config.samples], config.sample_steps,
                                           config.sample_guidance, config.seed).mean


@torch.no_grad()
def decode_all(vae, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """`vae`'s images of unscaled `latents`, a batch at a time on its device, kept on the CPU in fp16 (2,048 at
    512 px: 3.2 GB)."""
    return torch.cat([vae.decode(latents[start:start + batch].to(vae.device)).sample.half().cpu()
                      for start in range(0, len(latents), batch)])


def distill_vae(ref: modelio.ModelRef, config: SlimVAEConfig, out: Path, log=print) -> dict:
    """Distil a slim VAE from `ref`'s; write the pipeline with it and `vae_report.json` to `out`."""
    from accelerate import PartialState
    from diffusers import AutoencoderKL

    out, processes = Path(out), PartialState()
    modelio.require_trained_pipeline(ref, "slim VAE distillation")
    pipe = modelio.load_pipeline(ref)
    teacher = pipe.vae.eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    student = AutoencoderKL.from_config(slim_config(dict(teacher.config), config.width, config.layers_per_block,
                                                    config.norm_groups))
    resolution = pipe.unet.config.sample_size * modelio.vae_scale_factor(ref)
    images, captions = latent_data.image_set(config.data, resolution)
    if config.data in ("scenes", "openmoji"):
        held_out = latent_data.held_out_images(config.data, resolution)
    elif len(images) < 2:
        raise UserError(f"{config.data}: at least 2 images are needed (one in ten is held out for the figures)")
    else:
        images, held_out = images[:-max(1, len(images) // 10)], images[-max(1, len(images) // 10):]
    generated = own_samples(pipe, ref, captions, config, processes) if config.samples else None
    image_batch = config.batch if generated is None else max(1, config.batch // 2)
    pick = epoch_batches(len(images), min(image_batch, len(images)), config.seed)
    if generated is not None:
        pick_generated = epoch_batches(len(generated), min(max(1, config.batch - image_batch), len(generated)),
                                       config.seed + 1)

    def batch_for(step: int) -> dict:
        if generated is None:
            return {"x": images[pick(step)]}
        index = pick_generated(step)
        return {"x": images[pick(step)], "z": generated[index], "target": decoded_generated[index]}

    def loss_fn(batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["x"]
        with torch.no_grad():
            posterior = teacher.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, device=x.device)
            target = teacher.decode(z).sample
            if "z" in batch:
                z, target = torch.cat([z, batch["z"]]), torch.cat([target, batch["target"].to(target.dtype)])
        decoded = student.decode(z).sample.float()
        own = student.encode(x).latent_dist
        terms = {"decoder_l1": (decoded - target).abs().mean(), "decoder_mse": (decoded - target).pow(2).mean(),
                 "encoder_mean": (own.mean.float() - posterior.mean).pow(2).mean(),
                 "encoder_std": (own.std.float() - posterior.std).pow(2).mean()}
        return {"loss": sum(terms.values()), **terms}

    train_config = config.train_config(config.steps, config.lr)
    identity = {"teacher": hash_model_folder(ref.path), "config": config.model_dump()}
    began = time.perf_counter()
    trainer = Trainer(student, loss_fn, batch_for, train_config, out, "slim vae", identity)
    teacher.to(trainer.accelerator.device)
    if generated is not None:  # fixed latents: the teacher decodes each once, not at every step that draws it
        decoded_generated = decode_all(teacher, generated)
    trainer.run()
    student.load_state_dict(trainer.ema_state_dict())
    student = student.to("cpu").eval()
    teacher.to("cpu")
    report = {"teacher": str(ref.path.resolve()), "config": config.model_dump(),
              "wall_time_s": round(time.perf_counter() - began, 1), "held_out_images": len(held_out),
              "own_samples": 0 if generated is None else len(generated),
              **fidelity(teacher, student, held_out)}
    if processes.is_main_process:
        modelio.save_pipeline_with(ref.path, out, "vae", student)
        for label, model in (("before", ref), ("after", modelio.open_model(out))):
            for census in census_model(model):
                if census.component.startswith("vae_"):
                    report[f"{census.component}_params_{label}"] = census.params
                    report[f"{census.component}_macs_{label}"] = census.macs
        (out / "vae_report.json").write_text(json.dumps(report, indent=2))
    processes.wait_for_everyone()
    return report
