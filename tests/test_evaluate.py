"""The judge's metrics: Fréchet distance against closed forms, and the shipped judge on real images."""

import numpy as np
import pytest
import torch

from pocketdiff.apps.evaluate import frechet_distance, load_judge, prompt_set, score
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


def test_prompt_sets_are_seeded_and_disjoint():
    validation, train = prompt_set("validation", 64), prompt_set("train", 64)
    assert validation.captions == prompt_set("validation", 64).captions
    assert not set(validation.captions) & set(train.captions)
    assert validation.images.shape == (64, 32, 32, 3)
    with pytest.raises(UserError, match="the validation split has"):
        prompt_set("validation", 10_000)


def test_shipped_judge_recognises_real_images():
    judge = load_judge("default")
    prompts = prompt_set("validation", 256)
    with torch.no_grad():
        real = score(judge, prompts.images, prompts)
        shuffled = score(judge, prompts.images[np.roll(np.arange(256), 1)], prompts)
    assert real["retrieval_accuracy"] > 0.25  # chance is 1/256
    assert real["prompt_score"] > shuffled["prompt_score"] + 0.1
    assert real["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # the reference set itself


def test_missing_judge_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no judge here"):
        load_judge(tmp_path)


def test_clip_folder_works_as_judge(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from pocketdiff.apps.evaluate import ClipJudge
    from pocketdiff.distill.tokenizer import build_clip_tokenizer_files

    prompts = prompt_set("validation", 8)
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
    with torch.no_grad():
        result = score(judge, prompts.images, prompts)
    assert set(result) == {"prompt_score", "frechet_distance", "retrieval_accuracy"}
    assert -1 <= result["prompt_score"] <= 1 and result["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
