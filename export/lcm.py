"""LCM's multistep consistency sampler in numpy, read from a diffusers `LCMScheduler` config.

Few-step students from `pocketdiff distill steps --method lcm` ship with an LCMScheduler config;
the exported pipelines run without torch, so the sampler is re-implemented here, held by a test to
diffusers' `LCMScheduler` timestep for timestep. Each step maps the sample to the student's
consistency estimate c_skip·x + c_out·x̂0; between steps fresh noise is added back at the next
timestep (drawn from the caller's numpy generator, so those draws are numpy's, not torch's).
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .ddim import alphas_cumprod, x0_and_eps


class LCM:
    def __init__(self, config: dict):
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.original_steps = int(config.get("original_inference_steps", 50))
        self.scaling = float(config.get("timestep_scaling", 10.0))

    def timesteps(self, steps: int) -> np.ndarray:
        """Evenly spaced picks from the student's training grid (k·1 − 1, …, k·original − 1), highest first."""
        k = len(self.alphas_cumprod) // self.original_steps
        origin = (np.arange(1, self.original_steps + 1) * k - 1)[::-1]
        if not 1 <= steps <= self.original_steps:
            raise UserError(f"an LCM student samples in 1 to {self.original_steps} steps, not {steps}")
        return origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]

    def denoised(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """The consistency estimate of the clean latent at timestep t."""
        scaled = t * self.scaling
        c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25) ** 0.5
        x0, _ = x0_and_eps(model_output, sample, self.alphas_cumprod[t], self.config.get("prediction_type", "epsilon"))
        return (c_out * x0 + c_skip * sample).astype(np.float32)

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, steps: int,
             rng: np.random.Generator | None = None) -> np.ndarray:
        """The next sample: the estimate itself after the last step, else the estimate noised to the next timestep."""
        schedule = list(self.timesteps(steps))
        denoised = self.denoised(model_output, t, sample)
        position = schedule.index(t)
        if position == len(schedule) - 1:
            return denoised
        alpha_next = self.alphas_cumprod[schedule[position + 1]]
        noise = (rng or np.random.default_rng()).standard_normal(sample.shape, dtype=np.float32)
        return (alpha_next ** 0.5 * denoised + (1 - alpha_next) ** 0.5 * noise).astype(np.float32)
