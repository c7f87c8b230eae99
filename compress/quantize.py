"""`quantize(model, config)`: int8 for an export target, post-training or trained (QAT) against the fp32 model.

One verb, the backend named in the config. Calibration and training data are the model's own
sampling trajectories (every timestep the sampler visits, with the text and guidance inputs it
feeds), recorded once; QAT distils the fp32 UNet on them: its outputs (Intel's QAT + distillation
recipe for SD on CPUs) and, with `feature_weight`, its stage outputs (the KD stage's normalised
feature terms; on the quickstart's student they did not beat output distillation, so off by default).

What a quantized folder holds: a stock diffusers pipeline whose UNet weights are the (QAT-trained)
float weights, which stock diffusers loads and runs in fp32, plus `unet/quantization.json` (the
backend and its settings: data). int8 backends add `unet/quantization.safetensors` (every
observer's state: the ranges and scales); `load_quantized_unet` rebuilds the int8 graph from those
for any input shape, and the export for the backend's runtime (xnnpack: ExecuTorch; onnx-int8:
ONNX QDQ for onnxruntime; coreml-w8a8: Core ML) lowers that graph, so what was trained is what
ships. Palettized backends (coreml-palette4/6) are weight-only: the saved float weights are the
tables' values, the model itself, and the Core ML export packs them into look-up tables.
brevitas-w4a8 (the research backend) saves its activation scales the same way; its UNet is the
diffusers UNet with brevitas layers swapped in, and its ONNX export is QCDQ.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from .. import modelio
from ..errors import UserError
from ..folderhash import hash_model_folder
from ..distill.kd import Taps, block_pairs, feature_term
from ..distill.trainer import RunSettings, Trainer, epoch_batches, last_logged, unshared
from . import brevitas_w4a8, palettize, pt2e_int8, sensitivity
from .calibration import extra_conditions, record_unet_inputs

SPEC_FILE = "quantization.json"
STATE_FILE = "quantization.safetensors"
Backend = Literal["xnnpack", "onnx-int8", "coreml-w8a8", "coreml-palette4", "coreml-palette6", "brevitas-w4a8"]
PALETTES = {"coreml-palette4": 4, "coreml-palette6": 6}  # bits per weight: a table of 2**bits values per layer
W4A8 = "brevitas-w4a8"
ROOT = "unet"  # the float UNet's attribute in the traced wrapper: its parameters are `unet.<name>` in the graph


class QuantizeConfig(RunSettings):
    """What to quantize, with which backend, calibrated on what, trained how long."""

    backend: Backend = "xnnpack"
    layers: Literal["linear", "conv+linear"] = "conv+linear"
    attention: bool = False  # also the attention matmuls' operands (QKᵀ, AV): onnx-int8 and coreml-w8a8
    keep: list[str] = Field(default_factory=lambda: ["conv_in", "conv_out", "time_embedding"])  # stay fp32
    keep_sensitive: int = Field(0, ge=0)  # also keep fp32 the layers int8 hurts most, measured one by one
    qat_steps: int = Field(0, ge=0)  # 0: post-training quantization only
    feature_weight: float = Field(0.0, ge=0)  # QAT: weight of the normalised stage-output terms (measured: no gain here)
    batch: int = Field(8, ge=1)
    lr: float = Field(1e-5, gt=0)
    prompts: int = Field(64, ge=1)  # training captions whose trajectories calibrate (and train)
    check_prompts: int = Field(8, ge=1)  # validation captions whose trajectories measure the error
    sampling_steps: int = Field(4, ge=1)
    guidance: float = Field(7.5, ge=0)

    @model_validator(mode="after")
    def attention_where_it_runs(self):
        if self.attention and self.backend not in pt2e_int8.ATTENTION_SCHEMES:
            why = (": XNNPACK delegates batched matmuls in fp32 only, so int8 operands would be dequantized again"
                   if self.backend == "xnnpack" else "")
            raise ValueError(f"attention matmuls are quantized for {', '.join(pt2e_int8.ATTENTION_SCHEMES)}, "
                             f"not {self.backend}{why}")
        return self


def scheme(backend: str) -> dict:
    """The backend's numerics as data: int8 ranges (pt2e_int8.SCHEMES; W4A8's weights in ±7) or a palette's bits."""
    if backend == W4A8:
        return {"weight_qmax": 7, "activations": "symmetric"}
    return {"bits": PALETTES[backend]} if backend in PALETTES else pt2e_int8.SCHEMES[backend]


def graph_inputs(sample, timestep, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None) -> tuple:
    """The traced graph's positional inputs: one timestep per sample, then the extra conditions in export order."""
    timestep = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
    return (sample, timestep.expand(sample.shape[0]), encoder_hidden_states,
            *extra_conditions(timestep_cond, added_cond_kwargs))


def _extra_names(unet) -> tuple[str, ...]:
    names = ("text_embeds", "time_ids") if unet.config.get("addition_embed_type") == "text_time" else ()
    return names + (("timestep_cond",) if unet.config.get("time_cond_proj_dim") else ())


def traced(unet) -> torch.nn.Module:
    from ..export.components import UNet

    return UNet(unet, _extra_names(unet)).eval()


def per_sample(recorded: list[tuple]) -> dict[str, torch.Tensor]:
    """Recorded UNet calls as one tensor per input, a row per sample (a guidance pair gives two rows)."""
    columns = list(zip(*recorded))
    sizes = [s.shape[0] for s in columns[0]]
    out = {"sample": torch.cat(columns[0]),
           "timestep": torch.cat([t.expand(n) for t, n in zip(columns[1], sizes)]),
           "encoder_hidden_states": torch.cat(columns[2])}
    out.update({f"extra{i}": torch.cat(column) for i, column in enumerate(columns[3:])})
    return out


def _args(rows: dict[str, torch.Tensor]) -> tuple:
    extra = [rows[k] for k in sorted(k for k in rows if k.startswith("extra"))]
    return (rows["sample"], rows["timestep"], rows["encoder_hidden_states"], *extra)


def _chunks(rows: dict[str, torch.Tensor], size: int):
    n = rows["sample"].shape[0]
    for start in range(0, n - size + 1, size):  # whole batches only: the graph's shapes are fixed
        yield {k: v[start:start + size] for k, v in rows.items()}


@torch.no_grad()
def _outputs(module, rows: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    return torch.cat([module(*_args(chunk)) for chunk in _chunks(rows, size)])


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


def _captions(split: str, count: int, seed: int) -> list[str]:
    from ..distill import data

    captions = data.load_emoji(32, split).captions
    return [captions[i] for i in np.random.default_rng([seed, count]).choice(len(captions), count, replace=False)]


class QATLoss:
    """Distillation from the fp32 UNet on recorded trajectories: output term + weighted feature terms (BK-SDM, LAPTOP-Diff).

    The output term is the mean square error to the fp32 prediction; each feature term is one
    stage output's (every down block, the mid block, every up block) mean square error divided
    by the fp32 feature's mean square, so quantization error early in the UNet is corrected where
    it arises, not only as it reaches the output."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, feature_weight: float):
        self.student, self.teacher, self.feature_weight = student, teacher, feature_weight
        config = dict(teacher.unet.config)
        names = [name for name, _ in block_pairs(config, config)] if feature_weight else []
        self.student_taps = (pt2e_int8.GraphTaps(student, names, ROOT) if isinstance(student, torch.fx.GraphModule)
                             else Taps(student.unet, names))
        self.teacher_taps = Taps(teacher.unet, names)

    def __call__(self, batch: dict, _generator) -> dict[str, torch.Tensor]:
        args = _args(batch)
        with torch.no_grad():
            target = self.teacher(*args).float()
        terms = {"output_kd": (self.student(*args).float() - target).pow(2).mean()}
        per_block = {f"feature/{name}": feature_term(kept, self.teacher_taps.outputs[name], normalize=True)
                     for name, kept in self.student_taps.outputs.items()}
        terms["feature_kd"] = sum(per_block.values()) if per_block else torch.zeros_like(terms["output_kd"])
        self.student_taps.outputs.clear()
        self.teacher_taps.outputs.clear()
        return {"loss": terms["output_kd"] + self.feature_weight * terms["feature_kd"], **terms, **per_block}

    def remove(self) -> None:
        self.student_taps.remove()
        self.teacher_taps.remove()


def _spec(config: QuantizeConfig, keep: list[str]) -> dict:
    spec = {"backend": config.backend, "layers": config.layers, "keep": keep, "qat": config.qat_steps > 0}
    if config.attention:
        spec["attention"] = True
    if config.backend in PALETTES:
        bits = PALETTES[config.backend]
        return spec | {"bits": bits, "scheme": f"{bits}-bit weights: a {2 ** bits}-value table per layer, fp16 activations"}
    return spec | {"scheme": brevitas_w4a8.SCHEME if config.backend == W4A8 else
                   pt2e_int8.describe(config.backend, config.attention)}


def _layer_counts(unet, names: list[str]) -> dict[str, int]:
    linear = sum(isinstance(unet.get_submodule(name), torch.nn.Linear) for name in names)
    return {"linear": linear, "conv": len(names) - linear}


def _prepare(unet, spec: dict, rows: dict[str, torch.Tensor], size: int) -> tuple[torch.nn.Module, dict[str, int]]:
    """The model QAT trains (post-training quantization stops here) and how many layers it quantizes.

    int8: a copy's PT2E graph with observers, calibrated on every recorded timestep (for QAT, a
    fake-quantized graph that starts from those grids, weights' and activations', and keeps them);
    W4A8: a copy with brevitas layers, calibrated the same way; palettes: a copy whose chosen
    layers' weights are k-means tables (fitted from the weights alone)."""
    if spec["backend"] in PALETTES:
        student = traced(copy.deepcopy(unet))
        return student, _layer_counts(unet, palettize.palettize_(student.unet, spec["layers"], spec["keep"], spec["bits"]))
    if spec["backend"] == W4A8:
        student = traced(copy.deepcopy(unet).requires_grad_(True))
        names = brevitas_w4a8.quantize_layers_(student.unet, spec["layers"], spec["keep"])
        with brevitas_w4a8.calibrating(student):
            _outputs(student, rows, size)
        return student, _layer_counts(unet, names)
    args = _args(next(_chunks(rows, size)))
    settings = (spec["layers"], spec["keep"])
    calibrated = pt2e_int8.prepare(traced(copy.deepcopy(unet)), args, *settings, False, spec["backend"],
                                   spec.get("attention", False))
    _outputs(calibrated, rows, size)  # calibration: every observer sees every recorded timestep
    if not spec["qat"]:
        return calibrated, pt2e_int8.quantized_layers(calibrated)
    student = traced(copy.deepcopy(unet).requires_grad_(True))  # the graph may share tensors with its module
    graph = pt2e_int8.prepare(student, args, *settings, True, spec["backend"], spec.get("attention", False))
    pt2e_int8.start_from(graph, calibrated)
    return graph, pt2e_int8.quantized_layers(graph)


def _save(model: torch.nn.Module, unet, spec: dict, source: Path, out: Path) -> None:
    """The pipeline with the quantized UNet's float weights, its spec and its quantizers' state (not a palette's)."""
    if spec["backend"] in PALETTES:
        palettize.finalize_(model.unet)
        modelio.save_pipeline_with(source, out, "unet", model.unet)
    elif spec["backend"] == W4A8:  # brevitas layers keep the float layers' names; their scales are the extra entries
        state = model.unet.state_dict()
        floats = set(unet.state_dict())
        unet.load_state_dict({k: v for k, v in state.items() if k in floats})
        modelio.save_pipeline_with(source, out, "unet", unet)
        save_file(unshared({k: v for k, v in state.items() if k not in floats}), out / "unet" / STATE_FILE)
    else:
        state = model.state_dict()
        unet.load_state_dict({k[len(ROOT) + 1:]: v for k, v in state.items() if k.startswith(ROOT + ".")})
        modelio.save_pipeline_with(source, out, "unet", unet)
        save_file(unshared({k: v for k, v in state.items() if not k.startswith(ROOT + ".")}), out / "unet" / STATE_FILE)
    (out / "unet" / SPEC_FILE).write_text(json.dumps(spec, indent=2))


def quantize(ref: modelio.ModelRef, config: QuantizeConfig, out: Path, log=print) -> dict:
    """Quantize `ref`'s UNet for `config.backend`; write the quantized pipeline and `quantize_report.json` to `out`."""
    if ref.kind != "pipeline" or ref.random_weights:
        raise UserError(f"{ref.path}: quantization needs a pipeline folder with weights (its trajectories calibrate)")
    out, began = Path(out), time.perf_counter()
    pipe = modelio.load_pipeline(ref)
    unet = pipe.unet.requires_grad_(False)
    log(f"recording {config.prompts} + {config.check_prompts} trajectories of {config.sampling_steps} steps")
    rows = per_sample(record_unet_inputs(pipe, _captions("train", config.prompts, config.seed),
                                         config.sampling_steps, config.guidance))
    check = per_sample(record_unet_inputs(pipe, _captions("validation", config.check_prompts, config.seed),
                                          config.sampling_steps, config.guidance))
    size = min(config.batch, rows["sample"].shape[0], check["sample"].shape[0])
    reference = traced(unet)
    whole = rows["sample"].shape[0] // size * size  # whole batches only: the graph's shapes are fixed
    rows = {k: v[:whole] for k, v in rows.items()}
    expected = _outputs(reference, check, size)

    errors = sensitivity.layer_errors(reference, [_args(c) for c in itertools.islice(_chunks(rows, size), 8)],
                                      config.layers, config.keep, scheme(config.backend))
    sensitive = sensitivity.most_sensitive(errors, config.keep_sensitive)
    if sensitive:
        log(f"kept fp32 as the most sensitive: {', '.join(sensitive)}")
    spec = _spec(config, config.keep + sensitive)
    model, counts = _prepare(unet, spec, rows, size)
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
    _save(model, unet, spec, ref.path, out)

    saved = modelio.open_model(out)
    quantized = load_quantized_unet(saved)
    if isinstance(quantized, QuantizedUNet):
        run = lambda *args: quantized.graph_for(args)(*args)  # noqa: E731
    else:
        run = traced(quantized if quantized is not None else modelio.load_unet(saved))
    measured = _outputs(run, check, size)
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


def read_quantization(ref: modelio.ModelRef) -> tuple[dict, dict] | None:
    """(spec, observer state) of a quantized folder, or None for a float one; a palette has no state."""
    folder = ref.unet_path
    if not (folder / SPEC_FILE).exists():
        return None
    spec = json.loads((folder / SPEC_FILE).read_text())
    if spec["backend"] in PALETTES:
        return spec, {}
    if not (folder / STATE_FILE).exists():
        raise UserError(f"{folder}: {SPEC_FILE} without {STATE_FILE}; quantize the model again")
    return spec, load_file(folder / STATE_FILE)


class QuantizedUNet(torch.nn.Module):
    """A UNet that diffusers pipelines call like their own, running the int8 graph (torch's reference int8 ops).

    The graph has fixed shapes, as ExecuTorch programs do; one is built per input shape met, from
    the float weights and the saved observer state.
    """

    def __init__(self, unet, spec: dict, state: dict):
        super().__init__()
        self.unet, self.spec, self.state = unet.eval(), spec, state
        self._graphs: dict[tuple, torch.nn.Module] = {}

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def graph_for(self, args: tuple) -> torch.nn.Module:
        key = tuple(tuple(a.shape) for a in args)
        if key not in self._graphs:
            self._graphs[key] = build_int8(self.unet, args, self.spec, self.state)
        return self._graphs[key]

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None,
                return_dict: bool = True, **_):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        args = graph_inputs(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs)
        with torch.no_grad():
            out = self.graph_for(args)(*args)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def build_int8(unet, args: tuple, spec: dict, state: dict) -> torch.nn.Module:
    """The converted int8 graph of `unet` at `args`' shapes, its observers restored from `state`."""
    graph = pt2e_int8.prepare(traced(unet), args, spec["layers"], spec["keep"], spec["qat"], spec["backend"],
                              spec.get("attention", False))
    expected = {k for k in graph.state_dict() if not k.startswith(ROOT + ".")}
    if expected != set(state):
        raise UserError(f"the saved quantization state does not fit this UNet's graph "
                        f"({len(expected ^ set(state))} entries differ); quantize the model again")
    graph.load_state_dict(state, strict=False)
    return pt2e_int8.convert(graph)


def load_quantized_unet(ref: modelio.ModelRef) -> torch.nn.Module | None:
    """The quantized UNet of a quantized folder (int8: a QuantizedUNet; W4A8: the UNet with brevitas layers);
    None for a float or palettized one (its float UNet is the model)."""
    found = read_quantization(ref)
    if found is None or found[0]["backend"] in PALETTES:
        return None
    if found[0]["backend"] == W4A8:
        return brevitas_w4a8.rebuild(modelio.load_unet(ref), *found)
    return QuantizedUNet(modelio.load_unet(ref), *found)


def load_shipped_pipeline(ref: modelio.ModelRef):
    """The pipeline with a quantized folder's UNet as its int8 graph, not the float weights stock diffusers
    loads: what samples images to judge them calls this, so it measures what ships."""
    pipe = modelio.load_pipeline(ref)
    int8 = load_quantized_unet(ref)
    if int8 is not None:
        pipe.unet = int8
    return pipe
