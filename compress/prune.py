"""Prune a model folder and save the result as a diffusers folder that stock diffusers loads.

Three ways in: a BK-SDM preset (`prune_preset`), named units on top of a preset or of the teacher
(`prune_units`: an architecture a researcher picks by hand, in the units a target run's report
names), or one-shot pruning to a parameter, MAC or latency target (`prune_to_target`). A pipeline
comes back as a pipeline with the pruned UNet swapped in; a bare UNet as a bare UNet. An
architecture-only input (configs, no weights) gives an architecture-only output, so SD-scale
presets can be sized and profiled without weights. The report names every removed layer and the
parameters and MACs before and after, per block; a target run adds every unit's score and the
order the units went in.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import modelio
from ..errors import UserError
from ..distill import scenes
from ..distill.blocks import Plan, build_student, preset_plan, remove_blocks, teacher_plan
from ..macs import census_model
from . import oneshot
from .calibration import batched, record_unet_inputs

CALIBRATION_PROMPTS = scenes.SHOWCASE_PROMPTS  # every prompt family of the embedded default


def _teacher(ref: modelio.ModelRef):
    """The teacher UNet: its weights, or an architecture on the meta device for a config-only folder."""
    if ref.unet_has_weights:
        return modelio.load_unet(ref)
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(modelio.unet_config(ref))


def _save(ref: modelio.ModelRef, student, removed: list[str], plan: Plan, out: Path, details: dict) -> dict:
    """Write the pruned model and `prune_report.json`; return the report.

    The report keeps the teacher's folder and the plan (which teacher layer each student layer came
    from), so distillation can pair student modules with the teacher modules they replace.
    """
    out.mkdir(parents=True, exist_ok=True)
    unet_dir = out / "unet" if ref.kind == "pipeline" else out
    if ref.kind == "pipeline":
        modelio.copy_pipeline_except(ref.path, out, "unet")
    if ref.unet_has_weights:
        student.save_pretrained(unet_dir, safe_serialization=True)
    else:
        student.save_config(unet_dir)
    (before,) = census_model(ref, unet_only=True)
    (after,) = census_model(modelio.open_model(out), unet_only=True)
    report = {
        **details, "teacher": str(ref.path.resolve()), "plan": dataclasses.asdict(plan), "removed": removed,
        "params_before": before.params, "params_after": after.params,
        "macs_before": before.macs, "macs_after": after.macs,
        "attention_macs_before": before.attention_macs, "attention_macs_after": after.attention_macs,
        "blocks_before": {k: vars(v) for k, v in before.blocks.items()},
        "blocks_after": {k: vars(v) for k, v in after.blocks.items()},
        "random_weights": not ref.unet_has_weights,
    }
    (out / "prune_report.json").write_text(json.dumps(report, indent=2))
    return report


def prune_preset(ref: modelio.ModelRef, preset: str, out: Path) -> dict:
    """Apply a BK-SDM preset to `ref`; write the pruned model and `prune_report.json` to `out`; return the report."""
    teacher = _teacher(ref)
    student, removed = remove_blocks(teacher, preset)
    return _save(ref, student, removed, preset_plan(dict(teacher.config), preset), Path(out), {"preset": preset})


def prune_units(ref: modelio.ModelRef, names: list[str], out: Path, preset: str | None = None) -> dict:
    """Remove the named units (`oneshot.removable_units`' names), in order, from `preset`'s plan or the teacher's."""
    teacher = _teacher(ref)
    config = dict(teacher.config)
    costs = oneshot.Costs(config, "params")
    units = {u.name: u for u in oneshot.removable_units(config, costs)}
    plan = preset_plan(config, preset) if preset else teacher_plan(config)
    for n, name in enumerate(names):
        if name not in units:
            raise UserError(f"{name!r} is not a removable unit of this UNet; its units: {', '.join(units)}")
        pruned = units[name].apply(plan)
        if pruned is None or costs(pruned) is None:
            raise UserError(f"{name} cannot go after {', '.join([preset or 'the teacher', *names[:n]])}: "
                            "it is gone already, or the layers left around it would not fit")
        plan = pruned
    student, removed = build_student(teacher, plan)
    return _save(ref, student, removed, plan, Path(out), {"preset": preset, "removed_units": list(names)})


def calibration_batches(ref: modelio.ModelRef, prompts: list[str], steps: int, guidance: float) -> list[dict]:
    """UNet inputs along the teacher pipeline's sampling trajectories, in batches of 16 calls."""
    config = modelio.unet_config(ref)
    if ref.kind != "pipeline":
        raise UserError(f"{ref.path}: the distortion criterion samples the teacher pipeline for calibration inputs; "
                        "give a pipeline folder, or use --criterion magnitude or random")
    if config.get("addition_embed_type") or config.get("time_cond_proj_dim"):
        raise UserError("the distortion criterion records SD-1/2-style UNet inputs; this UNet takes added conditions "
                        "(SDXL or a guidance-embedded student): use --criterion magnitude or random")
    pipe = modelio.load_pipeline(ref)
    return batched(record_unet_inputs(pipe, prompts, steps, guidance), 16)


def prune_to_target(ref: modelio.ModelRef, target: oneshot.Target, out: Path, criterion: str = "distortion",
                    prompts: list[str] | None = None, steps: int = 10, guidance: float = 7.5, seed: int = 0,
                    table=None) -> dict:
    """One-shot pruning of `ref`'s UNet to `target`; write the pruned model and its report to `out`.

    A latency target is judged by `table`, a lookup table of the teacher's layers on one device
    (`devices.lookup.table_for` reads or builds it), saved beside the pruned model for reuse.
    """
    if criterion not in oneshot.CRITERIA:
        raise UserError(f"unknown criterion {criterion!r} (choose from {', '.join(oneshot.CRITERIA)})")
    if criterion != "random" and not ref.unet_has_weights:
        raise UserError(f"{ref.unet_path}: architecture only (no weights); the {criterion} criterion reads the "
                        "teacher's weights (use --criterion random, or a preset)")
    prompts = prompts or CALIBRATION_PROMPTS
    batches = calibration_batches(ref, prompts, steps, guidance) if criterion == "distortion" else []
    teacher = _teacher(ref)
    config = dict(teacher.config)
    if target.metric == "latency" and table is None:
        raise UserError("a latency target needs the device's latency table (devices.lookup.table_for)")
    costs = oneshot.Costs(config, target.metric, table)
    units = oneshot.removable_units(config, costs)
    if criterion == "distortion":
        scores = oneshot.distortion_scores(teacher, units, batches)
    elif criterion == "magnitude":
        scores = oneshot.magnitude_scores(teacher, units)
    else:
        scores = oneshot.random_scores(units, seed)
    start = teacher_plan(config)
    chosen = oneshot.select(units, scores, costs, start, target)
    plan = oneshot.apply_all(start, chosen)
    student, removed = build_student(teacher, plan)
    full = costs(start)
    details = {
        "target": str(target), "criterion": criterion, "seed": seed,
        "calibration": {"prompts": prompts, "steps": steps, "guidance": guidance,
                        "unet_calls": sum(len(b["sample"]) for b in batches)} if batches else None,
        "units": [{"name": u.name, "score": scores[u.name],
                   "saves": 1 - costs(u.apply(start)) / full,
                   "removed_order": chosen.index(u) + 1 if u in chosen else None} for u in units],
        "removed_units": [u.name for u in chosen],
    }
    if table is not None:
        details.update(device=table.device, runtime=table.runtime, latency_ms_before=full, latency_ms_after=costs(plan))
        Path(out).mkdir(parents=True, exist_ok=True)
        table.save(Path(out) / "latency_table.json")
    return _save(ref, student, removed, plan, Path(out), details)


class PruneConfig(BaseModel):
    """Layer pruning, by a BK-SDM preset and/or named units, or one-shot to a target."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["bk-base", "bk-small", "bk-tiny"] | None = Field(None, description="BK-SDM preset.")
    remove: list[str] | None = Field(None, min_length=1, description=(
        "Units to remove, named as a target run's report names them (e.g. mid_block,down_blocks.2.attentions), "
        "after the preset when given."))
    target: str | None = Field(None, description="One-shot pruning to a target: params=R, macs=R or latency=R keeps "
                                                 "at most R of the teacher's.")
    criterion: Literal[oneshot.CRITERIA] = Field("distortion", description="With a target: "
                                                                    "how units are ranked.")
    device: str = Field("host-cpu", description="With latency=R: the device profile the latency is judged on.")
    runtime: Literal["torch", "onnxruntime", "executorch"] = Field(
        "torch", description="With latency=R on host-cpu: the runtime the lookup table's layers are timed in.")
    latency_table: Path | None = Field(None, description="With latency=R: a saved lookup table (latency_table.json "
                                                         "of an earlier run) instead of timing again.")
    prompts: list[str] | None = Field(None, min_length=1, json_schema_extra={"free_text": True, "also": ["--prompt"]},
                                      description=(
        "Calibration prompts of the distortion criterion (default: 16 built in)."))
    steps: int = Field(10, ge=1, description="Sampling steps of each calibration trajectory.")
    guidance: float = Field(7.5, ge=0, description="Guidance of the calibration trajectories.")
    seed: int = Field(0, description="Seed of the random criterion.")

    @field_validator("target")
    @classmethod
    def readable_target(cls, value):
        if value is not None:
            try:
                oneshot.parse_target(value)
            except UserError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def one_way(self):
        if (self.preset is None and self.remove is None) == (self.target is None):
            raise ValueError("give preset and/or remove, or else target")
        if self.latency_table is not None and (self.target is None or
                                               oneshot.parse_target(self.target).metric != "latency"):
            raise ValueError("latency_table goes with a latency=R target")
        return self


def prune(ref: modelio.ModelRef, config: PruneConfig, out: Path, table=None) -> dict:
    """`config`'s pruning of `ref` written to `out`: named units (after the preset, if any), a preset, or one-shot
    to a target (a latency target judged by `table`, `devices.lookup.table_for(ref, config)`); the report."""
    if config.remove:
        return prune_units(ref, config.remove, out, config.preset)
    if config.preset:
        return prune_preset(ref, config.preset, out)
    return prune_to_target(ref, oneshot.parse_target(config.target), out, config.criterion, config.prompts,
                           config.steps, config.guidance, config.seed, table)
