"""W4A8 with brevitas, the research backend: 4-bit weights, int8 activations, written as ONNX QCDQ.

Below 8 bits is where diffusion UNets start to break (QuEST, Q-Sched), and where a researcher wants
to try ranges, granularities and training; brevitas's quantized layers are built for that. Each
chosen conv/linear is replaced in place by its brevitas twin (`layerwise_quantize`): per-channel
symmetric 4-bit weights (scales from the weights' own maxima), per-tensor symmetric int8 inputs
(scales from calibration statistics, then learnable). The UNet stays a diffusers UNet, so pipelines
sample through it unchanged; QAT trains weights and scales through brevitas's straight-through
estimators. The export is QuantizeLinear → Clip → DequantizeLinear around every quantized tensor
(the clip holds weights to ±7): onnxruntime computes in float between those nodes, so the file
measures what 4-bit weights do to quality, not how fast a W4A8 kernel would run.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import UserError

SCHEME = "W4A8: per-channel symmetric 4-bit weights, per-tensor symmetric int8 activations (brevitas)"


def _layer_map(layers: str) -> dict:
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    quant = {"input_quant": Int8ActPerTensorFloat, "weight_quant": Int8WeightPerChannelFloat.let(bit_width=4),
             "bias_quant": None, "return_quant_tensor": False}
    chosen = {torch.nn.Linear: (qnn.QuantLinear, quant)}
    if layers == "conv+linear":
        chosen[torch.nn.Conv2d] = (qnn.QuantConv2d, quant)
    return chosen


def quantize_layers_(unet, layers: str, keep: list[str]) -> list[str]:
    """Swap the chosen layers outside `keep` (module names) for brevitas's, in place; return their names."""
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize

    layerwise_quantize(unet, compute_layer_map=_layer_map(layers), name_blacklist=list(keep))
    return [name for name, module in unet.named_modules() if isinstance(module, (qnn.QuantConv2d, qnn.QuantLinear))]


@contextmanager
def calibrating(model: torch.nn.Module):
    """Activation scales collected from what flows through, as brevitas's calibration mode does."""
    from brevitas.graph.calibrate import calibration_mode

    with torch.no_grad(), calibration_mode(model):
        yield


def rebuild(unet, spec: dict, state: dict) -> torch.nn.Module:
    """The W4A8 UNet from the saved float weights and the saved quantizer state (the activation scales)."""
    quantize_layers_(unet, spec["layers"], spec["keep"])
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected or any("_quant." in key for key in missing):
        raise UserError(f"the saved W4A8 state does not fit this UNet ({len(unexpected)} unexpected, "
                        f"{sum('_quant.' in key for key in missing)} missing entries); quantize the model again")
    return unet.eval()


def export_qcdq(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
                output_names: list[str], opset: int) -> None:
    """ONNX QCDQ of a W4A8 module at `args`' shapes, weights and scales as initializers (not graph inputs)."""
    from brevitas.export import export_onnx_qcdq

    export_onnx_qcdq(module, args, export_path=str(path), dynamo=True, opset_version=opset, input_names=input_names,
                     output_names=output_names, keep_initializers_as_inputs=False, verbose=False)
