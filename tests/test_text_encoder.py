"""Slim text encoder: fewer layers, distilled toward the teacher's last hidden states, loaded by stock diffusers."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

from pocketdiff import modelio
from pocketdiff.distill.text_encoder import SlimTextEncoderConfig, distill_text_encoder, kept_layers, slim_text_encoder
from pocketdiff.errors import UserError


def test_kept_layers_are_evenly_spaced_with_first_and_last():
    assert kept_layers(12, 4) == [0, 4, 7, 11] and kept_layers(4, 2) == [0, 3] and kept_layers(4, 1) == [0]
    with pytest.raises(UserError, match="keep fewer"):
        kept_layers(4, 4)


def test_student_starts_from_the_teachers_own_layers():
    teacher = CLIPTextModel.from_pretrained(modelio.open_model("default").path / "text_encoder")
    student = slim_text_encoder(teacher, 2)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    own, source = student.state_dict(), teacher.state_dict()
    assert torch.equal(own["encoder.layers.0.mlp.fc1.weight"], source["encoder.layers.0.mlp.fc1.weight"])
    assert torch.equal(own["encoder.layers.1.mlp.fc1.weight"], source["encoder.layers.3.mlp.fc1.weight"])
    assert torch.equal(own["embeddings.token_embedding.weight"], source["embeddings.token_embedding.weight"])
    assert torch.equal(own["final_layer_norm.weight"], source["final_layer_norm.weight"])


def test_slim_text_encoder_learns_the_teachers_states_and_loads_in_stock_diffusers(tmp_path):
    default = modelio.open_model("default")
    config = SlimTextEncoderConfig(layers=2, steps=60, batch=32, lr=1e-3, warmup_steps=5)
    report = distill_text_encoder(default, config, tmp_path / "slim")
    assert report["kept_layers"] == [0, 3]
    assert report["params_after"] < 0.75 * report["params_before"]
    assert report["macs_after"] < 0.6 * report["macs_before"]
    assert report["relative_error"] < 0.5 * report["relative_error_start"], report
    assert json.loads((tmp_path / "slim" / "text_encoder_report.json").read_text())["relative_error"] == \
        report["relative_error"]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert pipe.text_encoder.config.num_hidden_layers == 2
    teacher = StableDiffusionPipeline.from_pretrained(default.path)
    assert torch.equal(pipe.unet.conv_in.weight, teacher.unet.conv_in.weight)  # everything else untouched
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_slim_text_encoder_refusals(tiny_pipeline, tmp_path):
    with pytest.raises(UserError, match="needs a pipeline folder with weights"):
        distill_text_encoder(modelio.open_model(tiny_pipeline / "unet"), SlimTextEncoderConfig(steps=1), tmp_path / "x")
    one = tmp_path / "prompts.txt"
    one.write_text("a red square\n")
    with pytest.raises(UserError, match="at least 2 captions"):
        distill_text_encoder(modelio.open_model("default"), SlimTextEncoderConfig(steps=1, data=str(one)), tmp_path / "y")
    with pytest.raises(UserError, match="the teacher has 1; keep fewer"):
        distill_text_encoder(modelio.open_model(tiny_pipeline), SlimTextEncoderConfig(steps=1, layers=1), tmp_path / "z")
