"""DMD one-step distillation: the generator denoises as LCMScheduler does, the teacher pairs are stock
diffusers' DDIM samples, the distribution term is the guided-teacher vs fake score difference, the
two time-scale rule trains the fake score alone between generator steps, and the student samples in
one UNet call with stock diffusers."""

import json

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from pocketdiff import modelio
from pocketdiff.distill import diffusion, dmd, latents, steps
from pocketdiff.distill.pairs import teacher_pairs
from pocketdiff.distill.steps import distill_steps
from pocketdiff.distill.zoo import scheduler_config
from tests.conftest import tiny_unet_config
from tests.test_steps import _config as steps_config
from tests.test_steps import _unet_calls, private_cache  # noqa: F401 (the autouse fixture: a cache of this module's own)


def _config(image_folder, **kw):
    return steps_config(image_folder, **{"method": "dmd", "regression_pairs": 8, "teacher_steps": 4, **kw})


def _loss(tiny_pipeline, image_folder, **kw):
    """A DMDLoss on the tiny pipeline, its networks and the first training batch."""
    model = modelio.open_model(tiny_pipeline)
    pipe, config = modelio.load_pipeline(model), _config(image_folder, **kw)
    alphas, final = steps._schedule(pipe)
    data, batch_for = latents.training_batches(pipe, model, config, 0, config.batch)
    pairs = teacher_pairs(pipe, model.path, data.captions, alphas, final, config)
    torch.manual_seed(0)
    networks = torch.nn.ModuleDict({"generator": diffusion.with_guidance_input(pipe.unet).requires_grad_(True),
                                    "fake": diffusion.with_guidance_input(pipe.unet).requires_grad_(True)})
    pipe.unet.requires_grad_(False)
    scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50, timestep_scaling=10.0)
    loss = dmd.DMDLoss(pipe, networks, alphas, final, pairs, dmd.chain_table(scheduler), config)
    return loss, networks, batch_for(0), pipe, pairs


def test_the_generator_denoises_as_lcm_scheduler_steps():
    torch.manual_seed(0)
    student = diffusion.with_guidance_input(UNet2DConditionModel.from_config(tiny_unet_config())).eval()
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.02)  # the guidance input matters
    scheduler = LCMScheduler.from_config(scheduler_config(), original_inference_steps=50, timestep_scaling=10.0)
    table = dmd.chain_table(scheduler)
    assert table.tolist() == [[999, -1, -1, -1], [999, 499, -1, -1], [999, 759, 499, 259]]
    loss = dmd.DMDLoss.__new__(dmd.DMDLoss)
    loss.networks, loss.prediction = torch.nn.ModuleDict({"generator": student}), "epsilon"
    loss.alphas, loss.final_alpha = scheduler.alphas_cumprod.float(), float(scheduler.final_alpha_cumprod)
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    cond = diffusion.guidance_embedding(torch.tensor([6.0]))
    scheduler.set_timesteps(4)
    for t in scheduler.timesteps:
        with torch.no_grad():
            ours = loss._generate(x, t.view(1), {"encoder_hidden_states": text}, cond)
            stock = scheduler.step(student(x, t, text, timestep_cond=cond).sample, t, x).denoised
        assert torch.allclose(ours, stock, atol=1e-5), int(t)


def test_teacher_pairs_are_the_stock_pipelines_guided_samples(tiny_pipeline, image_folder):
    _, _, _, pipe, pairs = _loss(tiny_pipeline, image_folder, regression_pairs=3)
    assert len(pairs) == 3 and len(set(pairs.guidance.tolist())) == 3  # guidance drawn per pair
    stock = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    assert stock.scheduler.config.timestep_spacing == "trailing"
    for i in range(3):
        with torch.no_grad():
            text = stock.text_encoder(pairs.ids["ids"][i:i + 1])[0]
            sample = stock(prompt_embeds=text, latents=pairs.noise[i:i + 1], num_inference_steps=4,
                           guidance_scale=float(pairs.guidance[i]), output_type="latent").images
        assert torch.allclose(sample, pairs.sample[i:i + 1], atol=1e-4), i


def test_sdxl_teacher_pairs_are_the_stock_sdxl_pipelines_guided_samples_and_dmd_trains_on_them(
        tiny_sdxl_pipeline, image_folder):
    from diffusers import StableDiffusionXLPipeline

    loss, networks, batch, _, pairs = _loss(tiny_sdxl_pipeline, image_folder, regression_pairs=2)
    assert set(pairs.ids) == {"ids", "ids_2"}  # both encoders' token ids, for the regression's conditions
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline)
    for i in range(2):
        prompt = stock.tokenizer.decode(pairs.ids["ids"][i], skip_special_tokens=True)
        with torch.no_grad():
            sample = stock(prompt, latents=pairs.noise[i:i + 1], num_inference_steps=4,
                           guidance_scale=float(pairs.guidance[i]), output_type="latent").images
        assert torch.allclose(sample, pairs.sample[i:i + 1], atol=1e-4), i
    terms = loss({**batch, "step": 0}, torch.Generator().manual_seed(3))
    terms["loss"].backward()
    assert all(float(terms[k]) > 0 for k in ("fake", "distribution", "regression"))
    assert all(net.conv_out.weight.grad is not None for net in networks.values())


def test_distribution_term_is_zero_where_fake_and_guided_teacher_agree(tiny_pipeline, image_folder):
    # The fake network starts as the teacher's conditional prediction: at guidance 1 the guided teacher is that
    # same prediction, so the gradient vanishes; at guidance 7.5 it is the guidance the student must learn.
    unguided = _loss(tiny_pipeline, image_folder, guidance_min=1.0, guidance_max=1.0, regression_weight=0.0)
    guided = _loss(tiny_pipeline, image_folder, guidance_min=7.5, guidance_max=7.5, regression_weight=0.0)
    terms = [loss({**batch, "step": 0}, torch.Generator().manual_seed(3)) for loss, _, batch, _, _ in (unguided, guided)]
    assert terms[1]["distribution"].item() > 1e-4
    assert terms[0]["distribution"].item() < 1e-6 * terms[1]["distribution"].item()


def test_fake_only_steps_leave_the_generator_without_gradient(tiny_pipeline, image_folder):
    loss, networks, batch, _, _ = _loss(tiny_pipeline, image_folder, fake_updates=2)
    for step, generator_learns in ((1, False), (2, True)):
        networks.zero_grad(set_to_none=True)
        loss({**batch, "step": step}, torch.Generator().manual_seed(step))["loss"].backward()
        grads = {name: any(p.grad is not None for p in net.parameters()) for name, net in networks.items()}
        assert grads == {"generator": generator_learns, "fake": True}, step


@pytest.fixture(scope="module")
def dmd_student(tiny_pipeline, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("dmd") / "student"
    report = distill_steps(modelio.open_model(tiny_pipeline), _config(image_folder, steps=30, lr=3e-4), out)
    return out, report


def test_dmd_trains_both_networks_and_stock_diffusers_samples_it_in_one_call(dmd_student, tiny_pipeline):
    folder, report = dmd_student
    lines = (folder / "log.csv").read_text().splitlines()
    column = {name: i for i, name in enumerate(lines[0].split(","))}
    regression = [float(line.split(",")[column["regression"]]) for line in lines[1:]]
    assert np.mean(regression[-5:]) < 0.7 * np.mean(regression[:5]), regression
    checkpoint = load_file(folder / "checkpoint" / "model.safetensors")
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet").state_dict()
    for network in ("generator", "fake"):  # both trained, both kept for an exact resume
        assert not torch.equal(checkpoint[f"{network}.conv_out.weight"], teacher["conv_out.weight"]), network
    assert report["sample_steps"] == [1, 2, 4] and report["rounds"][0]["regression_pairs"] == 8
    assert json.loads((folder / "steps_report.json").read_text())["method"] == "dmd"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert torch.equal(pipe.unet.conv_out.weight, checkpoint["generator.conv_out.weight"])
    calls = _unet_calls(pipe)
    image = pipe("red apple", num_inference_steps=1, guidance_scale=7.5, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert calls == [1] and np.isfinite(image).all()
    same = LatentConsistencyModelPipeline.from_pretrained(folder)(
        "red apple", num_inference_steps=1, guidance_scale=7.5, output_type="np",
        generator=torch.Generator().manual_seed(0)).images
    assert np.allclose(image, same, atol=1e-5)


def test_more_pairs_than_captions_take_every_caption_again_with_new_noise(tiny_pipeline, image_folder):
    model = modelio.open_model(tiny_pipeline)
    pipe, config = modelio.load_pipeline(model), _config(image_folder)
    alphas, final = steps._schedule(pipe)
    captions = latents.training_batches(pipe, model, config, 0, config.batch)[0].captions
    n = len(captions)
    one_each = teacher_pairs(pipe, model.path, captions, alphas, final, _config(image_folder, regression_pairs=n))
    more = teacher_pairs(pipe, model.path, captions, alphas, final, _config(image_folder, regression_pairs=n + 3))
    assert len(one_each) == n and len(more) == n + 3
    assert torch.equal(more.ids["ids"][:n], one_each.ids["ids"]) and torch.equal(more.noise[:n], one_each.noise)
    firsts = {tuple(row.tolist()): i for i, row in enumerate(more.ids["ids"][:n])}
    for j in range(n, n + 3):  # a caption again, from noise of its own
        i = firsts[tuple(more.ids["ids"][j].tolist())]
        assert not torch.allclose(more.noise[i], more.noise[j]) and not torch.allclose(more.sample[i], more.sample[j])
