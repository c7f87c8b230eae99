"""The quantization backends by name: one object each, picked by `QuantizeConfig.backend`.

A backend knows its numerics, how it turns the float UNet into the model calibration and QAT work
on, how that model is saved beside the float weights, how it is rebuilt from them, and which export
formats ship it quantized. Three kinds cover the six: PT2E int8 graphs (one per runtime's
numerics, `pt2e_int8.SCHEMES`), Core ML weight palettes, and brevitas W4A8. Adding a backend of
a known kind is one line in `BACKENDS`; a new kind is one class here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import modelio
from ..distill.trainer import unshared
from . import brevitas_w4a8, palettize, pt2e_int8
from .unet_graph import ROOT, batch_args, layer_counts, outputs, quantizer_state, traced, whole_batches

SPEC_FILE = "quantization.json"  # the backend and its settings, beside the float weights
STATE_FILE = "quantization.safetensors"  # the quantizers' state: ranges and scales


@dataclass(frozen=True)
class Int8:
    """A PT2E int8 graph: observers calibrated on every recorded timestep (QAT: fake-quantizers that start from
    those grids and keep them); the export for `formats` lowers the converted graph."""

    name: str
    formats: tuple[str, ...]  # the export formats that ship it as int8
    ships: str
    has_state = True
    label = "int8"

    @property
    def scheme(self) -> dict:
        return pt2e_int8.SCHEMES[self.name]

    @property
    def attention(self) -> bool:
        return self.name in pt2e_int8.ATTENTION_SCHEMES

    def spec(self, attention: bool) -> dict:
        return {"scheme": pt2e_int8.describe(self.name, attention)}

    def prepare(self, unet, spec: dict, rows: dict, size: int) -> tuple[torch.nn.Module, dict[str, int]]:
        args = batch_args(next(whole_batches(rows, size)))
        settings = (spec["layers"], spec["keep"])
        attention = spec.get("attention", False)
        calibrated = pt2e_int8.prepare(traced(copy.deepcopy(unet)), args, *settings, False, self.name, attention)
        outputs(calibrated, rows, size)  # calibration: every observer sees every recorded timestep
        if not spec["qat"]:
            return calibrated, pt2e_int8.quantized_layers(calibrated)
        student = traced(copy.deepcopy(unet).requires_grad_(True))  # the graph may share tensors with its module
        graph = pt2e_int8.prepare(student, args, *settings, True, self.name, attention)
        pt2e_int8.start_from(graph, calibrated)
        return graph, pt2e_int8.quantized_layers(graph)

    def save(self, model: torch.nn.Module, unet, source: Path, out: Path) -> None:
        state = model.state_dict()
        unet.load_state_dict({k[len(ROOT) + 1:]: v for k, v in state.items() if k.startswith(ROOT + ".")})
        modelio.save_pipeline_with(source, out, "unet", unet)
        save_file(unshared(quantizer_state(state)), out / "unet" / STATE_FILE)

    def load(self, unet, spec: dict, state: dict) -> torch.nn.Module:
        return pt2e_int8.QuantizedUNet(unet, spec, state)


@dataclass(frozen=True)
class Palette:
    """Core ML weight palettes: each chosen layer's weights become a table of 2**bits values (k-means on the weights
    alone); the saved float weights are the tables' values, so the float UNet is the model."""

    name: str
    bits: int
    formats: tuple[str, ...] = ()  # no int8 graph: Core ML packs the saved values into look-up tables
    has_state = False
    attention = False

    @property
    def ships(self) -> str:
        return f"Core ML exports ship it as {self.bits}-bit look-up tables"

    @property
    def scheme(self) -> dict:
        return {"bits": self.bits}

    def spec(self, _attention: bool) -> dict:
        return {"bits": self.bits, "scheme": f"{self.bits}-bit weights: a {2 ** self.bits}-value table per layer, "
                                             "fp16 activations"}

    def prepare(self, unet, spec: dict, _rows: dict, _size: int) -> tuple[torch.nn.Module, dict[str, int]]:
        student = traced(copy.deepcopy(unet))
        return student, layer_counts(unet, palettize.palettize_(student.unet, spec["layers"], spec["keep"], self.bits))

    def save(self, model: torch.nn.Module, _unet, source: Path, out: Path) -> None:
        palettize.finalize_(model.unet)
        modelio.save_pipeline_with(source, out, "unet", model.unet)

    def load(self, _unet, _spec: dict, _state: dict) -> None:
        return None


@dataclass(frozen=True)
class W4A8:
    """brevitas W4A8, the research backend: the diffusers UNet with brevitas layers swapped in, calibrated like int8;
    the layers keep the float layers' names, their scales are the saved state."""

    name: str
    formats: tuple[str, ...]
    ships: str
    has_state = True
    attention = False
    label = "W4A8"
    scheme = {"weight_qmax": 7, "activations": "symmetric"}

    def spec(self, _attention: bool) -> dict:
        return {"scheme": brevitas_w4a8.SCHEME}

    def prepare(self, unet, spec: dict, rows: dict, size: int) -> tuple[torch.nn.Module, dict[str, int]]:
        student = traced(copy.deepcopy(unet).requires_grad_(True))
        names = brevitas_w4a8.quantize_layers_(student.unet, spec["layers"], spec["keep"])
        with brevitas_w4a8.calibrating(student):
            outputs(student, rows, size)
        return student, layer_counts(unet, names)

    def save(self, model: torch.nn.Module, unet, source: Path, out: Path) -> None:
        state = model.unet.state_dict()
        floats = set(unet.state_dict())
        unet.load_state_dict({k: v for k, v in state.items() if k in floats})
        modelio.save_pipeline_with(source, out, "unet", unet)
        save_file(unshared({k: v for k, v in state.items() if k not in floats}), out / "unet" / STATE_FILE)

    def load(self, unet, spec: dict, state: dict) -> torch.nn.Module:
        return brevitas_w4a8.rebuild(unet, spec, state)


BACKENDS = {backend.name: backend for backend in (
    Int8("xnnpack", ("executorch",), "ExecuTorch exports ship it as int8"),
    Int8("onnx-int8", ("onnx",), "ONNX exports ship it as int8"),
    Int8("coreml-w8a8", ("coreml",), "Core ML exports ship it as int8"),
    Palette("coreml-palette4", 4),
    Palette("coreml-palette6", 6),
    W4A8("brevitas-w4a8", ("onnx",), "ONNX exports ship it as W4A8 QCDQ"),
)}


def int8_backends(export_format: str) -> tuple[str, ...]:
    """The backends whose saved UNet `export_format` ships quantized."""
    return tuple(name for name, backend in BACKENDS.items() if export_format in backend.formats)
