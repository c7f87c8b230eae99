"""Shared fixtures: real (tiny) diffusers models built from configs, saved as local folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pocketdiff  # noqa: F401  (sets offline mode before diffusers is imported)
from pocketdiff.devices.anchors import SD15_UNET

CAPTIONS = ["red apple", "green apple", "grinning face", "dog face", "rocket", "snowman", "ghost", "rainbow"]


def tiny_unet_config(**overrides) -> dict:
    config = {
        "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "layers_per_block": 1, "block_out_channels": [32, 64], "attention_head_dim": 2, "cross_attention_dim": 32,
        "norm_num_groups": 32, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }
    config.update(overrides)
    return config


def _tiny_text_parts(folder: Path, projection: int | None = None):
    """The captions' CLIP tokenizer and a one-layer text encoder on it (with a projection: SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pocketdiff.distill.tokenizer import build_clip_tokenizer_files

    tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer_files(CAPTIONS, folder.parent / f"{folder.name}-tokenizer"))
    vocab = tok.get_vocab()
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, eos_token_id=vocab["<|endoftext|>"],
                            bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                            **({"projection_dim": projection} if projection else {}))
    return tok, (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config))


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, sample_size=32)


def build_tiny_pipeline(folder: Path) -> Path:
    """A complete StableDiffusionPipeline folder with random (seeded) weights, 32 px images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from pocketdiff.distill.zoo import scheduler_config

    torch.manual_seed(0)
    tok, text = _tiny_text_parts(folder)
    vae = _tiny_vae()  # before the UNet: the seeded draws, hence every test's weights, stay as they were
    unet = UNet2DConditionModel.from_config(tiny_unet_config())
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler.from_config(scheduler_config()),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


SDXL_STYLE = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80,
              "use_linear_projection": True, "transformer_layers_per_block": 2}  # SDXL's conditions and transformer depth


def build_tiny_sdxl_pipeline(folder: Path, unet_config: dict | None = None) -> Path:
    """A StableDiffusionXLPipeline folder in small: two text encoders (the second projected, padding with
    "!" as SDXL's does), their penultimate layers side by side as the UNet's 64-wide text states, and
    its pooled 32-wide projection plus six size numbers as the added conditions. `unet_config`: another
    SDXL-style UNet than the two-stage one."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from pocketdiff.distill.zoo import scheduler_config

    torch.manual_seed(0)
    tok, text = _tiny_text_parts(folder)
    tok_2, text_2 = _tiny_text_parts(folder, projection=32)
    tok_2.pad_token = "!"
    unet = UNet2DConditionModel.from_config(unet_config or tiny_unet_config(**SDXL_STYLE, cross_attention_dim=64))
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config()))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-pipeline")


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tmp_path_factory) -> Path:
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def three_stage_config(**overrides) -> dict:
    """Two layers per stage and a mid block: every BK preset and pruning unit applies."""
    return tiny_unet_config(**{"block_out_channels": [32, 64, 64], "layers_per_block": 2,
                               "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                               "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], **overrides})


@pytest.fixture(scope="session")
def three_stage_pipeline(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline with a three-stage, two-layer UNet (seeded random weights)."""
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("models") / "three-stage"
    shutil.copytree(tiny_pipeline, folder, ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(three_stage_config()).save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="session")
def tiny_exports(tiny_pipeline, tmp_path_factory) -> dict:
    """The tiny pipeline exported once per session, two components at a time: ONNX (every component)
    and ExecuTorch (what its pipeline runs), each format's folder and report."""
    from pocketdiff import modelio
    from pocketdiff.export.exporter import ExportConfig, export_model

    ref, exports = modelio.open_model(tiny_pipeline), {"reports": {}}
    for fmt, components in (("onnx", None), ("executorch", ["text_encoder", "unet", "vae_decoder"])):
        out = tmp_path_factory.mktemp(f"export-{fmt}")
        config = ExportConfig(to=[fmt], workers=2, **({"components": components} if components else {}))
        exports["reports"][fmt] = export_model(ref, config, out, log=lambda _: None)[fmt]
        exports[fmt] = out / fmt
    return exports


@pytest.fixture
def sd15_unet_folder(tmp_path) -> Path:
    """SD-1.5's UNet config alone (diffusers' published values): architecture, no weights."""
    folder = tmp_path / "sd15-unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SD15_UNET))
    return folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """32 scene images as a Hugging Face ImageFolder (metadata.jsonl), the layout users bring."""
    from PIL import Image

    from pocketdiff.distill import scenes

    folder = tmp_path_factory.mktemp("images")
    pool = scenes.training_set(32)
    rows = []
    for i, (image, caption) in enumerate(zip(pool.images, pool.captions)):
        Image.fromarray(image).resize((48, 40)).save(folder / f"{i}.png")  # not square: fitted on load
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="session")
def lcm_student(tiny_pipeline, image_folder, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny pipeline LCM-distilled for 30 steps: a few-step student with guidance in its weights, and its report."""
    from pocketdiff import modelio
    from pocketdiff.distill.step_common import StepDistillConfig
    from pocketdiff.distill.steps import distill_steps

    out = tmp_path_factory.mktemp("lcm") / "student"
    config = StepDistillConfig(steps=30, batch=8, lr=1e-3, data=str(image_folder), checkpoint_every=3, log_every=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POCKETDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        report = distill_steps(modelio.open_model(tiny_pipeline), config, out)
    return out, report


@pytest.fixture(scope="session")
def compat_python() -> str:
    """The python of the transformers 4 / optimum environment (`tests/compat/`), built on first use."""
    from tests.stockcheck import compat_python as build

    return build()
