"""Parity between an export and PyTorch: per component on seeded inputs, and end to end on images.

Every exporter calls this as part of exporting, so an export that computes something else than
PyTorch fails (exit 2, naming the component and its error) instead of reaching an app.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError


IMAGE_CHECKS = {"image_psnr": "end-to-end", "one_step_image_psnr": "one-step program end-to-end"}  # report key: what


class ParityThresholds(BaseModel):
    """Limits per precision: fp32 is held to float rounding; fp16 and int8 to image quality."""

    model_config = ConfigDict(extra="forbid")

    max_abs_fp32: float = Field(1e-3, gt=0, description="fp32: per-component max-abs error limit.")
    max_rel_fp16: float = Field(5e-2, gt=0, description="fp16: per-component relative error limit.")
    psnr_fp32: float = Field(40.0, description="fp32: end-to-end image PSNR limit in dB.")
    psnr_fp16: float = Field(30.0, description="fp16: end-to-end image PSNR limit in dB.")
    # a 1-step ε-prediction image is (x - 0.998 ε) / 0.068: the int8 UNet's 2-3 % error reaches it ~15-fold
    psnr_int8: float = Field(22.0, description="int8: end-to-end image PSNR limit in dB.")


def compare(expected: dict, got: dict) -> dict:
    """Max-abs and relative (max-abs over the reference's max magnitude) error per output, and the worst."""
    per_output = {}
    for name, reference in expected.items():
        reference = np.asarray(reference, dtype=np.float64)
        value = np.asarray(got[name], dtype=np.float64)
        if value.shape != reference.shape:
            raise UserError(f"output {name}: shape {value.shape}, PyTorch gives {reference.shape}")
        max_abs = float(np.abs(value - reference).max()) if reference.size else 0.0
        per_output[name] = {"max_abs": max_abs, "rel": max_abs / max(float(np.abs(reference).max()), 1e-12)}
    worst = max(per_output.values(), key=lambda e: e["max_abs"])
    return {"max_abs": worst["max_abs"], "rel": max(e["rel"] for e in per_output.values()), "outputs": per_output}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 image stacks (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def component_failure(entry: dict, precision: str, thresholds: ParityThresholds) -> str | None:
    """Why a component fails its check, or None; int8 components are judged by the image alone."""
    if "max_abs" not in entry:  # not runnable here (Core ML off macOS): checked structurally instead
        return None
    if not np.isfinite(entry["max_abs"]):
        return "non-finite outputs"
    if precision == "fp32" and entry["max_abs"] > thresholds.max_abs_fp32:
        return f"max-abs error {entry['max_abs']:.3g} > {thresholds.max_abs_fp32:g}"
    if precision == "fp16" and entry["rel"] > thresholds.max_rel_fp16:
        return f"relative error {entry['rel']:.3g} > {thresholds.max_rel_fp16:g}"
    return None


def image_failure(value: float, precision: str, thresholds: ParityThresholds) -> str | None:
    limit = getattr(thresholds, f"psnr_{precision}")
    return None if value >= limit else f"image PSNR {value:.2f} dB < {limit:g} dB"


def write_report(report: dict, out: Path, thresholds: ParityThresholds) -> None:
    """Write `parity.json`; then raise naming every component (or the image) over its threshold."""
    precision = report["precision"]
    failures = []
    for name, entry in report["components"].items():
        why = component_failure(entry, entry.get("precision", precision), thresholds)
        entry["ok"] = why is None
        if why:
            failures.append(f"{report['format']} {name}: {why}")
    int8_part = any(entry.get("precision") == "int8" for entry in report["components"].values())
    for key, what in IMAGE_CHECKS.items():
        if key in report:
            why = image_failure(report[key], "int8" if int8_part else precision, thresholds)
            report[key.replace("psnr", "ok")] = why is None
            if why:
                failures.append(f"{report['format']} {what}: {why}")
    report["thresholds"] = thresholds.model_dump()
    report["ok"] = not failures
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "parity.json").write_text(json.dumps(report, indent=2, default=float))
    if failures:
        raise UserError("parity failed: " + "; ".join(failures) + f" (report: {Path(out) / 'parity.json'})")
