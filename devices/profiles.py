"""Devices as data: `profiles/<name>.yaml` gives a device's peak throughput per compute unit and dtype,
its memory bandwidth, the runtimes it has, how to reach it, and where each figure comes from.

Phone figures are published numbers (labelled estimates); each phone carries a `calibration`: a
published latency of a known model (see `anchors`) and the fraction of roofline peak it implies,
so an estimate for a pruned variant is anchored to something measured. `host-cpu` has no figures
in its file: they are measured here at first use (a GEMM and a memory-copy micro-benchmark) and
cached per machine, since the same YAML serves every host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError
from .microbench import measured_host

PROFILES = Path(__file__).resolve().parent / "profiles"
DTYPES = ("fp32", "fp16", "int8")


class Calibration(BaseModel):
    """A published measurement of an anchor model on this device and the roofline fraction it implies."""

    model_config = ConfigDict(extra="forbid")
    model: str  # a name in anchors.ANCHORS
    unit: str
    dtype: str
    weight_bytes: float = Field(gt=0)  # bytes per weight as deployed (W8A16: 1; 6-bit palettized: 0.75)
    activation_bytes: float = Field(gt=0)
    measured_ms: float = Field(gt=0)
    source: str
    achieved_fraction: float | None = Field(None, gt=0, le=1)  # ideal roofline time ÷ measured; `calibrate` writes it
    borrowed_from: str | None = None  # when the fraction comes from another device's anchor


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    device: str
    soc: str
    kind: Literal["host", "android", "apple"]
    estimate: bool  # true: published or derived figures, not measured here
    compute: dict[str, dict[str, float | None]]  # unit → dtype → peak tera-ops/s (a multiply-add is two ops)
    memory_bandwidth_gb_s: float | None
    runtimes: list[str]
    reach: Literal["local", "adb", "mac"]
    sources: list[str] = Field(default_factory=list)
    calibration: Calibration | None = None

    def peak(self, unit: str, dtype: str) -> float:
        """Peak ops/s of `unit` at `dtype`."""
        if unit not in self.compute:
            raise UserError(f"device '{self.name}' has no {unit} (it has: {', '.join(self.compute)})")
        value = self.compute[unit].get(dtype)
        if value is None:
            raise UserError(f"device '{self.name}': no published {dtype} peak for its {unit} "
                            f"(known: {', '.join(k for k, v in self.compute[unit].items() if v)})")
        return value * 1e12

    @property
    def bandwidth(self) -> float:
        return self.memory_bandwidth_gb_s * 1e9


def names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def profile_path(name: str) -> Path:
    path = PROFILES / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"unknown device profile '{name}' (known: {', '.join(names())})")
    return path


def load_profile(name: str) -> DeviceProfile:
    """A profile by name; `host-cpu` and `host-gpu` get this machine's measured peaks filled in."""
    path = profile_path(name)
    try:
        profile = DeviceProfile(**yaml.safe_load(path.read_text()))
    except ValidationError as err:
        raise UserError(f"{path}: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}") from None
    if profile.kind == "host":
        measured = measured_host(name)
        profile.compute = measured["compute"]
        profile.memory_bandwidth_gb_s = measured["memory_bandwidth_gb_s"]
        profile.device = f"{profile.device}: {measured['device']}"
    return profile


def write_fraction(name: str, fraction: float) -> None:
    """Record a calibrated fraction in the profile's YAML, keeping its comments."""
    import re

    path = profile_path(name)
    text = path.read_text()
    updated, count = re.subn(r"(?m)^(\s*achieved_fraction:).*$", rf"\g<1> {fraction:.4f}", text)
    if count != 1:
        raise UserError(f"{path}: expected one 'achieved_fraction:' line under calibration")
    path.write_text(updated)
