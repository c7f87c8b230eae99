"""The ExecuTorch backend of `quantize`: torchao PT2E with ExecuTorch's XNNPACK quantizer.

int8 as XNNPACK runs it: per-channel symmetric int8 weights, per-tensor affine int8 activations.
The graph is `torch.export`ed, annotated (`prepare_pt2e` for post-training calibration,
`prepare_qat_pt2e` for fake-quantized training), then `convert_pt2e` turns it into
quantize/dequantize pairs that XNNPACK's partitioner fuses into int8 kernels. Only the op types
asked for are annotated, and nodes inside the kept modules are not: diffusion UNets lose most
under int8 at their input and output convolutions and time embedding.
"""

from __future__ import annotations

import types

import torch

OPS = {"linear": (torch.ops.aten.linear.default,),
       "conv+linear": (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)}


def _module_paths(node) -> list[str]:
    """The module paths a graph node was traced inside, as `named_modules` spells them."""
    stack = node.meta.get("nn_module_stack") or {}
    prefix = "L['self']."
    return [path[len(prefix):] if path.startswith(prefix) else path for path, _ in stack.values()]


def _outside(keep: list[str], root: str):
    """A node filter: True unless the node comes from one of the kept modules (names relative to `root`)."""
    kept = tuple(f"{root}.{name}" for name in keep)

    def annotate(node) -> bool:
        return not any(path == k or path.startswith(k + ".") for path in _module_paths(node) for k in kept)

    return annotate


def quantizer(layers: str, keep: list[str], qat: bool, root: str = "unet"):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    config = get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)
    chosen = XNNPACKQuantizer()
    for op in OPS[layers]:
        chosen.set_operator_type(op, config)
    return chosen.set_filter_function(_outside(keep, root))


def prepare(module: torch.nn.Module, args: tuple, layers: str, keep: list[str], qat: bool) -> torch.fx.GraphModule:
    """`module` exported at `args`' shapes with observers (or fake-quantizers, for QAT) on the chosen layers."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    from ..export.executorch import classic_attention

    with classic_attention(module):  # the graph ExecuTorch lowers: no safe-softmax guards left on portable kernels
        graph = torch.export.export(module, args).module()
    prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(graph, quantizer(layers, keep, qat))
    prepared.train = types.MethodType(_keep_traced_mode, prepared)
    return prepared


def _keep_traced_mode(graph, mode: bool = True):
    """`.train()` / `.eval()` on the graph change nothing: it keeps the eval mode it was traced in.

    The shared trainer calls `.train()`, which exported graphs refuse, and torchao's way to allow
    it rewrites every dropout to p=0.5, its pattern's default, where diffusers' dropouts are p=0:
    measured on the default, that alone took the output's mean square error from 5e-4 to 0.3.
    """
    return graph


def freeze(prepared: torch.fx.GraphModule) -> None:
    """Stop every observer: the ranges seen so far are the ones the int8 model keeps."""
    for sub in prepared.modules():
        if hasattr(sub, "observer_enabled"):
            sub.observer_enabled[0] = 0


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    return convert_pt2e(prepared)


def quantized_layers(prepared: torch.fx.GraphModule) -> dict[str, int]:
    """How many linear and conv nodes carry a quantized weight: the count that proves annotation took."""
    counts = {"linear": 0, "conv": 0}
    for node in prepared.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
            if node.args[1].op == "call_module":  # the weight passes through an observer or fake-quantizer
                counts["linear" if node.target == torch.ops.aten.linear.default else "conv"] += 1
    return counts
