"""A UNet as two chunks, the way Apple's Swift `StableDiffusion` package runs `UnetChunk1` + `UnetChunk2`.

iOS loads a large UNet more reliably as two models of about half the weights each (Apple's
converter has `--chunk-unet` for this). Swift runs the first chunk on the UNet's inputs, then the
second on the first's outputs merged with the UNet's inputs by name (the first chunk's value wins a
clash), and reads the second chunk's first output as the noise prediction.

Apple cuts the converted program at its weight midpoint. We cut the torch module instead, between
two layers of the up path (where the weights are), at the layer that best balances the weights,
so each chunk is an ordinary module that converts (and is checked) like the whole UNet, for any
block layout our pruning makes: the first chunk returns the time embedding, the hidden state and
the skip connections the rest of the up path still consumes. The loop mirrors diffusers'
`UNet2DConditionModel.forward` and its up blocks' layer loop for SD-1/2 and SDXL-style UNets, with
LCM's guidance embedding and SDXL's `text_embeds` / `time_ids` conditions.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..compress.unet_graph import unet_conditions

HIDDEN, TIME = "hidden_states", "time_embedding"  # not `sample`: the first chunk's outputs must not shadow the UNet's inputs


def skip_name(i: int) -> str:
    return f"skip_{i}"


def _params(*modules) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def up_layers(unet) -> list[tuple[int, int]]:
    """(up block, layer) in the order the up path runs them: the places a chunk boundary may fall before."""
    return [(i, j) for i, block in enumerate(unet.up_blocks) for j in range(len(block.resnets))]


def _layer_modules(unet, i: int, j: int) -> list:
    block = unet.up_blocks[i]
    attention = block.attentions[j] if getattr(block, "attentions", None) else None
    upsamplers = block.upsamplers if j == len(block.resnets) - 1 else None  # the block's last layer ends with them
    return [block.resnets[j], attention, upsamplers]


def split_point(unet) -> int:
    """How many up-path layers join the first chunk: the count whose chunks' weights are nearest to equal."""
    sizes = [_params(unet.time_embedding, unet.conv_in, *unet.down_blocks, unet.mid_block)]
    for i, j in up_layers(unet):
        sizes.append(sizes[-1] + _params(*_layer_modules(unet, i, j)))
    total = _params(unet)
    return min(range(len(sizes)), key=lambda k: abs(total - 2 * sizes[k]))


def check_chunkable(unet) -> None:
    config = dict(unet.config)
    extra = [key for key in ("class_embed_type", "encoder_hid_dim_type") if config.get(key)]
    if config.get("addition_embed_type") not in (None, "text_time"):
        extra.append("addition_embed_type")
    if extra:
        raise UserError(f"UNet chunking handles SD-1/2 and SDXL-style UNets; this one has {extra[0]}={config[extra[0]]}")
    if any(getattr(block, "s1", None) is not None for block in unet.up_blocks):
        raise UserError("UNet chunking runs the up blocks layer by layer; disable FreeU before exporting")


def _cross(block) -> bool:
    return getattr(block, "has_cross_attention", False)


def _up(unet, first: int, last: int, sample, emb, context, skips: list):
    """Up-path layers `first`..`last - 1` (see `up_layers`), as diffusers' up blocks run them: each layer
    concatenates the last skip, then its resnet and attention; a block's last layer ends with its upsampler."""
    factor = 2 ** unet.num_upsamplers
    forward_size = any(dim % factor for dim in skips[0].shape[-2:]) if skips else False
    for i, j in up_layers(unet)[first:last]:
        resnet, attention, upsamplers = _layer_modules(unet, i, j)
        sample = resnet(torch.cat([sample, skips.pop()], dim=1), emb)
        if attention is not None:
            sample = attention(sample, encoder_hidden_states=context, return_dict=False)[0]
        for upsampler in upsamplers or []:
            size = skips[-1].shape[2:] if forward_size and i < len(unet.up_blocks) - 1 else None
            sample = upsampler(sample, size)
    return sample, skips


class FirstChunk(torch.nn.Module):
    """Apple's UNet inputs → time embedding, hidden state after `split` up-path layers, the skips still owed.

    Where the hidden state is the last skip itself (no mid block, no up block yet), it is sent once:
    Core ML merges identical outputs, and the second chunk reads it off the skips."""

    def __init__(self, unet, split: int, extra: tuple[str, ...], hidden_is_last_skip: bool = False):
        super().__init__()
        self.unet, self.split, self.extra, self.hidden_is_last_skip = unet, split, extra, hidden_is_last_skip

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        unet, (added, named) = self.unet, unet_conditions(self.extra, extra)
        context = encoder_hidden_states.squeeze(2).transpose(1, 2)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), named.get("timestep_cond"))
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)  # SDXL's conditions
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        sample = unet.conv_in(sample)
        skips = [sample]
        for block in unet.down_blocks:
            kwargs = {"encoder_hidden_states": context} if _cross(block) else {}
            sample, res = block(hidden_states=sample, temb=emb, **kwargs)
            skips.extend(res)
        if unet.mid_block is not None:
            kwargs = {"encoder_hidden_states": context} if _cross(unet.mid_block) else {}
            sample = unet.mid_block(sample, emb, **kwargs)
        sample, skips = _up(unet, 0, self.split, sample, emb, context, skips)
        return (emb, *skips) if self.hidden_is_last_skip else (emb, sample, *skips)


class SecondChunk(torch.nn.Module):
    """The first chunk's outputs and Apple's text states → the remaining up blocks and the output convolution."""

    def __init__(self, unet, split: int, hidden_is_last_skip: bool = False):
        super().__init__()
        self.unet, self.split, self.hidden_is_last_skip = unet, split, hidden_is_last_skip

    def forward(self, time_embedding, encoder_hidden_states, *handed):
        unet = self.unet
        context = encoder_hidden_states.squeeze(2).transpose(1, 2)
        hidden, skips = (handed[-1], list(handed)) if self.hidden_is_last_skip else (handed[0], list(handed[1:]))
        sample, _ = _up(unet, self.split, len(up_layers(unet)), hidden, time_embedding, context, skips)
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)


def chunks(unet, inputs: dict[str, torch.Tensor]) -> list[tuple[torch.nn.Module, dict[str, torch.Tensor], list[str]]]:
    """(module, named example inputs, output names) of each chunk, for Apple's UNet `inputs`."""
    check_chunkable(unet)
    split, extra = split_point(unet), tuple(inputs)[3:]
    with torch.no_grad():
        emb, hidden, *skips = FirstChunk(unet, split, extra).eval()(*inputs.values())
    shared = hidden is skips[-1]
    handed = {} if shared else {HIDDEN: hidden}
    handed.update({skip_name(i): skip for i, skip in enumerate(skips)})
    second_inputs = {TIME: emb, "encoder_hidden_states": inputs["encoder_hidden_states"], **handed}
    return [(FirstChunk(unet, split, extra, shared).eval(), dict(inputs), [TIME, *handed]),
            (SecondChunk(unet, split, shared).eval(), second_inputs, ["noise_pred"])]
