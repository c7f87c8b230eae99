"""Latency estimates for devices not at hand: a roofline per op, scaled by a measured fraction.

Each op takes the longer of its compute time (FLOPs ÷ the unit's peak) and its memory time
(bytes ÷ bandwidth; weights at their deployed width, activations at theirs); the ideal latency is
the sum. Real runtimes reach a fraction of that ideal; each phone profile records the fraction a
published measurement of a known model implies (`calibrate`), and an estimate divides the ideal by
it. A pruned variant of the same family on the same runtime is assumed to reach the same fraction:
that is what anchors the estimate to something measured.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .. import modelio
from ..errors import UserError
from .anchors import anchor
from .opcount import Op, unet_ops
from .profiles import DeviceProfile, load_profile

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass
class Estimate:
    device: str
    unit: str
    dtype: str
    ideal_ms: float  # the roofline at peak
    achieved_fraction: float | None
    calibration: str  # where the fraction comes from
    compute_bound_ms: float  # ideal time of the ops limited by compute
    memory_bound_ms: float
    flops: int
    bytes: int
    blocks_ms: dict[str, float] = field(default_factory=dict)  # estimated, per block
    ops_ms: dict[str, float] = field(default_factory=dict)  # estimated, per op type

    @property
    def estimate_ms(self) -> float | None:
        return self.ideal_ms / self.achieved_fraction if self.achieved_fraction else None

    def to_json(self) -> dict:
        return {**vars(self), "estimate_ms": self.estimate_ms}


def roofline(ops: list[Op], profile: DeviceProfile, unit: str, dtype: str, weight_bytes: float | None = None,
             activation_bytes: float | None = None, fraction: float | None = None, calibration: str = "") -> Estimate:
    if dtype not in BYTES:
        raise UserError(f"dtype {dtype!r}: choose from {', '.join(BYTES)}")
    peak, bandwidth = profile.peak(unit, dtype), profile.bandwidth
    weight_bytes = BYTES[dtype] if weight_bytes is None else weight_bytes
    activation_bytes = BYTES[dtype] if activation_bytes is None else activation_bytes
    scale = 1000.0 / fraction if fraction else 1000.0
    blocks, kinds = defaultdict(float), defaultdict(float)
    compute_bound = memory_bound = 0.0
    total_bytes = 0
    for op in ops:
        moved = op.weight_elements * weight_bytes + op.activation_elements * activation_bytes
        total_bytes += moved
        compute, memory = op.flops / peak, moved / bandwidth
        if compute >= memory:
            compute_bound += compute
        else:
            memory_bound += memory
        blocks[op.block] += max(compute, memory) * scale
        kinds[op.op] += max(compute, memory) * scale
    return Estimate(profile.name, unit, dtype, (compute_bound + memory_bound) * 1000, fraction, calibration,
                    compute_bound * 1000, memory_bound * 1000, sum(o.flops for o in ops), int(total_bytes),
                    dict(blocks), dict(sorted(kinds.items(), key=lambda kv: -kv[1])))


def calibrate(profile: DeviceProfile) -> float:
    """The fraction of its roofline the profile's anchor measurement reached (ideal ÷ measured)."""
    cal = profile.calibration
    if cal is None:
        raise UserError(f"device '{profile.name}' has no calibration measurement")
    if cal.borrowed_from:
        return calibrate(load_profile(cal.borrowed_from))
    ideal = roofline(anchor_ops(cal.model), profile, cal.unit, cal.dtype, cal.weight_bytes, cal.activation_bytes).ideal_ms
    return ideal / cal.measured_ms


@functools.lru_cache(maxsize=None)
def anchor_ops(name: str) -> tuple[Op, ...]:
    """The ops of an anchor model's measured call (counted once per process: seconds for an SD-scale UNet)."""
    model = anchor(name)
    return tuple(unet_ops(model.config, model.latent, model.batch))


def estimate(ops: list[Op], profile: DeviceProfile, unit: str | None = None, dtype: str | None = None,
             fraction: float | None = None) -> Estimate:
    """The profile's calibrated estimate for `ops` (the unit and dtype its anchor ran on, unless given).

    `fraction` overrides the recorded one: a host measurement gives its own.
    """
    cal = profile.calibration
    unit = unit or (cal.unit if cal else next(iter(profile.compute)))
    dtype = dtype or (cal.dtype if cal else "fp32")
    same = cal is not None and (cal.unit, cal.dtype) == (unit, dtype)
    if fraction is None and same:
        fraction = cal.achieved_fraction
        where = (f"{cal.measured_ms:g} ms for {cal.model} ({cal.source})"
                 + (f"; fraction borrowed from {cal.borrowed_from}" if cal.borrowed_from else ""))
    else:
        where = "given" if fraction else f"none: no anchor measured on {unit} at {dtype}, ideal roofline only"
    weights = cal.weight_bytes if same else None
    activations = cal.activation_bytes if same else None
    return roofline(ops, profile, unit, dtype, weights, activations, fraction, where)


def model_shapes(ref, component: str, batch: int | None = None, latent: int | None = None) -> tuple[Path, dict]:
    """The config folder and input shapes of one call of `component` of a model folder, as its pipeline calls it."""
    known = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
    if component not in known:
        raise UserError(f"unknown component {component!r} (known: {', '.join(known)})")
    unet = modelio.unet_config(ref)
    latent = latent or unet["sample_size"]
    if component == "unet":
        batch = batch or modelio.unet_batch(unet)
        return ref.unet_path, {"sample": [batch, unet["in_channels"], latent, latent]}
    if ref.kind != "pipeline":
        raise UserError(f"{ref.path}: a bare UNet folder has no {component}")
    if component.startswith("text_encoder"):
        if not (ref.path / component / "config.json").exists():
            raise UserError(f"{ref.path}: no {component} (only SDXL pipelines have text_encoder_2)")
        return ref.path / component, {"input_ids": [1, 77]}
    vae = json.loads((ref.path / "vae" / "config.json").read_text())
    factor = modelio.vae_scale_factor(ref)
    if component == "vae_decoder":
        return ref.path / "vae", {"latent_sample": [1, vae["latent_channels"], latent, latent]}
    return ref.path / "vae", {"sample": [1, vae["in_channels"], latent * factor, latent * factor]}


def estimate_model(ref, profile: DeviceProfile, components: list[str], unit: str | None = None,
                   dtype: str | None = None, latent: int | None = None, batch: int | None = None) -> dict[str, Estimate]:
    """Calibrated roofline estimates for components of a model folder (weights not needed) on `profile`."""
    from .opcount import component_ops

    estimates = {}
    for component in components:
        folder, shapes = model_shapes(ref, component, batch, latent)
        estimates[component] = estimate(component_ops(folder, component, shapes), profile, unit, dtype)
    return estimates
