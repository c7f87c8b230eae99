"""Palettization for Core ML: each layer keeps 2**bits weight values, a look-up table (4 or 6 bits).

What Apple ships Stable Diffusion with on the Neural Engine (ml-stable-diffusion's 6-bit and
mixed-bit palettized UNets): weights become indices into a small table, dequantized by
`constexpr_lut_to_dense` as they load, activations stay fp16. One table per layer, as Apple's:
measured on the quickstart's student (4 bits, 16 held-out prompts), tables per 32, 16, 8 or 4
output channels gave relative UNet errors 0.067–0.070 against 0.070 per layer, for 2–8× the tables.
Fitting is 1-D k-means (quantile start, so it is deterministic); training keeps every weight's
index and trains the tables' values against the fp32 UNet (the trained-quantization step of Deep
Compression): the assignments are what k-means gets right, the values what the output feels.

The saved UNet holds the table values at the weights' places as ordinary float weights: stock
diffusers runs exactly the palettized model, and the Core ML export recovers each table
losslessly from the layer's (at most 2**bits) distinct values.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from .unet_graph import candidates

ITERATIONS = 30


def fit(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted table of 2**bits values, each weight's index into it): least-squares 1-D k-means."""
    values = weight.detach().flatten().float()
    ordered = values.sort().values  # quantiles by hand: torch.quantile refuses SD-scale layers (over 2**24 values)
    table = ordered[torch.linspace(0, len(ordered) - 1, 2 ** bits, dtype=torch.float64).round().long()]
    for _ in range(ITERATIONS):
        index = _assign(values, table)
        sums = torch.zeros_like(table).scatter_add_(0, index, values)
        counts = torch.zeros_like(table).scatter_add_(0, index, torch.ones_like(values))
        table = torch.where(counts > 0, sums / counts.clamp(min=1), table).sort().values
    return table, _assign(values, table)


def _assign(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest entry of the sorted table: the midpoints split the line into the entries' cells."""
    return torch.searchsorted((table[1:] + table[:-1]) / 2, values)


class Palette(torch.nn.Module):
    """A layer's weight as `table[index]`: the table is the trained parameter, the index a buffer."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        self.shape, self.bits = tuple(weight.shape), bits
        self.register_buffer("index", torch.zeros(weight.numel(), dtype=torch.uint8))  # a byte a weight, not 8

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return table[self.index.long()].reshape(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The nearest palettized weight: k-means fits the table and sets each value's index."""
        table, index = fit(weight, self.bits)
        self.index.copy_(index)
        return table.to(weight.dtype)


def palettize_(unet, layers: str, keep: list[str], bits: int) -> list[str]:
    """Replace the chosen layers' (conv/linear outside `keep`) weights by trainable tables in place; return their names."""
    chosen = candidates(unet, layers, keep)
    for module in chosen.values():
        parametrize.register_parametrization(module, "weight", Palette(module.weight, bits))
        module.parametrizations.weight.original.requires_grad_(True)
    return list(chosen)


def finalize_(unet) -> None:
    """Bake every table into ordinary float weights (at most 2**bits values per layer)."""
    for module in unet.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def distinct_values(weight: torch.Tensor) -> int:
    """How many distinct values a weight holds: at most 2**bits for a palettized layer."""
    return len(torch.unique(weight.detach()))
