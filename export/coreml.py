"""Core ML export in the resource layout and I/O contract of Apple's Swift `StableDiffusion` package.

`<out>/Resources/{TextEncoder,Unet,VAEDecoder,VAEEncoder}.mlpackage` plus `vocab.json` and
`merges.txt`, with `SWIFT.md` (the Swift pipeline options that run it) and `compile.sh` (the
`xcrun coremlcompiler` calls that make the `.mlmodelc` Swift loads; on macOS the export runs
them itself). The contract is apple/ml-stable-diffusion's Swift package at commit e12202c
(`swift/StableDiffusion/pipeline/`, cited by file and line where each rule is applied):
the text encoder takes float32 `input_ids` (1, T) and returns `last_hidden_state`; the UNet takes
`sample`, a per-batch float32 `timestep` and `encoder_hidden_states` in the (B, dim, 1, T) layout, T
the tokenizer's length (CLIP's 77; Swift pads to the model's input length)
and returns `noise_pred`; the decoder takes `z`, the encoder one image and returns the Gaussian's
8-channel moments. Every output is float32: the package reads them as Float32, and float16
outputs crash on its minimum OS (iOS 16 / macOS 13). Unlike Apple's converter this one takes
mid-block-less UNets (BK-SDM small/tiny) and guidance-distilled students: the package feeds no
`timestep_cond`, so the student's guidance embedding is folded into the UNet as a constant and the
UNet runs at batch one (Swift then runs it unguided, guidance scale below 1). Swift apps scale
latents by SD's 0.18215 (SDXL's 0.13025 when they run an XL pipeline); our VAE wrappers fold in the
model's own scaling factor against that, so any VAE works unchanged. An SDXL pipeline adds
`TextEncoder2` and both encoders return `hidden_embeds` and `pooled_outputs`, the names Swift's
`TextEncoderXL` reads.

A UNet quantized by `pocketdiff quantize` ships as trained: coreml-w8a8 as its int8 graph
(int8 weights in `constexpr_affine_dequantize`, int8 activations as quantize/dequantize pairs,
iOS 17), coreml-palette4/6 as look-up tables (`constexpr_lut_to_dense`) rebuilt losslessly from
each layer's distinct weight values. `--text-encoder-int8` stores the text encoder's weights as
int8 per channel (`constexpr_affine_dequantize`, iOS 16), computed in fp16.

Core ML runs only on macOS: elsewhere each package is checked structurally (its spec's I/O, op
census, weight dtype, size); on macOS also numerically against PyTorch.
"""

from __future__ import annotations

import logging
import platform
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .. import modelio
from ..compress.backends import int8_backends
from ..errors import UserError
from . import unet_chunks
from ..stockformat import write_vocab_and_merges
from ..compress.unet_graph import UNet
from ..distill.diffusion import x0_and_eps
from .components import Component, quiet_tracing, require_saved_int8, saved_int8_unet
from .protocol import ExportFormat
from .runtime import guidance_embedding
from .split_einsum import QUERY_CHUNK, split_einsum_unet
from .swift_notes import write_swift_notes

INT8_BACKENDS = int8_backends("coreml")
SWIFT_SCALE, SWIFT_SCALE_XL = 0.18215, 0.13025  # the latent scale Swift apps set (SD; SDXL)
SWIFT_NAMES = {"text_encoder": "TextEncoder", "text_encoder_2": "TextEncoder2", "unet": "Unet", "vae_decoder": "VAEDecoder", "vae_encoder": "VAEEncoder"}
CHUNKS = ("UnetChunk1", "UnetChunk2")


def check_int8(quantized_for: str | None) -> None:
    require_saved_int8("Core ML", INT8_BACKENDS, quantized_for)


class TextEncoder(torch.nn.Module):
    """Swift's `TextEncoder`: `last_hidden_state`, `pooled_outputs`; for SDXL (`TextEncoderXL`, both encoders)
    `hidden_embeds` (the penultimate layer, what SDXL conditions on) and `pooled_outputs` (the second
    encoder's projected pooling, the UNet's `text_embeds`)."""

    def __init__(self, text_encoder, sdxl: bool = False):
        super().__init__()
        self.text_encoder, self.sdxl = text_encoder, sdxl

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.int32), output_hidden_states=self.sdxl)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return (out.hidden_states[-2] if self.sdxl else out.last_hidden_state), pooled


class FoldedCondition(torch.nn.Module):
    """A UNet's time embedding with its condition fixed: a guidance-distilled student's guidance scale,
    which the Swift package has no input for (no `timestep_cond` anywhere in `swift/`)."""

    def __init__(self, embedding, condition: torch.Tensor):
        super().__init__()
        self.embedding = embedding
        self.register_buffer("condition", condition)

    def forward(self, sample, condition=None):
        return self.embedding(sample, self.condition.expand(sample.shape[0], -1))


def fold_guidance(unet, guidance: float):
    """A copy of a guidance-distilled `unet` that runs at `guidance` with no guidance input, and that constant."""
    import copy

    condition = torch.from_numpy(guidance_embedding(guidance, unet.config.time_cond_proj_dim))
    folded = copy.deepcopy(unet)
    folded.time_embedding = FoldedCondition(folded.time_embedding, condition)
    return folded, condition


class AsEpsilon(torch.nn.Module):
    """The ε a UNet's x̂0 or v output implies at its timestep: Swift's schedulers read every UNet as
    ε-predicting (`convertModelOutput` takes epsilon only), so an x̂0 student ships returning ε."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str):
        super().__init__()
        if prediction not in ("sample", "v_prediction"):
            raise UserError(f"prediction_type {prediction!r}: the Core ML export converts sample or v_prediction to ε")
        self.prediction = prediction
        self.register_buffer("alphas", alphas_cumprod.float())

    def forward(self, output, sample, timestep):
        return x0_and_eps(output, sample, self.alphas[timestep.long()], self.prediction)[1]


def as_epsilon(pipe) -> AsEpsilon | None:
    """The ε conversion a pipeline's UNet needs in Swift; None for an ε-predicting UNet."""
    from diffusers import DDPMScheduler

    config = pipe.scheduler.config
    if config.get("prediction_type", "epsilon") == "epsilon":
        return None
    return AsEpsilon(DDPMScheduler.from_config(config).alphas_cumprod, config.prediction_type)


class Unet(UNet):
    """Apple's UNet I/O: (B,) timesteps and (B, dim, 1, tokens) text states; SDXL's `text_embeds` and
    `time_ids` as further (B, ...) inputs under those names. `source`: the UNet as saved, `constants`
    the conditions folded into `unet` (in the order the saved UNet takes them after the fed ones), and
    `epsilon` the conversion of an x̂0 or v output to the ε Swift reads."""

    def __init__(self, unet, extra: tuple[str, ...], source, constants: tuple[torch.Tensor, ...],
                 epsilon: AsEpsilon | None = None):
        super().__init__(unet, extra)
        self.source, self.constants, self.epsilon = source, constants, epsilon

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        out = super().forward(sample, timestep, encoder_hidden_states.squeeze(2).transpose(1, 2), *extra)
        return out if self.epsilon is None else self.epsilon(out, sample, timestep)


class Int8Unet(torch.nn.Module):
    """The saved int8 graph behind Apple's UNet I/O (the graph takes the text states as (B, tokens, dim)),
    folded conditions passed as constants."""

    def __init__(self, graph, constants: tuple[torch.Tensor, ...] = (), epsilon: AsEpsilon | None = None):
        super().__init__()
        self.int8 = graph  # not `graph`: the exported program's own graph module has that attribute
        for i, value in enumerate(constants):
            self.register_buffer(f"constant_{i}", value)
        self.count, self.epsilon = len(constants), epsilon

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        constants = [getattr(self, f"constant_{i}").expand(sample.shape[0], -1) for i in range(self.count)]
        out = self.int8(sample, timestep, encoder_hidden_states.squeeze(2).transpose(1, 2), *extra, *constants)
        return out if self.epsilon is None else self.epsilon(out, sample, timestep)


def _int8_unet(component: Component, quantization: tuple[dict, dict] | None) -> Int8Unet:
    sample, timestep, states, *extra = component.inputs.values()
    constants = tuple(c.expand(sample.shape[0], -1) for c in component.module.constants)
    graph = saved_int8_unet("Core ML", INT8_BACKENDS, component.module.source,
                            (sample, timestep, states.squeeze(2).transpose(1, 2), *extra, *constants), quantization)
    return Int8Unet(graph, component.module.constants, component.module.epsilon)


def _pack_palette(model, quantization: tuple[dict, dict] | None):
    """Palettized weights as `constexpr_lut_to_dense` tables: "unique" mode takes each weight's own distinct
    values, so the tables are exactly the trained ones (lossless wherever it applies: any constant with at
    most 256 values, norm scales included; kept layers, with more, stay fp16). Per op type it refuses
    constants that a norm shares with a convolution, hence one global setting."""
    if quantization is None or "bits" not in quantization[0]:
        return model
    ct = _quiet_coremltools()
    table = ct.optimize.coreml.OpPalettizerConfig(mode="unique", weight_threshold=0)
    return ct.optimize.coreml.palettize_weights(model, ct.optimize.coreml.OptimizationConfig(global_config=table))


def _int8_weights(model):
    """The linears' weights and the token embedding as int8 per channel with fp16 scales
    (`constexpr_affine_dequantize`, iOS 16); norms, position embeddings and the attention mask stay fp16."""
    ct = _quiet_coremltools()
    config = ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                        granularity="per_channel", weight_threshold=0)
    chosen = ct.optimize.coreml.OptimizationConfig(op_type_configs={"linear": config, "gather": config})
    return ct.optimize.coreml.linear_quantize_weights(model, chosen)


class VAEDecoder(torch.nn.Module):
    def __init__(self, vae, swift_scale: float):
        super().__init__()
        self.vae, self.rescale = vae, swift_scale / vae.config.scaling_factor

    def forward(self, z):
        return self.vae.decode(z * self.rescale, return_dict=False)[0]


class VAEEncoder(torch.nn.Module):
    """Image in [-1, 1] → the 8-channel moments Swift's `Encoder` samples (Encoder.swift:69-89: mean, log-variance
    clamped to [-30, 20], latent = N(mean, exp(logvar / 2)) × its scale factor). The moments are rescaled so
    that Swift's factor (SD's 0.18215) gives the latent this VAE's own factor gives."""

    def __init__(self, vae, swift_scale: float):
        super().__init__()
        self.vae, self.rescale = vae, vae.config.scaling_factor / swift_scale

    def forward(self, x):
        mean, logvar = self.vae.encode(x).latent_dist.parameters.chunk(2, dim=1)
        shift = 2.0 * torch.log(torch.tensor(self.rescale))
        return torch.cat([mean * self.rescale, logvar.clamp(-30.0, 20.0) + shift], dim=1)


def adapt(component: Component, pipe, ref: modelio.ModelRef, config) -> Component:
    """Re-wrap one of our components with the Swift package's names, layouts and dtypes.

    The UNet's batch is what Swift reads from its `sample` input (StableDiffusionPipeline.swift:287):
    two for one classifier-free-guidance call per step, one for two calls (`config.unet_batch_one`,
    Apple's `--unet-batch-one`) or for a guidance-distilled student, whose guidance embedding is folded
    in at `config.guidance` and which Swift runs unguided (guidance scale below 1: one batch-one call).
    """
    inputs = component.inputs
    sdxl = modelio.is_sdxl(pipe)
    if component.name.startswith("text_encoder"):
        return Component(component.name, TextEncoder(getattr(pipe, component.name), sdxl).eval(),
                         {"input_ids": inputs["input_ids"].float()},
                         ["hidden_embeds" if sdxl else "last_hidden_state", "pooled_outputs"])
    swift_scale = SWIFT_SCALE_XL if sdxl else SWIFT_SCALE
    if component.name == "unet":
        source = pipe.unet if pipe is not None else component.module.unet
        unet, extra, constants = source, component.module.extra, ()  # extra: SDXL's text_embeds, time_ids
        if source.config.get("time_cond_proj_dim"):
            unet, condition = fold_guidance(source, config.guidance)
            extra, constants = tuple(name for name in extra if name != "timestep_cond"), (condition,)
        unet_batch = 1 if config.unet_batch_one or constants else 2
        repeat = lambda t: t[:1].repeat(unet_batch, *([1] * (t.dim() - 1)))  # noqa: E731
        swift = {"sample": repeat(inputs["sample"]), "timestep": torch.full((unet_batch,), 501.0),
                 "encoder_hidden_states": repeat(inputs["encoder_hidden_states"]).transpose(1, 2).unsqueeze(2).contiguous()}
        swift.update({name: repeat(inputs[name]) for name in extra})
        epsilon = as_epsilon(pipe) if pipe is not None else None
        return Component("unet", Unet(unet, extra, source, constants, epsilon).eval(), swift, ["noise_pred"])
    if component.name == "vae_decoder":
        return Component("vae_decoder", VAEDecoder(pipe.vae, swift_scale).eval(), {"z": inputs["latent_sample"]},
                         ["image"])
    return Component("vae_encoder", VAEEncoder(pipe.vae, swift_scale).eval(), {"x": inputs["sample"]}, ["latent"])


def _quiet_coremltools():
    for name in ("coremltools", "coremltools.converters"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import coremltools

    return coremltools


def _without_aliases(exported):
    """Drop `aten.alias` nodes (transformers' mask code makes them; coremltools has no converter for them)."""
    graph = exported.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (torch.ops.aten.alias.default, torch.ops.aten.alias_copy.default):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    exported.graph_module.recompile()
    return exported


def _convert(module: torch.nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], precision: str,
             quantization: tuple[dict, dict] | None):
    ct = _quiet_coremltools()
    with quiet_tracing():
        exported = _without_aliases(torch.export.export(module, tuple(inputs.values())).run_decompositions({}))
        model = ct.convert(
            exported, convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS17 if precision == "int8" else ct.target.iOS16,
            inputs=[ct.TensorType(name=n, shape=tuple(v.shape), dtype=np.float32) for n, v in inputs.items()],
            outputs=[ct.TensorType(name=n, dtype=np.float32) for n in outputs],  # Swift reads Float32
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16)
    return _pack_palette(model, quantization)


def _parts(component: Component, precision: str, quantization, chunked: bool,
           attention: str) -> list[tuple[str, torch.nn.Module, dict, list]]:
    """(Swift name, module, inputs, outputs) of each package a component ships as."""
    if attention != "original" and component.name == "unet":
        if precision == "int8":
            raise UserError("split-einsum attention rewrites a float UNet; the int8 graph ships as it was trained")
        unet = split_einsum_unet(component.module.unet, QUERY_CHUNK if attention == "split_einsum_v2" else None)
        component = Component("unet", Unet(unet, component.module.extra, component.module.source,
                                           component.module.constants, component.module.epsilon).eval(),
                              component.inputs, component.outputs)
    if chunked:
        if precision == "int8":
            raise UserError("Core ML UNet chunking takes a float or palettized UNet; the int8 graph is one program")
        if component.module.epsilon is not None:
            raise UserError(f"Core ML UNet chunking splits the UNet before its output, where this "
                            f"{component.module.epsilon.prediction} student's conversion to ε happens: export it whole")
        return [(CHUNKS[i], module, inputs, outputs)
                for i, (module, inputs, outputs) in enumerate(unet_chunks.chunks(component.module.unet, component.inputs))]
    module = _int8_unet(component, quantization) if precision == "int8" and component.name == "unet" else component.module
    return [(SWIFT_NAMES[component.name], module, component.inputs, component.outputs)]


def export_component(component: Component, folder: Path, precision: str, config,
                     quantization: tuple[dict, dict] | None = None, **_) -> Path:
    """Convert one (adapted) component to `<out>/Resources/<SwiftName>.mlpackage`; return its path.

    `config.chunk_unet` (the UNet): `UnetChunk1` + `UnetChunk2` instead, the first's path returned. int8 (the
    UNet's saved W8A8 graph) computes in fp16 between its quantized layers and needs iOS 17 for int8
    activations; everything else targets iOS 16 like Apple's converter. `config.coreml_attention`
    "split_einsum" (or "split_einsum_v2", queries in chunks) converts the UNet in Apple's Neural Engine
    layout (`split_einsum.py`); parity still compares the package with the original UNet."""
    FORMAT.check_precision(precision)
    unet = component.name == "unet"
    chunked, attention = config.chunk_unet and unet, config.coreml_attention if unet else "original"
    resources = folder.parent / "Resources"
    resources.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, module, inputs, outputs in _parts(component, precision, quantization, chunked, attention):
        try:
            if precision == "int8" and not unet:  # a text encoder: int8 weights over fp16 compute
                model = _int8_weights(_convert(module, inputs, outputs, "fp16", None))
            else:
                model = _convert(module, inputs, outputs, precision, quantization)
        except Exception as err:  # coremltools names the op it cannot convert; keep that line
            raise UserError(f"Core ML export of {name} failed: {(str(err).splitlines() or [repr(err)])[0]}") from None
        model.short_description = f"pocketdiff {name} ({precision}), apple/ml-stable-diffusion layout"
        paths.append(resources / f"{name}.mlpackage")
        model.save(str(_emptied(paths[-1])))
    if component.name == "unet":  # Swift prefers chunks where both exist: leave only the layout just written
        for stale in {"Unet", *CHUNKS} - {path.stem for path in paths}:
            _emptied(resources / f"{stale}.mlpackage")
            _emptied(resources / f"{stale}.mlmodelc")
    return paths[0]


def _emptied(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def package_paths(path: Path) -> list[Path]:
    """The packages behind an exported component's path: both chunks for `UnetChunk1`."""
    return [path.with_name(f"{name}.mlpackage") for name in CHUNKS] if path.name == f"{CHUNKS[0]}.mlpackage" else [path]


def _operations(block) -> Counter:
    ops = Counter()
    for op in block.operations:
        ops[op.type] += 1
        for nested in op.blocks:
            ops += _operations(nested)
    return ops


def _declared(path: Path, name: str) -> dict:
    """A package's declared I/O (float32 both ways, as Swift feeds and reads them), op census, weight dtypes."""
    ct = _quiet_coremltools()
    spec = ct.utils.load_spec(str(path))
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    for side, features in (("inputs", spec.description.input), ("outputs", spec.description.output)):
        if any(f.type.multiArrayType.dataType != float32 for f in features):
            raise UserError(f"Core ML {name}: {side} must be float32 for the Swift package")
    ops, weight_types = Counter(), Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            ops += _operations(block)
            for op in block.operations:
                if op.type == "const":
                    for out in op.outputs:
                        weight_types[ct.proto.MIL_pb2.DataType.Name(out.type.tensorType.dataType)] += 1
    return {"inputs": {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input},
            "outputs": [o.name for o in spec.description.output], "ops": ops, "const_dtypes": weight_types,
            "spec_version": spec.specificationVersion}


def structural_check(path: Path, component: Component) -> dict:
    """The package's declared I/O against the Swift contract, its op census and weight dtypes.

    Chunks: the first takes the UNet's inputs; every input of the second is an output of the first
    or an input of the UNet (what Swift merges), and its first output is the noise prediction."""
    paths = package_paths(path)
    parts = [_declared(p, p.name) for p in paths]
    expected = {name: list(value.shape) for name, value in component.inputs.items()}
    first, last = parts[0], parts[-1]
    # Swift reads the last chunk's first output; a whole package declares exactly the contract's outputs
    outputs_ok = last["outputs"][:1] == component.outputs[:1] if len(parts) > 1 else last["outputs"] == component.outputs
    if first["inputs"] != expected or not outputs_ok:
        raise UserError(f"Core ML {component.name}: declares inputs {first['inputs']} / outputs {last['outputs']}, "
                        f"the Swift contract needs {expected} / {component.outputs}")
    if len(parts) > 1:
        missing = set(last["inputs"]) - set(first["outputs"]) - set(expected)
        if missing:
            raise UserError(f"Core ML {paths[-1].name}: inputs {sorted(missing)} are neither outputs of "
                            f"{paths[0].name} nor UNet inputs")
    entry = {"inputs": first["inputs"], "outputs": last["outputs"],
             "ops": dict(sum((p["ops"] for p in parts), Counter()).most_common()),
             "const_dtypes": dict(sum((p["const_dtypes"] for p in parts), Counter())),
             "spec_version": max(p["spec_version"] for p in parts)}
    if len(parts) > 1:
        entry["chunks"] = {p.name: {"inputs": list(part["inputs"]), "outputs": part["outputs"],
                                    "bytes": _package_bytes(p)} for p, part in zip(paths, parts)}
    return entry


class CoreMLModel:
    """A package, or chunks run as Swift runs them: each on its predecessor's outputs merged with the inputs."""

    def __init__(self, path: Path):
        ct = _quiet_coremltools()
        self.models = [ct.models.MLModel(str(p), compute_units=ct.ComputeUnit.CPU_ONLY) for p in package_paths(path)]

    def __call__(self, inputs: dict) -> dict:
        feed = {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
        outputs = self.models[0].predict(feed)
        for model in self.models[1:]:
            names = [i.name for i in model.get_spec().description.input]
            merged = {**feed, **outputs}
            outputs = model.predict({name: merged[name] for name in names})
        return outputs


def load(path: Path):
    """A runnable model on macOS; None elsewhere (the exporter then records the structural check)."""
    return CoreMLModel(path) if platform.system() == "Darwin" else None


def write_layout(ref: modelio.ModelRef, out: Path, _names: list[str], config) -> None:
    """The tokenizer files beside the models, `SWIFT.md`, `swift.json` and `compile.sh`; on macOS also the
    compiled `.mlmodelc` Swift loads."""
    resources = out / "Resources"
    if (ref.path / "tokenizer").is_dir():
        write_vocab_and_merges(ref.path / "tokenizer", resources)
    write_swift_notes(ref, out, config.guidance, config.unet_batch_one)
    if platform.system() == "Darwin":
        ct = _quiet_coremltools()
        for package in sorted(resources.glob("*.mlpackage")):
            compiled = Path(ct.utils.compile_model(str(package)))
            shutil.move(str(compiled), _emptied(package.with_suffix(".mlmodelc")))


def _package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def file_bytes(path: Path) -> int:
    return sum(_package_bytes(p) for p in package_paths(path))


FORMAT = ExportFormat(
    name="coreml", title="Core ML", precisions=("fp16", "fp32", "int8"), default_precision="fp16", int8_backends=INT8_BACKENDS,
    palettizes=True, dynamic_shapes=False, runs_pipeline=False, check_int8=check_int8,
    export_component=export_component, load=load, write_layout=write_layout, file_bytes=file_bytes, adapt=adapt,
    structural_check=structural_check, no_runtime_reason="numeric check skipped: Core ML runs only on macOS")
