"""A latency lookup table for UNet variants (SnapFusion's approach): time each layer once, predict any
pruned architecture by summing.

A pruned UNet is the teacher's layers minus some (`compress.blocks`), with a few layers changing
shape where skip connections move. A layer's cost depends on its class, its weights' shapes and
its inputs' shapes, nothing else, so that triple is the table's key: every layer of every variant
that shares it costs the same. The parts between layers (time embedding's projection, skip
concatenations, activations outside layers) are folded in by one factor, the teacher's measured
whole-model time over the sum of its layers, so the prediction for the teacher is exact by
construction and a variant's error comes only from how layers compose.

Entries come from timing each layer alone on this machine (`source="measured"`, torch eager, the
backend the table names), or from a device profile's calibrated roofline for devices not at hand
(`source="roofline"`). Layers a table lacks are measured (or estimated) when first asked for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..apps.errors import UserError
from .timing import call_times

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


def time_layer(call: Call, runs: int) -> float:
    """Best-of-`runs` ms of the layer alone on this machine's CPU (random weights: time does not depend on values).

    Tables take the best of N: on a shared machine interference only ever adds time, so the
    minimum is the steadiest estimate of the work itself."""
    module = call.module
    if any(p.is_meta for p in module.parameters()):
        module = module.to_empty(device="cpu")
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
    generator = torch.Generator().manual_seed(0)
    args, kwargs = _materialize(call.args, generator), _materialize(call.kwargs, generator)
    with torch.no_grad():
        return min(call_times(lambda: module(*args, **kwargs), runs))


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
            return time_layer(call, self.runs)
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

        from ..apps import modelio

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
            inputs = modelio.unet_example_inputs(config, self.latent, batch=self.batch, device="meta")
            return layer_calls(unet, inputs)


def unet_times(config: dict, latent: int, batch: int, runs: int) -> list[float]:
    """ms of each of `runs` calls of the whole UNet (random weights) on this machine's CPU."""
    from diffusers import UNet2DConditionModel

    from ..apps import modelio

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    inputs = modelio.unet_example_inputs(config, latent, batch=batch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return call_times(lambda: unet(**inputs), runs)


def build_table(config: dict, device: str = "host-cpu", latent: int | None = None, batch: int = 1,
                runs: int = 10) -> LatencyTable:
    """A table holding every layer of the teacher `config`, with the glue factor from the teacher's own time."""
    latent = latent or config["sample_size"]
    source = "measured" if device == "host-cpu" else "roofline"
    table = LatencyTable(device, source, latent, batch, runs=runs)
    if source == "measured":
        table.anchor(config, min(unet_times(config, latent, batch, runs)))
    return table
