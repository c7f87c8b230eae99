"""ExecuTorch export: one `.pte` per component, lowered to XNNPACK, in optimum's folder layout.

ExecuTorch's staged lowering as its docs teach it: `torch.export` → `to_edge_transform_and_lower`
with the partitioners asked for → `to_executorch`. Programs have static shapes (what XNNPACK
plans memory for): the UNet is traced at the batch a sampling step calls it with (2 for a
classifier-free-guidance pair, 1 for a student with guidance embedded), and our runner pads or
splits any other batch. `io.json` beside each program records input order, shapes and output
names, which a `.pte` does not carry. int8 is PT2E post-training quantization with ExecuTorch's
XNNPACK quantizer, calibrated on inputs recorded from the PyTorch pipeline's own sampling.

Attention is traced as batched matmul, softmax, matmul (diffusers' classic processor, with the
scale on the query), not `scaled_dot_product_attention`: torch decomposes the latter into a "safe"
softmax whose `where`/`eq`/`any` guards XNNPACK does not take, and `pocketdiff profile` showed those
portable fallbacks costing the default UNet about half its ExecuTorch time.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from ..compress import pt2e_int8
from ..compress.backends import int8_backends
from ..compress.unet_graph import classic_attention
from ..errors import UserError
from .components import Component, quiet_tracing, with_int8_unet
from .layout import write_optimum_layout
from .protocol import ExportFormat
from .runtime import ExecuTorchModel

FILE = "model.pte"
INT8_BACKENDS = int8_backends("executorch")
PARTITIONERS = {
    "xnnpack": ("executorch.backends.xnnpack.partition.xnnpack_partitioner", "XnnpackPartitioner"),
    "coreml": ("executorch.backends.apple.coreml.partition", "CoreMLPartitioner"),
    "mps": ("executorch.backends.apple.mps.partition", "MPSPartitioner"),
    "vulkan": ("executorch.backends.vulkan.partitioner.vulkan_partitioner", "VulkanPartitioner"),
}


def check_int8(quantized_for: str | None) -> None:
    """A float model gets post-training int8 of its linears here; a quantized one must be quantized for XNNPACK."""
    if quantized_for not in (None, *INT8_BACKENDS):
        raise UserError(f"this UNet was quantized for {quantized_for}, not for ExecuTorch's {INT8_BACKENDS[0]}; "
                        f"quantize it with --backend {INT8_BACKENDS[0]}")


def partitioner(name: str):
    """The named backend's partitioner, or a one-line error saying what is missing."""
    if name == "qnn":
        raise UserError("ExecuTorch backend 'qnn' needs a Qualcomm SoC compile spec; use xnnpack here")
    if name not in PARTITIONERS:
        raise UserError(f"unknown ExecuTorch backend '{name}' (known: {', '.join(PARTITIONERS)}, qnn)")
    module, cls = PARTITIONERS[name]
    try:
        partitioner_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise UserError(f"ExecuTorch backend '{name}' is not available here ({_first_line(err)}); "
                        "install its ExecuTorch extras or use xnnpack") from None
    return partitioner_cls()


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def quantize_int8(component: Component, calibration: list[tuple],
                  quantization: tuple[dict, dict] | None = None) -> torch.nn.Module:
    """The UNet's int8 graph: the one `pocketdiff quantize` saved with the model, else post-training int8.

    Post-training int8 here is static int8 of the linear layers alone (per-channel weights,
    per-tensor activations), XNNPACK's quantizer, calibrated on `calibration`: a few prompts'
    trajectories. Along the default's own sampling (4 prompts, 4 steps, guidance 7.5) linears
    alone kept the image at 32.4 dB PSNR and adding the convolutions dropped it to 21.0 dB; the
    convolutions go int8 through `pocketdiff quantize`, calibrated on hundreds of trajectories
    with the time embedding kept fp32, which keeps the judge's scores.
    """
    examples = tuple(component.inputs.values())
    if quantization is not None:
        check_int8(quantization[0]["backend"])
        return pt2e_int8.build_int8(component.module.unet, examples, *quantization)  # a 0-d timestep: the export's contract
    prepared = pt2e_int8.prepare(component.module, examples, "linear", [], False, INT8_BACKENDS[0])
    with torch.no_grad():
        for args in calibration or [examples]:
            prepared(*(_fit_batch(a, e) for a, e in zip(args, examples)))
    return pt2e_int8.convert(prepared)


def _fit_batch(value: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """Repeat or cut a recorded input to the program's fixed batch."""
    if value.dim() == 0 or value.shape[0] == example.shape[0]:
        return value
    return value.repeat(-(-example.shape[0] // value.shape[0]), *([1] * (value.dim() - 1)))[:example.shape[0]]


def lower(module: torch.nn.Module, args: tuple, backends: tuple[str, ...] = ("xnnpack",)) -> bytes:
    """The ExecuTorch program of `module(*args)`, attention traced as explicit matmuls, lowered to `backends`."""
    from executorch.exir import to_edge_transform_and_lower

    with classic_attention(module), quiet_tracing():
        exported = torch.export.export(module, args)
        program = to_edge_transform_and_lower(exported, partitioner=[partitioner(b) for b in backends])
        return program.to_executorch().buffer


def export_component(component: Component, folder: Path, precision: str, config,
                     calibration: list[tuple] | None = None, quantization: tuple[dict, dict] | None = None) -> Path:
    """Write `<folder>/model.pte` and `io.json` for one component; return the program's path."""
    FORMAT.check_precision(precision)
    folder.mkdir(parents=True, exist_ok=True)
    args, backends = tuple(component.inputs.values()), tuple(config.executorch_backends)
    if precision != "int8":
        module = component.module
    elif component.name.startswith("text_encoder"):
        module = pt2e_int8.dynamic_int8_linears(component.module, args)
    else:
        module = with_int8_unet(component, lambda unet: quantize_int8(unet, calibration, quantization))
    try:
        buffer = lower(module, args, backends)
    except UserError:
        raise
    except Exception as err:  # lowering errors name the op that failed; keep that line
        raise UserError(f"ExecuTorch export of {component.name} failed: {_first_line(err)}") from None
    path = folder / FILE
    path.write_bytes(buffer)
    io = {"inputs": list(component.inputs), "outputs": component.outputs, "backends": list(backends),
          "shapes": {name: list(value.shape) for name, value in component.inputs.items()}}
    (folder / "io.json").write_text(json.dumps(io, indent=2))
    return path


def load(path: Path):
    return ExecuTorchModel(path)


def file_bytes(path: Path) -> int:
    return Path(path).stat().st_size


FORMAT = ExportFormat(
    name="executorch", title="ExecuTorch", precisions=("fp32", "int8"), default_precision="fp32",
    int8_backends=INT8_BACKENDS, palettizes=False, dynamic_shapes=False, runs_pipeline=True, check_int8=check_int8,
    export_component=export_component, load=load, write_layout=write_optimum_layout, file_bytes=file_bytes)
