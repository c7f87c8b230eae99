"""A latency lookup table for UNet variants (SnapFusion's approach): time each layer once, predict any
pruned architecture by summing.

A pruned UNet is the teacher's layers minus some (`distill.blocks`), with a few layers changing
shape where skip connections move. A layer's cost depends on its class, its weights' shapes and
its inputs' shapes, nothing else, so that triple is the table's key: every layer of every variant
that shares it costs the same. The parts between layers (time embedding's projection, skip
concatenations, activations outside layers) are folded in by one factor, the teacher's measured
whole-model time over the sum of its layers, so the prediction for the teacher is exact by
construction and a variant's error comes only from how layers compose.

Entries come from timing each layer alone on this machine (`source="measured"`, in the table's
`runtime`: torch eager, onnxruntime with each layer exported alone to ONNX, or ExecuTorch with each
layer lowered alone to XNNPACK, since a table timed in one runtime mispredicts another where
per-node overhead differs), or from a device profile's calibrated roofline for devices not at hand
(`source="roofline"`). Layers a table lacks are measured (or estimated) when first asked for.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .. import modelio
from ..errors import UserError
from .timing import call_times

RUNTIMES = ("torch", "onnxruntime", "executorch")
LAYER = re.compile(r"^(conv_in|time_embedding|conv_norm_out|conv_out|mid_block|"
                   r"(down|up)_blocks\.\d+\.(resnets|attentions|downsamplers|upsamplers)\.\d+)$")


@dataclass
class Call:
    """One layer call as the UNet made it: the module, its key, and inputs to replay it with."""

    name: str
    key: str
    module: torch.nn.Module
    args: tuple
    kwargs: dict


def _shapes(value):
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in sorted(value.items())}
    return value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__


def layer_key(module: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    """Class, weight shapes and input shapes: what a layer's latency depends on."""
    weights = [list(p.shape) for p in module.parameters()]
    return json.dumps([type(module).__name__, weights, _shapes(list(args)), _shapes(kwargs)], separators=(",", ":"))


def layer_calls(unet, inputs: dict) -> list[Call]:
    """Every table layer of `unet` with the inputs one forward gives it (meta or real tensors alike)."""
    calls, handles = [], []
    for name, module in unet.named_modules():
        if LAYER.match(name):
            def hook(m, args, kwargs, name=name):
                calls.append(Call(name, layer_key(m, args, kwargs), m, args, kwargs))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            unet(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _materialize(value, generator: torch.Generator):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return torch.randn(value.shape, generator=generator, dtype=value.dtype)
        return torch.zeros(value.shape, dtype=value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, generator) for v in value)
    if isinstance(value, dict):
        return {k: _materialize(v, generator) for k, v in value.items()}
    return value


def _replayable(call: Call) -> tuple[torch.nn.Module, tuple, dict]:
    """The layer with real weights (random: time does not depend on values) and real inputs shaped as recorded."""
    module = call.module
    if any(p.is_meta for p in module.parameters()):
        module = module.to_empty(device="cpu")
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
    generator = torch.Generator().manual_seed(0)
    return module.eval(), _materialize(call.args, generator), _materialize(call.kwargs, generator)


class _TensorsOnly(torch.nn.Module):
    """A call with its tensor arguments as the only inputs (the rest fixed): what an ONNX graph takes."""

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.module, self.args, self.kwargs = module, args, kwargs
        self.tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]

    def forward(self, *tensors):
        given = iter(tensors)
        args = [next(given) if isinstance(v, torch.Tensor) else v for v in self.args]
        kwargs = {k: next(given) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}
        return self.module(*args, **kwargs)


def onnxruntime_times(module: torch.nn.Module, args: tuple, kwargs: dict, runs: int) -> list[float]:
    """ms of `runs` calls of `module(*args, **kwargs)` exported alone to ONNX and run by onnxruntime's CPU provider."""
    import onnxruntime

    from ..export.components import quiet_tracing
    from ..export.onnx import OPSET

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # as the ONNX export does: no per-export chatter
    call = _TensorsOnly(module, args, kwargs).eval()
    names = [f"input_{i}" for i in range(len(call.tensors))]
    with tempfile.TemporaryDirectory() as folder, torch.no_grad(), quiet_tracing():
        path = str(Path(folder) / "layer.onnx")
        torch.onnx.export(call, tuple(call.tensors), path, dynamo=True, opset_version=OPSET, input_names=names,
                          optimize=False, verbose=False)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    by_name = dict(zip(names, call.tensors))
    feed = {i.name: by_name[i.name].numpy() for i in session.get_inputs()}  # an unused input is not in the graph
    return call_times(lambda: session.run(None, feed), runs)


def executorch_times(module: torch.nn.Module, args: tuple, kwargs: dict, runs: int) -> list[float]:
    """ms of `runs` calls of `module(*args, **kwargs)` lowered alone to ExecuTorch's XNNPACK delegate, traced as
    the ExecuTorch export traces it (attention as explicit matmuls), and run by ExecuTorch's runtime."""
    from executorch.runtime import Runtime

    from ..export.executorch import lower

    call = _TensorsOnly(module, args, kwargs).eval()
    program = lower(call, tuple(call.tensors))  # kept while the method runs: the runtime reads it without a copy
    method = Runtime.get().load_program(program).load_method("forward")
    return call_times(lambda: method.execute(call.tensors), runs)


def torch_times(module: torch.nn.Module, args: tuple, kwargs: dict, runs: int) -> list[float]:
    """ms of `runs` calls of `module(*args, **kwargs)` in torch eager."""
    with torch.no_grad():
        return call_times(lambda: module(*args, **kwargs), runs)


TIMERS = {"torch": torch_times, "onnxruntime": onnxruntime_times, "executorch": executorch_times}


def time_layer(call: Call, runs: int, runtime: str = "torch") -> float:
    """Best-of-`runs` ms of the layer alone on this machine's CPU, in `runtime`.

    Tables take the best of N: on a shared machine interference only ever adds time, so the
    minimum is the steadiest estimate of the work itself."""
    module, args, kwargs = _replayable(call)
    return min(TIMERS[runtime](module, args, kwargs, runs))


@dataclass
class LatencyTable:
    device: str
    source: str  # measured | roofline
    latent: int
    batch: int
    entries: dict[str, float] = field(default_factory=dict)  # layer key → ms
    glue: float = 1.0  # teacher's whole-model ms ÷ the sum of its layers' ms
    teacher_ms: float | None = None
    runs: int = 10
    runtime: Literal["torch", "onnxruntime", "executorch"] = "torch"  # what a measured table's times come from

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(vars(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> LatencyTable:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"{path}: not a latency table ({err})") from None

    def layer_ms(self, call: Call) -> float:
        if call.key not in self.entries:
            self.entries[call.key] = self._cost(call)
        return self.entries[call.key]

    def _cost(self, call: Call) -> float:
        if self.source == "measured":
            return time_layer(call, self.runs, self.runtime)
        from .opcount import record_ops
        from .profiles import load_profile
        from .roofline import estimate

        ops = record_ops(call.module, lambda m: m(*call.args, **call.kwargs))
        value = estimate(ops, load_profile(self.device))
        return value.estimate_ms or value.ideal_ms

    def anchor(self, config: dict, measured_ms: float) -> None:
        """Set the glue factor from a whole-model time of `config` measured now, so the table's scale
        matches the machine's state when variants are measured beside it."""
        self.teacher_ms = measured_ms
        self.glue = measured_ms / sum(self.layer_ms(c) for c in self._calls(config))

    def predict(self, config: dict) -> float:
        """Predicted ms of one call of the UNet `config` at the table's latent size and batch."""
        return self.glue * sum(self.layer_ms(c) for c in self._calls(config))

    def _calls(self, config: dict) -> list[Call]:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
            inputs = modelio.unet_example_inputs(config, self.latent, batch=self.batch, device="meta")
            return layer_calls(unet, inputs)


def unet_times(config: dict, latent: int, batch: int, runs: int, runtime: str = "torch") -> list[float]:
    """ms of each of `runs` calls of the whole UNet (random weights) on this machine's CPU, in `runtime`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    inputs = modelio.unet_example_inputs(config, latent, batch=batch, generator=torch.Generator().manual_seed(0))
    return TIMERS[runtime](unet, (), {**inputs, "return_dict": False}, runs)


def build_table(config: dict, device: str = "host-cpu", latent: int | None = None, batch: int = 1,
                runs: int = 10, runtime: str = "torch") -> LatencyTable:
    """A table holding every layer of the teacher `config`, with the glue factor from the teacher's own time.

    `runtime` (host-cpu only): torch eager, onnxruntime or ExecuTorch, the runtime whose times the table holds."""
    if runtime not in RUNTIMES:
        raise UserError(f"runtime {runtime!r}: a latency table is timed in {', '.join(RUNTIMES[:-1])} or {RUNTIMES[-1]}")
    latent = latent or config["sample_size"]
    source = "measured" if device == "host-cpu" else "roofline"
    if runtime != "torch" and source != "measured":
        raise UserError(f"a {runtime} latency table is timed on this machine (device host-cpu), not {device}")
    table = LatencyTable(device, source, latent, batch, runs=runs, runtime=runtime)
    if source == "measured":
        table.anchor(config, min(unet_times(config, latent, batch, runs, runtime)))
    return table


def table_for(ref, config) -> LatencyTable | None:
    """The table a prune `config`'s latency target is judged by (None for other targets): its saved `latency_table`
    read back, else built now for its device (host-cpu: each layer timed once in its runtime, torch eager,
    onnxruntime or ExecuTorch; a phone: its calibrated roofline)."""
    from ..compress.oneshot import parse_target

    if config.target is None or parse_target(config.target).metric != "latency":
        return None
    unet = modelio.unet_config(ref)
    if config.latency_table is None:
        return build_table(unet, config.device, batch=modelio.unet_batch(unet), runtime=config.runtime)
    table = LatencyTable.load(config.latency_table)
    if (table.device, table.runtime) != (config.device, config.runtime):
        raise UserError(f"{config.latency_table}: a table for {table.device} ({table.runtime}), not {config.device} "
                        f"({config.runtime})")
    return table
