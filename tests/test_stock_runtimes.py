"""What pocketdiff writes runs in the libraries users already have, unchanged: stock diffusers on transformers
5 (this environment) and 4 (a second one, with optimum's ONNX pipeline), each loading with a plain
`from_pretrained(path)` and generating what pocketdiff's own loader generates."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pocketdiff import modelio
from pocketdiff.export.parity import psnr
from tests.stockcheck import (PROMPT, assert_stock_generates_ours, assert_transformers_4_generates_ours, elsewhere,
                              latents_for, ours, transformers_4_images)


@pytest.fixture(scope="module")
def written_folders(three_stage_pipeline, lcm_student, tmp_path_factory) -> dict[str, Path]:
    """Folders pocketdiff writes: the shipped default, a pruned model, a few-step student."""
    from pocketdiff.compress.prune import prune_preset

    pruned = tmp_path_factory.mktemp("stock") / "pruned"
    prune_preset(modelio.open_model(three_stage_pipeline), "bk-small", pruned)
    return {"default": modelio.DEFAULT_MODEL, "pruned": pruned, "lcm": lcm_student[0]}


def test_every_written_folder_generates_in_stock_diffusers_as_pocketdiff_does(written_folders):
    assert_stock_generates_ours(written_folders)


def test_transformers_4_loads_and_generates_every_written_folder(written_folders, three_stage_pipeline, compat_python,
                                                                 tmp_path):
    import shutil

    from pocketdiff.stockformat import write_vocab_and_merges

    assert_transformers_4_generates_ours(compat_python, written_folders, tmp_path / "written")
    # the control: the text encoder as transformers 5 saves it (unprefixed keys), tokenizer files made readable;
    # transformers 4 reads none of its keys and builds a random text encoder: another image
    control = shutil.copytree(three_stage_pipeline, tmp_path / "transformers-5-save")
    write_vocab_and_merges(control / "tokenizer", control / "tokenizer")
    image = transformers_4_images(compat_python, {"control": control}, tmp_path / "control")["control"]
    assert np.abs(image - ours(control, latents_for(control), 2)).max() > 0.05


def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


class TorchNoise:
    """The between-step noise diffusers' LCM scheduler draws from a seeded torch generator, for our numpy sampler."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape, dtype=np.float32):
        return torch.randn(tuple(shape), generator=self.generator).numpy().astype(dtype)


def test_optimum_runs_our_onnx_exports_as_our_runtime_does(tiny_exports, lcm_student, compat_python, tmp_path):
    from pocketdiff.export.exporter import ExportConfig, export_model
    from pocketdiff.export.runtime import ExportedPipeline

    student, int8_text = tmp_path / "student", tmp_path / "student-int8-text-encoder"
    export_model(modelio.open_model(lcm_student[0]), ExportConfig(to=["onnx"]), student, log=lambda _: None)
    export_model(modelio.open_model(lcm_student[0]), ExportConfig(to=["onnx"], text_encoder_int8=True), int8_text,
                 log=lambda _: None)
    cases = {"teacher-4": (tiny_exports["onnx"], 4), "lcm-1": (student / "onnx", 1), "lcm-4": (student / "onnx", 4),
             "lcm-1-int8-text-encoder": (int8_text / "onnx", 1)}
    latents = latents_for(lcm_student[0], seed=3)
    jobs = [{"name": name, "folder": folder, "kind": "optimum", "steps": steps, "guidance": 7.5, "seed": 5,
             "array": latents} for name, (folder, steps) in cases.items()]
    images = elsewhere(compat_python, jobs, tmp_path)
    assert list(images["teacher-4:classes"]) == ["ORTStableDiffusionPipeline", "DDIMScheduler"]
    assert list(images["lcm-4:classes"]) == ["ORTStableDiffusionPipeline", "LCMScheduler"]
    for name, (folder, steps) in cases.items():
        ours = ExportedPipeline(folder, "onnx")([PROMPT], steps, 7.5, latents=latents, noise=[TorchNoise(5)])
        assert psnr(ours, _uint8(images[name])[None]) >= 40, name
