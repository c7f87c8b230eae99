"""The judge's metrics: Fréchet distance against closed forms, GenEval-style scores on renders and on wrong images."""

import numpy as np
import pytest
from PIL import Image

from pocketdiff.apps.evaluate import frechet_distance, headline, load_judge, prompt_set, score
from pocketdiff.distill import scenes
from pocketdiff.errors import UserError


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 6))
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = np.array([1.0, -2.0, 0, 0, 0.5, 0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    b = 2.0 * rng.standard_normal((40000, 6))
    # N(0, I) vs N(0, 4I): d·(1 + 4 − 2·2) = d
    assert frechet_distance(rng.standard_normal((40000, 6)), b) == pytest.approx(6.0, rel=0.05)


def test_prompt_sets_are_seeded_and_cover_the_families():
    prompts = prompt_set("in_distribution", 8)
    assert prompts.captions == prompt_set("in_distribution", 8).captions
    assert [s.prompt.family for s in prompts.scenes] == [f for f in scenes.FAMILIES for _ in range(8)]
    assert prompts.images.shape == (48, 32, 32, 3)
    held_out = prompt_set("held_out", 8)
    assert {s.prompt.family for s in held_out.scenes} == set(scenes.HELD_OUT_FAMILIES)
    with pytest.raises(UserError, match="choose one of in_distribution, held_out"):
        prompt_set("validation", 8)


def test_judge_passes_renders_and_fails_mismatched_images():
    judge = load_judge("default")
    prompts = prompt_set("in_distribution", 16)
    real = score(judge, prompts.images, prompts)
    assert real["overall"] == 1.0 and real["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    shuffled = score(judge, prompts.images[np.roll(np.arange(len(prompts.images)), 7)], prompts)
    assert shuffled["overall"] < 0.5  # right objects, wrong prompts
    assert shuffled["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # the same images: a distribution, no order
    blank = score(judge, np.full_like(prompts.images, 255), prompts)
    assert blank["overall"] == 0.0 and headline(blank) == 0.0 and blank["frechet_distance"] > 1
    large = np.stack([np.asarray(Image.fromarray(i).resize((64, 64))) for i in prompts.images])
    assert score(judge, large, prompts)["overall"] >= 0.95  # other resolutions are judged at the judge's own


def test_missing_judge_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no judge here"):
        load_judge(tmp_path)


def test_clip_folder_works_as_judge(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from pocketdiff.apps.evaluate import ClipJudge
    from pocketdiff.distill.tokenizer import build_clip_tokenizer_files

    prompts = prompt_set("in_distribution", 2)
    build_clip_tokenizer_files(prompts.captions, tmp_path)
    vocab = CLIPTokenizer.from_pretrained(tmp_path).get_vocab()
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "eos_token_id": vocab["<|endoftext|>"]},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path)
    judge = load_judge(tmp_path)
    assert isinstance(judge, ClipJudge)
    result = score(judge, prompts.images, prompts)
    assert set(result) == {"prompt_score", "frechet_distance", "retrieval_accuracy"}
    assert -1 <= headline(result) <= 1 and result["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
