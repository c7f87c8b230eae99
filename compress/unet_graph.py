"""The UNet as one positional graph, and recorded UNet calls as rows of its inputs.

Every quantization backend calibrates, trains and checks a UNet through the same wrapper
(`export.components.UNet`: one timestep per sample, the extra conditions in export order), fed with
the calls `calibration.record_unet_inputs` recorded, regrouped into whole batches because an int8
graph has the fixed shapes it was traced at.
"""

from __future__ import annotations

import torch

from .calibration import extra_conditions

ROOT = "unet"  # the float UNet's attribute in the traced wrapper: its parameters are `unet.<name>` in the graph


def graph_inputs(sample, timestep, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None) -> tuple:
    """The traced graph's positional inputs: one timestep per sample, then the extra conditions in export order."""
    timestep = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
    return (sample, timestep.expand(sample.shape[0]), encoder_hidden_states,
            *extra_conditions(timestep_cond, added_cond_kwargs))


def extra_names(unet) -> tuple[str, ...]:
    names = ("text_embeds", "time_ids") if unet.config.get("addition_embed_type") == "text_time" else ()
    return names + (("timestep_cond",) if unet.config.get("time_cond_proj_dim") else ())


def traced(unet) -> torch.nn.Module:
    from ..export.components import UNet

    return UNet(unet, extra_names(unet)).eval()


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


def layer_counts(unet, names: list[str]) -> dict[str, int]:
    linear = sum(isinstance(unet.get_submodule(name), torch.nn.Linear) for name in names)
    return {"linear": linear, "conv": len(names) - linear}
