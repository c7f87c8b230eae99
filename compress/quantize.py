"""`quantize(model, config)`: int8 for an export target, post-training or trained (QAT) against the fp32 model.

One verb, the backend named in the config. Calibration and training data are the model's own
sampling trajectories (every timestep the sampler visits, with the text and guidance inputs it
feeds), recorded once; QAT distils the fp32 UNet on them: its outputs (Intel's QAT + distillation
recipe for SD on CPUs) and, with `feature_weight`, its stage outputs (the KD stage's normalised
feature terms; on the quickstart's student they did not beat output distillation, so off by default).

The backend object (`backends.py`) prepares, saves and reloads the UNet; `saved.py` reads a
quantized folder back; `qat.py` is the training loss.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from .. import modelio
from ..errors import UserError
from ..folderhash import hash_model_folder
from ..distill import scenes
from ..distill.trainer import RunSettings, Trainer, epoch_batches, last_logged
from . import sensitivity
from .backends import BACKENDS, SPEC_FILE
from .calibration import record_unet_inputs
from .pt2e_int8 import QuantizedUNet
from .qat import QATLoss
from .saved import load_quantized_unet
from .unet_graph import batch_args, outputs, per_sample, traced, whole_batches

Backend = Literal[tuple(BACKENDS)]  # the registry's names, as the config's schema lists them


class QuantizeConfig(RunSettings):
    """What to quantize, with which backend, calibrated on what, trained how long."""

    backend: Backend = Field("xnnpack", description="The runtime the UNet is quantized for: xnnpack (ExecuTorch), "
                                                    "onnx-int8 (onnxruntime QDQ), coreml-w8a8 and coreml-palette4/6 "
                                                    "(Core ML), brevitas-w4a8 (ONNX QCDQ, research).")
    layers: Literal["linear", "conv+linear"] = Field("conv+linear", description="The layer types quantized.")
    attention: bool = Field(False, description="Also int8 the attention matmuls' operands (QKᵀ, AV): onnx-int8, "
                                               "coreml-w8a8.")
    keep: list[str] = Field(default_factory=lambda: ["conv_in", "conv_out", "time_embedding"],
                            description="UNet modules kept fp32.")
    keep_sensitive: int = Field(0, ge=0, description="Also keep fp32 the N layers quantization hurts most (measured "
                                                     "one by one).")
    qat_steps: int = Field(0, ge=0, description="Quantization-aware training steps; 0: post-training only.")
    feature_weight: float = Field(0.0, ge=0, description="QAT: weight of the normalised stage-output KD terms beside "
                                                         "the output term; 0: output only.")
    batch: int = Field(8, ge=1, description="UNet calls per calibration and QAT batch.")
    lr: float = Field(1e-5, gt=0, description="QAT learning rate.")
    prompts: int = Field(64, ge=1, description="Training captions whose trajectories calibrate and train.")
    check_prompts: int = Field(8, ge=1, description="Validation captions whose trajectories measure the error.")
    sampling_steps: int = Field(4, ge=1, description="Steps of each recorded trajectory.")
    guidance: float = Field(7.5, ge=0, description="Guidance of the recorded trajectories.")

    @model_validator(mode="after")
    def attention_where_it_runs(self):
        if self.attention and not BACKENDS[self.backend].attention:
            why = (": XNNPACK delegates batched matmuls in fp32 only, so int8 operands would be dequantized again"
                   if self.backend == "xnnpack" else "")
            where = ", ".join(name for name, backend in BACKENDS.items() if backend.attention)
            raise ValueError(f"attention matmuls are quantized for {where}, not {self.backend}{why}")
        return self


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


def _captions(stream: int, count: int, seed: int) -> list[str]:
    """`count` scene captions of one stream: calibration (0) and its check (1) draw apart."""
    return [scenes.scene_at(i, seed=2 * seed + stream).prompt.caption for i in range(count)]


def quantization_spec(config: QuantizeConfig, keep: list[str]) -> dict:
    """What `quantization.json` records: the backend, the quantized layers and those `keep` leaves float."""
    spec = {"backend": config.backend, "layers": config.layers, "keep": keep, "qat": config.qat_steps > 0}
    if config.attention:
        spec["attention"] = True
    return spec | BACKENDS[config.backend].spec(config.attention)


def quantize(ref: modelio.ModelRef, config: QuantizeConfig, out: Path, log=print) -> dict:
    """Quantize `ref`'s UNet for `config.backend`; write the quantized pipeline and `quantize_report.json` to `out`."""
    modelio.require_trained_pipeline(ref, "quantization", " (its trajectories calibrate)")
    out, began = Path(out), time.perf_counter()
    pipe = modelio.load_pipeline(ref)
    unet = pipe.unet.requires_grad_(False)
    log(f"recording {config.prompts} + {config.check_prompts} trajectories of {config.sampling_steps} steps")
    rows = per_sample(record_unet_inputs(pipe, _captions(0, config.prompts, config.seed),
                                         config.sampling_steps, config.guidance))
    check = per_sample(record_unet_inputs(pipe, _captions(1, config.check_prompts, config.seed),
                                          config.sampling_steps, config.guidance))
    size = min(config.batch, rows["sample"].shape[0], check["sample"].shape[0])
    reference = traced(unet)
    whole = rows["sample"].shape[0] // size * size  # whole batches only: the graph's shapes are fixed
    rows = {k: v[:whole] for k, v in rows.items()}
    expected = outputs(reference, check, size)
    backend = BACKENDS[config.backend]

    errors = sensitivity.layer_errors(reference, [batch_args(b) for b in itertools.islice(whole_batches(rows, size), 8)],
                                      config.layers, config.keep, backend.scheme)
    sensitive = sensitivity.most_sensitive(errors, config.keep_sensitive)
    if sensitive:
        log(f"kept fp32 as the most sensitive: {', '.join(sensitive)}")
    spec = quantization_spec(config, config.keep + sensitive)
    model, counts = backend.prepare(unet, spec, rows, size)
    if not sum(counts.values()):
        raise UserError(f"{ref.path}: no {config.layers} layer is left to quantize outside {spec['keep']}")
    if spec["qat"]:
        pick = epoch_batches(rows["sample"].shape[0], size, config.seed)
        identity = {"model": hash_model_folder(ref.path), "config": config.model_dump()}
        loss = QATLoss(model, reference, config.feature_weight)
        trainer = Trainer(model, loss, lambda step: {k: v[pick(step)] for k, v in rows.items()},
                          config.train_config(config.qat_steps, config.lr), out, "qat", identity)
        reference.to(trainer.accelerator.device)
        try:
            trainer.run()
        finally:
            loss.remove()
            reference.to("cpu")
    backend.save(model, unet, ref.path, out)
    (out / "unet" / SPEC_FILE).write_text(json.dumps(spec, indent=2))

    saved = modelio.open_model(out)
    quantized = load_quantized_unet(saved)
    if isinstance(quantized, QuantizedUNet):
        run = lambda *args: quantized.graph_for(args)(*args)  # noqa: E731
    else:
        run = traced(quantized if quantized is not None else modelio.load_unet(saved))
    measured = outputs(run, check, size)
    report = {"model": str(ref.path.resolve()), "config": config.model_dump(), "spec": spec,
              "quantized_layers": counts, "calibration_samples": int(rows["sample"].shape[0]),
              "most_sensitive_layers": {name: errors[name] for name in sensitivity.most_sensitive(errors, 10)},
              "check_samples": int(expected.shape[0]),
              "unet_relative_error": _relative_error(measured, expected),
              "wall_time_s": round(time.perf_counter() - began, 1)}
    if spec["qat"]:
        report["final"] = last_logged(out / "log.csv")
    (out / "quantize_report.json").write_text(json.dumps(report, indent=2))
    matmuls = f" + {counts['attention_matmuls']} attention matmuls" if "attention_matmuls" in counts else ""
    log(f"{config.backend} ({'QAT' if spec['qat'] else 'PTQ'}, {spec['scheme']}): {counts['linear']} linear + "
        f"{counts['conv']} conv layers{matmuls}, UNet relative error {report['unet_relative_error']:.4f} on held-out trajectories")
    return report
