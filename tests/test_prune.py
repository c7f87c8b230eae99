"""BK-SDM presets: the paper's sizes on SD-1.5, weights carried from the teacher, stock diffusers loads them."""

import math

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from pocketdiff import modelio
from pocketdiff.errors import UserError
from pocketdiff.distill.blocks import preset_config, remove_blocks
from pocketdiff.compress.prune import prune_preset
from tests.conftest import three_stage_config, tiny_unet_config

# BK-SDM's table (params, conv+linear MACs at 512 px)
BK_TABLE = {"bk-base": (579.4e6, 223.8e9), "bk-small": (482.3e6, 217.6e9), "bk-tiny": (323.4e6, 205.0e9)}


@pytest.mark.parametrize("preset", list(BK_TABLE))
def test_presets_match_bk_sdm_table(sd15_unet_folder, tmp_path, preset):
    report = prune_preset(modelio.open_model(sd15_unet_folder), preset, tmp_path / preset)
    params, macs = BK_TABLE[preset]
    assert math.isclose(report["params_after"], params, rel_tol=0.01)
    assert math.isclose(report["macs_after"], macs, rel_tol=0.02)
    assert report["random_weights"] and not any((tmp_path / preset).glob("*.safetensors"))
    rebuilt = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tmp_path / preset))
    assert sum(p.numel() for p in rebuilt.parameters()) == report["params_after"]


def test_removed_layers_are_named(sd15_unet_folder, tmp_path):
    report = prune_preset(modelio.open_model(sd15_unet_folder), "bk-small", tmp_path / "small")
    removed = set(report["removed"])
    assert {"mid_block", "down_blocks.0.resnets.1", "down_blocks.0.attentions.1", "up_blocks.3.resnets.1"} <= removed
    assert "up_blocks.3.resnets.2" not in removed and "down_blocks.0.resnets.0" not in removed


@pytest.mark.parametrize("preset", ["bk-base", "bk-small", "bk-tiny"])
def test_kept_layers_carry_teacher_weights_and_reload(tmp_path, preset):
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(three_stage_config()).eval()
    student, removed = remove_blocks(teacher, preset)
    t, s = teacher.state_dict(), student.state_dict()
    offset = 1 if preset == "bk-tiny" else 0
    assert torch.equal(s["conv_in.weight"], t["conv_in.weight"])
    assert torch.equal(s["down_blocks.0.attentions.0.proj_in.weight"], t["down_blocks.0.attentions.0.proj_in.weight"])
    # up stages keep the teacher's first and last layer: the last one becomes layer 1
    assert torch.equal(s["up_blocks.1.resnets.1.conv1.weight"], t[f"up_blocks.{1 + offset}.resnets.2.conv1.weight"])
    assert ("mid_block" in removed) == (preset != "bk-base")
    student.save_pretrained(tmp_path / "student")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "student").eval()
    inputs = modelio.unet_example_inputs(dict(teacher.config), 8, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), student.state_dict().values()))
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).sample, student.eval()(**inputs).sample, atol=1e-5)
    assert reloaded.config.layers_per_block == 1 and (reloaded.mid_block is None) == (preset != "bk-base")


def test_pruned_pipeline_loads_in_stock_diffusers(tiny_pipeline, three_stage_pipeline, tmp_path):
    with pytest.raises(UserError, match="needs layers_per_block ≥ 2"):  # the shared tiny pipeline has one layer
        prune_preset(modelio.open_model(tiny_pipeline), "bk-base", tmp_path / "out")
    prune_preset(modelio.open_model(three_stage_pipeline), "bk-tiny", tmp_path / "tiny")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny")
    assert len(pipe.unet.down_blocks) == 2 and pipe.unet.mid_block is None
    assert pipe("rocket", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    assert (tmp_path / "tiny" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (three_stage_pipeline / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_sdxl_presets_apply(tmp_path):
    from tests.test_inspect import SDXL_UNET

    for preset in ("bk-base", "bk-small", "bk-tiny"):
        config = preset_config(SDXL_UNET, preset)
        assert config["layers_per_block"] == 1
    tiny = preset_config(SDXL_UNET, "bk-tiny")
    assert tiny["block_out_channels"] == [320, 640] and tiny["transformer_layers_per_block"] == [1, 2]
    with torch.device("meta"):
        student, _ = remove_blocks(UNet2DConditionModel.from_config(SDXL_UNET), "bk-small")
    assert student.mid_block is None


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'bk-huge'"):
        preset_config(tiny_unet_config(layers_per_block=2), "bk-huge")


def test_prune_stage_feeds_the_next_stage(three_stage_pipeline, tmp_path):
    from rich.console import Console

    from pocketdiff.apps.recipe import parse_recipe
    from pocketdiff.apps.runner import read_manifest, run_recipe

    recipe = parse_recipe(f"name: p\nmodel: {three_stage_pipeline}\nstages:\n  - prune: {{preset: bk-small}}\n"
                          "  - generate: {prompts: [ghost], steps: 1}\n", "p.yaml")
    run_dir = run_recipe(recipe, tmp_path / "runs", Console(quiet=True))
    pruned = read_manifest(run_dir / "01-prune")
    assert pruned["produced_model"] and pruned["metrics"]["params_after"] < pruned["metrics"]["params_before"]
    assert read_manifest(run_dir / "02-generate")["input"] == str(run_dir / "01-prune")
    assert StableDiffusionPipeline.from_pretrained(run_dir / "01-prune").unet.mid_block is None
