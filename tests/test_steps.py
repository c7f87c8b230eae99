"""Step distillation: the student's guidance input and grids are stock diffusers', the solver steps are
diffusers' DDIM, LCM and progressive runs train and save pipelines that stock diffusers samples with one
UNet call per step, and a killed run resumes to the same weights."""

import json

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)

from pocketdiff import modelio
from pocketdiff.errors import UserError
from pocketdiff.distill import diffusion, latents, pairs, steps
from pocketdiff.distill.step_common import StepDistillConfig
from pocketdiff.distill.steps import distill_steps
from pocketdiff.distill.zoo import scheduler_config
from tests.conftest import tiny_unet_config


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POCKETDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _config(image_folder, **kw):
    return StepDistillConfig(**{"steps": 8, "batch": 8, "lr": 1e-3, "data": str(image_folder), "checkpoint_every": 3,
                                "log_every": 1, **kw})


def _unet_calls(pipe) -> list[int]:
    """Batch size of every UNet call the pipeline makes from now on."""
    calls = []
    pipe.unet.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(len((args or [kwargs["sample"]])[0])),
                                        with_kwargs=True)
    return calls


def _held_out_loss(pipe, teacher_unet, student, student_steps, image_folder) -> float:
    """The progressive loss of `student` against `teacher_unet` on one fixed batch and fixed noise."""
    alphas, final = steps._schedule(pipe)
    loss = steps.ProgressiveLoss(pipe, teacher_unet, student.eval(), alphas, final, student_steps, "epsilon",
                                 "epsilon", _config(image_folder))
    data = latents.training_latents(pipe, modelio.open_model(pipe.name_or_path), _config(image_folder), 0)
    ids = pipe.tokenizer(data.captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(loss({"mean": data.mean, "std": data.std, "ids": ids}, torch.Generator().manual_seed(7))["loss"])


def test_guidance_embedding_is_the_one_stock_pipelines_feed():
    guidance = torch.tensor([1.0, 4.5, 7.5, 12.0])
    stock = StableDiffusionPipeline.get_guidance_scale_embedding(None, guidance - 1, embedding_dim=256)
    assert torch.allclose(diffusion.guidance_embedding(guidance, 256), stock, atol=1e-6)


def test_the_guidance_input_starts_as_the_teacher():
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(tiny_unet_config()).eval()
    student = diffusion.with_guidance_input(teacher).eval()
    assert student.config.time_cond_proj_dim == diffusion.GUIDANCE_DIM
    inputs = modelio.unet_example_inputs(dict(teacher.config), 8, batch=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = diffusion.guidance_embedding(torch.tensor([2.0, 9.0]))
        assert torch.equal(student(**inputs, timestep_cond=cond).sample, teacher(**inputs).sample)


def test_solver_steps_are_diffusers_ddim_and_the_grids_are_the_schedulers():
    ddim = DDIMScheduler.from_config(scheduler_config(), timestep_spacing="trailing")
    alphas, final = steps._schedule(type("P", (), {"scheduler": ddim})())
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for n in (1, 2, 4):
        ddim.set_timesteps(n)
        grid = len(alphas) - 1 - (len(alphas) // n) * torch.arange(n)
        assert torch.equal(ddim.timesteps, grid)
        t = ddim.timesteps[-1]  # the last step lands on the final alpha
        x0 = diffusion.x0_and_eps(eps, x, alphas[t].view(1), "epsilon")[0]
        ours = diffusion.ddim_to(x0, eps, torch.tensor([final]))
        assert torch.allclose(ours, ddim.step(eps, t, x).prev_sample, atol=1e-5)
    lcm = LCMScheduler.from_config(scheduler_config(), original_inference_steps=50)
    origin = set((torch.arange(1, 51) * 20 - 1).tolist())
    for n in (1, 2, 4):
        lcm.set_timesteps(n)
        assert set(lcm.timesteps.tolist()) <= origin
    c_skip, c_out = diffusion.boundary_scalings(torch.tensor([0, 499]))
    stock_skip, stock_out = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(499))
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)
    assert c_skip[1].item() == pytest.approx(float(stock_skip)) and c_out[1].item() == pytest.approx(float(stock_out))


def test_progressive_target_lands_where_the_teacher_two_steps_land():
    ddim = DDIMScheduler.from_config(scheduler_config(), timestep_spacing="trailing")
    alphas, final = steps._schedule(type("P", (), {"scheduler": ddim})())

    class Teacher:  # a fixed nonlinear "UNet" stands in: the algebra, not the network, is under test
        config = {}

        def __call__(self, x, t, encoder_hidden_states):
            return type("O", (), {"sample": torch.tanh(x * 0.7 + t.view(-1, 1, 1, 1) / 1000)})()

    loss = steps.ProgressiveLoss.__new__(steps.ProgressiveLoss)
    loss.alphas, loss.final_alpha, loss.stride = alphas, final, 500
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 499])
    guided = diffusion.GuidedTeacher(Teacher(), "epsilon")
    a, a_mid, a_end = loss._alpha(t), loss._alpha(t - 250), loss._alpha(t - 500)
    text = {"encoder_hidden_states": torch.zeros(2, 77, 32)}
    x_mid = diffusion.ddim_to(*guided(x, t, a, text, text, torch.ones(2)), a_mid)
    x_end = diffusion.ddim_to(*guided(x_mid, t - 250, a_mid, text, text, torch.ones(2)), a_end)
    ratio = ((1 - a_end) / (1 - a)).sqrt().view(-1, 1, 1, 1)
    x0 = (x_end - ratio * x) / (a_end.sqrt().view(-1, 1, 1, 1) - ratio * a.sqrt().view(-1, 1, 1, 1))
    eps = diffusion.x0_and_eps(x0, x, a, "sample")[1]
    ddim_x0 = DDIMScheduler.from_config(ddim.config, prediction_type="sample")
    ddim_x0.set_timesteps(2)
    for i in range(2):  # a 2-step student that outputs this x0 follows diffusers' DDIM onto the teacher's point
        landed = ddim_x0.step(x0[i:i + 1], int(t[i]), x[i:i + 1]).prev_sample
        assert torch.allclose(landed, x_end[i:i + 1], atol=1e-4), i
    assert torch.allclose(diffusion.x0_and_eps(eps, x, a, "epsilon")[0], x0, atol=1e-4)


def test_guided_teacher_is_classifier_free_guidance():
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_unet_config()).eval()
    x, t, a = torch.randn(2, 4, 8, 8), torch.tensor([700, 300]), torch.tensor([0.2, 0.6])
    text, empty, g = torch.randn(2, 77, 32), torch.randn(2, 77, 32), torch.tensor([7.5, 3.0])
    _, eps = diffusion.GuidedTeacher(unet, "epsilon")(x, t, a, {"encoder_hidden_states": text},
                                                  {"encoder_hidden_states": empty}, g)
    with torch.no_grad():
        cond, uncond = unet(x, t, text).sample, unet(x, t, empty).sample
    assert torch.allclose(eps, uncond + g.view(-1, 1, 1, 1) * (cond - uncond), atol=1e-4)  # batched vs apart


def test_lcm_trains_and_stock_diffusers_samples_it_with_one_unet_call_per_step(lcm_student):
    folder, report = lcm_student
    losses = [float(line.split(",")[3]) for line in (folder / "log.csv").read_text().splitlines()[1:]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert report["sample_steps"] == [1, 2, 4] and report["rounds"][0]["student_steps"] == 50
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 50
    calls = _unet_calls(pipe)
    image = pipe("red apple", num_inference_steps=2, guidance_scale=7.5, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert calls == [1, 1] and np.isfinite(image).all()
    lcm_pipe = LatentConsistencyModelPipeline.from_pretrained(folder)
    same = lcm_pipe("red apple", num_inference_steps=2, guidance_scale=7.5, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    assert np.allclose(image, same, atol=1e-5)


def test_lcm_distils_an_sdxl_pipeline_that_stock_diffusers_samples_in_one_call_per_step(
        tiny_sdxl_pipeline, image_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    distill_steps(modelio.open_model(tiny_sdxl_pipeline), _config(image_folder, steps=30), tmp_path / "lcm")
    losses = [float(line.split(",")[3]) for line in (tmp_path / "lcm" / "log.csv").read_text().splitlines()[1:]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "lcm")
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim
    calls = _unet_calls(pipe)
    image = pipe("red apple", num_inference_steps=2, guidance_scale=7.5, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert calls == [1, 1] and np.isfinite(image).all()  # guidance inside: no unconditional half


def test_progressive_rounds_halve_the_steps_and_the_last_student_samples_in_one_call(
        tiny_pipeline, image_folder, tmp_path):
    config = _config(image_folder, method="progressive", start_steps=4, final_steps=1, steps=100, lr=1e-4,
                     checkpoint_every=100)
    report = distill_steps(modelio.open_model(tiny_pipeline), config, tmp_path / "pd")
    assert [r["student_steps"] for r in report["rounds"]] == [2, 1]
    teacher = modelio.load_pipeline(modelio.open_model(tiny_pipeline))
    two = UNet2DConditionModel.from_pretrained(tmp_path / "pd" / "rounds" / "2-steps" / "unet")
    one = UNet2DConditionModel.from_pretrained(tmp_path / "pd" / "unet")
    untrained = diffusion.with_guidance_input(teacher.unet)
    assert _held_out_loss(teacher, teacher.unet, two, 2, image_folder) < 0.8 * _held_out_loss(
        teacher, teacher.unet, untrained, 2, image_folder)
    assert _held_out_loss(teacher, two, one, 1, image_folder) < 0.8 * _held_out_loss(
        teacher, two, two, 1, image_folder)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pd")
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    calls = _unet_calls(pipe)
    pipe("rocket", num_inference_steps=1, guidance_scale=7.5, output_type="np")
    assert calls == [1]
    again = distill_steps(modelio.open_model(tiny_pipeline), config, tmp_path / "pd")  # finished rounds are kept
    assert [r["resumed_at_step"] for r in again["rounds"]] == [0, 0]
    assert torch.equal(UNet2DConditionModel.from_pretrained(tmp_path / "pd" / "unet").conv_out.weight,
                       pipe.unet.conv_out.weight)


@pytest.mark.parametrize("method", ["lcm", "dmd", "ode"])
def test_killed_run_resumes_to_the_weights_of_a_straight_run(method, tiny_pipeline, image_folder, tmp_path, monkeypatch):
    """LCM's target network and DMD's fake score network are part of what resumes; ode's batches are teacher pairs."""
    model = modelio.open_model(tiny_pipeline)
    changes = {"method": method, "regression_pairs": 8, "teacher_steps": 4}
    distill_steps(model, _config(image_folder, **changes), tmp_path / "straight")
    real = latents.epoch_batches

    def dying(*args):
        pick = real(*args)

        def indices(step):
            if step == 5:  # after the checkpoint at step 3: steps 3 and 4 are redone, target network included
                raise KeyboardInterrupt
            return pick(step)
        return indices

    for module in (latents, pairs):
        monkeypatch.setattr(module, "epoch_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        distill_steps(model, _config(image_folder, **changes), tmp_path / "resumed")
    for module in (latents, pairs):
        monkeypatch.setattr(module, "epoch_batches", real)
    report = distill_steps(model, _config(image_folder, **changes), tmp_path / "resumed")
    assert report["rounds"][0]["resumed_at_step"] == 3
    straight = UNet2DConditionModel.from_pretrained(tmp_path / "straight" / "unet").state_dict()
    resumed = UNet2DConditionModel.from_pretrained(tmp_path / "resumed" / "unet").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_step_distillation_refusals(tiny_pipeline, sd15_unet_folder, image_folder, tmp_path):
    with pytest.raises(ValueError, match="power of two"):
        StepDistillConfig(method="progressive", start_steps=12, final_steps=5)
    with pytest.raises(ValueError, match="above guidance_max"):
        StepDistillConfig(guidance_min=9, guidance_max=3)
    with pytest.raises(UserError, match="3 steps do not divide the 1000 training timesteps"):
        distill_steps(modelio.open_model(tiny_pipeline), _config(image_folder, method="progressive", start_steps=6,
                                                                 final_steps=3), tmp_path / "x")
    with pytest.raises(UserError, match="needs a pipeline folder with weights"):
        distill_steps(modelio.open_model(sd15_unet_folder), _config(image_folder), tmp_path / "y")


def test_cli_distills_steps_and_refuses_bad_options(tiny_pipeline, image_folder, tmp_path):
    from typer.testing import CliRunner

    from pocketdiff.apps.cli import app

    out = tmp_path / "lcm"
    result = CliRunner().invoke(app, ["distill", "steps", str(tiny_pipeline), "--out", str(out), "--steps", "2",
                                      "--batch", "4", "--data", str(image_folder)])
    assert result.exit_code == 0, result.output
    assert "sample it in 1/2/4 steps" in " ".join(result.output.split())  # rich wraps at the terminal width
    assert json.loads((out / "steps_report.json").read_text())["method"] == "lcm"
    result = CliRunner().invoke(app, ["distill", "steps", str(tiny_pipeline), "--out", str(tmp_path / "dmd"), "--method",
                                      "dmd", "--steps", "2", "--batch", "4", "--regression-pairs", "4",
                                      "--fake-updates", "2", "--data", str(image_folder)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "dmd" / "steps_report.json").read_text())["config"]["fake_updates"] == 2
    result = CliRunner().invoke(app, ["distill", "steps", str(tiny_pipeline), "--out", str(out), "--method", "gan"])
    assert isinstance(result.exception, UserError) and "method" in str(result.exception)
    result = CliRunner().invoke(app, ["distill", "steps", str(tiny_pipeline), "--out", str(out), "--loss", "l1"])
    assert isinstance(result.exception, UserError) and "loss" in str(result.exception)


def test_recipe_stage_feeds_the_few_step_student_to_the_next_stage(tiny_pipeline, image_folder, tmp_path):
    from rich.console import Console

    from pocketdiff.apps.recipe import parse_recipe
    from pocketdiff.apps.runner import read_manifest, run_recipe

    recipe = (f"name: lcm\nmodel: {tiny_pipeline}\nstages:\n"
              f"  - step_distill: {{method: lcm, steps: 2, batch: 4, data: {image_folder}}}\n"
              "  - generate: {prompts: [rocket], steps: 1, guidance: 7.5}\n")
    run_dir = run_recipe(parse_recipe(recipe, "lcm.yaml"), tmp_path, Console(record=True, width=200))
    assert read_manifest(run_dir / "01-step-distill")["metrics"]["loss"] > 0
    assert read_manifest(run_dir / "02-generate")["status"] == "done"
    assert StableDiffusionPipeline.from_pretrained(run_dir / "01-step-distill").unet.config.time_cond_proj_dim == 256


def test_numpy_lcm_sampler_matches_diffusers():
    from pocketdiff.export.lcm import LCM

    config = {**scheduler_config(), "_class_name": "LCMScheduler", "original_inference_steps": 50}
    ours, theirs = LCM(config), LCMScheduler.from_config(config)
    for n in (1, 2, 3, 4, 8):
        theirs.set_timesteps(n)
        assert ours.timesteps(n).tolist() == theirs.timesteps.tolist(), n
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    theirs.set_timesteps(4)
    for i, t in enumerate(ours.timesteps(4)):
        out = rng.standard_normal(x.shape, dtype=np.float32)
        step = theirs.step(torch.from_numpy(out), int(t), torch.from_numpy(x))
        np.testing.assert_allclose(ours.denoised(out, int(t), x), step.denoised.numpy(), rtol=1e-5, atol=1e-5)
        x_next = ours.step(out, int(t), x, 4, np.random.default_rng(i))
        if i == 3:  # the last step returns the estimate itself
            np.testing.assert_allclose(x_next, step.prev_sample.numpy(), rtol=1e-5, atol=1e-5)
        x = x_next


def test_an_lcm_student_exports_without_guidance_pairs_and_its_one_step_image_as_one_program(lcm_student, tmp_path):
    """In ONNX the student's UNet runs once per step (guidance in its weights), and at one step its UNet, sampler
    step and decoder run as one program: the image of the parts. In ExecuTorch too, exported alone with a fixed
    prompt set's states, as an app that samples in one step from a few prompts ships it."""
    from pocketdiff.devices.profile import ProfileConfig, profile
    from pocketdiff.export.exporter import ExportConfig, export_model
    from pocketdiff.export.parity import psnr
    from pocketdiff.export.runtime import ExportedPipeline

    folder, _ = lcm_student
    config = ExportConfig(to=["onnx"], components=["text_encoder", "unet", "vae_decoder", "one_step"])
    report = export_model(modelio.open_model(folder), config, tmp_path, log=lambda _: None)["onnx"]
    assert report["ok"] and report["image_check"]["steps"] == 1 and report["image_psnr"] >= 40
    assert report["one_step_image_psnr"] >= 40 and report["components"]["one_step"]["max_abs"] < 1e-3
    exported, parts = ExportedPipeline(tmp_path / "onnx", "onnx"), ExportedPipeline(tmp_path / "onnx", "onnx", one_step=False)
    assert exported.one_step.input_names == ["sample", "encoder_hidden_states", "guidance"]
    calls = []
    for name in ("unet", "vae_decoder", "one_step"):
        real = getattr(exported, name)
        setattr(exported, name, lambda inputs, name=name, real=real: calls.append((name, sorted(inputs))) or real(inputs))
    images = exported(["rocket"], 4, 7.5, seed=3)
    assert images.shape == (1, 32, 32, 3) and [name for name, _ in calls] == ["unet"] * 4 + ["vae_decoder"]
    assert calls[0][1] == ["encoder_hidden_states", "sample", "timestep", "timestep_cond"]
    assert np.array_equal(images, exported(["rocket"], 4, 7.5, seed=3))  # seeded, between-step noise included
    calls.clear()
    prompts = ["rocket", "a red circle"]
    images = {guidance: exported(prompts, 1, guidance, seed=5) for guidance in (7.5, 3.0)}
    assert [name for name, _ in calls] == ["one_step"] * 4
    for guidance, image in images.items():  # the guidance input is embedded as the pipeline embeds it
        assert psnr(image, parts(prompts, 1, guidance, seed=5)) >= 40
    assert not np.array_equal(images[7.5], images[3.0])

    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")  # a fixed prompt set: no text encoder either
    config = ExportConfig(to=["executorch"], components=["one_step"], prompt_embeddings=str(tmp_path / "prompts.txt"))
    alone = export_model(modelio.open_model(folder), config, tmp_path / "alone", log=lambda _: None)["executorch"]
    assert alone["ok"] and "image_psnr" not in alone and alone["one_step_image_psnr"] >= 40
    app = ExportedPipeline(tmp_path / "alone" / "executorch", "executorch")
    assert psnr(app(prompts, 1, 7.5, seed=5), images[7.5]) >= 40
    with pytest.raises(UserError, match="only the one-step program: it samples in 1 step"):
        app(prompts, 2, 7.5)

    config = ProfileConfig(backend="executorch", components=["one_step"], runs=2, warmup=1)
    (measured,) = profile(tmp_path / "alone", config, log=lambda _: None)["measurements"]
    delegated = {op["op"]: op["delegated"] for op in measured["ops"]}
    assert delegated["native_group_norm.out"] is False and any(delegated.values()) and "roofline" not in measured
    with pytest.raises(ValueError, match="one_step is not a Core ML component"):
        ProfileConfig(backend="coreml", components=["one_step"])
