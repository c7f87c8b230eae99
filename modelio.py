"""Open diffusers models from local folders: full pipelines, bare UNets, or architecture-only configs.

Every failure a user can cause (a missing path, a folder that is no diffusers model, an
architecture we do not handle, a corrupt weight file, pickle weights without consent) becomes a
one-line `UserError`. A folder whose components hold only `config.json` is built with random
weights, which lets hardware teams profile SD-scale architectures without downloading anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .stockformat import make_stock_pipeline
from .errors import UserError

DEFAULT_MODEL = Path(__file__).resolve().parent / "apps" / "zoo" / "default"  # shipped as the apps' package data
RANDOM_WEIGHTS_NOTE = "random weights: architecture only"

SUPPORTED_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "LatentConsistencyModelPipeline"}
SUPPORTED_COMPONENTS = {"UNet2DConditionModel"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class ModelRef:
    """A validated model folder: what it is, and whether its weights exist or are random."""

    path: Path
    kind: str  # "pipeline" or "unet"
    class_name: str
    random_weights: bool
    allow_pickle: bool = False

    @property
    def unet_path(self) -> Path:
        return self.path / "unet" if self.kind == "pipeline" else self.path

    @property
    def unet_has_weights(self) -> bool:
        return any(p.suffix in (".safetensors", *_PICKLE_SUFFIXES) for p in self.unet_path.iterdir())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err})") from None


def _weights_state(folder: Path, allow_pickle: bool) -> bool:
    """True where the component has usable weights, False where it is config-only."""
    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = [p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if safetensors:
        from safetensors import safe_open

        for file in safetensors:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            except Exception as err:  # safetensors raises several types for a damaged header
                raise UserError(f"{file}: corrupt safetensors file ({err})") from None
        return True
    if pickles:
        if not allow_pickle:
            raise UserError(f"{folder}: only pickle weights ({pickles[0].name}); convert to safetensors "
                            "or pass --allow-pickle if you trust the file")
        return True
    return False


def open_model(spec: str | Path, allow_pickle: bool = False) -> ModelRef:
    """Validate a local model folder ('default' names the embedded model) without loading weights."""
    path = DEFAULT_MODEL if str(spec) == "default" else Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such model folder")
    if not path.is_dir():
        raise UserError(f"{path}: expected a diffusers model folder, got a file")
    if (path / "model_index.json").exists():
        index = _read_json(path / "model_index.json")
        name = index.get("_class_name", "?")
        if name not in SUPPORTED_PIPELINES:
            raise UserError(f"{path}: pipeline {name} is not supported (supported: {', '.join(sorted(SUPPORTED_PIPELINES))})")
        if not (path / "unet" / "config.json").exists():
            raise UserError(f"{path}: pipeline has no unet/config.json")
        with_weights = [_weights_state(path / part, allow_pickle) for part, spec_ in index.items()
                        if isinstance(spec_, list) and spec_[0] is not None and (path / part / "config.json").exists()]
        return ModelRef(path, "pipeline", name, not all(with_weights), allow_pickle)
    if (path / "config.json").exists():
        name = _read_json(path / "config.json").get("_class_name", "?")
        if name not in SUPPORTED_COMPONENTS:
            raise UserError(f"{path}: {name} is not a supported model (supported: a pipeline folder or "
                            f"{', '.join(sorted(SUPPORTED_COMPONENTS))})")
        return ModelRef(path, "unet", name, not _weights_state(path, allow_pickle), allow_pickle)
    raise UserError(f"{path}: not a diffusers model (no model_index.json or config.json)")


def require_trained_pipeline(ref: ModelRef, user: str, why: str = "") -> None:
    """Refuse a bare UNet folder or an architecture with random weights where `user` (a verb, a role) needs a whole
    trained pipeline: sampling, teacher targets and calibration all come from its weights."""
    if ref.kind != "pipeline" or ref.random_weights:
        raise UserError(f"{ref.path}: {user} needs a pipeline folder with weights{why}")


def load_unet(ref: ModelRef, device: str | torch.device = "cpu"):
    """The UNet in fp32: its weights, or random weights (seeded) for an architecture-only folder."""
    from diffusers import UNet2DConditionModel

    folder = ref.unet_path
    if not ref.unet_has_weights:
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(_read_json(folder / "config.json")).to(device).eval()
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, dtype=torch.float32, use_safetensors=not ref.allow_pickle)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{folder}: cannot load UNet ({str(err).splitlines()[0]})") from None
    return unet.to(device).eval()


def load_pipeline(ref: ModelRef, device: str | torch.device = "cpu"):
    """The whole pipeline in fp32, components without weights built from their configs (a quantized
    folder's UNet as the float weights stock diffusers loads; `compress.saved.load_shipped_pipeline`
    runs its int8 graph)."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    if ref.kind != "pipeline":
        raise UserError(f"{ref.path}: a bare {ref.class_name}, not a pipeline; this command needs a pipeline folder")
    overrides = {}
    if ref.random_weights:
        overrides = _random_components(ref.path)
    try:
        pipe = DiffusionPipeline.from_pretrained(ref.path, dtype=torch.float32, use_safetensors=not ref.allow_pickle,
                                                 **overrides)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{ref.path}: cannot load pipeline ({str(err).splitlines()[0]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def copy_pipeline_except(source: Path, out: Path, component: str) -> None:
    """model_index.json and every component folder it names but `component`, which the caller writes anew;
    text encoders in the form stock loaders of transformers 4 and 5 both read (`stockformat`)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "model_index.json", out / "model_index.json")
    for name, spec in _read_json(source / "model_index.json").items():
        if name != component and isinstance(spec, list) and spec[0] and (source / name).is_dir():
            shutil.copytree(source / name, out / name, dirs_exist_ok=True)
    make_stock_pipeline(out)


def save_pipeline_with(source: Path, out: Path, component: str, model) -> None:
    """A pipeline folder at `out`: `model` (safetensors) as `component`, every other component from `source`."""
    copy_pipeline_except(source, out, component)
    model.save_pretrained(out / component, safe_serialization=True)
    make_stock_pipeline(out)  # a text encoder just saved by transformers 5 needs its stock key names


def _random_components(path: Path) -> dict:
    """Components that have a config but no weights, instantiated from the config."""
    import diffusers
    import transformers

    built = {}
    torch.manual_seed(0)
    for part, spec in _read_json(path / "model_index.json").items():
        folder = path / part
        if not (isinstance(spec, list) and spec[0] and (folder / "config.json").exists()):
            continue
        if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
            continue
        library = diffusers if spec[0] == "diffusers" else transformers
        cls = getattr(library, spec[1])
        if spec[0] == "diffusers":
            built[part] = cls.from_config(_read_json(folder / "config.json"))
        else:
            built[part] = cls(cls.config_class.from_pretrained(folder))
    return built


def is_sdxl(pipe) -> bool:
    """An SDXL-style pipeline: a second (projected) text encoder, whose pooling and the image size feed the UNet."""
    return getattr(pipe, "text_encoder_2", None) is not None


def vae_scale_factor(ref: ModelRef) -> int:
    """Pixels per latent cell: from the pipeline's VAE, or SD's 8 for a bare UNet."""
    vae_config = ref.path / "vae" / "config.json"
    if ref.kind == "pipeline" and vae_config.exists():
        return 2 ** (len(_read_json(vae_config)["block_out_channels"]) - 1)
    return 8


def unet_config(ref: ModelRef) -> dict:
    return _read_json(ref.unet_path / "config.json")


def unet_batch(config: dict) -> int:
    """The batch a pipeline feeds its UNet per step: 2 for a guided model (prompt and empty prompt),
    1 for a student with guidance in its weights (`time_cond_proj_dim`)."""
    return 1 if config.get("time_cond_proj_dim") else 2


def unet_example_inputs(config: dict, latent_size: int, batch: int = 1, tokens: int = 77,
                        device: str | torch.device = "cpu", generator: torch.Generator | None = None) -> dict:
    """Keyword inputs of one UNet forward for any SD-family config (SD-1/2, SDXL's added conditions, LCM's w)."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inputs = {
        "sample": randn(batch, config["in_channels"], latent_size, latent_size),
        "timestep": torch.full((batch,), 999, device=device),
        "encoder_hidden_states": randn(batch, tokens, cross),
    }
    if config.get("addition_embed_type") == "text_time":
        time_dim = config["addition_time_embed_dim"]
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * time_dim
        inputs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_dim), "time_ids": randn(batch, 6)}
    if config.get("time_cond_proj_dim"):
        inputs["timestep_cond"] = randn(batch, config["time_cond_proj_dim"])
    return inputs
