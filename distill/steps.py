"""Step distillation: a UNet that samples in 1–4 steps, guidance distilled into its weights.

Every method gives the student LCM's guidance input (`time_cond_proj_dim`, the guidance scale
embedded as stock diffusers' pipelines embed it, `guidance − 1`), added to the teacher's weights
with its projection zeroed so the student starts as the teacher. Stock diffusers then runs one UNet
evaluation per step and no classifier-free pair, and the saved scheduler (LCM's, or DDIM on the
trained grid) samples the student with the teacher's pipeline class (`StableDiffusionPipeline`,
`StableDiffusionXLPipeline`) at the distilled step count.

- `lcm` (Latent Consistency Models; diffusers' train_lcm_distill_sd_wds.py is the peer): one DDIM
  step of the guided teacher over a `solver_steps` grid, the student's consistency output
  (c_skip·x + c_out·x̂0, LCMScheduler's boundary scalings) matched to an EMA target's output on the
  teacher's next point, guidance scale drawn per sample.
- `progressive` (Salimans & Ho): rounds that halve the step count; each student matches two DDIM
  half-steps of its teacher (the original, guided, then the previous round's student) in one: the
  x̂0 that lands where the teacher lands, regressed in the student's own output space (ε, v or x0;
  ε weights high noise least, which is why v-prediction is offered for 1-step students).
- `dmd` (distribution matching, `dmd.py`): a fake score network tracks the student's samples, and
  the student follows the difference of the fake and the guided teacher's scores, plus regression
  to the teacher's own samples; sampled with LCMScheduler in 1, 2 or 4 steps.
- `ode` (`ode.py`, Luhman & Luhman's one-step student): regression of the student's one-step
  sample on the guided teacher's DDIM samples of the same noise, the teacher optionally another
  pipeline (a pruned student's original); sampled with LCMScheduler in 1 step.

The text encoder(s) and VAE stay the teacher's; only the UNet trains. Every UNet call takes the text
conditions its pipeline computes (`conditions.py`: SDXL's added conditions too).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from .. import modelio
from ..errors import UserError
from ..folderhash import hash_model_folder
from . import latents as latent_data
from .conditions import frozen_teacher
from .diffusion import (GuidedTeacher, alpha_at, as_column, consistency_output, ddim_to, guidance_embedding,
                        output_for, with_guidance_input, x0_and_eps)
from .dmd import train_dmd
from .ode import train_ode
from .step_common import BatchParts, StepDistillConfig, train_round
from .trainer import Trainer



class LCMLoss:
    """Latent consistency distillation of one batch; the trainer's EMA of the student is the target network."""

    def __init__(self, pipe, student, alphas: torch.Tensor, config: StepDistillConfig):
        self.student, self.config, self.alphas = student, config, alphas
        self.prediction = pipe.scheduler.config.prediction_type
        self.teacher = GuidedTeacher(pipe.unet, self.prediction)
        self.parts = BatchParts(pipe, config)
        k = len(alphas) // config.solver_steps
        self.grid = torch.arange(1, config.solver_steps + 1) * k - 1  # LCMScheduler's origin timesteps
        self.skip = k
        self.target_weights: dict[str, torch.Tensor] = {}

    def __call__(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        z, text, empty, guidance = self.parts.draw(batch, generator)
        device, n = z.device, z.shape[0]
        alphas = self.alphas.to(device)
        index = torch.randint(0, len(self.grid), (n,), generator=generator, device=device)
        t = self.grid.to(device)[index]
        t_prev = (t - self.skip).clamp(min=0)
        noise = torch.randn(z.shape, generator=generator, device=device)
        a, a_prev = alphas[t], alphas[t_prev]
        x = ddim_to(z, noise, a)
        cond = guidance_embedding(guidance, self.student.config.time_cond_proj_dim)

        out = self.student(x, t, **text, timestep_cond=cond).sample.float()
        pred = consistency_output(out, x, t, a, self.prediction)
        with torch.no_grad():
            x_prev = ddim_to(*self.teacher(x, t, a, text, empty, guidance), a_prev)
            target_out = torch.func.functional_call(self.student, self.target_weights, (x_prev, t_prev),
                                                    {**text, "timestep_cond": cond}).sample.float()
            target = consistency_output(target_out, x_prev, t_prev, a_prev, self.prediction)
        if self.config.loss == "huber":
            c = self.config.huber_c
            loss = ((pred - target).pow(2) + c * c).sqrt().mean() - c
        else:
            loss = (pred - target).pow(2).mean()
        return {"loss": loss, "x0_mse": (pred - target).pow(2).mean().detach()}


class ProgressiveLoss:
    """One round of progressive distillation: the student's one DDIM step against the teacher's two."""

    def __init__(self, pipe, teacher_unet, student, alphas: torch.Tensor, final_alpha: float, student_steps: int,
                 teacher_prediction: str, student_prediction: str, config: StepDistillConfig):
        self.student, self.alphas, self.final_alpha = student, alphas, final_alpha
        self.prediction = student_prediction
        self.teacher = GuidedTeacher(teacher_unet, teacher_prediction)
        self.parts = BatchParts(pipe, config)
        self.stride = len(alphas) // student_steps
        self.grid = len(alphas) - 1 - self.stride * torch.arange(student_steps)  # DDIM "trailing" timesteps

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return alpha_at(self.alphas, self.final_alpha, t)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        z, text, empty, guidance = self.parts.draw(batch, generator)
        device, n = z.device, z.shape[0]
        t = self.grid.to(device)[torch.randint(0, len(self.grid), (n,), generator=generator, device=device)]
        t_mid, t_end = t - self.stride // 2, t - self.stride
        a, a_mid, a_end = self._alpha(t), self._alpha(t_mid), self._alpha(t_end)
        x = ddim_to(z, torch.randn(z.shape, generator=generator, device=device), a)
        with torch.no_grad():
            x_mid = ddim_to(*self.teacher(x, t, a, text, empty, guidance), a_mid)
            x_end = ddim_to(*self.teacher(x_mid, t_mid, a_mid, text, empty, guidance), a_end)
            ratio = as_column((1 - a_end) / (1 - a)).sqrt()
            x0_target = (x_end - ratio * x) / (as_column(a_end).sqrt() - ratio * as_column(a).sqrt())
        cond = guidance_embedding(guidance, self.student.config.time_cond_proj_dim)
        out = self.student(x, t, **text, timestep_cond=cond).sample.float()
        x0 = x0_and_eps(out, x, a, self.prediction)[0]
        target = output_for(x0_target, x, a, self.prediction)
        return {"loss": (out - target).pow(2).mean(), "x0_mse": (x0 - x0_target).pow(2).mean().detach()}


def _schedule(pipe) -> tuple[torch.Tensor, float]:
    from diffusers import DDPMScheduler

    config = pipe.scheduler.config
    alphas = DDPMScheduler.from_config(config).alphas_cumprod.float()
    final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas[0])
    return alphas, final


def _student_scheduler(pipe, config: StepDistillConfig, prediction: str):
    """The scheduler that samples the student on the grid it learned, in stock diffusers."""
    from diffusers import DDIMScheduler, LCMScheduler

    if config.method in ("lcm", "dmd", "ode"):
        return LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=config.solver_steps,
                                        timestep_scaling=10.0, prediction_type=prediction)
    return DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", prediction_type=prediction,
                                     clip_sample=False, thresholding=False)


def distill_steps(model_ref: modelio.ModelRef, config: StepDistillConfig, out: Path, log=print) -> dict:
    """Distil `model_ref`'s UNet to few steps; write the student pipeline and `steps_report.json` to `out`."""
    from accelerate import PartialState

    out, processes = Path(out), PartialState()
    modelio.require_trained_pipeline(model_ref, "step distillation")
    pipe = modelio.load_pipeline(model_ref)
    teacher_prediction = pipe.scheduler.config.prediction_type
    prediction = config.student_prediction(teacher_prediction)
    alphas, final_alpha = _schedule(pipe)
    bad = [n for n in config.student_step_counts() if len(alphas) % n]
    if bad:
        raise UserError(f"{bad[0]} steps do not divide the {len(alphas)} training timesteps: the student's grid would "
                        "not be the one diffusers samples (choose step counts that divide it)")
    for frozen in frozen_teacher(pipe):
        frozen.eval().requires_grad_(False)

    latents, batch_for = latent_data.training_batches(pipe, model_ref, config, config.seed, config.batch)

    began, identity = time.perf_counter(), {"teacher": hash_model_folder(model_ref.path), "config": config.model_dump()}
    student = with_guidance_input(pipe.unet).train().requires_grad_(True)
    rounds = []
    if config.method == "lcm":
        loss = LCMLoss(pipe, student, alphas, config)
        train = config.train_config(config.steps, config.lr, config.target_decay)  # the EMA is LCM's target network
        trainer = Trainer(student, loss, batch_for, train, out, "lcm", identity)
        loss.target_weights = trainer.ema
        rounds.append(train_round(trainer, pipe, out, config.solver_steps))
    elif config.method == "dmd":
        rounds.append(train_dmd(pipe, model_ref.path, student, latents, batch_for, alphas, final_alpha,
                                _student_scheduler(pipe, config, prediction), config, out, identity))
    elif config.method == "ode":
        rounds.append(train_ode(pipe, model_ref, student, latents.captions, alphas, final_alpha,
                                _student_scheduler(pipe, config, prediction), config, out, identity))
    else:
        teacher = pipe.unet
        for n in config.student_step_counts():
            folder = out / "rounds" / f"{n}-steps"
            if (folder / "unet" / "config.json").exists():
                student = modelio.load_unet(modelio.open_model(folder / "unet")).train().requires_grad_(True)
                rounds.append(json.loads((folder / "round.json").read_text()))
            else:
                loss = ProgressiveLoss(pipe, teacher, student, alphas, final_alpha, n,
                                       teacher_prediction if teacher is pipe.unet else prediction, prediction, config)
                train = config.train_config(config.steps, config.lr, config.ema_decay)
                trainer = Trainer(student, loss, batch_for, train, folder, f"progressive → {n} steps",
                                  {**identity, "round": n})
                rounds.append(train_round(trainer, pipe, folder, n))
                student.load_state_dict(trainer.ema_state_dict())
                if processes.is_main_process:
                    student.save_pretrained(folder / "unet", safe_serialization=True)
                    (folder / "round.json").write_text(json.dumps(rounds[-1], indent=2))
            log(f"{config.method}: {n}-step student trained ({rounds[-1]['wall_time_s']} s)")
            teacher = copy.deepcopy(student).eval().requires_grad_(False)
    report = {"method": config.method, "teacher": str(model_ref.path.resolve()), "config": config.model_dump(),
              "prediction_type": prediction, "rounds": rounds,
              "sample_steps": {"progressive": [config.final_steps], "ode": [1]}.get(config.method, [1, 2, 4]),
              "training_images": len(latents), "data_free": bool(config.captions),
              "wall_time_s": round(time.perf_counter() - began, 1)}
    if processes.is_main_process:
        modelio.save_pipeline_with(model_ref.path, out, "unet", student.to("cpu").eval())
        _write_scheduler(_student_scheduler(pipe, config, prediction), out)
        (out / "steps_report.json").write_text(json.dumps(report, indent=2))
    processes.wait_for_everyone()
    return report


def _write_scheduler(scheduler, out: Path) -> None:
    """The student's scheduler config, and model_index.json naming its class so stock diffusers loads it."""
    scheduler.save_pretrained(out / "scheduler")
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    index_path.write_text(json.dumps(index, indent=2))

