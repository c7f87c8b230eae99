"""The components of a diffusers pipeline as plain tensor-in, tensor-out modules, with example inputs.

Every exporter traces these wrappers rather than the diffusers classes, so each format sees the
same graph and the same I/O names: optimum's ONNX names (`sample`, `timestep`,
`encoder_hidden_states` → `out_sample`, `latent_sample` → `sample`, …), which ExecuTorch reuses.
Core ML's Swift contract differs and wraps these again (see `coreml.py`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .. import modelio
from ..compress.pt2e_int8 import build_int8
from ..compress.unet_graph import UNet
from ..errors import UserError
from ..distill.diffusion import guidance_embedding
from .runtime import one_step_affine, scheduler_from_config

PIPELINE_COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
STATIC = ("one_step",)  # traced at the model's own shapes in every format
EXAMPLE_SEED = 1234


@dataclass
class Component:
    """One exportable module: positional inputs in `inputs` order, named outputs, and the axes that vary."""

    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)

    def run(self, inputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            values = self.module(*(inputs or self.inputs).values())
        values = values if isinstance(values, tuple) else (values,)
        return dict(zip(self.outputs, values))


class TextEncoder(torch.nn.Module):
    """optimum's text-encoder outputs: `last_hidden_state`, `pooler_output` (SDXL's second encoder, with its
    projection: `text_embeds`, `last_hidden_state`), and in an SDXL pipeline every `hidden_states.i`, because
    SDXL conditions on the penultimate layer."""

    def __init__(self, text_encoder, hidden_states: bool = False):
        super().__init__()
        self.text_encoder, self.hidden_states = text_encoder, hidden_states
        pooled = ["text_embeds", "last_hidden_state"] if hasattr(text_encoder, "text_projection") else [
            "last_hidden_state", "pooler_output"]
        layers = range(text_encoder.config.num_hidden_layers + 1) if hidden_states else ()
        self.outputs = pooled + [f"hidden_states.{i}" for i in layers]  # the names of what forward returns, in order

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=self.hidden_states)
        return tuple(getattr(out, name) for name in self.outputs[:2]) + (
            tuple(out.hidden_states) if self.hidden_states else ())


def pipeline_component_names(pipe, asked: list[str]) -> list[str]:
    """The components to export: as asked, with SDXL's second text encoder beside its first (an SDXL
    pipeline's "text_encoder" is both encoders, which the runtime needs together)."""
    names = list(asked)
    if modelio.is_sdxl(pipe) and "text_encoder" in names:
        names.insert(names.index("text_encoder") + 1, "text_encoder_2")
    return names


class VaeEncoder(torch.nn.Module):
    """Image in [-1, 1] → the Gaussian's mean and log-variance stacked on channels (optimum's `latent_parameters`)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.parameters


class VaeDecoder(torch.nn.Module):
    """Unscaled latents (already divided by the scaling factor) → image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class OneStepImage(torch.nn.Module):
    """A one-step student's whole image as one program: starting noise and text states in, the image out.

    At one step the UNet, the sampler's step and the VAE decoder each run once per image; as one
    program an app makes one call per image and nothing runs between the parts. The step is the
    scheduler's own (`runtime.one_step_affine`). A student with guidance in its weights takes the
    guidance scale as an input and embeds it as diffusers' pipelines do.
    """

    def __init__(self, unet: torch.nn.Module, decoder: torch.nn.Module, timestep: int, keep: float, weight: float,
                 scaling: float, guidance_dim: int | None):
        super().__init__()
        self.unet, self.decoder = unet, decoder
        self.timestep, self.keep, self.weight, self.scaling = float(timestep), keep, weight, scaling
        self.guidance_dim = guidance_dim

    def unet_inputs(self, sample, encoder_hidden_states, guidance=None) -> dict[str, torch.Tensor]:
        """What the UNet inside is called with: its export's names and order."""
        inputs = {"sample": sample, "timestep": torch.tensor(self.timestep), "encoder_hidden_states": encoder_hidden_states}
        if self.guidance_dim:
            inputs["timestep_cond"] = guidance_embedding(guidance.reshape(1), self.guidance_dim)
        return inputs

    def forward(self, sample, encoder_hidden_states, guidance=None):
        output = self.unet(*self.unet_inputs(sample, encoder_hidden_states, guidance).values())
        return self.decoder((self.keep * sample + self.weight * output) / self.scaling)

    def unet_part(self, inputs: dict[str, torch.Tensor]) -> "Component":
        """The UNet inside as a component, fed what `inputs` (the program's) give it: what int8 is built on."""
        return Component("unet", self.unet, self.unet_inputs(*inputs.values()), ["out_sample"])

    def with_unet(self, unet: torch.nn.Module) -> "OneStepImage":
        """The same program around another graph of the UNet (its int8 one)."""
        return OneStepImage(unet, self.decoder, self.timestep, self.keep, self.weight, self.scaling, self.guidance_dim)


def one_step_component(pipe, latent_size: int, tokens: int) -> Component:
    """The one-step program of a pipeline whose scheduler steps affinely (DDIM, LCM), batch one."""
    if modelio.is_sdxl(pipe):
        raise UserError("one_step takes an SD-1.x/2.x student; an SDXL one's added conditions are not built in")
    unet = unet_component(pipe.unet, latent_size, 1, tokens)
    guidance_dim = pipe.unet.config.get("time_cond_proj_dim")
    module = OneStepImage(unet.module, VaeDecoder(pipe.vae).eval(), *one_step_affine(scheduler_from_config(
        dict(pipe.scheduler.config))), float(pipe.vae.config.scaling_factor), guidance_dim).eval()
    inputs = {"sample": unet.inputs["sample"], "encoder_hidden_states": unet.inputs["encoder_hidden_states"]}
    if guidance_dim:
        inputs["guidance"] = torch.tensor(7.5)
    return Component("one_step", module, inputs, ["image"])


def unet_component(unet, latent_size: int, batch: int | None = None, tokens: int = 77) -> Component:
    """The UNet's wrapper with example inputs at `batch`, by default the batch one sampling step calls it with
    (`modelio.unet_batch`: 1 for a student with guidance embedded). Formats with static shapes (ExecuTorch, int8
    ONNX) trace at it, so a student's program does not compute a padded second sample on every call."""
    config = dict(unet.config)
    batch = batch or modelio.unet_batch(config)
    generator = torch.Generator().manual_seed(EXAMPLE_SEED)
    example = modelio.unet_example_inputs(config, latent_size, batch, tokens, generator=generator)
    inputs = {"sample": example["sample"], "timestep": torch.tensor(501.0),
              "encoder_hidden_states": example["encoder_hidden_states"]}
    inputs.update(example.get("added_cond_kwargs", {}))
    if "timestep_cond" in example:
        inputs["timestep_cond"] = example["timestep_cond"]
    extra = tuple(inputs)[3:]
    dynamic = {"sample": {0: "batch_size", 2: "height", 3: "width"}, "encoder_hidden_states": {0: "batch_size"}}
    dynamic.update({name: {0: "batch_size"} for name in extra})
    return Component("unet", UNet(unet, extra).eval(), inputs, ["out_sample"], dynamic)


def trace_latent_size(unet_config: dict) -> int:
    """A latent size whose innermost feature map is at least 2x2: at 1x1 torch.export specialises
    every spatial dimension and a dynamic-shape export loses its dynamic height and width."""
    return max(unet_config["sample_size"], 2 ** len(unet_config["block_out_channels"]))


def model_components(ref: modelio.ModelRef, pipe=None, names: tuple[str, ...] = PIPELINE_COMPONENTS,
                     latent_size: int | None = None) -> list[Component]:
    """The wrapped components of `ref` (a pipeline, loaded as `pipe`, or a bare UNet) with seeded inputs."""
    latent_size = latent_size or modelio.unet_config(ref)["sample_size"]
    if ref.kind == "unet":
        return [unet_component(modelio.load_unet(ref), latent_size)]
    sdxl = modelio.is_sdxl(pipe)
    def seeded():  # a generator per component: its inputs do not depend on which others are built
        return torch.Generator().manual_seed(EXAMPLE_SEED)

    factor = modelio.vae_scale_factor(ref)
    tokens = pipe.tokenizer.model_max_length

    def text(name: str) -> Component:
        encoder = getattr(pipe, name)
        wrapper = TextEncoder(encoder, sdxl).eval()
        return Component(name, wrapper,
                         {"input_ids": torch.randint(0, encoder.config.vocab_size, (1, tokens), generator=seeded())},
                         wrapper.outputs, {"input_ids": {0: "batch_size"}})

    made = {
        "text_encoder": lambda: text("text_encoder"),
        "unet": lambda: unet_component(pipe.unet, latent_size, tokens=tokens),
        "vae_encoder": lambda: Component(
            "vae_encoder", VaeEncoder(pipe.vae).eval(),
            {"sample": torch.rand(1, 3, latent_size * factor, latent_size * factor, generator=seeded()) * 2 - 1},
            ["latent_parameters"], {"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"}}),
        "one_step": lambda: one_step_component(pipe, latent_size, tokens),
        "vae_decoder": lambda: Component(
            "vae_decoder", VaeDecoder(pipe.vae).eval(),
            {"latent_sample": torch.randn(1, pipe.vae.config.latent_channels, latent_size, latent_size,
                                          generator=seeded())},
            ["sample"], {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"}}),
    }
    if sdxl:
        made["text_encoder_2"] = lambda: text("text_encoder_2")
    unknown = set(names) - set(made)
    if unknown:
        raise UserError(f"unknown component(s) {', '.join(sorted(unknown))} (known: {', '.join(made)})")
    return [made[name]() for name in names]


@contextmanager
def quiet_tracing():
    """Silence torch's own pytree deprecation notice, which tracing and lowering raise once per process.

    Scoped to the exporters' calls: a process-wide filter set at import did not survive to the
    export worker's later jobs.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


def require_saved_int8(fmt: str, backends: tuple[str, ...], quantized_for: str | None) -> None:
    """int8 in `fmt` is only a UNet `pocketdiff quantize --backend B` made for it: no silent post-training fallback."""
    if quantized_for not in backends:
        made = f"this UNet was quantized for {quantized_for}" if quantized_for else "this model is not quantized"
        raise UserError(f"{fmt} int8 ships the UNet `pocketdiff quantize --backend {'|'.join(backends)}` makes; {made}")


def with_int8_unet(component: Component, build) -> torch.nn.Module:
    """The module a format exports at int8: `build(unet_component)` (the UNet's int8 graph) for the UNet, and
    the one-step program around it for `one_step`."""
    if component.name == "one_step":
        return component.module.with_unet(build(component.module.unet_part(component.inputs)))
    return build(component)


def saved_int8_unet(fmt: str, backends: tuple[str, ...], unet, args: tuple, quantization: tuple[dict, dict] | None):
    """The converted int8 graph saved with the model, at `args`' shapes."""
    require_saved_int8(fmt, backends, quantization[0]["backend"] if quantization else None)
    return build_int8(unet, args, *quantization)
