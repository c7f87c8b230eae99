"""Prune a model folder and save the result as a diffusers folder that stock diffusers loads.

A pipeline comes back as a pipeline with the pruned UNet swapped in; a bare UNet as a bare UNet.
An architecture-only input (configs, no weights) gives an architecture-only output, so SD-scale
presets can be sized and profiled without weights. The report names every removed layer and the
parameters and MACs before and after, per block.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..apps import modelio
from ..devices.macs import census_model
from .blocks import remove_blocks


def _copy_other_components(source: Path, out: Path) -> None:
    """model_index.json and every component folder it names, except the UNet being replaced."""
    index = json.loads((source / "model_index.json").read_text())
    shutil.copy2(source / "model_index.json", out / "model_index.json")
    for name, spec in index.items():
        if name != "unet" and isinstance(spec, list) and spec[0] and (source / name).is_dir():
            shutil.copytree(source / name, out / name, dirs_exist_ok=True)


def prune_preset(ref: modelio.ModelRef, preset: str, out: Path) -> dict:
    """Apply a BK-SDM preset to `ref`; write the pruned model and `prune_report.json` to `out`; return the report."""
    out = Path(out)
    if ref.unet_has_weights:
        teacher = modelio.load_unet(ref)
    else:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            teacher = UNet2DConditionModel.from_config(modelio.unet_config(ref))
    student, removed = remove_blocks(teacher, preset)
    out.mkdir(parents=True, exist_ok=True)
    unet_dir = out / "unet" if ref.kind == "pipeline" else out
    if ref.kind == "pipeline":
        _copy_other_components(ref.path, out)
    if ref.unet_has_weights:
        student.save_pretrained(unet_dir, safe_serialization=True)
    else:
        student.save_config(unet_dir)

    (before,) = census_model(ref, unet_only=True)
    (after,) = census_model(modelio.open_model(out), unet_only=True)
    report = {
        "preset": preset, "removed": removed,
        "params_before": before.params, "params_after": after.params,
        "macs_before": before.macs, "macs_after": after.macs,
        "attention_macs_before": before.attention_macs, "attention_macs_after": after.attention_macs,
        "blocks_before": {k: vars(v) for k, v in before.blocks.items()},
        "blocks_after": {k: vars(v) for k, v in after.blocks.items()},
        "random_weights": not ref.unet_has_weights,
    }
    (out / "prune_report.json").write_text(json.dumps(report, indent=2))
    return report
