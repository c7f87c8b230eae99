"""One-step distillation by regression to the guided teacher's ODE samples (Luhman & Luhman 2021).

Why: sampled deterministically (DDIM, classifier-free guidance), the teacher is a function from
(noise, prompt, guidance) to a latent. A 1-step student can learn that function directly: the
guided teacher samples `regression_pairs` prompts once (DMD's cached pairs), and the student
regresses each pair's sample from its noise in one call. LCM and DMD spend their budget on
consistency along the whole trajectory, which a few hundred CPU steps never carry down to one
step; the regression is the signal a 1-step student needs, from its first step.

- The teacher may be another pipeline than the student's (`teacher`): a pruned and distilled
  student then learns the original teacher's samples, not its own weaker ones. The two must share
  the latent shape and the tokenizer (the pairs' token ids feed the student's own text encoder).
- The student's output is `prediction` ("sample" unless set): at the 1-step timestep
  (t = 999, ᾱ ≈ 0.0047) an ε output reaches the image as (x − 0.998 ε) / 0.068, so every error in
  it is amplified ~15-fold, while an x̂0 output is the image itself. The saved `LCMScheduler`
  carries that prediction type; at one step it computes exactly what the loss trained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import modelio
from ..errors import UserError
from ..folderhash import hash_model_folder
from .conditions import TextConditions, caption_ids, frozen_teacher
from .pairs import OneStep, pair_batches, pair_regression, teacher_pairs
from .step_common import StepDistillConfig, train_round
from .trainer import Trainer


def _teacher(student_pipe, student_ref: modelio.ModelRef, config: StepDistillConfig, captions: list[str]):
    """The pipeline that samples the pairs, and its folder: `config.teacher`, else the student's own pipeline."""
    if config.teacher is None:
        return student_pipe, student_ref.path
    ref = modelio.open_model(config.teacher)
    modelio.require_trained_pipeline(ref, "the ode teacher")
    pipe = modelio.load_pipeline(ref)
    mine, theirs = student_pipe.unet.config, pipe.unet.config
    for key in ("in_channels", "sample_size"):
        if mine[key] != theirs[key]:
            raise UserError(f"student and teacher differ in {key} ({mine[key]} vs {theirs[key]}): the student cannot "
                            "regress the teacher's latents")
    probe = captions[:64]
    if any(not torch.equal(a, b) for a, b in zip(caption_ids(student_pipe, probe).values(),
                                                 caption_ids(pipe, probe).values())):
        raise UserError("student and teacher tokenize captions differently: the teacher's pairs cannot condition "
                        "the student")
    for frozen in frozen_teacher(pipe):
        frozen.eval().requires_grad_(False)
    return pipe, ref.path


def train_ode(pipe, student_ref: modelio.ModelRef, student, captions: list[str], alphas: torch.Tensor,
              final_alpha: float, scheduler, config: StepDistillConfig, out: Path, identity: dict) -> dict:
    """Train `student` (in place) to give the teacher's sample in one step of `scheduler` (the student's
    `LCMScheduler`); the run's figures."""
    teacher_pipe, teacher_folder = _teacher(pipe, student_ref, config, captions)
    pairs = teacher_pairs(teacher_pipe, teacher_folder, captions, alphas, final_alpha, config)
    scheduler.set_timesteps(1)
    one_step = OneStep(student, alphas, final_alpha, scheduler.config.prediction_type, int(scheduler.timesteps[0]))
    conditions = TextConditions(pipe)
    loss = lambda batch, _generator: {"loss": pair_regression(one_step, conditions, batch)}  # noqa: E731
    train = config.train_config(config.steps, config.lr, config.ema_decay)
    trainer = Trainer(student, loss, pair_batches(pairs, config.batch, config.seed + 1), train, out, "ode",
                      {**identity, "pairs_teacher": hash_model_folder(teacher_folder)})
    figures = train_round(trainer, pipe, out, 1)
    if config.ema_decay:
        student.load_state_dict(trainer.ema_state_dict())
    return {**figures, "regression_pairs": len(pairs), "pairs_teacher": str(Path(teacher_folder).resolve())}
