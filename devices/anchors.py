"""Published architectures that device figures were measured on, as diffusers configs (no weights).

A phone profile's latency estimate is anchored to a published measurement of one of these (see
the profile's `calibration`), and the roofline counts their ops from the config alone on the meta
device, so no multi-GB checkpoint is needed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

SD15_UNET = {  # diffusers' published config of runwayml/stable-diffusion-v1-5's UNet
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD21_BASE_UNET = {  # stabilityai/stable-diffusion-2-1-base: SD-1.5's layout, OpenCLIP-H context, linear projections
    **SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
}


@dataclass(frozen=True)
class Anchor:
    """One UNet call as it was measured: the architecture, its latent size and batch."""

    config: dict
    latent: int
    batch: int
    about: str


ANCHORS = {
    "sd15-unet-512": Anchor(SD15_UNET, 64, 1, "SD-1.5 UNet, 512×512 image (64×64 latent), batch 1"),
    "sd21-base-unet-512-cfg": Anchor(SD21_BASE_UNET, 64, 2, "SD-2.1-base UNet, 512×512, batch 2 (guided step)"),
}


def anchor(name: str) -> Anchor:
    if name not in ANCHORS:
        raise UserError(f"unknown anchor model {name!r} (known: {', '.join(ANCHORS)})")
    return ANCHORS[name]
