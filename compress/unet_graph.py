"""The UNet as one positional graph, its attention traced as explicit matmuls, and recorded UNet calls as rows
of its inputs.

Every exporter and every quantization backend traces the UNet through the same wrapper (`UNet`:
the extra conditions as plain inputs, in export order) with the same attention (`classic_attention`:
matmul, softmax, matmul, the form ExecuTorch lowers and int8 quantizes). Calibration and QAT feed it
the calls `calibration.record_unet_inputs` recorded, regrouped into whole batches because an int8
graph has the fixed shapes it was traced at.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .calibration import extra_conditions

KINDS = {"linear": (torch.nn.Linear,), "conv+linear": (torch.nn.Linear, torch.nn.Conv2d)}
ROOT = "unet"  # the float UNet's attribute in the traced wrapper: its parameters are `unet.<name>` in the graph


def graph_inputs(sample, timestep, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None) -> tuple:
    """The traced graph's positional inputs: one timestep per sample, then the extra conditions in export order."""
    timestep = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
    return (sample, timestep.expand(sample.shape[0]), encoder_hidden_states,
            *extra_conditions(timestep_cond, added_cond_kwargs))


def extra_names(unet) -> tuple[str, ...]:
    names = ("text_embeds", "time_ids") if unet.config.get("addition_embed_type") == "text_time" else ()
    return names + (("timestep_cond",) if unet.config.get("time_cond_proj_dim") else ())


def unet_conditions(names: tuple[str, ...], values) -> tuple[dict | None, dict]:
    """A UNet's extra inputs by name: SDXL's `text_embeds` / `time_ids` (diffusers' `added_cond_kwargs`, None
    where absent) and the rest (LCM's `timestep_cond`)."""
    named = dict(zip(names, values))
    return {k: named.pop(k) for k in ("text_embeds", "time_ids") if k in named} or None, named


class UNet(torch.nn.Module):
    """A scalar `timestep`, and SDXL's / LCM's extra conditions as plain inputs."""

    def __init__(self, unet, extra: tuple[str, ...]):
        super().__init__()
        self.unet, self.extra = unet, extra

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        added, named = unet_conditions(self.extra, extra)
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False, **named)[0]


def traced(unet) -> torch.nn.Module:
    return UNet(unet, extra_names(unet)).eval()


def quantizer_state(state: dict) -> dict:
    """A traced int8 graph's own entries (its observers' or fake-quantizers' ranges), without the float UNet's."""
    return {k: v for k, v in state.items() if not k.startswith(ROOT + ".")}


def per_sample(recorded: list[tuple]) -> dict[str, torch.Tensor]:
    """Recorded UNet calls as one tensor per input, a row per sample (a guidance pair gives two rows)."""
    columns = list(zip(*recorded))
    sizes = [s.shape[0] for s in columns[0]]
    out = {"sample": torch.cat(columns[0]),
           "timestep": torch.cat([t.expand(n) for t, n in zip(columns[1], sizes)]),
           "encoder_hidden_states": torch.cat(columns[2])}
    out.update({f"extra{i}": torch.cat(column) for i, column in enumerate(columns[3:])})
    return out


def batch_args(rows: dict[str, torch.Tensor]) -> tuple:
    """Rows as the graph's positional inputs."""
    extra = [rows[k] for k in sorted(k for k in rows if k.startswith("extra"))]
    return (rows["sample"], rows["timestep"], rows["encoder_hidden_states"], *extra)


def whole_batches(rows: dict[str, torch.Tensor], size: int):
    n = rows["sample"].shape[0]
    for start in range(0, n - size + 1, size):  # whole batches only: the graph's shapes are fixed
        yield {k: v[start:start + size] for k, v in rows.items()}


@torch.no_grad()
def outputs(module, rows: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    return torch.cat([module(*batch_args(batch)) for batch in whole_batches(rows, size)])


def candidates(unet, layers: str, keep: list[str]) -> dict[str, torch.nn.Module]:
    """The layers a backend quantizes: the chosen kinds, outside the kept modules (names or their prefixes)."""
    return {name: module for name, module in unet.named_modules() if isinstance(module, KINDS[layers])
            and not any(name == k or name.startswith(k + ".") for k in keep)}


def layer_counts(unet, names: list[str]) -> dict[str, int]:
    linear = sum(isinstance(unet.get_submodule(name), torch.nn.Linear) for name in names)
    return {"linear": linear, "conv": len(names) - linear}


def _scaled_query_scores(layer):
    """Attention's probabilities from a plain batched matmul of the scaled query.

    diffusers' `get_attention_scores` computes baddbmm(empty, Q, Kᵀ, beta=0, alpha=scale), which the
    exporters write as the empty input expanded to the scores' shape, two scalar multiplies and an add
    over all heads × tokens² scores: at SD-1.5's 4,096 tokens those took onnxruntime longer than the
    matmul itself. Scaling Q first (heads × tokens × head_dim values) is the same product."""
    def scores(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = query.dtype
        if layer.upcast_attention:
            query, key = query.float(), key.float()
        logits = torch.bmm(query * layer.scale, key.transpose(-1, -2))
        if attention_mask is not None:
            logits = logits + attention_mask
        if layer.upcast_softmax:
            logits = logits.float()
        probabilities = logits.softmax(dim=-1)
        return probabilities if probabilities.dtype == dtype else probabilities.to(dtype)  # no copy traced

    return scores


@contextmanager
def attention_processor(module: torch.nn.Module, processor: type):
    """Every diffusers `Attention` in `module` runs a fresh `processor()`; the processors are put back after."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in module.modules() if isinstance(m, Attention)]
    saved = [m.processor for m in layers]
    for layer in layers:
        layer.set_processor(processor())
    try:
        yield layers
    finally:
        for layer, kept in zip(layers, saved):
            layer.set_processor(kept)


@contextmanager
def classic_attention(module: torch.nn.Module):
    """Trace diffusers' attention as explicit matmul-softmax-matmul (same math, the scale on Q), then put the
    processors back."""
    from diffusers.models.attention_processor import AttnProcessor

    with attention_processor(module, AttnProcessor) as layers:
        for layer in layers:
            layer.get_attention_scores = _scaled_query_scores(layer)
        try:
            yield
        finally:
            for layer in layers:
                del layer.get_attention_scores
