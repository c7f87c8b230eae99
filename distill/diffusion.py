"""The diffusion arithmetic every step-distillation method and the exported samplers share, in torch.

A UNet output in any parameterisation (epsilon, v, sample) to its clean-sample and noise
estimates and back, deterministic DDIM between noise levels, LCM's boundary scalings, the guidance
embedding diffusers' pipelines feed a guidance-distilled UNet, and the classifier-free-guided
teacher. `steps.py` (LCM, progressive) and `dmd.py` (distribution matching) train with these;
`export/ddim.py` and `export/lcm.py` are their numpy twins, held to diffusers by tests.
"""

from __future__ import annotations

import copy
import math

import torch

from ..errors import UserError
from .conditions import map_conditions

GUIDANCE_DIM = 256  # diffusers' LCM students use 256 (`time_cond_proj_dim`)


def guidance_embedding(guidance: torch.Tensor, dim: int = GUIDANCE_DIM) -> torch.Tensor:
    """The student's guidance input: `guidance − 1` embedded exactly as diffusers' SD and LCM pipelines do."""
    w = (guidance.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def with_guidance_input(unet, dim: int = GUIDANCE_DIM):
    """A copy of `unet` that takes the embedded guidance scale, its projection zeroed: it starts as `unet`."""
    from diffusers import UNet2DConditionModel

    if unet.config.get("time_cond_proj_dim"):
        return copy.deepcopy(unet)
    config = {k: v for k, v in unet.config.items() if k != "_use_default_values"}  # else from_config drops our dim
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise UserError(f"cannot add a guidance input to this UNet (unexpected {unexpected[:2]}, missing {missing[:2]})")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(unet.device)


def as_column(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def x0_and_eps(output: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean-sample and noise estimates from a UNet output in its parameterisation; `a` is ᾱ_t per sample."""
    alpha, sigma = as_column(a).sqrt(), as_column(1 - a).sqrt()
    if prediction == "epsilon":
        return (x - sigma * output) / alpha, output
    if prediction == "v_prediction":
        x0 = alpha * x - sigma * output
        return x0, alpha * output + sigma * x
    return output, (x - alpha * output) / sigma  # "sample"


def output_for(x0: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction: str) -> torch.Tensor:
    """The UNet output, in its parameterisation, whose clean-sample estimate at x is `x0` (x0_and_eps inverted)."""
    alpha, sigma = as_column(a).sqrt(), as_column(1 - a).sqrt()
    if prediction == "epsilon":
        return (x - alpha * x0) / sigma
    if prediction == "v_prediction":
        return (alpha * x - x0) / sigma
    return x0


def ddim_to(x0: torch.Tensor, eps: torch.Tensor, a_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM: the point at ᾱ_next on the line that (x̂0, ε̂) define."""
    return as_column(a_next).sqrt() * x0 + as_column(1 - a_next).sqrt() * eps


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCMScheduler's c_skip and c_out at integer timesteps t (c_skip = 1, c_out = 0 at t = 0)."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return as_column(c_skip), as_column(c_out)


def consistency_output(output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, a: torch.Tensor,
                       prediction: str) -> torch.Tensor:
    """LCMScheduler's denoised sample from a UNet output at (x, t): c_skip·x + c_out·x̂0; `a` is ᾱ_t per sample."""
    c_skip, c_out = boundary_scalings(t)
    return c_skip * x + c_out * x0_and_eps(output, x, a, prediction)[0]


class GuidedTeacher:
    """The teacher's guided (x̂0, ε̂): a classifier-free pair, or one call where guidance is already embedded.
    `text` and `empty_text` are the UNet's text keyword arguments (`conditions.TextConditions`)."""

    def __init__(self, unet, prediction: str):
        self.unet, self.prediction = unet, prediction
        self.embedded = bool(unet.config.get("time_cond_proj_dim"))

    @torch.no_grad()
    def __call__(self, x, t, a, text: dict, empty_text: dict, guidance) -> tuple[torch.Tensor, torch.Tensor]:
        if self.embedded:
            cond = guidance_embedding(guidance, self.unet.config.time_cond_proj_dim)
            out = self.unet(x, t, **text, timestep_cond=cond.to(x.dtype)).sample.float()
            return x0_and_eps(out, x, a, self.prediction)
        both = map_conditions(lambda c, u: torch.cat([c, u]), text, empty_text)
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), **both).sample.float()
        x0_c, eps_c = x0_and_eps(out[:len(x)], x, a, self.prediction)
        x0_u, eps_u = x0_and_eps(out[len(x):], x, a, self.prediction)
        g = as_column(guidance)
        return x0_u + g * (x0_c - x0_u), eps_u + g * (eps_c - eps_u)


def alpha_at(alphas: torch.Tensor, final_alpha: float, t: torch.Tensor) -> torch.Tensor:
    """ᾱ at timesteps `t`; −1 (past the last step) is the schedule's final ᾱ, as DDIM and LCM step to it."""
    alphas = alphas.to(t.device)
    return torch.where(t >= 0, alphas[t.clamp(min=0)], torch.full_like(alphas[:1], final_alpha))
