"""The embedded default: reproducible training that stock diffusers loads, and the shipped weights."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from pocketdiff.modelio import DEFAULT_MODEL
from pocketdiff.distill.zoo import DefaultTrainConfig, train_default


def _generate(folder, prompts, steps, guidance=7.5):
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # as a user types it: no dtype
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np").images


def test_quick_training_writes_a_stock_pipeline_and_resumes(tmp_path):
    out = tmp_path / "default"
    train_default(out, DefaultTrainConfig.quick(), work=tmp_path / "work")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (out / "tokenizer" / "vocab.json").exists() and (out / "tokenizer" / "merges.txt").exists()
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.float16
    images = _generate(out, ["a red circle", "two crosses"], steps=2)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    unet_log = (tmp_path / "work" / "unet" / "log.csv").read_text()
    # a second call finds every phase finished: no new training steps are logged
    train_default(out, DefaultTrainConfig.quick(), work=tmp_path / "work")
    assert (tmp_path / "work" / "unet" / "log.csv").read_text() == unet_log


def test_shipped_default_is_small_and_loads_in_stock_diffusers():
    sizes = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file())
    assert sizes < 40e6
    record = json.loads((DEFAULT_MODEL / "training.json").read_text())
    assert record["config"]["unet_steps"][-1] >= 1000 and record["config"]["scenes"] >= 10_000
    images = _generate(DEFAULT_MODEL, ["a red circle"], steps=4)
    assert images.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_shipped_default_draws_what_it_is_asked():
    from pocketdiff.apps.evaluate import load_judge, prompt_set, score

    prompts = prompt_set("in_distribution", 8)
    images = (np.clip(_generate(DEFAULT_MODEL, prompts.captions, steps=25), 0, 1) * 255).round().astype(np.uint8)
    judge = load_judge("default")
    result = score(judge, images, prompts)
    mismatched = score(judge, images[np.roll(np.arange(len(images)), 8)], prompts)  # each family judged by the next's
    # measured: 0.21 against 0.02; the 0.80 goal is not reached yet (apps/zoo/default/README.md)
    assert result["overall"] >= 0.12 and result["overall"] > 2 * mismatched["overall"], (result, mismatched)
