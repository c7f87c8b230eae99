"""Which teacher layers a pruned UNet keeps, written so that stock diffusers' config describes it.

A `Plan` names, per down stage, the teacher layers (resnet + its attention) the student keeps and
the teacher layers kept by the up block that mirrors it; whether each block keeps its
cross-attention; the mid block's type; how many stages remain. Every plan maps onto config fields
diffusers already has (`layers_per_block` as a per-stage list, `DownBlock2D`/`UpBlock2D` for
attention-free stages, `mid_block_type` `UNetMidBlock2D` or null, fewer `block_out_channels`), so
the pruned UNet is a stock `UNet2DConditionModel` that `from_pretrained` rebuilds from its saved
config alone (segmind's in-place surgery without a config update broke their checkpoints). The
price: diffusers ties each up block to its down stage (one more layer, fed by the skips), so layers
go in down/up pairs, and attention goes per block, not per layer.

Deep transformers (SDXL's ten blocks per attention) lose single transformer blocks: the plan's
`dropped` names them, and the student's depth per attention is written as the nested
`transformer_layers_per_block` (per down layer) and `reverse_transformer_layers_per_block` (per up
layer) diffusers reads. Diffusers gives the mid block the depth of the innermost down stage's first
attention, so the two stay equal (a plan that parts them does not fit; `oneshot` offers units that
take a block of each).

BK-SDM's presets ("On Architectural Compression of Text-to-Image Diffusion Models") are plans:
- `bk-base`: one residual+attention pair per down stage instead of two, two per up stage instead of
  three (the middle one goes): down stages keep layer 0, up stages layers 0 and 2;
- `bk-small`: bk-base without the mid block;
- `bk-tiny`: bk-small without the innermost stage's down and up blocks.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass

import torch

from ..errors import UserError

PRESETS = ("bk-base", "bk-small", "bk-tiny")
# Config fields holding one value per stage, in down-block order (up blocks read them reversed).
_PER_STAGE = ("block_out_channels", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
              "cross_attention_dim", "only_cross_attention", "layers_per_block")
# The attention-free block each cross-attention block type becomes when its attention is removed.
PLAIN_BLOCK = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}
MID_WITHOUT_ATTENTION = "UNetMidBlock2D"


@dataclass(frozen=True)
class Plan:
    """The teacher layers a student keeps (indices are the teacher's)."""

    down: tuple[tuple[int, ...], ...]  # per kept down stage
    up: tuple[tuple[int, ...], ...]  # per kept down stage: the layers of the up block that mirrors it
    down_attention: tuple[bool, ...]  # per teacher stage; False turns a cross-attention block into a plain one
    up_attention: tuple[bool, ...]  # per teacher stage (the mirroring up block)
    mid: str | None  # mid_block_type
    dropped: tuple[str, ...] = ()  # teacher transformer blocks gone from attentions that stay, sorted

    @property
    def stages(self) -> int:
        return len(self.down)

    def replace(self, **changes) -> Plan:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        """The plan `dataclasses.asdict` wrote to a prune report."""
        return cls(down=tuple(map(tuple, data["down"])), up=tuple(map(tuple, data["up"])),
                   down_attention=tuple(data["down_attention"]), up_attention=tuple(data["up_attention"]),
                   mid=data["mid"], dropped=tuple(data.get("dropped", ())))


def _per_stage(value, stages: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * stages


def teacher_plan(config: dict) -> Plan:
    """The plan that keeps everything: the student it builds is the teacher."""
    stages = len(config["down_block_types"])
    layers = _per_stage(config["layers_per_block"], stages)
    up_types = list(reversed(config["up_block_types"]))
    return Plan(down=tuple(tuple(range(n)) for n in layers), up=tuple(tuple(range(n + 1)) for n in layers),
                down_attention=tuple(t in PLAIN_BLOCK for t in config["down_block_types"]),
                up_attention=tuple(t in PLAIN_BLOCK for t in up_types),
                mid=config.get("mid_block_type", "UNetMidBlock2DCrossAttn"))


def _per_layer(depth, layers: int) -> list[int]:
    return list(depth) if isinstance(depth, (list, tuple)) else [depth] * layers


def teacher_depths(config: dict) -> tuple[list[list[int]], list[list[int]], int]:
    """Transformer blocks in each teacher attention: per down stage and layer, per mirroring up block
    (indexed by its down stage) and layer, and the mid block's."""
    stages = len(config["down_block_types"])
    layers = _per_stage(config["layers_per_block"], stages)
    depth = _per_stage(config.get("transformer_layers_per_block", 1), stages)
    down = [_per_layer(d, n) for d, n in zip(depth, layers)]
    up_blocks = config.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    up = [_per_layer(d, n + 1) for d, n in zip(up_blocks, reversed(layers))][::-1]
    return down, up, down[-1][0]


def depth_left(plan: Plan, attention: str, depth: int) -> int:
    """Transformer blocks the plan keeps in a teacher attention of `depth` blocks."""
    return depth - sum(name.startswith(attention + ".") for name in plan.dropped)


def _write_depths(config: dict, teacher: dict, plan: Plan) -> None:
    """The student's depth per attention, in the nested fields diffusers reads (see the module docstring)."""
    stages, kept = len(teacher["down_block_types"]), plan.stages
    down_depth, up_depth, mid_depth = teacher_depths(teacher)
    down = [[depth_left(plan, f"down_blocks.{s}.attentions.{d}", down_depth[s][d]) for d in plan.down[s]]
            for s in range(kept)]
    up = [[depth_left(plan, f"up_blocks.{stages - 1 - s}.attentions.{u}", up_depth[s][u]) for u in plan.up[s]]
          for s in range(kept)]
    mid = depth_left(plan, "mid_block.attentions.0", mid_depth)
    if plan.mid == "UNetMidBlock2DCrossAttn":
        if not plan.down_attention[kept - 1]:
            down[-1] = [mid] * len(down[-1])  # a plain block ignores its depth: it can carry the mid block's
        elif down[-1][0] != mid:
            raise UserError(f"the mid block keeps {mid} transformer blocks and down_blocks.{kept - 1}'s first attention "
                            f"{down[-1][0]}: diffusers' config gives both one depth")
    config["transformer_layers_per_block"] = down
    config["reverse_transformer_layers_per_block"] = up[::-1]


def student_config(teacher: dict, plan: Plan) -> dict:
    """The diffusers UNet config of the student `plan` describes."""
    config = {k: v for k, v in teacher.items() if not k.startswith("_")}
    stages, kept = len(teacher["down_block_types"]), plan.stages
    if kept < stages:
        for key in _PER_STAGE:
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[:kept]
        if isinstance(config.get("reverse_transformer_layers_per_block"), (list, tuple)):
            config["reverse_transformer_layers_per_block"] = list(config["reverse_transformer_layers_per_block"])[stages - kept:]
    down_types, up_types = teacher["down_block_types"], list(reversed(teacher["up_block_types"]))
    config["down_block_types"] = [t if plan.down_attention[s] or t not in PLAIN_BLOCK else PLAIN_BLOCK[t]
                                  for s, t in enumerate(down_types[:kept])]
    config["up_block_types"] = list(reversed([t if plan.up_attention[s] or t not in PLAIN_BLOCK else PLAIN_BLOCK[t]
                                              for s, t in enumerate(up_types[:kept])]))
    layers = [len(d) for d in plan.down]
    config["layers_per_block"] = layers[0] if len(set(layers)) == 1 else layers
    config["mid_block_type"] = plan.mid
    if plan.dropped:
        _write_depths(config, teacher, plan)
    return config


def teacher_key(student_key: str, plan: Plan, teacher_stages: int) -> str:
    """The teacher parameter a student parameter is initialised from."""
    key = _teacher_layer_key(student_key, plan, teacher_stages)
    match = re.match(r"(.*\.attentions\.\d+)\.transformer_blocks\.(\d+)\.(.*)", key)
    if not match or not plan.dropped:
        return key
    attention, rest = match.group(1), match.group(3)
    kept = (i for i in itertools.count() if f"{attention}.transformer_blocks.{i}" not in plan.dropped)
    return f"{attention}.transformer_blocks.{next(itertools.islice(kept, int(match.group(2)), None))}.{rest}"


def _teacher_layer_key(student_key: str, plan: Plan, teacher_stages: int) -> str:
    """`teacher_key` up to the transformer block: the teacher layer a student layer came from."""
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", student_key)
    offset = teacher_stages - plan.stages
    if match:
        kind, block, part, layer, rest = match.groups()
        block, layer = int(block), int(layer)
        if kind == "down_blocks":
            return f"down_blocks.{block}.{part}.{plan.down[block][layer]}.{rest}"
        stage = plan.stages - 1 - block
        return f"up_blocks.{block + offset}.{part}.{plan.up[stage][layer]}.{rest}"
    match = re.match(r"up_blocks\.(\d+)\.(.*)", student_key)
    if match:
        return f"up_blocks.{int(match.group(1)) + offset}.{match.group(2)}"
    return student_key


def layer_names(keys) -> set[str]:
    """Removable units named by their parameters: 'down_blocks.0.resnets.1', 'mid_block', …"""
    names = set()
    for key in keys:
        parts = key.split(".")
        if parts[0] == "mid_block":
            names.add("mid_block" if len(parts) < 3 or parts[1] not in ("resnets", "attentions") else ".".join(parts[:3]))
        elif len(parts) > 3 and parts[2] in ("resnets", "attentions"):
            names.add(".".join(parts[:4]))
    return names


def instantiate(config: dict, device, dtype):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config(config).to(dtype)


def source_keys(student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size], plan: Plan,
                teacher_stages: int) -> dict[str, str]:
    """Student parameter → teacher parameter; UserError when a kept layer's shape does not fit its new place."""
    mapping = {}
    for key, shape in student_shapes.items():
        source = teacher_key(key, plan, teacher_stages)
        if teacher_shapes.get(source) != shape:
            raise UserError(f"no teacher weight of shape {tuple(shape)} for {key} (looked for {source})")
        mapping[key] = source
    return mapping


def shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def mapped_student(config: dict, teacher_shapes: dict[str, torch.Size], plan: Plan, device="meta",
                   dtype=torch.float32):
    """The uninitialised student `plan` describes and its student → teacher parameter map; UserError if it does not fit."""
    student = instantiate(student_config(config, plan), device, dtype)
    return student, source_keys(shapes(student), teacher_shapes, plan, len(config["down_block_types"]))


def build_student(unet, plan: Plan):
    """A new UNet as `plan` describes, every kept layer copied from `unet`; and the teacher layers removed."""
    teacher_state = unet.state_dict()
    student, mapping = mapped_student(dict(unet.config), shapes(unet), plan, unet.device, unet.dtype)
    student.load_state_dict({k: teacher_state[v] for k, v in mapping.items()}, assign=unet.device.type == "meta")
    kept = layer_names(mapping.values())
    removed = layer_names(teacher_state) - kept
    mid = {name for name in layer_names(teacher_state) if name.startswith("mid_block")}
    if mid and mid <= removed:
        removed = (removed - mid) | {"mid_block"}
    removed |= {name for name in plan.dropped if name.rpartition(".transformer_blocks.")[0] in kept}
    return student, sorted(removed)


def preset_plan(teacher: dict, preset: str) -> Plan:
    """The plan of a BK-SDM preset."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    layers = teacher["layers_per_block"]
    if not isinstance(layers, int) or layers < 2:
        raise UserError(f"{preset} needs layers_per_block ≥ 2 in every stage (this UNet has {layers})")
    plan = teacher_plan(teacher)
    plan = plan.replace(down=tuple((0,) for _ in plan.down), up=tuple((0, layers) for _ in plan.up))
    if preset in ("bk-small", "bk-tiny"):
        plan = plan.replace(mid=None)
    if preset == "bk-tiny":
        if plan.stages < 3:
            raise UserError("bk-tiny removes the innermost stage; this UNet has fewer than three")
        plan = plan.replace(down=plan.down[:-1], up=plan.up[:-1])
    return plan


def preset_config(teacher: dict, preset: str) -> dict:
    """The student's UNet config for a BK-SDM preset."""
    return student_config(teacher, preset_plan(teacher, preset))


def remove_blocks(unet, preset: str):
    """A new UNet with the preset's blocks removed, every kept layer copied from `unet`; and the removed layers."""
    try:
        return build_student(unet, preset_plan(dict(unet.config), preset))
    except UserError as err:
        raise UserError(f"{preset}: {err}") from None
