"""Every tensor op of one forward pass, with its FLOPs and the bytes it moves: the roofline's input.

`macs` counts modules (BK-SDM's convention); a latency model needs every op instead, since
group norms, activations, concatenations and attention's softmax move memory that a phone's NPU
waits on. The forward runs on the meta device under a dispatch mode that sees the aten ops every
exporter lowers from, so an SD-scale config is counted in seconds without weights. Weights and
activations are counted apart because they are stored at different precisions (W8A16, say).
View ops (transpose, reshape, expand…) move nothing and are left out. Attention is counted as
one fused op (Q, K, V in, output out), as every mobile runtime worth targeting runs it (Apple's
split-einsum kernels, QNN, flash-style SDPA): the score matrix never goes to memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .. import modelio
from ..macs import block_name, text_encoder_from_config

# Not views by schema, but no runtime moves data for them (a reshape result, autograd plumbing).
_FREE = (torch.ops.aten._unsafe_view, torch.ops.aten.detach, torch.ops.aten.lift_fresh)
_ELEMENTWISE_FLOPS = {"native_group_norm": 8, "native_layer_norm": 8, "_softmax": 5, "gelu": 8, "silu": 4}


@dataclass(frozen=True)
class Op:
    """One op call: `flops` (a multiply-add is two), elements read or written as activations, weight elements read."""

    op: str
    block: str
    flops: int
    activation_elements: int
    weight_elements: int


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _FusedAttention(TorchFunctionMode):
    """Record `F.scaled_dot_product_attention` as one op and hand back an output of the right shape."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = args[:3]
        batch_heads = math.prod(query.shape[:-2])
        flops = 4 * batch_heads * query.shape[-2] * key.shape[-2] * query.shape[-1]
        out_shape = (*query.shape[:-1], value.shape[-1])
        moved = query.numel() + key.numel() + value.numel() + math.prod(out_shape)
        self.recorder.ops.append(Op("scaled_dot_product_attention", self.recorder.blocks[-1], flops, moved, 0))
        self.recorder.paused = True
        try:
            return torch.empty(out_shape, dtype=query.dtype, device=query.device)
        finally:
            self.recorder.paused = False


class _Recorder(TorchDispatchMode):
    def __init__(self, weights: set[int], blocks: list[str]):
        super().__init__()
        self.weights, self.blocks, self.ops, self.paused = weights, blocks, [], False

    def _weight(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self.weights or (tensor._base is not None and id(tensor._base) in self.weights)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or _is_view(func) or func._overloadpacket in _FREE:
            return out
        name = func._overloadpacket.__name__
        inputs = list(_tensors(list(args) + list(kwargs.values())))
        outputs = list(_tensors([out]))
        weight = sum(t.numel() for t in inputs if self._weight(t))
        activation = sum(t.numel() for t in inputs if not self._weight(t)) + sum(t.numel() for t in outputs)
        if func._overloadpacket in flop_registry:
            flops = flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        else:
            flops = _ELEMENTWISE_FLOPS.get(name, 1) * sum(t.numel() for t in outputs)
        self.ops.append(Op(name, self.blocks[-1], int(flops), activation, weight))
        return out


def record_ops(module: torch.nn.Module, run) -> list[Op]:
    """The ops `run(module)` performs, each tagged with the block (`macs.block_name`) it ran in."""
    names = {sub: block_name(name) for name, sub in module.named_modules() if name}
    blocks = ["(root)"]
    handles = []
    for sub, block in names.items():
        handles.append(sub.register_forward_pre_hook(lambda m, a, block=block: blocks.append(block)))
        handles.append(sub.register_forward_hook(lambda m, a, o: blocks.pop() and None))
    weights = {id(p) for p in module.parameters()} | {id(b) for b in module.buffers()}
    recorder = _Recorder(weights, blocks)
    try:
        with torch.no_grad(), recorder, _FusedAttention(recorder):
            run(module)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.ops


def unet_ops(config: dict, latent: int, batch: int = 1) -> list[Op]:
    """The ops of one call of a UNet built from `config` (meta device) on a `latent`×`latent` sample."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        inputs = modelio.unet_example_inputs(config, latent, device="meta", batch=batch)
        return record_ops(unet, lambda m: m(**inputs))



def component_ops(config_folder: Path, component: str, shapes: dict[str, list[int]]) -> list[Op]:
    """The ops of one call of a pipeline component, built from the config.json in `config_folder`
    (an exported component's folder or the model's own subfolder) at the input shapes it was run at."""
    config = json.loads((Path(config_folder) / "config.json").read_text())
    if component == "unet":
        sample = shapes["sample"]
        return unet_ops(config, sample[2], sample[0])
    with torch.device("meta"):
        if component.startswith("text_encoder"):
            ids = torch.zeros(shapes["input_ids"], dtype=torch.long)
            return record_ops(text_encoder_from_config(config_folder), lambda m: m(ids))
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config(config)
        if component == "vae_decoder":
            z = torch.empty(shapes["latent_sample"])
            return record_ops(vae, lambda m: m.decode(z))
        image = torch.empty(shapes["sample"])
        return record_ops(vae, lambda m: m.encode(image))
