"""One-step distillation by regression: a student trained from the CLI on another pipeline's guided samples
draws them closer in one stock-diffusers step, with the x̂0 output its saved scheduler names."""

import json

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from typer.testing import CliRunner

from pocketdiff import modelio
from pocketdiff.apps.cli import app
from pocketdiff.compress.prune import prune_preset
from pocketdiff.distill import steps
from pocketdiff.distill.pairs import teacher_pairs
from pocketdiff.distill.step_common import StepDistillConfig
from pocketdiff.distill.steps import distill_steps
from pocketdiff.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POCKETDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _one_step_error(folder, pairs) -> float:
    """Mean squared error of stock diffusers' 1-step latents (no classifier-free pair) against the teacher's samples."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    with torch.no_grad():
        text = pipe.text_encoder(pairs.ids["ids"])[0]
    latents = pipe(prompt_embeds=text, num_inference_steps=1, guidance_scale=7.5, latents=pairs.noise,
                   output_type="latent").images
    assert calls == [len(text)]
    return float((latents - pairs.sample).pow(2).mean())


def test_pruned_student_learns_its_teachers_samples_in_one_step(image_folder, tmp_path):
    """The quickstart's case (whose student also drops the outer stage's transformers): the default pruned to
    bk-small learns the unpruned default's guided samples."""
    teacher, student = modelio.open_model("default").path, tmp_path / "bk-small"
    prune_preset(modelio.open_model(teacher), "bk-small", student)
    out = tmp_path / "ode"
    args = ["distill", "steps", str(student), "--out", str(out), "--method", "ode", "--teacher", "default",
            "--steps", "60", "--batch", "8", "--lr", "5e-4", "--regression-pairs", "16", "--teacher-steps", "4",
            "--guidance-min", "7.5", "--guidance-max", "7.5", "--data", str(image_folder)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "steps_report.json").read_text())
    assert report["sample_steps"] == [1] and report["prediction_type"] == "sample"
    assert report["rounds"][0]["pairs_teacher"] == str(teacher.resolve())
    scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.prediction_type == "sample"

    config = StepDistillConfig(method="ode", teacher="default", steps=1, batch=8, lr=5e-4, regression_pairs=16,
                               teacher_steps=4, guidance_min=7.5, guidance_max=7.5, data=str(image_folder))
    distill_steps(modelio.open_model(student), config, tmp_path / "one-step")  # the same run, one update in
    teacher_pipe = modelio.load_pipeline(modelio.open_model(teacher))
    alphas, final = steps._schedule(teacher_pipe)
    captions = [json.loads(line)["text"] for line in (image_folder / "metadata.jsonl").read_text().splitlines()]
    pairs = teacher_pairs(teacher_pipe, teacher, captions, alphas, final, config)
    before, after = _one_step_error(tmp_path / "one-step", pairs), _one_step_error(out, pairs)
    assert after < 0.5 * before, (before, after)


def test_ode_refusals(tiny_pipeline, sd15_unet_folder, image_folder, tmp_path):
    with pytest.raises(ValueError, match="teacher is an ode setting"):
        StepDistillConfig(method="lcm", teacher="default")
    with pytest.raises(ValueError, match="prediction is a progressive and ode setting"):
        StepDistillConfig(method="dmd", prediction="sample")
    config = StepDistillConfig(method="ode", teacher=str(sd15_unet_folder), steps=1, data=str(image_folder))
    with pytest.raises(UserError, match="the ode teacher needs a pipeline folder with weights"):
        distill_steps(modelio.open_model(tiny_pipeline), config, tmp_path / "x")
