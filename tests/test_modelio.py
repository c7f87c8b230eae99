"""Opening models from local folders: every way a user can get it wrong gives one clear line."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from pocketdiff import modelio
from pocketdiff.errors import UserError
from tests.conftest import tiny_unet_config


def _unet_folder(tmp_path, weights: bool = True):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "unet"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_unet_config())
    if weights:
        unet.save_pretrained(folder)
    else:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(dict(unet.config)))
    return folder


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        modelio.open_model(tmp_path / "nope")


def test_file_is_not_a_folder(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="expected a diffusers model folder"):
        modelio.open_model(tmp_path / "x.safetensors")


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(UserError, match="not a diffusers model"):
        modelio.open_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(UserError, match="ControlNetModel is not a supported model"):
        modelio.open_model(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError, match="pipeline KandinskyPipeline is not supported"):
        modelio.open_model(tmp_path)


def test_corrupt_weights(tmp_path):
    folder = _unet_folder(tmp_path)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="corrupt safetensors"):
        modelio.open_model(folder)


def test_pickle_weights_need_consent(tmp_path):
    folder = _unet_folder(tmp_path)
    state = {k: v for k, v in __import__("safetensors.torch").torch.load_file(next(folder.glob("*.safetensors"))).items()}
    next(folder.glob("*.safetensors")).unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="--allow-pickle"):
        modelio.open_model(folder)
    ref = modelio.open_model(folder, allow_pickle=True)
    unet = modelio.load_unet(ref)
    assert torch.equal(unet.conv_in.weight, state["conv_in.weight"])


def test_unet_with_weights_loads_them(tmp_path):
    folder = _unet_folder(tmp_path)
    ref = modelio.open_model(folder)
    assert (ref.kind, ref.random_weights) == ("unet", False)
    from safetensors.torch import load_file

    saved = load_file(next(folder.glob("*.safetensors")))
    assert torch.equal(modelio.load_unet(ref).conv_in.weight, saved["conv_in.weight"])


def test_config_only_unet_gets_random_weights(tmp_path):
    ref = modelio.open_model(_unet_folder(tmp_path, weights=False))
    assert ref.random_weights
    unet = modelio.load_unet(ref)
    inputs = modelio.unet_example_inputs(dict(unet.config), 8)
    assert unet(**inputs).sample.shape == (1, 4, 8, 8)


def test_pipeline_loads_and_generates(tiny_pipeline):
    ref = modelio.open_model(tiny_pipeline)
    assert (ref.kind, ref.class_name, ref.random_weights) == ("pipeline", "StableDiffusionPipeline", False)
    pipe = modelio.load_pipeline(ref)
    image = pipe("red apple", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_config_only_pipeline_is_architecture_only(tiny_pipeline, tmp_path):
    folder = tmp_path / "configs-only"
    shutil.copytree(tiny_pipeline, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    ref = modelio.open_model(folder)
    assert ref.random_weights
    pipe = modelio.load_pipeline(ref)
    assert pipe("ghost", num_inference_steps=1, output_type="np").images.shape == (1, 32, 32, 3)


def test_bare_unet_is_not_a_pipeline(tmp_path):
    ref = modelio.open_model(_unet_folder(tmp_path))
    with pytest.raises(UserError, match="not a pipeline"):
        modelio.load_pipeline(ref)


def test_cli_error_is_one_line_exit_2(tmp_path):
    result = subprocess.run(["pocketdiff", "inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such model folder"]
    assert "Traceback" not in result.stderr


def test_offline_mode_is_set():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
