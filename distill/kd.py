"""Block-level knowledge distillation: a pruned UNet learns from the teacher it was cut from.

Loss = task (the denoising target) + output KD (the teacher's prediction) + feature KD at every
place the student still shares with the teacher (BK-SDM). Feature places are stage outputs
(`blocks`: each down block, the mid block, each up block, paired by stage after any stage removal),
or every transformer block's self-attention output (`self-attention`, KOALA's finding), paired
through the prune report's plan with the teacher layer each student layer came from. Pairs whose
shapes differ (a stage that lost its downsampler) are dropped and reported. LAPTOP-Diff's
normalisation divides each feature term by the teacher feature's mean square, so no block
dominates by its scale. The text encoder(s) and VAE stay the teacher's; only the UNet trains. An SDXL
teacher's UNet gets its added conditions as its pipeline computes them (`conditions.py`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field, model_validator

from .. import modelio
from ..errors import UserError
from ..folderhash import hash_model_folder
from .blocks import Plan, student_config, teacher_key, teacher_plan
from . import latents as latent_data
from .conditions import TextConditions, frozen_teacher
from .trainer import RunSettings, Trainer, last_logged

_STRUCTURE = ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "mid_block_type",
              "transformer_layers_per_block", "reverse_transformer_layers_per_block")


class KDConfig(RunSettings, latent_data.DataSettings):
    """Everything a KD run depends on; the recipe stage and the CLI both build one."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(300, ge=1, description="Optimiser steps.")
    batch: int = Field(64, ge=1, description="Latents per step.")
    lr: float = Field(1e-4, gt=0, description="Learning rate.")
    task_weight: float = Field(1.0, ge=0, description="Weight of the denoising loss on the data.")
    output_weight: float = Field(1.0, ge=0, description="Weight of the output KD term (the teacher's prediction).")
    feature_weight: float = Field(1.0, ge=0, description="Weight of the feature KD terms.")
    features: Literal["blocks", "self-attention", "none"] = Field("blocks", description="Feature KD places.")
    normalize: bool = Field(True, description="LAPTOP-Diff: each feature term relative to the teacher feature's mean square.")
    caption_dropout: float = Field(0.1, ge=0, le=1,
                                   description="Share of empty prompts, so the unconditional branch is distilled too.")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the saved student; 0: none.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory.")

    @model_validator(mode="after")
    def some_loss(self):
        if self.task_weight == self.output_weight == self.feature_weight == 0:
            raise ValueError("every loss weight is 0: nothing to train on")
        return self


def _structure(config: dict) -> dict:
    return {k: config.get(k) for k in _STRUCTURE}


def student_plan(teacher_config: dict, student_config_: dict, student_folder: Path) -> Plan | None:
    """Which teacher layer each student layer came from: the prune report's plan, the identity for an
    unpruned student, None when neither is known; UserError when the report names another teacher."""
    if _structure(teacher_config) == _structure(student_config_):
        return teacher_plan(teacher_config)
    report = student_folder / "prune_report.json"
    if not report.exists():
        return None
    plan = Plan.from_json(json.loads(report.read_text())["plan"])
    if _structure(student_config(teacher_config, plan)) != _structure(student_config_):
        raise UserError(f"{report}: the student was not pruned from this teacher (its plan gives another architecture)")
    return plan


def block_pairs(teacher_config: dict, student_config_: dict) -> list[tuple[str, str]]:
    """(student module, teacher module) for every stage output the student keeps: down, mid, up."""
    kept = len(student_config_["down_block_types"])
    offset = len(teacher_config["down_block_types"]) - kept
    pairs = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(kept)]
    if student_config_.get("mid_block_type", "UNetMidBlock2DCrossAttn") and teacher_config.get(
            "mid_block_type", "UNetMidBlock2DCrossAttn"):
        pairs.append(("mid_block", "mid_block"))
    return pairs + [(f"up_blocks.{j}", f"up_blocks.{j + offset}") for j in range(kept)]


def self_attention_pairs(student, plan: Plan, teacher_stages: int) -> list[tuple[str, str]]:
    """(student, teacher) self-attention (`attn1`) of every transformer block, mapped through the plan."""
    names = [name for name, _ in student.named_modules() if name.endswith(".attn1")]
    return [(name, teacher_key(name + ".weight", plan, teacher_stages).removesuffix(".weight")) for name in names]


class Taps:
    """Forward hooks that keep the named modules' outputs of the latest forward."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise UserError(f"no module {missing[0]} in {type(model).__name__}")
        self.handles = [modules[n].register_forward_hook(self._keeper(n)) for n in names]

    def _keeper(self, name: str):
        def hook(_module, _args, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def shape_matched(teacher, student, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The pairs whose features have one shape (kept) and those that do not (dropped), from one probe forward."""
    config = dict(teacher.config)
    size = 2 ** len(config["block_out_channels"])
    inputs = modelio.unet_example_inputs(config, size, device=teacher.device, generator=torch.Generator().manual_seed(0))
    s_taps, t_taps = Taps(student, [s for s, _ in pairs]), Taps(teacher, [t for _, t in pairs])
    try:
        with torch.no_grad():
            teacher(**inputs)
            student(**inputs)
    finally:
        s_taps.remove()
        t_taps.remove()
    same = [(s, t) for s, t in pairs if s_taps.outputs[s].shape == t_taps.outputs[t].shape]
    return same, [p for p in pairs if p not in same]


def feature_term(student_feature: torch.Tensor, teacher_feature: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Mean squared error, divided by the teacher feature's mean square when normalising (LAPTOP-Diff)."""
    error = (student_feature.float() - teacher_feature.float()).pow(2).mean()
    return error / teacher_feature.float().pow(2).mean().clamp(min=1e-8) if normalize else error


def resolve_teacher(student: modelio.ModelRef, teacher: str | None) -> modelio.ModelRef:
    """The teacher given, or the one the student's prune report names."""
    if teacher is not None:
        return modelio.open_model(teacher)
    report = student.path / "prune_report.json"
    if not report.exists():
        raise UserError(f"{student.path}: no prune_report.json names its teacher; give the teacher")
    named = Path(json.loads(report.read_text())["teacher"])
    if not named.exists():
        raise UserError(f"{report} names the teacher {named}, which is not there; give the teacher")
    return modelio.open_model(named)


def _check_pair(pipe, student_config_: dict) -> None:
    teacher_config = dict(pipe.unet.config)
    if teacher_config.get("time_cond_proj_dim"):
        raise UserError("KD feeds the UNet text conditions; this teacher also takes a guidance embedding "
                        "(time_cond_proj_dim), which KD does not build")
    if teacher_config.get("addition_embed_type") and not (teacher_config["addition_embed_type"] == "text_time"
                                                           and modelio.is_sdxl(pipe)):
        raise UserError(f"KD builds SDXL's added conditions from an SDXL pipeline's two text encoders; this teacher "
                        f"takes addition_embed_type {teacher_config['addition_embed_type']!r} without them")
    for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type"):
        if teacher_config.get(key) != student_config_.get(key):
            raise UserError(f"student and teacher differ in {key} ({student_config_.get(key)} vs "
                            f"{teacher_config.get(key)}): not a student of this teacher")


def choose_pairs(teacher, student, features: str, student_folder: Path) -> tuple[list, list]:
    """The (student, teacher) feature pairs of a KD run, and the candidates dropped for their shapes."""
    teacher_config, student_config_ = dict(teacher.config), dict(student.config)
    if features == "self-attention":
        plan = student_plan(teacher_config, student_config_, student_folder)
        if plan is None:
            raise UserError(f"{student_folder}: self-attention KD pairs layers through the prune report's plan; "
                            "this student has no prune_report.json (use features: blocks)")
        candidates = self_attention_pairs(student, plan, len(teacher_config["down_block_types"]))
    elif features == "blocks":
        candidates = block_pairs(teacher_config, student_config_)
    else:
        candidates = []
    return shape_matched(teacher, student, candidates) if candidates else ([], [])


class KDLoss:
    """Task + output KD + feature KD of one batch of cached latents; taps on both UNets collect the features."""

    def __init__(self, pipe, student, pairs: list[tuple[str, str]], config: KDConfig):
        from diffusers import DDPMScheduler

        self.teacher, self.conditions, self.student = pipe.unet, TextConditions(pipe), student
        self.pairs, self.config = pairs, config
        self.scale = pipe.vae.config.scaling_factor
        schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas, self.prediction = schedule.alphas_cumprod, schedule.config.prediction_type
        self.student_taps = Taps(student, [s for s, _ in pairs])
        self.teacher_taps = Taps(self.teacher, [t for _, t in pairs])

    def __call__(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        config, device, shape = self.config, batch["mean"].device, batch["mean"].shape
        z = (batch["mean"] + batch["std"] * torch.randn(shape, generator=generator, device=device)) * self.scale
        drop = torch.rand(shape[0], generator=generator, device=device) < config.caption_dropout
        t = torch.randint(0, len(self.alphas), (shape[0],), generator=generator, device=device)
        noise = torch.randn(shape, generator=generator, device=device)
        a = self.alphas.to(device)[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        with torch.no_grad():
            text = self.conditions(batch, drop)
            teacher_pred = self.teacher(noisy, t, **text).sample.float()
        pred = self.student(noisy, t, **text).sample.float()
        target = a.sqrt() * noise - (1 - a).sqrt() * z if self.prediction == "v_prediction" else noise
        terms = {"task": (pred - target).pow(2).mean(), "output_kd": (pred - teacher_pred).pow(2).mean()}
        per_pair = {f"feature/{s}": feature_term(self.student_taps.outputs[s], self.teacher_taps.outputs[t],
                                                 config.normalize) for s, t in self.pairs}
        terms["feature_kd"] = sum(per_pair.values()) if per_pair else torch.zeros((), device=device)
        self.student_taps.outputs.clear()
        self.teacher_taps.outputs.clear()
        loss = (config.task_weight * terms["task"] + config.output_weight * terms["output_kd"]
                + config.feature_weight * terms["feature_kd"])
        return {"loss": loss, **terms, **per_pair}

    def remove(self) -> None:
        self.student_taps.remove()
        self.teacher_taps.remove()


def distill_kd(teacher_ref: modelio.ModelRef, student_ref: modelio.ModelRef, config: KDConfig, out: Path,
               log=print) -> dict:
    """Train `student_ref`'s UNet from `teacher_ref`; write the student pipeline and `kd_report.json` to `out`."""
    from accelerate import PartialState

    out, processes = Path(out), PartialState()
    modelio.require_trained_pipeline(teacher_ref, "the KD teacher")
    if not student_ref.unet_has_weights:
        raise UserError(f"{student_ref.unet_path}: the student has no weights (prune a model with weights first)")
    pipe = modelio.load_pipeline(teacher_ref)
    student = modelio.load_unet(student_ref)
    _check_pair(pipe, dict(student.config))
    for frozen in frozen_teacher(pipe):
        frozen.eval().requires_grad_(False)
    pairs, dropped = choose_pairs(pipe.unet, student, config.features, student_ref.path)
    log(f"feature KD ({config.features}): {len(pairs)} pairs" + (f", {len(dropped)} dropped for shape" if dropped else ""))

    latents, batch_for = latent_data.training_batches(pipe, teacher_ref, config, config.seed, config.batch)

    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    loss = KDLoss(pipe, student, pairs, config)
    train_config = config.train_config(config.steps, config.lr, config.ema_decay)
    began = time.perf_counter()
    identity = {"teacher": hash_model_folder(teacher_ref.path), "student": hash_model_folder(student_ref.path),
                "config": config.model_dump()}
    trainer = Trainer(student, loss, batch_for, train_config, out, "kd", identity)
    resumed_at = trainer.step
    for frozen in frozen_teacher(pipe):
        frozen.to(trainer.accelerator.device)
    try:
        trainer.run()
    finally:
        loss.remove()
    student.load_state_dict(trainer.ema_state_dict())
    if config.gradient_checkpointing:
        student.disable_gradient_checkpointing()
    report = {
        "teacher": str(teacher_ref.path.resolve()), "student": str(student_ref.path.resolve()),
        "config": config.model_dump(), "pairs": [list(p) for p in pairs], "dropped_pairs": [list(p) for p in dropped],
        "training_images": len(latents), "data_free": bool(config.captions),
        "resumed_at_step": resumed_at, "wall_time_s": round(time.perf_counter() - began, 1),
        "final": last_logged(out / "log.csv"),
    }
    if processes.is_main_process:
        components_from = student_ref if student_ref.kind == "pipeline" else teacher_ref
        modelio.save_pipeline_with(components_from.path, out, "unet", student.to("cpu"))
        (out / "kd_report.json").write_text(json.dumps(report, indent=2))
    processes.wait_for_everyone()
    return report

