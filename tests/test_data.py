"""OpenMoji captions and rendering, and the CLIP-format tokenizer built from them."""

import json

import numpy as np
from transformers import CLIPTokenizer

from pocketdiff.distill import data
from pocketdiff.distill.tokenizer import BOS, EOS, build_clip_tokenizer_files


def test_captions_from_code_points():
    assert data.caption_for([0x1F34E]) == "red apple"
    assert data.caption_for([0x1F468, 0x1F3FD, 0x200D, 0x1F4BB]) == "man medium skin tone personal computer"
    assert data.caption_for([0x1F1EB, 0x1F1F7]) == "flag fr"
    assert data.caption_for([0x0023, 0xFE0F, 0x20E3]) == "number sign keycap"
    assert data.caption_for([0xE000]) is None  # private use: OpenMoji's extras have no Unicode name


def test_rendered_set_and_fixed_split():
    full = data.load_emoji(32)
    assert len(full) > 4000 and full.images.shape[1:] == (32, 32, 3) and full.images.dtype == np.uint8
    train, validation = data.load_emoji(32, "train"), data.load_emoji(32, "validation")
    assert len(train) + len(validation) == len(full)
    assert not set(train.stems) & set(validation.stems)
    assert data.load_emoji(32, "validation").stems == validation.stems  # seeded, stable
    apple = full.images[full.captions.index("red apple")].astype(int)
    red, green = apple[..., 0], apple[..., 1]
    assert ((red > 150) & (green < 100)).sum() > 50  # a real red apple, drawn on white
    assert (full.images[:, 0, 0] == 255).all(axis=-1).mean() > 0.9  # white background
    tensors = full.subset(np.arange(4)).tensors()
    assert tensors.shape == (4, 3, 32, 32) and tensors.min() >= -1 and tensors.max() <= 1


def test_tokenizer_in_clip_format_gives_whole_word_tokens(tmp_path):
    captions = ["red apple", "man medium-light skin tone", "flag fr", "keycap digit one 1"]
    folder = build_clip_tokenizer_files(captions, tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = (folder / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(vocab) == 512 + len(merges) - 1 + 2
    assert list(vocab)[-2:] == [BOS, EOS]
    tok = CLIPTokenizer.from_pretrained(folder)
    ids = tok("man medium-light skin tone").input_ids
    assert tok.convert_ids_to_tokens(ids) == [BOS, "man</w>", "medium</w>", "-</w>", "light</w>", "skin</w>",
                                              "tone</w>", EOS]
    assert tok.convert_ids_to_tokens(tok("zebra").input_ids)[1:-1] != ["zebra</w>"]  # unseen words fall to pieces
    padded = tok("red apple", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == vocab[EOS]
