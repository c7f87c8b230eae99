"""What every step-distillation method shares: its config, the batch parts each loss draws, one training round.

`steps.py` (LCM, progressive) and `dmd.py` (distribution matching) both build on these, and
`steps.distill_steps` dispatches between them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from . import latents as latent_data
from .conditions import TextConditions, frozen_teacher
from .trainer import RunSettings, Trainer, last_logged


class StepDistillConfig(RunSettings, latent_data.DataSettings):
    """Everything a step-distillation run depends on; the recipe stage and the CLI both build one."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["lcm", "progressive", "dmd", "ode"] = Field(
        "lcm", description="lcm, progressive, dmd (distribution matching) or ode (1 step: regression to the guided "
                           "teacher's samples).")
    teacher: str | None = Field(None, description="ode: the pipeline whose guided samples the student learns (a "
                                                  "folder or 'default'; default: the model itself).")
    steps: int = Field(500, ge=1, description="Optimiser steps (per round for progressive).")
    batch: int = Field(32, ge=1, description="Latents per step.")
    lr: float = Field(1e-4, gt=0, description="Learning rate.")
    guidance_min: float = Field(3.0, ge=1, description="Lowest guidance scale distilled into the student (drawn per "
                                                       "sample).")
    guidance_max: float = Field(9.0, ge=1, description="Highest guidance scale distilled into the student.")
    solver_steps: int = Field(50, ge=2, description="lcm, dmd: LCMScheduler's original_inference_steps (lcm: the "
                                                    "teacher's DDIM grid).")
    loss: Literal["huber", "l2"] = Field("huber", description="lcm: the consistency loss.")
    huber_c: float = Field(0.001, gt=0, description="lcm: the pseudo-Huber loss's c.")
    target_decay: float = Field(0.95, ge=0, lt=1, description="lcm: EMA rate of the target network.")
    start_steps: int = Field(16, ge=2, description="progressive: the teacher's steps in round 1; each round halves.")
    final_steps: int = Field(1, ge=1, description="progressive: the last student's steps.")
    prediction: Literal["teacher", "epsilon", "v_prediction", "sample"] | None = Field(
        None, description="progressive, ode: the student's output (default: progressive the teacher's, ode sample).")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="progressive, dmd, ode: EMA of the saved student.")
    fake_updates: int = Field(1, ge=1, description="dmd: fake-score updates per generator update (DMD2's two "
                                                   "time-scale rule uses 5).")
    regression_weight: float = Field(1.0, ge=0, description="dmd: weight of the regression to the teacher's samples; "
                                                            "0: distribution matching only.")
    regression_pairs: int = Field(1024, ge=1, description="dmd, ode: prompts the guided teacher samples once "
                                                          "(teacher_steps DDIM steps); past the training set's "
                                                          "captions, each comes again with new noise.")
    dm_min_step: int = Field(20, ge=0, description="dmd: lowest noise level of the distribution-matching gradient.")
    dm_max_step: int = Field(980, ge=0, description="dmd: highest noise level of the distribution-matching gradient.")

    @model_validator(mode="after")
    def coherent(self):
        if self.guidance_min > self.guidance_max:
            raise ValueError(f"guidance_min {self.guidance_min} is above guidance_max {self.guidance_max}")
        if self.dm_min_step > self.dm_max_step:
            raise ValueError(f"dm_min_step {self.dm_min_step} is above dm_max_step {self.dm_max_step}")
        if self.prediction is not None and self.method in ("lcm", "dmd"):
            raise ValueError(f"prediction is a progressive and ode setting; {self.method} keeps the teacher's")
        if self.teacher is not None and self.method != "ode":
            raise ValueError(f"teacher is an ode setting; {self.method} distils the model's own UNet")
        if self.method == "progressive":
            rounds = math.log2(self.start_steps / self.final_steps)
            if self.start_steps <= self.final_steps or rounds != int(rounds):
                raise ValueError(f"start_steps {self.start_steps} must be final_steps {self.final_steps} "
                                 "times a power of two (each round halves the steps)")
        return self

    def student_prediction(self, teacher: str) -> str:
        """The student's output type: as set ("teacher": the teacher's), else ode's x̂0 and the others' the teacher's."""
        if self.prediction is None:
            return "sample" if self.method == "ode" else teacher
        return teacher if self.prediction == "teacher" else self.prediction

    def student_step_counts(self) -> list[int]:
        """The step count each round's student learns: start/2, start/4, ... final (one entry for LCM)."""
        if self.method in ("lcm", "dmd"):
            return [self.solver_steps]
        if self.method == "ode":
            return [1]
        counts, n = [], self.start_steps
        while n > self.final_steps:
            n //= 2
            counts.append(n)
        return counts


class BatchParts:
    """The parts of a step both losses draw: text conditions, clean latents, guidance scales."""

    def __init__(self, pipe, config: StepDistillConfig):
        self.conditions, self.config = TextConditions(pipe), config
        self.scale = pipe.vae.config.scaling_factor

    @torch.no_grad()
    def draw(self, batch: dict, generator: torch.Generator):
        config, device, shape = self.config, batch["mean"].device, batch["mean"].shape
        z = (batch["mean"] + batch["std"] * torch.randn(shape, generator=generator, device=device)) * self.scale
        text, empty = self.conditions(batch), self.conditions.unconditional(shape[0], device)
        u = torch.rand(shape[0], generator=generator, device=device)
        guidance = config.guidance_min + (config.guidance_max - config.guidance_min) * u
        return z, text, empty, guidance


def train_round(trainer: Trainer, pipe, folder: Path, student_steps: int) -> dict:
    """Train with the frozen teacher parts on the trainer's device; the round's figures."""
    resumed_at = trainer.step
    for frozen in frozen_teacher(pipe):
        frozen.to(trainer.accelerator.device)
    began = time.perf_counter()
    trainer.run()
    return {"student_steps": student_steps, "resumed_at_step": resumed_at,
            "wall_time_s": round(time.perf_counter() - began, 1), "final": last_logged(folder / "log.csv")}
