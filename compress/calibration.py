"""UNet inputs recorded along the teacher's own sampling trajectories.

Pruning scores and int8 calibration both need inputs the UNet actually meets: noisy latents at
every timestep the sampler visits, with the text embeddings (conditional and unconditional) that
classifier-free guidance feeds it. Recording them with a forward pre-hook while the stock pipeline
samples gives exactly that, for any scheduler.
"""

from __future__ import annotations

import torch

from ..progress import tracked


def extra_conditions(timestep_cond=None, added_cond_kwargs=None) -> list[torch.Tensor]:
    """A UNet call's conditions beyond sample, timestep and text, in the exported UNet's input order."""
    added = added_cond_kwargs or {}
    extra = [added[k] for k in ("text_embeds", "time_ids") if k in added]
    return extra + ([timestep_cond] if timestep_cond is not None else [])


def record_unet_inputs(pipe, prompts: list[str], steps: int, guidance: float) -> list[tuple]:
    """(sample, 0-d float timestep, encoder_hidden_states, *extra) per UNet call, each prompt sampled with seed = its index.

    `extra` are the conditions the call had beyond those three, in the exported UNet's input order
    (`export.components.unet_component`): SDXL's text_embeds and time_ids, a guidance student's
    timestep_cond. Calls are as the pipeline made them (a guidance pair, or one sample a prompt)."""
    recorded = []

    def hook(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        extra = extra_conditions(kwargs.get("timestep_cond"), kwargs.get("added_cond_kwargs"))
        recorded.append((sample.clone(), torch.as_tensor(timestep, dtype=torch.float32).reshape(()),
                         kwargs["encoder_hidden_states"].clone(), *(e.clone() for e in extra)))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, prompt in tracked(enumerate(prompts), "recording UNet inputs", len(prompts)):
                pipe([prompt], num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                     generator=torch.Generator().manual_seed(i))
    finally:
        handle.remove()
    return recorded


def batched(recorded: list[tuple], size: int) -> list[dict]:
    """Recorded calls regrouped into UNet keyword batches of up to `size` calls, one timestep per sample.

    Only sample, timestep and text: what pruning scores a UNet on (a guidance student is scored
    without its guidance input, as at guidance 1)."""
    batches = []
    for start in range(0, len(recorded), size):
        group = [call[:3] for call in recorded[start:start + size]]
        batches.append({
            "sample": torch.cat([s for s, _, _ in group]),
            "timestep": torch.cat([t.expand(s.shape[0]) for s, t, _ in group]),
            "encoder_hidden_states": torch.cat([e for _, _, e in group]),
        })
    return batches
