"""BK-SDM block removal ("On Architectural Compression of Text-to-Image Diffusion Models").

The presets are expressed as diffusers config edits, so the pruned UNet is a stock
`UNet2DConditionModel` that `from_pretrained` rebuilds from its saved config alone (segmind's
in-place surgery without a config update broke their checkpoints):

- `bk-base`: one residual+attention pair per down stage instead of two, two per up stage instead of
  three (the middle one goes) → `layers_per_block: 1`;
- `bk-small`: bk-base without the mid block → `mid_block_type: null`;
- `bk-tiny`: bk-small without the innermost stage's down and up blocks.

Kept layers are initialised from the teacher layers they replace: down stages keep layer 0, up
stages keep the first and last layer (teacher pairs 0 and 2), and every other module keeps its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..apps.errors import UserError

PRESETS = ("bk-base", "bk-small", "bk-tiny")
# Config fields holding one value per stage, in down-block order (up blocks read them reversed).
_PER_STAGE = ("block_out_channels", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
              "cross_attention_dim", "only_cross_attention", "layers_per_block")


def preset_config(teacher: dict, preset: str) -> dict:
    """The student's UNet config for a BK-SDM preset."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    layers = teacher["layers_per_block"]
    if not isinstance(layers, int) or layers < 2:
        raise UserError(f"{preset} needs layers_per_block ≥ 2 in every stage (this UNet has {layers})")
    config = {k: v for k, v in teacher.items() if not k.startswith("_")}
    config["layers_per_block"] = 1
    if preset in ("bk-small", "bk-tiny"):
        config["mid_block_type"] = None
    if preset == "bk-tiny":
        if len(config["block_out_channels"]) < 3:
            raise UserError("bk-tiny removes the innermost stage; this UNet has fewer than three")
        for key in _PER_STAGE:
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[:-1]
        config["down_block_types"] = list(config["down_block_types"])[:-1]
        config["up_block_types"] = list(config["up_block_types"])[1:]
        if isinstance(config.get("reverse_transformer_layers_per_block"), (list, tuple)):
            config["reverse_transformer_layers_per_block"] = list(config["reverse_transformer_layers_per_block"])[1:]
    return config


@dataclass(frozen=True)
class LayerMap:
    """Which teacher layer each student layer starts from."""

    down_layers: list[int]
    up_layers: list[int]
    up_offset: int  # student up block j is teacher up block j + up_offset


def layer_map(teacher: dict, student: dict) -> LayerMap:
    kept_down = student["layers_per_block"]
    teacher_layers = teacher["layers_per_block"]
    up_layers = list(range(kept_down)) + [teacher_layers]  # first ones and the last (the one fed by the downsampler)
    offset = len(teacher["up_block_types"]) - len(student["up_block_types"])
    return LayerMap(list(range(kept_down)), up_layers, offset)


def teacher_key(student_key: str, layers: LayerMap) -> str:
    """The teacher parameter a student parameter is initialised from."""
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", student_key)
    if match:
        kind, block, part, layer, rest = match.groups()
        if kind == "down_blocks":
            return f"down_blocks.{block}.{part}.{layers.down_layers[int(layer)]}.{rest}"
        return f"up_blocks.{int(block) + layers.up_offset}.{part}.{layers.up_layers[int(layer)]}.{rest}"
    match = re.match(r"up_blocks\.(\d+)\.(.*)", student_key)
    if match:
        return f"up_blocks.{int(match.group(1)) + layers.up_offset}.{match.group(2)}"
    return student_key


def _layer_names(keys) -> set[str]:
    """Removable units named by their parameters: 'down_blocks.0.resnets.1', 'mid_block', …"""
    names = set()
    for key in keys:
        parts = key.split(".")
        if parts[0] == "mid_block":
            names.add("mid_block")
        elif len(parts) > 3 and parts[2] in ("resnets", "attentions"):
            names.add(".".join(parts[:4]))
    return names


def remove_blocks(unet, preset: str):
    """A new UNet with the preset's blocks removed, every kept layer copied from `unet`; and the removed layers."""
    from diffusers import UNet2DConditionModel

    config = preset_config(dict(unet.config), preset)
    with torch.device(unet.device):
        student = UNet2DConditionModel.from_config(config).to(unet.dtype)
    teacher_state = unet.state_dict()
    layers = layer_map(dict(unet.config), config)
    copied = {}
    for key, value in student.state_dict().items():
        source = teacher_key(key, layers)
        if source not in teacher_state or teacher_state[source].shape != value.shape:
            raise UserError(f"{preset}: no teacher weight of shape {tuple(value.shape)} for {key} (looked for {source})")
        copied[key] = teacher_state[source]
    student.load_state_dict(copied, assign=unet.device.type == "meta")
    removed = _layer_names(teacher_state) - _layer_names(teacher_key(k, layers) for k in copied)
    return student, sorted(removed)
