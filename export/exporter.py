"""`export_model`: every component of a model to each requested format, each checked against PyTorch.

One loop for all formats: wrap the components (`components.py`), hand each to the format's
`export_component`, run the written file on the same seeded inputs and compare, then (for
pipelines, where the runtime exists here) generate images from the export and from PyTorch with
the same starting noise and compare those. The per-format `parity.json` and the overall
`export_report.json` hold times, file sizes and errors; any check over its threshold exits 2.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..apps import modelio
from . import parity
from .clip_bpe import write_vocab_and_merges
from .components import PIPELINE_COMPONENTS, model_components, trace_latent_size

Format = Literal["onnx", "executorch", "coreml"]


class ExportConfig(BaseModel):
    """What to export and how hard to check it."""

    model_config = ConfigDict(extra="forbid")

    to: list[Format] = Field(default_factory=lambda: ["onnx"], min_length=1)
    precision: Literal["fp32", "fp16", "int8"] | None = None  # None: each format's default (Core ML fp16)
    components: list[Literal["text_encoder", "unet", "vae_encoder", "vae_decoder"]] = Field(
        default_factory=lambda: list(PIPELINE_COMPONENTS), min_length=1)
    executorch_backends: list[str] = Field(default_factory=lambda: ["xnnpack"], min_length=1)
    prompts: list[str] = Field(default_factory=lambda: ["red apple", "rocket"], min_length=1)
    steps: int = Field(4, ge=1)
    guidance: float = Field(7.5, ge=0)
    thresholds: parity.ParityThresholds = Field(default_factory=parity.ParityThresholds)


def _format_module(name: str):
    if name == "onnx":
        from . import onnx as module
    elif name == "executorch":
        from . import executorch as module
    else:
        from . import coreml as module
    return module


def write_optimum_layout(ref: modelio.ModelRef, out: Path, names: list[str]) -> None:
    """model_index.json, tokenizer/, scheduler/ as they are, and each component's config.json."""
    out.mkdir(parents=True, exist_ok=True)
    if ref.kind == "unet":
        shutil.copy2(ref.path / "config.json", out / "unet" / "config.json")
        return
    for item in ("model_index.json", "tokenizer", "scheduler", "feature_extractor"):
        source = ref.path / item
        if source.is_dir():
            shutil.copytree(source, out / item, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy2(source, out / item)
    if (out / "tokenizer").is_dir() and not (out / "tokenizer" / "vocab.json").exists():
        write_vocab_and_merges(out / "tokenizer", out / "tokenizer")  # apps' BPE readers want CLIP's two files
    for name in names:
        source = ref.path / ("vae" if name.startswith("vae") else name) / "config.json"
        shutil.copy2(source, out / name / "config.json")


def _numpy(tensors: dict) -> dict:
    return {k: v.detach().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in tensors.items()}


def torch_images(pipe, prompts: list[str], steps: int, guidance: float, latents: np.ndarray) -> np.ndarray:
    """The PyTorch pipeline's uint8 images from the given starting latents."""
    import torch

    result = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  latents=torch.from_numpy(latents))
    return (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)


def _int8_origin(quantization: tuple[dict, dict] | None) -> str:
    """Where the int8 UNet came from, for the report: the model's own quantization or the export's fallback."""
    if quantization is None:
        return "post-training at export: xnnpack int8, linear"
    spec = quantization[0]
    return f"saved: {spec['backend']} int8, {'QAT' if spec['qat'] else 'post-training'}, {spec['layers']}"


def export_format(fmt: str, ref: modelio.ModelRef, pipe, config: ExportConfig, out: Path, seed: int = 0,
                  log=print) -> dict:
    """Export every asked component to one format under `out`; return (and write) its parity report."""
    module = _format_module(fmt)
    precision = config.precision or module.DEFAULT_PRECISION
    module.check_precision(precision)
    names = list(config.components) if ref.kind == "pipeline" else ["unet"]
    size = trace_latent_size(modelio.unet_config(ref)) if module.DYNAMIC_SHAPES else None
    report = {"format": fmt, "precision": precision, "model": str(ref.path), "components": {}}
    for component in model_components(ref, pipe, tuple(names), size):
        if hasattr(module, "adapt"):
            component = module.adapt(component, pipe, ref)
        began = time.perf_counter()
        # int8 is for the UNet, where the time goes; text encoder and VAE stay fp32 (the usual deployment)
        own_precision = "fp32" if precision == "int8" and component.name != "unet" else precision
        extra = {"backends": tuple(config.executorch_backends)} if fmt == "executorch" else {}
        if own_precision == "int8":
            from ..compress.quantize import read_quantization

            extra["quantization"] = read_quantization(ref)
        if own_precision == "int8" and pipe is not None and extra["quantization"] is None:
            from ..compress.calibration import record_unet_inputs

            extra["calibration"] = record_unet_inputs(pipe, config.prompts, config.steps, config.guidance)
        path = module.export_component(component, out / component.name, own_precision, **extra)
        entry = {"file": str(path.relative_to(out)), "precision": own_precision, "bytes": module.file_bytes(path),
                 "export_seconds": round(time.perf_counter() - began, 2)}
        if own_precision == "int8":
            entry["quantization"] = _int8_origin(extra["quantization"])
        runner = module.load(path)
        if runner is None:
            entry.update(module.structural_check(path, component))
            entry["numeric"] = module.NO_RUNTIME_REASON
        else:
            expected = _numpy(component.run())
            entry.update(parity.compare(expected, runner(_numpy(component.inputs))))
        report["components"][component.name] = entry
        check = entry.get("numeric") or f"max-abs {entry['max_abs']:.2e} vs PyTorch"
        log(f"{fmt} {component.name}: {entry['bytes'] / 1e6:.1f} MB in {entry['export_seconds']:.1f} s, {check}")
    module.write_layout(ref, out, names)
    if ref.kind == "pipeline" and module.RUNS_PIPELINE and {"text_encoder", "unet", "vae_decoder"} <= set(names):
        from .lcm import LCM
        from .runtime import ExportedPipeline

        exported_pipe = ExportedPipeline(out, fmt)
        latents = exported_pipe.initial_latents(len(config.prompts), seed)
        # LCM adds fresh noise between steps, drawn by numpy here and by torch there: compare the one noise-free step
        steps = 1 if isinstance(exported_pipe.scheduler, LCM) else config.steps
        ours = exported_pipe(config.prompts, steps, config.guidance, latents=latents)
        theirs = torch_images(pipe, config.prompts, steps, config.guidance, latents)
        report["image_psnr"] = parity.psnr(ours, theirs)
        report["image_check"] = {"prompts": config.prompts, "steps": steps, "guidance": config.guidance, "seed": seed}
        log(f"{fmt} end-to-end: image PSNR {report['image_psnr']:.2f} dB vs PyTorch")
    parity.write_report(report, out, config.thresholds)
    return report


def export_model(ref: modelio.ModelRef, config: ExportConfig, out: Path, seed: int = 0, log=print) -> dict:
    """Export `ref` to every format in `config.to` under `out/<format>/`; return the overall report."""
    out = Path(out)
    pipe = modelio.load_pipeline(ref) if ref.kind == "pipeline" else None
    reports = {}
    for fmt in config.to:
        reports[fmt] = export_format(fmt, ref, pipe, config, out / fmt, seed, log)
    (out / "export_report.json").write_text(json.dumps(reports, indent=2, default=float))
    return reports

