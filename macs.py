"""Parameters and multiply-accumulates per block, by tracing one forward pass on the meta device.

The counting convention is BK-SDM's (thop, modules only): convolution and linear layers, bias
excluded, so our numbers line up with the paper's table. Attention matmuls (QKᵀ and AV) are not
modules and thop misses them; we count them separately, because at high resolution they are
where much of the time goes. The meta device carries shapes without data, so an SD-scale UNet is
counted in a second and no memory.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from . import modelio


@dataclass
class BlockCount:
    params: int = 0
    macs: int = 0  # conv + linear
    attention_macs: int = 0


@dataclass
class Census:
    """Counts per block (top-level child, with down/up stages split) and in total."""

    component: str
    input_shape: tuple
    blocks: dict[str, BlockCount] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks.values())

    @property
    def macs(self) -> int:
        return sum(b.macs for b in self.blocks.values())

    @property
    def attention_macs(self) -> int:
        return sum(b.attention_macs for b in self.blocks.values())

    def to_json(self) -> dict:
        return {
            "component": self.component, "input_shape": list(self.input_shape),
            "params": self.params, "macs": self.macs, "attention_macs": self.attention_macs,
            "blocks": {name: vars(b) for name, b in self.blocks.items()},
        }


_CONTAINERS = {"encoder", "decoder", "text_model", "vision_model"}


def block_name(module_name: str) -> str:
    """'down_blocks.1.attentions.0' → 'down_blocks.1'; 'decoder.mid_block.resnets.0' → 'decoder.mid_block'."""
    parts = module_name.split(".")
    head = 0
    while head < len(parts) - 1 and parts[head] in _CONTAINERS:
        head += 1
    stop = head + 2 if head + 1 < len(parts) and parts[head + 1].isdigit() else head + 1
    return ".".join(parts[:stop]) or "(root)"


def _attention_macs(module, args, kwargs) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    context = kwargs.get("encoder_hidden_states")
    if context is None and len(args) > 1:
        context = args[1]
    batch = hidden.shape[0]
    queries = math.prod(hidden.shape[2:]) if hidden.dim() == 4 else hidden.shape[1]
    keys = queries if context is None else context.shape[1]
    return 2 * batch * queries * keys * module.inner_dim


def count(module: torch.nn.Module, run, component: str, input_shape: tuple) -> Census:
    """Count `module` while `run(module)` performs one forward pass (on meta tensors)."""
    from diffusers.models.attention_processor import Attention

    census = Census(component, tuple(input_shape))
    blocks: dict[str, BlockCount] = defaultdict(BlockCount)
    for name, param in module.named_parameters():
        blocks[block_name(name)].params += param.numel()
    handles = []
    for name, sub in module.named_modules():
        key = block_name(name)
        if isinstance(sub, torch.nn.Conv2d):
            def conv_hook(m, inputs, output, key=key):
                blocks[key].macs += output.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            handles.append(sub.register_forward_hook(conv_hook))
        elif isinstance(sub, torch.nn.Linear):
            def linear_hook(m, inputs, output, key=key):
                blocks[key].macs += output.numel() * m.in_features
            handles.append(sub.register_forward_hook(linear_hook))
        elif isinstance(sub, Attention):
            def attention_hook(m, args, kwargs, output, key=key):
                blocks[key].attention_macs += _attention_macs(m, args, kwargs)
            handles.append(sub.register_forward_hook(attention_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run(module)
    finally:
        for handle in handles:
            handle.remove()
    census.blocks = dict(blocks)
    return census


def text_encoder_from_config(config_folder) -> torch.nn.Module:
    """A text encoder of the class its config.json names, on the current device (meta, for counting):
    SDXL's second encoder is a `CLIPTextModelWithProjection`, whose projection `AutoModel` leaves out."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_folder)
    named = getattr(transformers, (config.architectures or [""])[0], None)
    return named(config) if named is not None else transformers.AutoModel.from_config(config)


def census_model(ref, resolution: int | None = None, unet_only: bool = False) -> list[Census]:
    """Counts for each network of a model folder (UNet; text encoders and VAE halves for a pipeline)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    factor = modelio.vae_scale_factor(ref)
    config = modelio.unet_config(ref)
    resolution = resolution or config["sample_size"] * factor
    if resolution % factor:
        raise modelio.UserError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
    latent = resolution // factor
    censuses = []
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        inputs = modelio.unet_example_inputs(config, latent, device="meta")
        censuses.append(count(unet, lambda m: m(**inputs), "unet", tuple(inputs["sample"].shape)))
        if unet_only or ref.kind != "pipeline":
            return censuses
        for name in ("text_encoder", "text_encoder_2"):
            if (ref.path / name / "config.json").exists():
                encoder = text_encoder_from_config(ref.path / name)
                tokens = encoder.config.max_position_embeddings  # the positions it takes: 77 for CLIP's own
                ids = torch.zeros(1, tokens, dtype=torch.long)
                censuses.append(count(encoder, lambda m: m(ids), name, (1, tokens)))
        if (ref.path / "vae" / "config.json").exists():
            vae = AutoencoderKL.from_config(modelio._read_json(ref.path / "vae" / "config.json"))
            z = torch.randn(1, vae.config.latent_channels, latent, latent)
            image = torch.randn(1, vae.config.in_channels, resolution, resolution)
            for half, run, shape in (("decoder", lambda m: m.decode(z), z.shape),
                                      ("encoder", lambda m: m.encode(image), image.shape)):
                census = count(vae, run, f"vae_{half}", tuple(shape))
                own = ("decoder", "post_quant_conv") if half == "decoder" else ("encoder", "quant_conv")
                census.blocks = {k: v for k, v in census.blocks.items() if k.startswith(own)}
                censuses.append(census)
    return censuses
