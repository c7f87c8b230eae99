"""`export_model`: every component of a model to each requested format, each checked against PyTorch.

One loop for all formats: wrap the components (`components.py`), hand each to the format's
`export_component`, run the written file on the same seeded inputs and compare, then (for
pipelines, where the runtime exists here) generate images from the export and from PyTorch with
the same starting noise and compare those. The per-format `parity.json` and the overall
`export_report.json` hold times, file sizes and errors; any check over its threshold exits 2.
With `workers` > 1 the (format, component) exports run in that many processes, longest first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import modelio
from ..compress.calibration import record_unet_inputs
from ..compress.backends import BACKENDS, SPEC_FILE
from ..compress.saved import read_quantization
from ..distill.latents import read_captions
from ..errors import UserError
from ..progress import progress_bar
from . import parity
from .formats import FORMATS
from .lcm import LCM
from .prompt_table import write_prompt_table
from .runtime import ExportedPipeline
from .components import PIPELINE_COMPONENTS, STATIC, model_components, pipeline_component_names, trace_latent_size

UNET_PROGRAMS = ("unet", "one_step")  # the components that hold the UNet, and its quantization
Format = Literal[tuple(FORMATS)]  # the registry's names, as the config's schema lists them


class ExportConfig(BaseModel):
    """What to export and how hard to check it."""

    model_config = ConfigDict(extra="forbid")

    to: list[Format] = Field(default_factory=lambda: ["onnx"], min_length=1, description="The formats.")
    precision: Literal["fp32", "fp16", "int8"] | None = Field(
        None, description="Default: each format's (Core ML fp16; int8 for a model `quantize` made for the format).")
    components: list[Literal["text_encoder", "unet", "vae_encoder", "vae_decoder", "one_step"]] = Field(
        default_factory=lambda: list(PIPELINE_COMPONENTS), min_length=1,
        description="The components exported (an SDXL pipeline's text_encoder is both its encoders; one_step: a "
                    "one-step student's UNet, sampler step and VAE decoder as one program, ONNX and ExecuTorch).")
    executorch_backends: list[str] = Field(default_factory=lambda: ["xnnpack"], min_length=1,
                                           description="ExecuTorch partitioners: xnnpack, coreml, mps, vulkan, qnn.")
    prompts: list[str] = Field(default_factory=lambda: ["a red circle", "a triangle above a cross"], min_length=1,
                               json_schema_extra={"free_text": True}, description="Prompts of the image check.")
    steps: int = Field(4, ge=1, description="Sampling steps of the image check.")
    guidance: float = Field(7.5, ge=0, description="Guidance of the image check; a guidance-distilled student's Core "
                                                   "ML UNet has it folded in (Swift feeds no guidance input).")
    thresholds: parity.ParityThresholds = Field(default_factory=parity.ParityThresholds)
    workers: int = Field(1, ge=1, description="Processes exporting components side by side (each loads the model).")
    chunk_unet: bool = Field(False, description="Core ML: the UNet as UnetChunk1 + UnetChunk2, as Swift loads large "
                                                "UNets on iOS.")
    coreml_attention: Literal["original", "split_einsum", "split_einsum_v2"] = Field(
        "original", description="Core ML UNet attention: split_einsum is Apple's Neural Engine layout, "
                                "split_einsum_v2 its queries in chunks.")
    unet_batch_one: bool = Field(False, description="Core ML: a batch-one UNet, called twice per guided step "
                                                    "(Apple's --unet-batch-one); a guidance-distilled student's always is.")
    prompt_embeddings: str | None = Field(None, description="A prompts file (one per line): their text-encoder states "
                                                            "go beside each export, for apps with a fixed prompt set "
                                                            "that ship no text encoder.")
    text_encoder_int8: bool = Field(False, description="The text encoder(s) with int8 linears: dynamic int8 in "
                                                       "ExecuTorch (XNNPACK) and onnxruntime, int8 weights in Core ML.")

    @model_validator(mode="after")
    def core_ml_options_need_its_unet(self):
        if "coreml" in self.to and "one_step" in self.components:
            raise ValueError("one_step is not a Core ML component: Apple's Swift pipeline calls the UNet and the "
                             "decoder apart; export one_step to onnx or executorch")
        for option, asked in (("chunk_unet", self.chunk_unet), ("coreml_attention", self.coreml_attention != "original"),
                              ("unet_batch_one", self.unet_batch_one)):
            if asked and ("coreml" not in self.to or "unet" not in self.components):
                raise ValueError(f"{option} is a Core ML UNet option: export the unet to coreml")
        return self


def _numpy(tensors: dict) -> dict:
    return {k: v.detach().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in tensors.items()}


def torch_images(pipe, prompts: list[str], steps: int, guidance: float, latents: np.ndarray) -> np.ndarray:
    """The PyTorch pipeline's uint8 images from the given starting latents, sampled as the exported runtime
    samples: deterministic DDIM on the pipeline's own schedule unless its scheduler is LCM's (SD-1.5 ships
    PNDM, SDXL Euler; against those an exact export would fail its image check)."""
    import torch
    from diffusers import DDIMScheduler, LCMScheduler

    own = pipe.scheduler
    if not isinstance(own, LCMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(own.config)
    try:
        result = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                      latents=torch.from_numpy(latents))
    finally:
        pipe.scheduler = own
    return (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)


def _quantization_note(fmt: str, export_format, precision: str, quantization: tuple[dict, dict] | None) -> str | None:
    """What the report says of the UNet's quantization: the model's own, the export's fallback, or not applied."""
    if precision != "int8" and quantization is None:
        return None
    if precision == "int8" and quantization is None:
        return "post-training at export: xnnpack int8, linear"
    spec = quantization[0]
    trained = f"{'QAT' if spec['qat'] else 'post-training'}, {spec['layers']}{' + attention' if spec.get('attention') else ''}"
    if precision == "int8":
        return f"saved: {spec['backend']} {BACKENDS[spec['backend']].label}, {trained}"
    if "bits" in spec and export_format.palettizes:
        return f"saved: {spec['backend']} {spec['bits']}-bit look-up tables, {trained}"
    return f"not applied: {fmt} {precision} of the float (QAT-trained) weights"


TEXT_ENCODER_INT8 = {"onnx": "onnxruntime dynamic int8: MatMul weights int8 per channel, activations per call",
                     "executorch": "XNNPACK dynamic int8 linears: weights per channel, activations per call",
                     "coreml": "int8 weights per channel (constexpr_affine_dequantize), fp16 compute"}


def component_precision(name: str, precision: str, config: ExportConfig) -> str:
    """int8 is the UNet's, where the time goes at many steps; at one step the text encoder costs as much, so
    `text_encoder_int8` makes it int8 too, in every format. The VAE stays float (the usual deployment); the
    one-step program is int8 where its UNet is."""
    if name.startswith("text_encoder") and config.text_encoder_int8:
        return "int8"
    return "fp32" if precision == "int8" and name not in UNET_PROGRAMS else precision


def precision_for(fmt: str, ref: modelio.ModelRef, config: ExportConfig) -> str:
    """The asked precision, else the format's default; a model quantized for the format's runtime ships int8 unasked."""
    export_format = FORMATS[fmt]
    precision = config.precision or export_format.default_precision
    spec = ref.unet_path / SPEC_FILE
    quantized_for = json.loads(spec.read_text())["backend"] if spec.exists() else None
    if config.precision is None and quantized_for in export_format.int8_backends:
        precision = "int8"  # what `pocketdiff quantize` trained is what ships
    export_format.check_precision(precision)
    if precision == "int8":
        export_format.check_int8(quantized_for)
    return precision


def export_one(fmt: str, name: str, ref: modelio.ModelRef, pipe, config: ExportConfig, out: Path) -> dict:
    """Export one component to one format in `out/<name>/`, run the file, compare with PyTorch: its report entry."""
    export_format = FORMATS[fmt]
    own_precision = component_precision(name, precision_for(fmt, ref, config), config)
    # a dynamic-shape trace needs a latent big enough not to specialise; an int8 UNet graph is fixed at the
    # model's own (a text encoder's dynamic int8 keeps its dynamic batch)
    dynamic = export_format.dynamic_shapes and name not in STATIC and (own_precision != "int8" or name != "unet")
    size = trace_latent_size(modelio.unet_config(ref)) if dynamic else None
    (component,) = model_components(ref, pipe, (name,), size)
    component = export_format.adapt(component, pipe, ref, config)
    began = time.perf_counter()
    quantization = read_quantization(ref) if name in UNET_PROGRAMS else None
    if own_precision == "int8" and name == "one_step" and quantization is None:
        raise UserError("an int8 one-step program ships the UNet `pocketdiff quantize` made; quantize the student "
                        "or export it fp32")
    extra = {"quantization": quantization}
    if own_precision == "int8" and name == "unet" and pipe is not None and quantization is None:
        extra["calibration"] = record_unet_inputs(pipe, config.prompts, config.steps, config.guidance)
    path = export_format.export_component(component, out / name, own_precision, config, **extra)
    entry = {"file": str(path.relative_to(out)), "precision": own_precision, "bytes": export_format.file_bytes(path),
             "export_seconds": round(time.perf_counter() - began, 2)}
    note = (_quantization_note(fmt, export_format, own_precision, quantization) if name in UNET_PROGRAMS
            else TEXT_ENCODER_INT8[fmt] if own_precision == "int8" else None)
    if note:
        entry["quantization"] = note
    runner = export_format.load(path)
    if runner is None:
        entry.update(export_format.structural_check(path, component))
        entry["numeric"] = export_format.no_runtime_reason
    else:
        expected = _numpy(component.run())
        entry.update(parity.compare(expected, runner(_numpy(component.inputs))))
    return entry


def describe(fmt: str, name: str, entry: dict) -> str:
    check = entry.get("numeric") or f"max-abs {entry['max_abs']:.2e} vs PyTorch"
    return f"{fmt} {name}: {entry['bytes'] / 1e6:.1f} MB in {entry['export_seconds']:.1f} s, {check}"


_WORKER_MODELS: dict[tuple, tuple] = {}


def _export_in_worker(fmt: str, name: str, path: str, allow_pickle: bool, config: dict, out: str) -> dict:
    """`export_one` in a worker process, which loads the model once for all its jobs."""
    if (path, allow_pickle) not in _WORKER_MODELS:
        ref = modelio.open_model(path, allow_pickle)
        _WORKER_MODELS[path, allow_pickle] = ref, modelio.load_pipeline(ref) if ref.kind == "pipeline" else None
    ref, pipe = _WORKER_MODELS[path, allow_pickle]
    return export_one(fmt, name, ref, pipe, ExportConfig(**config), Path(out))


def _cost(job: tuple[str, str]) -> int:
    """A rough rank of export times: ExecuTorch lowering is the slowest format, the UNet the largest component."""
    fmt, name = job
    return (3 if fmt == "executorch" else 1) * (4 if name in UNET_PROGRAMS else 1)


def export_components(jobs: list[tuple[str, str]], ref: modelio.ModelRef, pipe, config: ExportConfig, out: Path,
                      log=print) -> dict[tuple[str, str], dict]:
    """Every (format, component) job's entry, in `config.workers` processes.

    Lowering and conversion are single-threaded Python, so on two cores two workers take about
    the time of the longest job (the UNet's ExecuTorch lowering) rather than the sum. Each worker
    loads its own copy of the model: at SD scale mind the memory.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    entries = {}
    with progress_bar("export", len(jobs)) as advance:
        if config.workers == 1 or len(jobs) == 1:
            for fmt, name in jobs:
                entries[fmt, name] = export_one(fmt, name, ref, pipe, config, out / fmt)
                log(describe(fmt, name, entries[fmt, name]))
                advance()
            return entries
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        with ProcessPoolExecutor(min(config.workers, len(jobs)), mp_context=context) as pool:
            futures = {pool.submit(_export_in_worker, fmt, name, str(ref.path), ref.allow_pickle, config.model_dump(),
                                   str(out / fmt)): (fmt, name) for fmt, name in sorted(jobs, key=_cost, reverse=True)}
            for future in as_completed(futures):
                fmt, name = futures[future]
                entries[fmt, name] = future.result()
                log(describe(fmt, name, entries[fmt, name]))
                advance()
    return {job: entries[job] for job in jobs}


def finish_format(fmt: str, ref: modelio.ModelRef, pipe, config: ExportConfig, out: Path, entries: dict,
                  seed: int = 0, log=print, fixed_prompts: list[str] | None = None) -> dict:
    """The format's app layout around its exported components, the end-to-end image check, its parity report."""
    export_format = FORMATS[fmt]
    names = list(entries)
    report = {"format": fmt, "precision": precision_for(fmt, ref, config), "model": str(ref.path),
              "components": entries}
    export_format.write_layout(ref, out, names, config)
    prompts = config.prompts
    if fixed_prompts:
        report["prompt_embeddings"] = write_prompt_table(pipe, fixed_prompts, out)
        prompts = prompts if "text_encoder" in names else fixed_prompts[:2]
    texts = "text_encoder" in names or fixed_prompts
    parts = {"unet", "vae_decoder"} <= set(names)
    if ref.kind == "pipeline" and export_format.runs_pipeline and texts and (parts or "one_step" in names):
        exported_pipe = ExportedPipeline(out, fmt, one_step=False)
        latents = exported_pipe.initial_latents(len(prompts), seed)
        # LCM adds fresh noise between steps, drawn by numpy here and by torch there: compare the one noise-free step
        steps = 1 if isinstance(exported_pipe.scheduler, LCM) or not parts else config.steps
        checks = {"image_psnr": (exported_pipe, steps, config.guidance)} if parts else {}
        if "one_step" in names:  # at the guidance it computes: embedded, else none
            checks["one_step_image_psnr"] = (ExportedPipeline(out, fmt), 1,
                                             config.guidance if exported_pipe.guidance_dim else 1.0)
        for key, (runner, check_steps, guidance) in checks.items():
            ours = runner(prompts, check_steps, guidance, latents=latents)
            report[key] = parity.psnr(ours, torch_images(pipe, prompts, check_steps, guidance, latents))
            log(f"{fmt} {parity.IMAGE_CHECKS[key]}: image PSNR {report[key]:.2f} dB vs PyTorch")
        report["image_check"] = {"prompts": prompts, "steps": steps, "guidance": config.guidance, "seed": seed}
    parity.write_report(report, out, config.thresholds)
    return report


def export_model(ref: modelio.ModelRef, config: ExportConfig, out: Path, seed: int = 0, log=print) -> dict:
    """Export `ref` to every format in `config.to` under `out/<format>/`; return the overall report."""
    out = Path(out)
    for fmt in config.to:
        precision_for(fmt, ref, config)  # a precision a format refuses fails before any work
    fixed_prompts = None
    if config.prompt_embeddings:  # a missing file or a UNet folder fails before any work
        if ref.kind != "pipeline":
            raise UserError(f"{ref.path}: prompt embeddings need a pipeline folder (its text encoder makes them)")
        fixed_prompts = read_captions(Path(config.prompt_embeddings))
    pipe = modelio.load_pipeline(ref) if ref.kind == "pipeline" else None
    names = pipeline_component_names(pipe, config.components) if ref.kind == "pipeline" else ["unet"]
    entries = export_components([(fmt, name) for fmt in config.to for name in names], ref, pipe, config, out, log)
    reports = {fmt: finish_format(fmt, ref, pipe, config, out / fmt, {name: entries[fmt, name] for name in names},
                                  seed, log, fixed_prompts) for fmt in config.to}
    (out / "export_report.json").write_text(json.dumps(reports, indent=2, default=float))
    return reports
