"""Which layers quantization hurts most: each one quantized alone, on the inputs it really meets.

Mixed precision keeps a few layers in fp32; which ones is measured, not guessed. Each candidate
layer's recorded inputs are fake-quantized as the backend would (int8: per-tensor activations over
their observed range, affine or symmetric, and per-channel symmetric weights in the backend's
range; palettization: the layer's k-means table, activations untouched) and its output compared
with the float output: the relative squared error of that layer alone. One pass with hooks gives
every layer's ranges, a second its error, so the cost is two forwards per batch.
"""

from __future__ import annotations

import torch

from .palettize import fit
from .unet_graph import candidates

def _int8_weight(weight: torch.Tensor, qmax: int) -> torch.Tensor:
    flat = weight.detach().flatten(1).abs().amax(1).clamp(min=1e-8)
    scale = (flat / qmax).float()
    return torch.fake_quantize_per_channel_affine(weight.detach(), scale, torch.zeros_like(scale, dtype=torch.int32),
                                                  0, -qmax, qmax)


def _weight(weight: torch.Tensor, scheme: dict) -> torch.Tensor:
    if "bits" in scheme:
        table, index = fit(weight, scheme["bits"])
        return table[index].reshape(weight.shape).to(weight.dtype)
    return _int8_weight(weight, scheme["weight_qmax"])


def _activation(x: torch.Tensor, low: float, high: float, scheme: dict) -> torch.Tensor:
    """int8 over the observed range (which holds zero, as the observers' does); weight-only schemes leave x."""
    kind = scheme.get("activations")
    if kind is None:
        return x
    if kind == "symmetric":
        scale = max(max(-low, high) / 127.5, 1e-8)
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255, 1e-8)
    zero_point = int(round(-low / scale)) - 128
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127)


def _forward(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


@torch.no_grad()
def layer_errors(model, batches: list[tuple], layers: str, keep: list[str], scheme: dict) -> dict[str, float]:
    """Relative squared output error of each candidate layer quantized alone, over `batches` of inputs.

    `model` is the traced wrapper (`model.unet` the diffusers UNet, whose module names `keep` and
    the result use); `batches` are its positional inputs; `scheme` the backend's numerics
    (`backends.BACKENDS[name].scheme`)."""
    chosen = candidates(model.unet, layers, keep)
    ranges = {name: [float("inf"), float("-inf")] for name in chosen}
    errors = {name: [0.0, 0.0] for name in chosen}
    weights = {name: _weight(module.weight, scheme) for name, module in chosen.items()}

    def observe(name):
        def hook(_module, args, _output):
            seen = ranges[name]
            seen[0], seen[1] = min(seen[0], float(args[0].min())), max(seen[1], float(args[0].max()))
        return hook

    def measure(name):
        def hook(module, args, output):
            quantized = _forward(module, _activation(args[0], *ranges[name], scheme), weights[name])
            errors[name][0] += float((quantized - output).pow(2).sum())
            errors[name][1] += float(output.pow(2).sum())
        return hook

    for make in (observe, measure):
        handles = [module.register_forward_hook(make(name)) for name, module in chosen.items()]
        try:
            for args in batches:
                model(*args)
        finally:
            for handle in handles:
                handle.remove()
    return {name: err / max(total, 1e-30) for name, (err, total) in errors.items()}


def most_sensitive(errors: dict[str, float], count: int) -> list[str]:
    return sorted(errors, key=errors.get, reverse=True)[:count]
