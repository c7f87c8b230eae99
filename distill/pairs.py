"""The guided teacher's ODE samples of seeded noise, and the one-step regression on them.

DMD regresses its generator on these pairs (its guard against mode collapse), and the `ode` method
trains on nothing else; both share the pairs' cache, the student's one-step sample and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..folderhash import hash_model_folder
from ..progress import tracked
from . import data
from .conditions import TextConditions, caption_ids
from .diffusion import GuidedTeacher, alpha_at, consistency_output, ddim_to, guidance_embedding
from .latents import digest_of, save_atomic
from .step_common import StepDistillConfig
from .trainer import epoch_batches


@dataclass(frozen=True)
class Pairs:
    """The guided teacher's ODE samples: starting noise, final latent, guidance scale and prompt ids (per text
    encoder, under the batch keys `TextConditions` reads)."""

    noise: torch.Tensor
    sample: torch.Tensor
    guidance: torch.Tensor
    ids: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.noise)


@torch.no_grad()
def teacher_pairs(pipe, teacher_folder: Path, captions: list[str], alphas: torch.Tensor, final_alpha: float,
                  config: StepDistillConfig, batch: int = 64) -> Pairs:
    """`config.regression_pairs` prompts sampled by the guided teacher with DDIM ("trailing", as the default
    samples) from seeded noise, guidance drawn per pair; cached by teacher, prompts and settings."""
    # More pairs than captions: every caption once, then again in a new order, each time with new noise.
    shuffle, rounds = torch.Generator().manual_seed(config.seed), -(-config.regression_pairs // len(captions))
    order = torch.cat([torch.randperm(len(captions), generator=shuffle) for _ in range(rounds)])
    chosen = [captions[i] for i in order[:config.regression_pairs].tolist()]
    key = digest_of(hash_model_folder(teacher_folder), chosen, config.teacher_steps, config.guidance_min,
                  config.guidance_max, config.seed)
    path = data.cache_dir() / "pairs" / f"{key}.safetensors"
    if path.exists():
        saved = load_file(path)
        return Pairs(saved.pop("noise"), saved.pop("sample"), saved.pop("guidance"), saved)
    ids, conditions = caption_ids(pipe, chosen), TextConditions(pipe)
    random = torch.Generator().manual_seed(config.seed)
    unet, device = pipe.unet, pipe.unet.device
    shape = (len(chosen), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = torch.randn(shape, generator=random)
    guidance = config.guidance_min + (config.guidance_max - config.guidance_min) * torch.rand(len(chosen), generator=random)
    stride = len(alphas) // config.teacher_steps
    grid = [len(alphas) - 1 - stride * i for i in range(config.teacher_steps)]
    teacher, samples = GuidedTeacher(unet, pipe.scheduler.config.prediction_type), []
    for start in tracked(range(0, len(chosen), batch), "teacher pairs"):
        part = slice(start, start + batch)
        x, g = noise[part].to(device), guidance[part].to(device)
        text, empty = conditions({k: v[part].to(device) for k, v in ids.items()}), conditions.unconditional(len(x), device)
        for timestep in grid:
            t = torch.full((len(x),), timestep, device=device)
            x = ddim_to(*teacher(x, t, alpha_at(alphas, final_alpha, t), text, empty, g),
                        alpha_at(alphas, final_alpha, (t - stride).clamp(min=-1)))
        samples.append(x.cpu())
    pairs = Pairs(noise, torch.cat(samples).contiguous(), guidance, ids)
    save_atomic({"noise": pairs.noise, "sample": pairs.sample, "guidance": pairs.guidance, **pairs.ids}, path)
    return pairs


class OneStep:
    """The student's one-step sample from pure noise, as `LCMScheduler` computes it from the UNet output at
    `timestep` (its one timestep at one step)."""

    def __init__(self, student, alphas: torch.Tensor, final_alpha: float, prediction: str, timestep: int):
        self.student, self.prediction, self.timestep = student, prediction, timestep
        self.alpha = alpha_at(alphas, final_alpha, torch.tensor([timestep]))

    def __call__(self, noise: torch.Tensor, text: dict, guidance: torch.Tensor) -> torch.Tensor:
        t = torch.full((len(noise),), self.timestep, device=noise.device)
        cond = guidance_embedding(guidance, self.student.config.time_cond_proj_dim)
        out = self.student(noise, t, **text, timestep_cond=cond).sample.float()
        return consistency_output(out, noise, t, self.alpha.to(noise.device).expand(len(noise)), self.prediction)


def pair_regression(one_step: OneStep, conditions: TextConditions, batch: dict) -> torch.Tensor:
    """Mean squared error between the student's one-step samples and the teacher's samples of the same noise."""
    with torch.no_grad():
        text = conditions(batch)
    return (one_step(batch["noise"], text, batch["guidance"]) - batch["sample"]).pow(2).mean()


def pair_batches(pairs: Pairs, batch: int, seed: int):
    """The pairs' rows as a function of the step (noise, sample, guidance and the token ids `TextConditions` reads)."""
    pick = epoch_batches(len(pairs), min(batch, len(pairs)), seed)

    def batch_for(step: int) -> dict:
        index = pick(step)
        return {"noise": pairs.noise[index], "sample": pairs.sample[index], "guidance": pairs.guidance[index],
                **{k: v[index] for k, v in pairs.ids.items()}}

    return batch_for
