"""`pocketdiff profile`: measure exported components on a device and say where the time goes.

On the host, each component is timed by `host` in a fresh process; on a phone, `remote` runs the
runtime's benchmark binary over adb. Each measurement is set against the device profile's
roofline for the same component at the same shapes (`roofline`), giving its roofline efficiency
(ideal time at peak ÷ measured): how much of the machine the backend actually uses.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import modelio
from ..charts import profile_chart
from ..errors import UserError
from . import host
from .profiles import load_profile

_FORMAT_FOLDERS = {"onnxruntime": "onnx", "executorch": "executorch", "coreml": "coreml"}


class ProfileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: Literal["onnxruntime", "executorch", "coreml", "torch"] = Field(
        "onnxruntime", description="The runtime that times it (coreml on macOS; torch: a model folder in eager).")
    device: str = Field("host-cpu", description="Device profile: host-cpu, host-gpu, or a phone (over adb / a Mac).")
    components: list[Literal["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder", "one_step"]] = Field(
        default_factory=lambda: ["unet"], min_length=1,
        description="The components timed (one_step: a one-step student's UNet, step and decoder as one program).")
    runs: int = Field(20, ge=1, description="Timed runs.")
    warmup: int = Field(3, ge=0, description="Untimed runs first.")
    batch: int | None = Field(None, ge=1, description="Batch per call (default: what the pipeline feeds).")
    threads: int | None = Field(None, ge=1, description="Runtime threads (default: the runtime's).")
    runner: Path | None = Field(None, description="Phone: the runtime's benchmark binary to push.")

    @model_validator(mode="after")
    def one_step_is_not_core_ml(self):
        if self.backend == "coreml" and "one_step" in self.components:
            raise ValueError("one_step is not a Core ML component (Swift calls the UNet and the decoder apart)")
        return self


def component_file(target: Path, backend: str, component: str) -> Path:
    """An exported component's file: `target` is the export folder, its format subfolder, or the file itself."""
    if target.is_file() or target.suffix == ".mlpackage":
        return target
    if backend == "coreml":
        from ..export.coreml import SWIFT_NAMES

        for path in (target / "coreml" / "Resources", target / "Resources", target):
            if (path / f"{SWIFT_NAMES[component]}.mlpackage").exists():
                return path / f"{SWIFT_NAMES[component]}.mlpackage"
        raise UserError(f"{target}: no Core ML export of {component} ({SWIFT_NAMES[component]}.mlpackage); "
                        "export it first: pocketdiff export MODEL --to coreml")
    name = host.BACKEND_FILES[backend]
    for folder in (target / _FORMAT_FOLDERS[backend], target):
        if (folder / component / name).exists():
            return folder / component / name
    raise UserError(f"{target}: no {backend} export of {component} (looked for "
                    f"{target / _FORMAT_FOLDERS[backend] / component / name} and {target / component / name}); "
                    f"export it first: pocketdiff export MODEL --to {_FORMAT_FOLDERS[backend]}")


def _config_folder(target: Path, file: Path, backend: str, component: str) -> Path:
    if backend != "torch":
        return file.parent
    sub = component if component in ("unet", "text_encoder", "text_encoder_2") else "vae"
    return target / sub if (target / sub / "config.json").exists() else target


def _efficiency(measurement: host.Measurement, config_folder: Path, device) -> dict:
    """The measured median against the device's roofline for the same component and shapes."""
    from .opcount import component_ops
    from .roofline import roofline

    unit = next(iter(device.compute))
    ops = component_ops(config_folder, measurement.component, measurement.inputs)
    ideal = roofline(ops, device, unit, "fp32")
    return {"unit": unit, "dtype": "fp32", "ideal_ms": ideal.ideal_ms, "gflop": ideal.flops / 1e9,
            "efficiency": ideal.ideal_ms / measurement.median_ms,
            "achieved_tflops": ideal.flops / (measurement.median_ms / 1000) / 1e12}


def _on_phone(target: Path, config: ProfileConfig, device) -> list[dict]:
    from .remote import Adb

    results = []
    for component in config.components:
        file = component_file(target, config.backend, component)
        with tempfile.TemporaryDirectory() as tmp:
            timed = Adb().time_model(config.backend, file, config.runner, config.runs, config.threads,
                                     Path(tmp) / "run.etdp")
            times = timed.get("times_ms") or [timed["average_ms"]]
            entry = {"backend": config.backend, "component": component, "file": str(file),
                     "file_bytes": host._size(file), "times_ms": times, "median_ms": statistics.median(times),
                     "peak_memory_bytes": timed.get("peak_memory_bytes"), "phone": timed}
            if "etdump" in timed:
                entry["ops"], entry["coverage"] = host.etdump_breakdown(Path(timed["etdump"]), [])
        results.append(entry)
    return results


def profile(target: Path | str, config: ProfileConfig, log=print) -> dict:
    """Measure every asked component of `target` on `config.device`; return the report (JSON-ready)."""
    target = Path(target)
    device = load_profile(config.device)
    if device.kind == "android":
        if config.backend not in ("executorch", "onnxruntime"):
            raise UserError(f"on an Android phone, profile executorch or onnxruntime exports (not {config.backend})")
        measurements = _on_phone(target, config, device)
    elif device.kind == "apple" and platform.system() != "Darwin":
        raise UserError(f"'{device.name}' is reached through a Mac: run this on macOS with --backend coreml "
                        f"(this is {platform.system()}); or estimate: pocketdiff estimate MODEL --device {device.name}")
    else:
        measurements = []
        if config.backend == "torch":
            target = modelio.open_model(str(target)).path  # 'default' names the embedded model
        for component in config.components:
            file = target if config.backend == "torch" else component_file(target, config.backend, component)
            log(f"{config.backend} {component}: {config.runs} runs after {config.warmup} warm-up …")
            measured = host.measure(config.backend, str(file), component, config.runs, config.warmup,
                                    config.batch, config.threads)
            entry = measured.to_json()
            folder = _config_folder(target, file, config.backend, component)
            # a Core ML package carries no config; the one-step program's ops are two models' (no roofline)
            if device.kind == "host" and (folder / "config.json").exists() and component != "one_step":
                entry["roofline"] = _efficiency(measured, folder, device)
            measurements.append(entry)
    return {"device": device.name, "device_description": device.device, "backend": config.backend,
            "runs": config.runs, "warmup": config.warmup, "threads": config.threads,
            "host": platform.platform(), "measurements": measurements}


def write_report(report: dict, out: Path) -> list[Path]:
    """`profile.json` and `profile.png` (per-op and per-block bars) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    profile_chart(report, out / "profile.png")
    return [out / "profile.json", out / "profile.png"]
