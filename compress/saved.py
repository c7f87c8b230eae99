"""A quantized folder, read back: its spec and quantizer state, the quantized UNet they rebuild, and a pipeline
that runs it.

The folder is a stock diffusers pipeline whose UNet weights are the (QAT-trained) float weights,
which stock diffusers loads and runs in fp32, plus `unet/quantization.json` (the backend and its
settings) and, for backends with quantizers, `unet/quantization.safetensors` (their ranges and
scales). The backend object rebuilds the quantized UNet from those for any input shape, and the
export for the backend's runtime lowers it, so what was trained is what ships.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from .. import modelio
from ..errors import UserError
from .backends import BACKENDS, SPEC_FILE, STATE_FILE


def read_quantization(ref: modelio.ModelRef) -> tuple[dict, dict] | None:
    """(spec, quantizer state) of a quantized folder, or None for a float one; a palette has no state."""
    folder = ref.unet_path
    if not (folder / SPEC_FILE).exists():
        return None
    spec = json.loads((folder / SPEC_FILE).read_text())
    if not BACKENDS[spec["backend"]].has_state:
        return spec, {}
    if not (folder / STATE_FILE).exists():
        raise UserError(f"{folder}: {SPEC_FILE} without {STATE_FILE}; quantize the model again")
    return spec, load_file(folder / STATE_FILE)


def load_quantized_unet(ref: modelio.ModelRef) -> torch.nn.Module | None:
    """The quantized UNet of a quantized folder (int8: a QuantizedUNet; W4A8: the UNet with brevitas layers);
    None for a float or palettized one (its float UNet is the model)."""
    found = read_quantization(ref)
    if found is None:
        return None
    return BACKENDS[found[0]["backend"]].load(modelio.load_unet(ref), *found)


def load_shipped_pipeline(ref: modelio.ModelRef):
    """The pipeline with a quantized folder's UNet as its int8 graph, not the float weights stock diffusers
    loads: what samples images to judge them calls this, so it measures what ships."""
    pipe = modelio.load_pipeline(ref)
    int8 = load_quantized_unet(ref)
    if int8 is not None:
        pipe.unet = int8
    return pipe
