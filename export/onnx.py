"""ONNX export in the folder layout of optimum's ONNX diffusion pipelines.

`<out>/unet/model.onnx` with `config.json` beside it (optimum's loader reads it), likewise
`text_encoder/`, `vae_encoder/`, `vae_decoder/` (both carrying the VAE's config), and the
pipeline's `model_index.json`, `tokenizer/` and `scheduler/` copied unchanged, so
`ORTDiffusionPipeline.from_pretrained(<out>)` and our torch-free `ExportedPipeline` both load it.
Batch and spatial axes are dynamic (one file serves guidance on and off, any resolution); models
over 2 GB keep their weights in `model.onnx.data`. fp16 stores weights and compute in half
precision with fp32 inputs and outputs, so callers need not change. int8 is the UNet that
`pocketdiff quantize --backend onnx-int8` trained, written as QuantizeLinear/DequantizeLinear
pairs that onnxruntime fuses into its int8 kernels; like an ExecuTorch program, that graph has the
fixed shapes it was traced at (a sampling step's batch, the model's latent size). A `brevitas-w4a8` UNet is
written by brevitas as QCDQ (QuantizeLinear → Clip → DequantizeLinear), also at fixed shapes.
`--text-encoder-int8` writes the text encoder as onnxruntime's own dynamic quantization makes it
(int8 MatMul weights, activations quantized per call), dynamic axes kept.
"""

from __future__ import annotations

import copy
import inspect
import logging
from pathlib import Path

import numpy as np
import torch

from ..compress.backends import BACKENDS, W4A8, int8_backends
from ..compress.brevitas_w4a8 import export_qcdq, rebuild
from ..compress.unet_graph import traced
from ..errors import UserError
from .components import Component, quiet_tracing, require_saved_int8, saved_int8_unet, with_int8_unet
from .layout import write_optimum_layout
from .protocol import ExportFormat
from .runtime import OnnxModel

FILE = "model.onnx"
OPSET = 18
_TWO_GB = 2 * 1024 ** 3


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


INT8_BACKENDS = int8_backends("onnx")


def check_int8(quantized_for: str | None) -> None:
    require_saved_int8("ONNX", INT8_BACKENDS, quantized_for)


def _w4a8_unet(component: Component, quantization: tuple[dict, dict]) -> torch.nn.Module:
    """The saved W4A8 UNet (brevitas layers, saved scales) in the export's wrapper."""
    return traced(rebuild(copy.deepcopy(component.module.unet), *quantization))


def load(path: Path):
    return OnnxModel(path)


def _dynamic_shapes(component: Component) -> dict:
    """torch.export's dynamic-shape spec keyed by the forward's arguments; inputs that land in a `*args`
    (the UNet's optional conditions, e.g. an LCM student's `timestep_cond`) go in as one tuple."""
    specs = [{axis: torch.export.Dim.DYNAMIC for axis in component.dynamic.get(name, {})} for name in component.inputs]
    shapes = {}
    for position, (name, parameter) in enumerate(inspect.signature(component.module.forward).parameters.items()):
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            if specs[position:]:  # an empty *args is not an argument to torch.export
                shapes[name] = tuple(specs[position:])
            break
        if position < len(specs):
            shapes[name] = specs[position]
    return shapes


def export_component(component: Component, folder: Path, precision: str, _config,
                     quantization: tuple[dict, dict] | None = None, **_) -> Path:
    """Write `<folder>/model.onnx` for one component; return its path."""
    FORMAT.check_precision(precision)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    text_int8 = precision == "int8" and component.name.startswith("text_encoder")
    int8 = precision == "int8" and not text_int8  # the UNet's saved int8 graph
    args = tuple(component.inputs.values())
    dynamic = None if int8 else _dynamic_shapes(component)
    large = _param_bytes(component.module) > _TWO_GB * (0.5 if precision == "fp16" else 1.0)
    w4a8 = int8 and quantization is not None and isinstance(BACKENDS[quantization[0]["backend"]], W4A8)
    if w4a8 and component.name == "one_step":
        raise UserError("a brevitas W4A8 UNet is written by brevitas alone, not inside a one-step program; "
                        "export one_step fp32, or the unet")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with quiet_tracing():
            if w4a8:
                export_qcdq(_w4a8_unet(component, quantization), args, path, list(component.inputs), component.outputs, OPSET)
            else:
                module = with_int8_unet(component, lambda unet: saved_int8_unet(
                    "ONNX", INT8_BACKENDS, unet.module.unet, tuple(unet.inputs.values()), quantization)) if int8 else component.module
                torch.onnx.export(module, args, str(path), dynamo=True, opset_version=OPSET,
                                  input_names=list(component.inputs), output_names=component.outputs,
                                  dynamic_shapes=dynamic, optimize=False, external_data=large, verbose=False)
    except Exception as err:  # the exporter's own errors name the failing op; keep that line
        raise UserError(f"ONNX export of {component.name} failed: {_first_line(err)}") from None
    import onnx

    model = onnx.load(str(path), load_external_data=large)
    if dynamic:
        _name_dynamic_axes(model, component)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)
    if large:
        for stale in folder.glob(f"{FILE}*"):
            stale.unlink()
    if text_int8:
        _dynamic_int8(_weight_transposes_folded(model), path, large)
    else:
        onnx.save(model, str(path), save_as_external_data=large, location=f"{FILE}.data" if large else None)
    return path


def _weight_transposes_folded(model):
    """Each `Transpose` of a weight replaced by the transposed weight: the exporter writes a linear as
    MatMul(x, Transpose(W)), and onnxruntime's quantizer only quantizes MatMuls whose weight is an initializer."""
    from onnx import numpy_helper

    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type == "Transpose" and node.input[0] in weights:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            value = numpy_helper.to_array(weights[node.input[0]]).transpose(perm)
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), node.output[0]))
            model.graph.node.remove(node)
    return model


def _dynamic_int8(model, path: Path, large: bool) -> None:
    """onnxruntime's dynamic int8 of the model's MatMuls written to `path`, weights per channel in the full 8 bits:
    on SD-1.5's text encoder (random weights, an AVX-512 VNNI CPU) that was the closest of the per-channel /
    per-tensor, 7-/8-bit settings (relative error 0.035 against 0.054 in 7 bits) and among the fastest. x86
    CPUs without VNNI can saturate 8-bit products (`compress/pt2e_int8.SCHEMES`); phones' ARM kernels do not."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # where it advises pre-processing the model first
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(model, path, weight_type=QuantType.QInt8, per_channel=True, reduce_range=False,
                         op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=large)
    finally:
        root.setLevel(level)


def _name_dynamic_axes(model, component: Component) -> None:
    """Give dynamic axes optimum's names (`batch_size`, `height`, …) instead of the tracer's `s53`."""
    for value in model.graph.input:
        for axis, name in component.dynamic.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = name


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).parent.glob(f"{Path(path).name}*"))


FORMAT = ExportFormat(
    name="onnx", title="ONNX", precisions=("fp32", "fp16", "int8"), default_precision="fp32",
    int8_backends=INT8_BACKENDS, palettizes=False,
    dynamic_shapes=True,  # one file for guidance on and off, any resolution (int8: fixed, see above)
    runs_pipeline=True, check_int8=check_int8, export_component=export_component, load=load,
    write_layout=write_optimum_layout, file_bytes=file_bytes)
