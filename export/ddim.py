"""The DDIM sampler (eta 0) in numpy, read from a diffusers `scheduler_config.json`.

Exported pipelines run without torch, so the scheduler is re-implemented here; a test holds it to
diffusers' `DDIMScheduler` timestep for timestep. Any SD-family scheduler config is accepted: its
betas, spacing and prediction type are honoured and sampling is deterministic DDIM, the sampler
a 1–4 step student is distilled for.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError


def alphas_cumprod(config: dict) -> np.ndarray:
    """ᾱ_t of a diffusers scheduler config, in float32 as diffusers computes them."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    schedule = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas"):
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float32) ** 2
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float32)
    else:
        raise UserError(f"scheduler beta_schedule '{schedule}' is not supported by the exported pipeline")
    if config.get("rescale_betas_zero_snr"):
        raise UserError("scheduler rescale_betas_zero_snr is not supported by the exported pipeline")
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float32), dtype=np.float32)


def x0_and_eps(model_output: np.ndarray, sample: np.ndarray, alpha: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Clean-sample and noise estimates from a UNet output in the config's prediction type."""
    if kind == "epsilon":
        return (sample - (1 - alpha) ** 0.5 * model_output) / alpha ** 0.5, model_output
    if kind == "v_prediction":
        return (alpha ** 0.5 * sample - (1 - alpha) ** 0.5 * model_output,
                alpha ** 0.5 * model_output + (1 - alpha) ** 0.5 * sample)
    if kind == "sample":
        return model_output, (sample - alpha ** 0.5 * model_output) / (1 - alpha) ** 0.5
    raise UserError(f"scheduler prediction_type '{kind}' is not supported by the exported pipeline")


class DDIM:
    def __init__(self, config: dict):
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.final_alpha = 1.0 if config.get("set_alpha_to_one", True) else float(self.alphas_cumprod[0])
        self.train_steps = len(self.alphas_cumprod)

    def timesteps(self, steps: int) -> np.ndarray:
        spacing, offset = self.config.get("timestep_spacing", "leading"), int(self.config.get("steps_offset", 0))
        n = self.train_steps
        if spacing == "trailing":
            return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        if spacing == "leading":
            return (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + offset
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        raise UserError(f"scheduler timestep_spacing '{spacing}' is not supported by the exported pipeline")

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, steps: int, rng=None) -> np.ndarray:
        """One deterministic step (`rng` unused: DDIM at eta 0 draws no noise)."""
        prev_t = t - self.train_steps // steps
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha
        x0, eps = x0_and_eps(model_output, sample, alpha, self.config.get("prediction_type", "epsilon"))
        if self.config.get("clip_sample"):
            limit = float(self.config.get("clip_sample_range", 1.0))
            x0 = np.clip(x0, -limit, limit)
        return (alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps).astype(np.float32)
