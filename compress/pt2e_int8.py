"""int8 by torchao's PT2E, the graph every int8 export lowers: one flow, a scheme per target runtime.

Per-channel symmetric int8 weights, per-tensor int8 activations. The graph is
`torch.export`ed, annotated (`prepare_pt2e` for post-training calibration, `prepare_qat_pt2e` for
fake-quantized training), then `convert_pt2e` turns it into quantize/dequantize pairs: XNNPACK's
partitioner fuses them into int8 kernels (ExecuTorch), and the ONNX exporter writes them as
QuantizeLinear/DequantizeLinear that onnxruntime fuses into QLinearConv / QGemm, and coremltools
into `constexpr_affine_dequantize` weights and quantize/dequantize activations. Only the op types
asked for are annotated, and nodes inside the kept modules are not: diffusion UNets lose most
under int8 at their input and output convolutions and time embedding.
"""

from __future__ import annotations

import dataclasses
import types

import torch

from ..errors import UserError
from .unet_graph import classic_attention, graph_inputs, quantizer_state, traced

# Weight ranges per target. onnxruntime's x86 int8 kernels without VNNI multiply u8×s8 pairs into
# int16 (VPMADDUBSW), which saturates with 8-bit weights; its own quantizer's answer is 7-bit
# weights (`reduce_range`). Measured on the quickstart's student: with ±127 weights torch's int8
# graph was 0.022 from fp32 (relative) and onnxruntime ran it at 0.074; with ±63, 0.023 and 0.024.
# Core ML's int8 activations (W8A8, the Neural Engine's int8 path from A17 Pro / M4) are symmetric:
# coremltools' own activation quantizer offers only linear_symmetric.
SCHEMES = {"xnnpack": {"weight_qmin": -127, "weight_qmax": 127, "activations": "affine"},
           "onnx-int8": {"weight_qmin": -63, "weight_qmax": 63, "activations": "affine"},
           "coreml-w8a8": {"weight_qmin": -127, "weight_qmax": 127, "activations": "symmetric"}}
OPS = {"linear": (torch.ops.aten.linear.default,),
       "conv+linear": (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)}
# Attention's two batched matmuls as `classic_attention` traces them, and their operands' positions:
# QKᵀ is bmm(scale·Q, Kᵀ), AV is bmm(softmax, V). Q, K and V come out of quantized linears, whose
# output observers already make them int8 (reshapes share them); annotating the matmuls adds the
# float operands left: the scaled query and the softmax's probabilities.
ATTENTION_MATMULS = {torch.ops.aten.bmm.default: (0, 1)}
# Runtimes whose int8 kernels take both operands of a matmul from activations: onnxruntime fuses
# DQ, DQ → MatMul into MatMulIntegerToFloat; Core ML takes int8 activations into any op. XNNPACK's
# partitioner delegates bmm in fp32 only, so int8 operands would be dequantized again on the CPU.
ATTENTION_SCHEMES = ("onnx-int8", "coreml-w8a8")


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


class GraphTaps:
    """The named modules' outputs at each forward of an exported graph: `distill.kd.Taps` for graphs.

    An exported graph has no submodules to hook. A module's output is the last node traced inside it
    (graph order is execution order); a node inserted after it keeps the value, gradient included,
    until `remove` takes the inserted nodes out again."""

    def __init__(self, graph: torch.fx.GraphModule, names: list[str], root: str = "unet"):
        self.graph, self.outputs = graph, {}
        last = {}
        for node in graph.graph.nodes:
            if node.op == "call_function":
                for name in names:
                    module = f"{root}.{name}"
                    if any(path == module or path.startswith(module + ".") for path in _module_paths(node)):
                        last[name] = node
        missing = [name for name in names if name not in last]
        if missing:
            raise ValueError(f"no node of {root}.{missing[0]} in the graph")
        self.taps = []
        for name, node in last.items():
            with graph.graph.inserting_after(node):
                self.taps.append(graph.graph.call_function(self._keeper(name), (node,)))
        graph.recompile()

    def _keeper(self, name: str):
        def keep(value):
            self.outputs[name] = value
        keep.__name__ = f"keep_{name.replace('.', '_')}"
        return keep

    def remove(self) -> None:
        for tap in self.taps:
            self.graph.graph.erase_node(tap)
        self.taps = []
        self.graph.recompile()


def describe(scheme: str, attention: bool = False) -> str:
    chosen = SCHEMES[scheme]
    return (f"int8: per-channel symmetric weights in ±{chosen['weight_qmax']}, "
            f"per-tensor {chosen['activations']} activations" + ("; attention matmuls' operands int8" if attention else ""))


def _in_attention(node) -> bool:
    return any(kind is not None and getattr(kind, "__name__", str(kind)).endswith("Attention")
               for _, kind in (node.meta.get("nn_module_stack") or {}).values())


def attention_matmuls(spec, wanted):
    """A torchao PT2E quantizer (composed after XNNPACK's) that annotates both operands of attention's matmuls
    (QKᵀ and AV) with the activation spec `spec`, where `wanted(node)`; their outputs stay float, since
    QKᵀ goes on to softmax."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

    class AttentionMatmuls(Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for node in model.graph.nodes:
                operands = ATTENTION_MATMULS.get(node.target) if node.op == "call_function" else None
                if operands and _in_attention(node) and wanted(node):
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[i]: spec for i in operands}, _annotated=True)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            pass

    return AttentionMatmuls()


def quantizer(layers: str, keep: list[str], qat: bool, scheme: str, root: str = "unet", attention: bool = False):
    """ExecuTorch's XNNPACK quantizer as a plain annotator: its patterns fit any QDQ runtime; the ranges are the
    scheme's. `attention`: the attention matmuls' operands too (`ATTENTION_SCHEMES` only)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantizer import ComposableQuantizer

    chosen_scheme = SCHEMES[scheme]
    config = get_symmetric_quantization_config(is_per_channel=True, is_qat=qat, weight_qmin=chosen_scheme["weight_qmin"],
                                               weight_qmax=chosen_scheme["weight_qmax"])
    if chosen_scheme["activations"] == "symmetric":
        activation = dataclasses.replace(config.input_activation, qscheme=torch.per_tensor_symmetric)
        config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    chosen = XNNPACKQuantizer()
    for op in OPS[layers]:
        chosen.set_operator_type(op, config)
    chosen.set_filter_function(_outside(keep, root))
    if not attention:
        return chosen
    return ComposableQuantizer([chosen, attention_matmuls(config.input_activation, _outside(keep, root))])


def prepare(module: torch.nn.Module, args: tuple, layers: str, keep: list[str], qat: bool,
            scheme: str, attention: bool = False) -> torch.fx.GraphModule:
    """`module` exported at `args`' shapes with observers (or fake-quantizers, for QAT) on the chosen layers."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    with classic_attention(module):  # the graph ExecuTorch lowers: no safe-softmax guards left on portable kernels
        graph = torch.export.export(module, args).module()
    prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(graph, quantizer(layers, keep, qat, scheme, attention=attention))
    prepared.train = types.MethodType(_keep_traced_mode, prepared)
    return prepared


def dynamic_int8_linears(module: torch.nn.Module, args: tuple) -> torch.fx.GraphModule:
    """`module`'s linears as XNNPACK's dynamic int8: per-channel int8 weights, activations quantized per call.

    For text encoders: their activations have outlier channels that one calibrated per-tensor range
    clips, and per-call ranges need no calibration set, so any prompt is handled as well as the
    traced one. One forward fills the weight observers.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    chosen = XNNPACKQuantizer().set_operator_type(
        torch.ops.aten.linear.default, get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    prepared = prepare_pt2e(torch.export.export(module, args).module(), chosen)
    with torch.no_grad():
        prepared(*args)
    return convert(prepared)


def _keep_traced_mode(graph, mode: bool = True):
    """`.train()` / `.eval()` on the graph change nothing: it keeps the eval mode it was traced in.

    The shared trainer calls `.train()`, which exported graphs refuse, and torchao's way to allow
    it rewrites every dropout to p=0.5, its pattern's default, where diffusers' dropouts are p=0:
    measured on the default, that alone took the output's mean square error from 5e-4 to 0.3.
    """
    return graph


def _observer_nodes(graph: torch.fx.GraphModule) -> list:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from torchao.quantization.pt2e.observer import ObserverBase

    return [node for node in graph.graph.nodes if node.op == "call_module"
            and isinstance(graph.get_submodule(node.target), (ObserverBase, FakeQuantizeBase))]


@torch.no_grad()
def start_from(qat: torch.fx.GraphModule, calibrated: torch.fx.GraphModule) -> None:
    """Give a QAT graph every range a post-training graph calibrated, and hold them there while it trains.

    Two differences made QAT's int8 model no better than post-training int8's (held-out UNet error
    0.0232–0.0240 against 0.0227–0.0233 in four measurements before this). Activations: calibration's
    histogram searches for the range with the least int8 error, clipping outliers, where QAT's
    fused fake-quantizers keep a moving average of min/max, a wider range with coarser steps.
    Weights: the fused kernel recomputes a per-channel scale from min/max at every call, even with
    its observer off, as the largest magnitude over 62.5 or 63.5 steps (for ±63, by the extreme's
    sign), while the converted graph divides by 63, so the grid QAT trained on was not the grid
    that shipped. Here every fake-quantizer keeps the calibrated grid and applies it with
    `FakeQuantize`'s own unfused forward (the fused class is its subclass, with the same state), so
    step 0 of QAT is the post-training model and the grids it trains on are the ones `convert`
    writes. Both graphs come from one exported module and one quantizer, so their observers pair
    up in graph order, each on the same node.
    """
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import HistogramObserver

    for before, after in zip(_observer_nodes(calibrated), _observer_nodes(qat), strict=True):
        if before.args[0].name != after.args[0].name:
            raise RuntimeError(f"the QAT graph observes {after.args[0].name} where calibration observed "
                               f"{before.args[0].name}")
        observed, fake = calibrated.get_submodule(before.target), qat.get_submodule(after.target)
        if isinstance(observed, HistogramObserver):
            low, high = observed._non_linear_param_search()  # the range its calculate_qparams quantizes with
        else:
            low, high = observed.min_val, observed.max_val
        fake.activation_post_process.min_val = low.clone()
        fake.activation_post_process.max_val = high.clone()
        scale, zero_point = fake.calculate_qparams()
        fake.scale, fake.zero_point = scale.clone(), zero_point.to(fake.zero_point.dtype)
        fake.disable_observer()
        fake.__class__ = FakeQuantize  # same buffers; its forward applies the held scale and zero point


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(prepared)
    for module in converted.modules():  # traced in eval mode; exported graphs refuse `.eval()` itself
        module.training = False
    return converted


def quantized_layers(prepared: torch.fx.GraphModule) -> dict[str, int]:
    """How many linear and conv nodes carry a quantized weight (and, where any are, how many attention matmuls
    were annotated): the count that proves annotation took."""
    counts = {"linear": 0, "conv": 0, "attention_matmuls": 0}
    for node in prepared.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
            if node.args[1].op == "call_module":  # the weight passes through an observer or fake-quantizer
                counts["linear" if node.target == torch.ops.aten.linear.default else "conv"] += 1
        elif node.target in ATTENTION_MATMULS:
            annotation = node.meta.get("quantization_annotation")
            counts["attention_matmuls"] += bool(annotation and annotation.input_qspec_map)
    return counts if counts["attention_matmuls"] else {"linear": counts["linear"], "conv": counts["conv"]}


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
    graph = prepare(traced(unet), args, spec["layers"], spec["keep"], spec["qat"], spec["backend"],
                    spec.get("attention", False))
    expected = set(quantizer_state(graph.state_dict()))
    if expected != set(state):
        raise UserError(f"the saved quantization state does not fit this UNet's graph "
                        f"({len(expected ^ set(state))} entries differ); quantize the model again")
    graph.load_state_dict(state, strict=False)
    return convert(graph)
