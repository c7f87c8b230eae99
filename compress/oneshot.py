"""One-shot layer pruning to a parameter, MAC or latency target, after LAPTOP-Diff.

1. Enumerate the teacher's removable units, as far as stock diffusers' config can express them
   (see `blocks`): a down-stage layer together with a layer of the up block mirroring it, a block's
   cross-attention, the mid block's attention, the mid block, the innermost stage, and one
   transformer block of an attention that has more than one (SDXL's deep ones). A unit whose
   kept neighbours would not fit their new place (channel counts) is not offered.
2. Score each unit alone:
   - `distortion`: how far the UNet's output moves when only that unit is removed, as squared error
     relative to the output's own energy, on inputs recorded along the teacher's sampling
     trajectories across timesteps. LAPTOP-Diff's finding that these one-at-a-time losses add up
     is what makes scoring units alone, once, enough.
   - `magnitude`: mean |w| of the weights the unit removes (a baseline).
   - `random`: seeded uniform scores (a baseline).
3. Select: remove the unit with the least score per unit of cost saved, again and again, until the
   target is met; then put back every removed unit the target can spare, the worst-scored first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import modelio
from ..distill.blocks import (MID_WITHOUT_ATTENTION, Plan, build_student, depth_left, instantiate, mapped_student,
                              shapes, teacher_depths, teacher_plan)
from ..errors import UserError
from ..macs import count
from ..progress import tracked

CRITERIA = ("distortion", "magnitude", "random")
METRICS = ("params", "macs", "latency")


@dataclass(frozen=True)
class Target:
    """Keep at most `ratio` of the teacher UNet's `metric`."""

    metric: str
    ratio: float

    def __str__(self) -> str:
        return f"{self.metric}={self.ratio:g}"


def parse_target(text: str) -> Target:
    metric, _, value = text.partition("=")
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if metric not in METRICS or not 0 < ratio < 1:
        raise UserError(f"target {text!r}: write params=R, macs=R or latency=R, R the fraction of the teacher to keep "
                        "(0 < R < 1)")
    return Target(metric, ratio)


@dataclass(frozen=True)
class Unit:
    """One removable unit; `apply` gives the plan without it, or None where it is already gone or cannot go."""

    name: str
    kind: str  # pair | down_attention | up_attention | mid_attention | mid | stage | transformer
    stage: int = -1
    down: int = -1
    up: int = -1
    depth: int = 0  # transformer: the teacher attention's transformer blocks

    def apply(self, plan: Plan) -> Plan | None:
        s = self.stage
        if self.kind == "transformer":
            names = self.name.split("+")
            for name in names:
                attention = name.rpartition(".transformer_blocks.")[0]
                if name in plan.dropped or depth_left(plan, attention, self.depth) <= 1:
                    return None  # already gone, or the attention's last block (the attention units' job)
            if not self._attends(plan):
                return None
            return plan.replace(dropped=tuple(sorted((*plan.dropped, *names))))
        if self.kind == "pair":
            if s >= plan.stages or len(plan.down[s]) < 2 or self.down not in plan.down[s] or self.up not in plan.up[s]:
                return None
            down, up = list(plan.down), list(plan.up)
            down[s] = tuple(i for i in down[s] if i != self.down)
            up[s] = tuple(i for i in up[s] if i != self.up)
            return plan.replace(down=tuple(down), up=tuple(up))
        if self.kind in ("down_attention", "up_attention"):
            flags = getattr(plan, self.kind)
            if s >= plan.stages or not flags[s]:
                return None
            return plan.replace(**{self.kind: flags[:s] + (False,) + flags[s + 1:]})
        if self.kind == "mid_attention":
            return plan.replace(mid=MID_WITHOUT_ATTENTION) if plan.mid == "UNetMidBlock2DCrossAttn" else None
        if self.kind == "mid":
            return plan.replace(mid=None) if plan.mid is not None else None
        innermost, keeps_two = plan.stages == s + 1, plan.stages > 2  # the innermost stage, leaving at least two
        return plan.replace(down=plan.down[:-1], up=plan.up[:-1]) if innermost and keeps_two else None

    def _attends(self, plan: Plan) -> bool:
        """Whether the attentions this transformer unit's blocks sit in are all still in `plan`."""
        s = self.stage
        if self.down >= 0 and not (s < plan.stages and plan.down_attention[s] and self.down in plan.down[s]):
            return False
        if self.up >= 0 and not (s < plan.stages and plan.up_attention[s] and self.up in plan.up[s]):
            return False
        return not self.name.startswith("mid_block") or plan.mid == "UNetMidBlock2DCrossAttn"


def apply_all(plan: Plan, units) -> Plan | None:
    for unit in units:
        plan = unit.apply(plan)
        if plan is None:
            return None
    return plan


class Costs:
    """A plan's parameter count, MAC count or predicted latency (None when it does not fit), cached.

    Latency comes from a `devices.lookup.LatencyTable`: the plan's layers summed, each timed once.
    """

    def __init__(self, config: dict, metric: str, table=None):
        if metric == "latency" and table is None:
            raise UserError("a latency target needs a latency table (devices.lookup.build_table)")
        self.config, self.metric, self.table = config, metric, table
        self.teacher_shapes = shapes(instantiate(config, "meta", torch.float32))
        self._known: dict[Plan, float | None] = {}

    def __call__(self, plan: Plan) -> float | None:
        if plan not in self._known:
            self._known[plan] = self._measure(plan)
        return self._known[plan]

    def _measure(self, plan: Plan) -> float | None:
        try:
            student, _ = mapped_student(self.config, self.teacher_shapes, plan)
        except UserError:
            return None
        if self.metric == "params":
            return float(sum(p.numel() for p in student.parameters()))
        if self.metric == "latency":
            return self.table.predict(dict(student.config))
        config = dict(student.config)
        inputs = modelio.unet_example_inputs(config, config["sample_size"], device="meta")
        return float(count(student, lambda m: m(**inputs), "unet", tuple(inputs["sample"].shape)).macs)


def removable_units(config: dict, costs: Costs) -> list[Unit]:
    """Every unit the teacher can lose on its own."""
    plan, stages = teacher_plan(config), len(config["down_block_types"])
    units = [Unit(f"down_blocks.{s}.layers.{d}+up_blocks.{stages - 1 - s}.layers.{u}", "pair", s, d, u)
             for s in range(stages) for d in plan.down[s] for u in plan.up[s]]
    units += [Unit(f"down_blocks.{s}.attentions", "down_attention", s) for s in range(stages)]
    units += [Unit(f"up_blocks.{stages - 1 - s}.attentions", "up_attention", s) for s in range(stages)]
    units += [Unit("mid_block.attentions", "mid_attention"), Unit("mid_block", "mid"),
              Unit(f"down_blocks.{stages - 1}+up_blocks.0", "stage", stages - 1)]
    units += transformer_units(config)
    return [u for u in units if (p := u.apply(plan)) is not None and costs(p) is not None]


def transformer_units(config: dict) -> list[Unit]:
    """One unit per transformer block of every teacher attention deeper than one block; where the mid block's
    depth is tied to the innermost down stage's first attention (see `blocks`), units of a block of each."""
    plan, stages = teacher_plan(config), len(config["down_block_types"])
    down_depth, up_depth, mid_depth = teacher_depths(config)

    def blocks(attention: str, depth: int, **where) -> list[Unit]:
        return [Unit(f"{attention}.transformer_blocks.{i}", "transformer", depth=depth, **where)
                for i in range(depth)] if depth > 1 else []

    units = []
    for s in range(stages):
        if plan.down_attention[s]:
            units += [u for d in plan.down[s] for u in blocks(f"down_blocks.{s}.attentions.{d}", down_depth[s][d],
                                                              stage=s, down=d)]
        if plan.up_attention[s]:
            units += [u for i in plan.up[s] for u in blocks(f"up_blocks.{stages - 1 - s}.attentions.{i}",
                                                            up_depth[s][i], stage=s, up=i)]
    if plan.mid == "UNetMidBlock2DCrossAttn":
        units += blocks("mid_block.attentions.0", mid_depth)
        if plan.down_attention[-1] and mid_depth > 1:
            first = f"down_blocks.{stages - 1}.attentions.{plan.down[-1][0]}.transformer_blocks"
            units += [Unit(f"mid_block.attentions.0.transformer_blocks.{i}+{first}.{i}", "transformer",
                           stage=stages - 1, down=plan.down[-1][0], depth=mid_depth) for i in range(mid_depth)]
    return units


def distortion_scores(unet, units: list[Unit], batches: list[dict]) -> dict[str, float]:
    """Output error of the UNet without each unit, relative to the teacher output's energy, over `batches`."""
    plan = teacher_plan(dict(unet.config))
    unet.eval()
    scores = {}
    with torch.no_grad():
        reference = [unet(**batch).sample for batch in batches]
        energy = sum(float(r.square().sum()) for r in reference)
        for unit in tracked(units, "scoring units"):
            student, _ = build_student(unet, unit.apply(plan))
            student.eval()
            error = sum(float((student(**b).sample - r).square().sum()) for b, r in zip(batches, reference))
            scores[unit.name] = error / energy
    return scores


def magnitude_scores(unet, units: list[Unit]) -> dict[str, float]:
    """Mean |w| over the weights each unit removes."""
    config, state = dict(unet.config), unet.state_dict()
    teacher_shapes, plan = shapes(unet), teacher_plan(config)
    scores = {}
    for unit in units:
        _, mapping = mapped_student(config, teacher_shapes, unit.apply(plan))
        kept = set(mapping.values())
        gone = [state[k] for k in state if k not in kept]
        scores[unit.name] = float(sum(w.abs().sum() for w in gone) / sum(w.numel() for w in gone))
    return scores


def random_scores(units: list[Unit], seed: int) -> dict[str, float]:
    return dict(zip((u.name for u in units), np.random.default_rng(seed).random(len(units)).tolist()))


def select(units: list[Unit], scores: dict[str, float], costs: Costs, start: Plan, target: Target) -> list[Unit]:
    """The units to remove: greedy by score per cost saved until the target holds, then what it can spare put back.

    A unit's saving is measured once, removed alone from the teacher (one-shot, like its score); the
    running cost is measured on the real plan after every removal.
    """
    full = costs(start)
    budget = target.ratio * full
    saving = {u.name: full - costs(u.apply(start)) for u in units}
    chosen, plan = [], start
    while costs(plan) > budget:
        ranked = sorted((u for u in units if u not in chosen), key=lambda u: scores[u.name] / max(saving[u.name], 1.0))
        for unit in ranked:
            pruned = unit.apply(plan)
            if pruned is not None and costs(pruned) is not None and costs(pruned) < costs(plan):
                chosen.append(unit)
                plan = pruned
                break
        else:
            raise UserError(f"{target} is out of reach: removing every unit that fits leaves "
                            f"{costs(plan) / full:.1%} of the {target.metric}")
    for unit in sorted(chosen, key=lambda u: -scores[u.name]):
        rest = [u for u in chosen if u is not unit]
        plan = apply_all(start, rest)
        if plan is not None and costs(plan) is not None and costs(plan) <= budget:
            chosen = rest
    return chosen
