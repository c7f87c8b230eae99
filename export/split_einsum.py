"""Split-einsum attention: a UNet's transformers rewritten in the layout Apple Neural Engine favours.

Apple's ml-stable-diffusion converts Stable Diffusion for the Neural Engine with its SPLIT_EINSUM
attention: the transformer's tokens live as (B, C, 1, S) tensors (channels second, a unit height,
the sequence last) instead of (B, S, C); every linear layer is a 1×1 convolution, layer norm
normalises over the channel axis, and attention runs one head at a time, each head's scores an
einsum over its slice of the channels, so no (B, heads, S, d) reshape or rank-5 tensor appears.
Apple reports that layout as what keeps the whole UNet on the Neural Engine; on the GPU and CPU
the original attention is as fast or faster, hence an option (Apple's converter has the same).
SPLIT_EINSUM_V2, Apple's later variant for larger images, also cuts each head's queries into
chunks of 512 so no score tensor grows with the square of a long sequence.

`split_einsum_unet` returns a UNet computing the same function with the same weights (shared, not
copied), its `Transformer2DModel`s replaced by `SplitEinsumTransformer`. It takes SD-1/2 and SDXL
style transformers (layer norms, GEGLU or GELU feed-forward, any depth) and refuses others naming
the part it cannot rewrite.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..errors import UserError

QUERY_CHUNK = 512  # SPLIT_EINSUM_V2's query chunk, Apple's: long sequences (high resolutions) in ANE-sized pieces


def _conv(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer as the 1×1 convolution it is on (B, C, 1, S)."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channel axis of (B, C, 1, S), as Apple's `LayerNormANE`."""
    mean = x.mean(1, keepdim=True)
    centred = x - mean
    x = centred * torch.rsqrt(centred.pow(2).mean(1, keepdim=True) + norm.eps)
    if norm.weight is not None:
        x = x * norm.weight[None, :, None, None]
    return x + norm.bias[None, :, None, None] if norm.bias is not None else x


def _attention(attn, x: torch.Tensor, context: torch.Tensor, query_chunk: int | None) -> torch.Tensor:
    """Softmax attention one head at a time: x (B, C, 1, S) attends to context (B, C', 1, T); with
    `query_chunk`, each head's queries in chunks of that many (Apple's SPLIT_EINSUM_V2)."""
    q, k, v = _conv(attn.to_q, x), _conv(attn.to_k, context), _conv(attn.to_v, context)
    width, length = q.shape[1] // attn.heads, q.shape[3]
    step = query_chunk or length
    heads = []
    for h in range(attn.heads):
        part = slice(h * width, (h + 1) * width)
        keys, values = k[:, part].transpose(1, 3), v[:, part]
        chunks = []
        for start in range(0, length, step):
            scores = torch.einsum("bchq,bkhc->bkhq", q[:, part, :, start:start + step], keys) * attn.scale
            chunks.append(torch.einsum("bkhq,bchk->bchq", scores.softmax(dim=1), values))
        heads.append(torch.cat(chunks, dim=3) if len(chunks) > 1 else chunks[0])
    return _conv(attn.to_out[0], torch.cat(heads, dim=1))


def _feed_forward(ff, x: torch.Tensor) -> torch.Tensor:
    from diffusers.models.activations import GEGLU

    activation, out = ff.net[0], ff.net[2]
    x = _conv(activation.proj, x)
    if isinstance(activation, GEGLU):
        x, gate = x.chunk(2, dim=1)
        x = x * F.gelu(gate)
    else:
        x = F.gelu(x, approximate=activation.approximate)
    return _conv(out, x)


def _check_block(block, where: str) -> None:
    """Refuse what the rewrite does not compute: it must equal the original, not approximate it."""
    from diffusers.models.activations import GEGLU, GELU

    problems = []
    if block.norm_type != "layer_norm" or block.pos_embed is not None or block.only_cross_attention:
        problems.append(f"norm {block.norm_type}, positional embedding or cross-only self-attention")
    if getattr(block, "fuser", None) is not None or getattr(block, "_chunk_size", None) is not None:
        problems.append("GLIGEN fuser or chunked feed-forward")
    if not isinstance(block.ff.net[0], (GEGLU, GELU)) or len(block.ff.net) != 3:
        problems.append(f"feed-forward {type(block.ff.net[0]).__name__}")
    for attn in (block.attn1, block.attn2):
        if attn is not None and (attn.norm_q is not None or attn.group_norm is not None or attn.spatial_norm is not None
                                 or attn.residual_connection or attn.rescale_output_factor != 1 or attn.norm_cross):
            problems.append("attention with its own norms, residual or output rescaling")
    if problems:
        raise UserError(f"split-einsum attention cannot rewrite {where}: {'; '.join(problems)}")


class SplitEinsumTransformer(torch.nn.Module):
    """A `Transformer2DModel` (continuous input) computed in the (B, C, 1, S) layout, its own weights shared."""

    def __init__(self, transformer, where: str, query_chunk: int | None = None):
        super().__init__()
        if transformer.is_input_vectorized or transformer.is_input_patches:
            raise UserError(f"split-einsum attention cannot rewrite {where}: it takes patches or vectorized input")
        for i, block in enumerate(transformer.transformer_blocks):
            _check_block(block, f"{where}.transformer_blocks.{i}")
        self.transformer, self.query_chunk = transformer, query_chunk

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, encoder_attention_mask=None,
                return_dict=False, **_):
        if attention_mask is not None or encoder_attention_mask is not None:
            raise UserError("split-einsum attention takes no attention masks (Stable Diffusion passes none)")
        t = self.transformer
        batch, _, height, width = hidden_states.shape
        x = t.norm(hidden_states)
        x = x.reshape(batch, x.shape[1], 1, height * width)
        x = _conv(t.proj_in, x) if t.use_linear_projection else t.proj_in(x)
        context = encoder_hidden_states.transpose(1, 2).unsqueeze(2) if encoder_hidden_states is not None else None
        for block in t.transformer_blocks:
            normed = _layer_norm(block.norm1, x)
            x = _attention(block.attn1, normed, normed, self.query_chunk) + x
            if block.attn2 is not None:
                normed = _layer_norm(block.norm2, x)
                x = _attention(block.attn2, normed, normed if context is None else context, self.query_chunk) + x
            x = _feed_forward(block.ff, _layer_norm(block.norm3, x)) + x
        x = _conv(t.proj_out, x) if t.use_linear_projection else t.proj_out(x)
        return (x.reshape(batch, x.shape[1], height, width) + hidden_states,)


def split_einsum_unet(unet, query_chunk: int | None = None):
    """The UNet with every transformer in split-einsum form; weights shared with `unet`, which is unchanged.
    `query_chunk`: attend in chunks of that many queries (SPLIT_EINSUM_V2 takes `QUERY_CHUNK`)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    shared = {id(t): t for t in [*unet.parameters(), *unet.buffers()]}
    rewritten = copy.deepcopy(unet, memo=shared)  # the module tree copied, every tensor the original's
    targets = [name for name, module in rewritten.named_modules() if isinstance(module, Transformer2DModel)]
    if not targets:
        raise UserError("split-einsum attention: this UNet has no transformer blocks to rewrite")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = rewritten.get_submodule(parent_name)
        parent.register_module(child, SplitEinsumTransformer(parent.get_submodule(child), name, query_chunk))
    return rewritten.eval()
