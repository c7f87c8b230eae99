"""Block-level KD: features paired through pruning, every term logged, the student moves toward the teacher,
a killed run resumes to the same weights, data-free latents come from the teacher and are cached."""

import csv
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from pocketdiff import modelio
from pocketdiff.errors import UserError
from pocketdiff.distill.blocks import preset_plan, remove_blocks
from pocketdiff.compress.prune import prune_preset
from pocketdiff.distill import kd, latents
from pocketdiff.distill.conditions import TextConditions, caption_ids
from pocketdiff.distill.kd import KDConfig, distill_kd, resolve_teacher
from tests.conftest import SDXL_STYLE, build_tiny_sdxl_pipeline, three_stage_config


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETDIFF_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def student(three_stage_pipeline, tmp_path_factory):
    """bk-small of the three-stage tiny pipeline: a pruned pipeline folder with its prune report."""
    folder = tmp_path_factory.mktemp("kd") / "bk-small"
    prune_preset(modelio.open_model(three_stage_pipeline), "bk-small", folder)
    return folder


def _config(image_folder, **kw):
    return KDConfig(**{"steps": 12, "batch": 8, "lr": 1e-3, "data": str(image_folder), "checkpoint_every": 4,
                        "log_every": 1, **kw})


def _output_error(teacher_folder, student_unet) -> float:
    """Relative squared error of the student's prediction against the teacher's, on text-conditioned noise."""
    pipe = modelio.load_pipeline(modelio.open_model(teacher_folder))
    ids = caption_ids(pipe, ["red apple", "rocket", "dog face", ""] * 2)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        inputs = {"sample": torch.randn(8, 4, 8, 8, generator=generator), "timestep": torch.linspace(50, 950, 8),
                  **TextConditions(pipe)(ids)}
        target, pred = pipe.unet(**inputs).sample, student_unet.eval()(**inputs).sample
    return float((pred - target).pow(2).mean() / target.pow(2).mean())


def test_block_pairs_follow_the_stages_a_student_keeps():
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(three_stage_config()).eval()
    small, _ = remove_blocks(teacher, "bk-small")
    pairs = kd.block_pairs(dict(teacher.config), dict(small.config))
    assert pairs == [("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
                     ("down_blocks.2", "down_blocks.2"), ("up_blocks.0", "up_blocks.0"),
                     ("up_blocks.1", "up_blocks.1"), ("up_blocks.2", "up_blocks.2")]
    assert kd.shape_matched(teacher, small, pairs) == (pairs, [])
    tiny, _ = remove_blocks(teacher, "bk-tiny")  # the innermost stage gone: up blocks shift by one
    pairs = kd.block_pairs(dict(teacher.config), dict(tiny.config))
    assert pairs == [("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
                     ("up_blocks.0", "up_blocks.1"), ("up_blocks.1", "up_blocks.2")]
    kept, dropped = kd.shape_matched(teacher, tiny, pairs)
    assert dropped == [("down_blocks.1", "down_blocks.1")]  # the student's last stage lost its downsampler


def test_self_attention_pairs_map_each_layer_to_the_teacher_layer_it_came_from():
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(three_stage_config()).eval()
    small, _ = remove_blocks(teacher, "bk-small")
    pairs = dict(kd.self_attention_pairs(small, preset_plan(dict(teacher.config), "bk-small"), 3))
    # up blocks keep the teacher's layers 0 and 2: the student's layer 1 is the teacher's layer 2
    assert pairs["up_blocks.2.attentions.1.transformer_blocks.0.attn1"] == "up_blocks.2.attentions.2.transformer_blocks.0.attn1"
    assert len(pairs) == 2 + 2 * 2  # one per kept down layer with attention, two per up block with attention
    teacher_modules = dict(teacher.named_modules())
    for s, t in kd.self_attention_pairs(small, preset_plan(dict(teacher.config), "bk-small"), 3):
        assert torch.equal(small.get_submodule(s).to_q.weight, teacher_modules[t].to_q.weight), s


def test_normalised_feature_term_ignores_the_feature_scale():
    s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    assert torch.allclose(kd.feature_term(100 * s, 100 * t, True), kd.feature_term(s, t, True))
    assert torch.allclose(kd.feature_term(100 * s, 100 * t, False), 1e4 * kd.feature_term(s, t, False))
    assert float(kd.feature_term(t, t, True)) == 0.0


def test_kd_logs_every_term_moves_the_student_toward_the_teacher_and_saves_a_stock_pipeline(
        three_stage_pipeline, student, image_folder, tmp_path):
    before = _output_error(three_stage_pipeline, modelio.load_unet(modelio.open_model(student)))
    report = distill_kd(modelio.open_model(three_stage_pipeline), modelio.open_model(student),
                        _config(image_folder, steps=30, task_weight=0.0), tmp_path / "kd")  # random teacher: KD only
    rows = list(csv.DictReader((tmp_path / "kd" / "log.csv").open()))
    assert {"loss", "task", "output_kd", "feature_kd"} <= set(rows[0])
    assert sum(k.startswith("feature/") for k in rows[0]) == len(report["pairs"]) == 6
    assert report["training_images"] == 32 and not report["data_free"]
    assert np.mean([float(r["loss"]) for r in rows[-5:]]) < np.mean([float(r["loss"]) for r in rows[:5]])
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "kd")
    after = _output_error(three_stage_pipeline, pipe.unet)
    assert after < 0.5 * before, (before, after)
    assert pipe.unet.mid_block is None and pipe.unet.config.layers_per_block == 1
    image = pipe("red apple", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_killed_kd_resumes_to_the_weights_of_a_straight_run(three_stage_pipeline, student, image_folder, tmp_path,
                                                            monkeypatch):
    teacher, pruned = modelio.open_model(three_stage_pipeline), modelio.open_model(student)
    distill_kd(teacher, pruned, _config(image_folder), tmp_path / "straight")
    real = latents.epoch_batches

    def dying(*args):
        pick = real(*args)

        def indices(step):
            if step == 6:  # after the checkpoint at step 4: steps 4 and 5 are redone
                raise KeyboardInterrupt
            return pick(step)
        return indices

    monkeypatch.setattr(latents, "epoch_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        distill_kd(teacher, pruned, _config(image_folder), tmp_path / "resumed")
    monkeypatch.setattr(latents, "epoch_batches", real)
    report = distill_kd(teacher, pruned, _config(image_folder), tmp_path / "resumed")
    assert report["resumed_at_step"] == 4
    straight = UNet2DConditionModel.from_pretrained(tmp_path / "straight" / "unet").state_dict()
    resumed = UNet2DConditionModel.from_pretrained(tmp_path / "resumed" / "unet").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_gradient_checkpointing_and_self_attention_kd(three_stage_pipeline, student, image_folder, tmp_path):
    teacher, pruned = modelio.open_model(three_stage_pipeline), modelio.open_model(student)
    first = {}
    for checkpointing in (False, True):
        out = tmp_path / f"gc-{checkpointing}"
        report = distill_kd(teacher, pruned, _config(image_folder, steps=1, features="self-attention",
                                                     gradient_checkpointing=checkpointing), out)
        first[checkpointing] = next(csv.DictReader((out / "log.csv").open()))
    assert len(report["pairs"]) == 6 and all(p[0].endswith("attn1") for p in report["pairs"])
    for key in ("loss", "task", "output_kd", "feature_kd"):
        assert float(first[True][key]) == pytest.approx(float(first[False][key]), rel=1e-5), key


def test_data_free_kd_trains_on_cached_teacher_samples(three_stage_pipeline, student, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("red apple\n\nrocket\ndog face\n")
    config = KDConfig(steps=2, batch=4, captions=str(captions), teacher_steps=2)
    report = distill_kd(modelio.open_model(three_stage_pipeline), modelio.open_model(student), config, tmp_path / "kd")
    assert report["data_free"] and report["training_images"] == 3
    cached = list((tmp_path / "cache" / "latents").glob("teacher-*.safetensors"))
    assert len(cached) == 1

    class NoSampling:
        def __call__(self, *args, **kwargs):
            raise AssertionError("the cache should have answered")

    again = latents.teacher_latents(NoSampling(), three_stage_pipeline, ["red apple", "rocket", "dog face"], 2, 7.5, 0)
    assert torch.equal(again.std, torch.zeros_like(again.std)) and again.captions == ["red apple", "rocket", "dog face"]
    pipe = modelio.load_pipeline(modelio.open_model(three_stage_pipeline))
    fresh = pipe(["rocket"], num_inference_steps=2, guidance_scale=7.5, output_type="latent",
                 generator=[torch.Generator().manual_seed(1)]).images  # caption 1 of the set, seed 0 + 1
    assert torch.allclose(again.mean[1:2] * pipe.vae.config.scaling_factor, fresh, rtol=1e-4, atol=1e-4)


def test_kd_refusals(three_stage_pipeline, student, tiny_pipeline, tmp_path):
    bare = tmp_path / "bare"
    modelio.load_unet(modelio.open_model(student)).save_pretrained(bare)
    with pytest.raises(UserError, match="no prune_report.json names its teacher"):
        resolve_teacher(modelio.open_model(bare), None)
    assert resolve_teacher(modelio.open_model(student), None).path == three_stage_pipeline.resolve()
    with pytest.raises(UserError, match="self-attention KD pairs layers through the prune report"):
        distill_kd(modelio.open_model(three_stage_pipeline), modelio.open_model(bare),
                   KDConfig(steps=1, features="self-attention"), tmp_path / "x")
    with pytest.raises(UserError, match="the student was not pruned from this teacher"):
        distill_kd(modelio.open_model(tiny_pipeline), modelio.open_model(student),
                   KDConfig(steps=1, features="self-attention"), tmp_path / "y")
    with pytest.raises(UserError, match="no metadata.jsonl"):
        distill_kd(modelio.open_model(three_stage_pipeline), modelio.open_model(student),
                   KDConfig(steps=1, data=str(tmp_path)), tmp_path / "z")
    with pytest.raises(ValueError, match="every loss weight is 0"):
        KDConfig(task_weight=0, output_weight=0, feature_weight=0)


def test_cli_takes_the_teacher_from_the_prune_report_and_refuses_a_foreign_checkpoint(
        three_stage_pipeline, student, image_folder, tmp_path):
    from typer.testing import CliRunner

    from pocketdiff.apps.cli import app

    args = ["distill", "kd", str(student), "--out", str(tmp_path / "kd"), "--steps", "2", "--batch", "4",
            "--data", str(image_folder)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "distilled pipeline" in result.output and "output_kd" in result.output
    report = json.loads((tmp_path / "kd" / "kd_report.json").read_text())
    assert report["teacher"] == str(three_stage_pipeline.resolve()) and len(report["pairs"]) == 6
    result = CliRunner().invoke(app, [*args, "--lr", "0.5"])  # same folder, other settings
    assert isinstance(result.exception, UserError) and "other inputs or settings" in str(result.exception)
    result = CliRunner().invoke(app, [*args, "--features", "everything"])
    assert isinstance(result.exception, UserError) and str(result.exception).startswith("distill kd: features:")


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    """A three-stage tiny SDXL pipeline and its bk-small student."""
    root = tmp_path_factory.mktemp("kd-sdxl")
    teacher = build_tiny_sdxl_pipeline(root / "teacher", three_stage_config(**SDXL_STYLE, cross_attention_dim=64))
    prune_preset(modelio.open_model(teacher), "bk-small", root / "bk-small")
    return teacher, root / "bk-small"


def test_text_conditions_are_what_the_sdxl_pipeline_feeds_its_unet(sdxl_pair):
    pipe = modelio.load_pipeline(modelio.open_model(sdxl_pair[0]))
    captions = ["red apple", "grinning face", "rocket"]
    conditions, ids = TextConditions(pipe), caption_ids(pipe, captions)
    assert set(ids) == {"ids", "ids_2"} and ids["ids_2"][0, -1] == pipe.tokenizer_2.convert_tokens_to_ids("!")
    with torch.no_grad():
        got = conditions(ids)
        embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
        dropped = conditions(ids, drop=torch.tensor([True, False, True]))
    torch.testing.assert_close(got["encoder_hidden_states"], embeds)  # both encoders' penultimate layers
    torch.testing.assert_close(got["added_cond_kwargs"]["text_embeds"], pooled)
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(got["added_cond_kwargs"]["time_ids"], time_ids.repeat(3, 1))
    # a dropped caption is SDXL's unconditional input: zeros (force_zeros_for_empty_prompt), the rest untouched
    assert not dropped["encoder_hidden_states"][[0, 2]].any() and not dropped["added_cond_kwargs"]["text_embeds"][2].any()
    torch.testing.assert_close(dropped["encoder_hidden_states"][1], got["encoder_hidden_states"][1])


def test_kd_distils_an_sdxl_student_and_saves_a_stock_sdxl_pipeline(sdxl_pair, image_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    teacher, student = sdxl_pair
    before = _output_error(teacher, modelio.load_unet(modelio.open_model(student)))
    report = distill_kd(modelio.open_model(teacher), modelio.open_model(student),
                        _config(image_folder, steps=30, task_weight=0.0), tmp_path / "kd")
    rows = list(csv.DictReader((tmp_path / "kd" / "log.csv").open()))
    assert len(report["pairs"]) == 6 and report["dropped_pairs"] == []
    assert np.mean([float(r["loss"]) for r in rows[-5:]]) < np.mean([float(r["loss"]) for r in rows[:5]])
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "kd")
    assert _output_error(teacher, pipe.unet) < 0.5 * before
    image = pipe("red apple", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
