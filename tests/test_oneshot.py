"""One-shot pruning to a target: every unit is a stock diffusers config, scores mean what they say, targets hold."""

import json
import subprocess

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from pocketdiff import modelio
from pocketdiff.errors import UserError
from pocketdiff.compress import oneshot
from pocketdiff.distill.blocks import build_student, teacher_plan
from pocketdiff.compress.prune import calibration_batches, prune_to_target, prune_units
from tests.conftest import three_stage_config, tiny_unet_config


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(three_stage_config()).eval()


def test_every_unit_is_a_stock_diffusers_unet(teacher, tmp_path):
    config = dict(teacher.config)
    costs = oneshot.Costs(config, "params")
    units = oneshot.removable_units(config, costs)
    kinds = {u.kind for u in units}
    assert kinds == {"pair", "down_attention", "up_attention", "mid_attention", "mid", "stage"}
    # stage 1 widens 32 → 64: its first down layer and the up layer fed by stage 0 cannot go (channels would not fit)
    names = {u.name for u in units}
    assert "down_blocks.1.layers.1+up_blocks.1.layers.1" in names
    assert not any(n.startswith("down_blocks.1.layers.0") or n.endswith("up_blocks.1.layers.2") for n in names)
    inputs = modelio.unet_example_inputs(config, 8, batch=2, generator=torch.Generator().manual_seed(0))
    for unit in units:
        student, removed = build_student(teacher, unit.apply(teacher_plan(config)))
        assert removed, unit.name
        assert sum(p.numel() for p in student.parameters()) == costs(unit.apply(teacher_plan(config)))
        student.save_pretrained(tmp_path / "s")
        reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "s").eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(**inputs).sample, student.eval()(**inputs).sample, atol=1e-5), unit.name


# two-layer stages with deep transformers, SDXL's shape in small: a plain outer stage, a cross-attention inner one
DEEP = dict(layers_per_block=2, transformer_layers_per_block=[2, 3], use_linear_projection=True,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])


def test_deep_transformers_lose_single_blocks_in_a_stock_config(tmp_path):
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(tiny_unet_config(**DEEP)).eval()
    config = dict(teacher.config)
    costs = oneshot.Costs(config, "params")
    units = {u.name: u for u in oneshot.removable_units(config, costs) if u.kind == "transformer"}
    # down_blocks.1's second attention, the three of up_blocks.0; diffusers' config gives the mid block the depth of
    # the innermost down stage's first attention, so their blocks go together
    assert len(units) == 3 + 3 * 3 + 3
    assert not any(name.startswith("down_blocks.1.attentions.0") for name in units)
    joint = units["mid_block.attentions.0.transformer_blocks.1+down_blocks.1.attentions.0.transformer_blocks.1"]
    student, removed = build_student(teacher, joint.apply(teacher_plan(config)))
    assert removed == sorted(joint.name.split("+")) and student.config.transformer_layers_per_block == [[2, 2], [2, 3]]
    assert len(student.mid_block.attentions[0].transformer_blocks) == 2
    unit = units["up_blocks.0.attentions.1.transformer_blocks.1"]
    plan = unit.apply(teacher_plan(config))
    student, removed = build_student(teacher, plan)
    assert removed == [unit.name] and sum(p.numel() for p in student.parameters()) == costs(plan)
    assert student.config.reverse_transformer_layers_per_block == [[3, 2, 3], [2, 2, 2]]
    blocks, source = student.up_blocks[0].attentions[1].transformer_blocks, teacher.up_blocks[0].attentions[1].transformer_blocks
    assert len(blocks) == 2 and torch.equal(blocks[1].ff.net[2].weight, source[2].ff.net[2].weight)  # block 2 moved up
    second = units["up_blocks.0.attentions.1.transformer_blocks.0"].apply(plan)
    assert second is not None and units["up_blocks.0.attentions.1.transformer_blocks.2"].apply(second) is None  # the last stays
    student.save_pretrained(tmp_path / "s")
    inputs = modelio.unet_example_inputs(config, 8, batch=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "s").eval()
        assert torch.allclose(reloaded(**inputs).sample, student.eval()(**inputs).sample, atol=1e-5)
    # a block whose three residual branches add nothing is the identity: removing it scores 0, every other block more
    block = teacher.down_blocks[1].attentions[1].transformer_blocks[2]
    for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[2]):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    scores = oneshot.distortion_scores(teacher, list(units.values()), [inputs])
    assert scores["down_blocks.1.attentions.1.transformer_blocks.2"] < 1e-10
    assert min(v for k, v in scores.items() if k != "down_blocks.1.attentions.1.transformer_blocks.2") > 1e-6


def test_distortion_is_zero_for_a_unit_that_does_nothing(teacher):
    """Zeroing an attention's output projection makes it the identity: removing it must score 0, the rest more."""
    import copy

    unet = copy.deepcopy(teacher)
    for attention in unet.up_blocks[1].attentions:
        torch.nn.init.zeros_(attention.proj_out.weight)
        torch.nn.init.zeros_(attention.proj_out.bias)
    config = dict(unet.config)
    units = oneshot.removable_units(config, oneshot.Costs(config, "params"))
    inputs = modelio.unet_example_inputs(config, 8, batch=4, generator=torch.Generator().manual_seed(1))
    scores = oneshot.distortion_scores(unet, units, [inputs])
    assert scores["up_blocks.1.attentions"] < 1e-10
    assert min(v for k, v in scores.items() if k != "up_blocks.1.attentions") > 1e-6


def test_selection_meets_the_target_and_keeps_what_it_can(teacher):
    config = dict(teacher.config)
    start = teacher_plan(config)
    for metric in ("params", "macs"):
        costs = oneshot.Costs(config, metric)
        units = oneshot.removable_units(config, costs)
        scores = oneshot.random_scores(units, seed=3)
        target = oneshot.Target(metric, 0.6)
        chosen = oneshot.select(units, scores, costs, start, target)
        assert costs(oneshot.apply_all(start, chosen)) <= 0.6 * costs(start)
        for unit in chosen:  # nothing removed that the target could spare
            rest = oneshot.apply_all(start, [u for u in chosen if u is not unit])
            assert rest is None or costs(rest) is None or costs(rest) > 0.6 * costs(start)
    with pytest.raises(UserError, match=r"params=0.01 is out of reach: removing every unit that fits leaves \d"):
        oneshot.select(units, scores, oneshot.Costs(config, "params"), start, oneshot.Target("params", 0.01))


def test_targets_parse_or_say_why():
    assert oneshot.parse_target("macs=0.6") == oneshot.Target("macs", 0.6)
    assert oneshot.parse_target("latency=0.5") == oneshot.Target("latency", 0.5)
    for bad in ("params=1.2", "params", "flops=0.5", "params=half", "latency=0"):
        with pytest.raises(UserError, match="write params=R, macs=R or latency=R"):
            oneshot.parse_target(bad)


def test_calibration_follows_the_teachers_trajectories(three_stage_pipeline):
    batches = calibration_batches(modelio.open_model(three_stage_pipeline), ["rocket", "ghost"], steps=3, guidance=7.5)
    calls = torch.cat([b["sample"] for b in batches])
    assert calls.shape == (2 * 3 * 2, 4, 8, 8)  # prompts × steps × (unconditional, conditional)
    timesteps = torch.cat([b["timestep"] for b in batches]).unique()
    assert len(timesteps) == 3  # one per step, across the trajectory


def test_prune_to_target_end_to_end(three_stage_pipeline, tmp_path):
    ref = modelio.open_model(three_stage_pipeline)
    report = prune_to_target(ref, oneshot.Target("params", 0.7), tmp_path / "out", prompts=["rocket", "ghost"], steps=2)
    assert report["params_after"] <= 0.7 * report["params_before"]
    assert report["calibration"]["unet_calls"] == 2 * 2 * 2
    scored = {u["name"]: u for u in report["units"]}
    assert set(report["removed_units"]) == {n for n, u in scored.items() if u["removed_order"]}
    assert all(u["score"] >= 0 for u in scored.values())
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert sum(p.numel() for p in pipe.unet.parameters()) == report["params_after"]
    assert pipe("rocket", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    saved = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert saved["criterion"] == "distortion" and saved["target"] == "params=0.7"


def test_cli_prune_to_target_and_its_errors(three_stage_pipeline, sd15_unet_folder, tmp_path):
    def prune(*args):
        return subprocess.run(["pocketdiff", "prune", *args, "--out", str(tmp_path / "x")], capture_output=True, text=True)

    result = prune(str(sd15_unet_folder), "--target", "params=0.6", "--criterion", "random", "--seed", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "x" / "prune_report.json").read_text())
    assert report["random_weights"] and report["params_after"] <= 0.6 * report["params_before"]
    assert UNet2DConditionModel.load_config(tmp_path / "x")["_class_name"] == "UNet2DConditionModel"
    for args, message in [
        ((str(sd15_unet_folder), "--target", "params=0.5"), "architecture only (no weights); the distortion criterion"),
        ((str(three_stage_pipeline / "unet"), "--target", "macs=0.5"), "the distortion criterion samples the teacher pipeline"),
        ((str(three_stage_pipeline), "--target", "latency=0.5", "--criterion", "random", "--latency-table",
          str(tmp_path / "missing.json")), "not a latency table"),
        ((str(three_stage_pipeline), "--target", "params=0.5", "--preset", "bk-small"), "give preset and/or remove, or else target"),
        ((str(three_stage_pipeline), "--remove", "mid_block,up_blocks.1.atentions"), "'up_blocks.1.atentions' is not a"),
        ((str(three_stage_pipeline), "--preset", "bk-small", "--remove", "mid_block"),
         "mid_block cannot go after bk-small: it is gone already"),
        ((str(three_stage_pipeline), "--target", "params=0.5", "--criterion", "loudest"),
         "criterion: Input should be 'distortion', 'magnitude' or 'random'"),
    ]:
        result = prune(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_named_units_rebuild_a_target_runs_architecture_and_go_on_top_of_a_preset(three_stage_pipeline, tmp_path):
    ref = modelio.open_model(three_stage_pipeline)
    chosen = prune_to_target(ref, oneshot.Target("params", 0.6), tmp_path / "target", criterion="magnitude")
    named = prune_units(ref, chosen["removed_units"], tmp_path / "named")
    assert named["plan"] == chosen["plan"] and named["removed"] == chosen["removed"]
    a, b = (UNet2DConditionModel.from_pretrained(tmp_path / name / "unet") for name in ("target", "named"))
    assert (tmp_path / "target/unet/config.json").read_text() == (tmp_path / "named/unet/config.json").read_text()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    teacher = UNet2DConditionModel.from_pretrained(three_stage_pipeline / "unet")
    report = prune_units(ref, ["down_blocks.1.attentions", "up_blocks.1.attentions"], tmp_path / "bk", "bk-small")
    student = UNet2DConditionModel.from_pretrained(tmp_path / "bk" / "unet")
    assert list(student.config.down_block_types) == ["CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert list(student.config.up_block_types) == ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]
    assert student.config.layers_per_block == 1 and student.config.mid_block_type is None
    assert report["preset"] == "bk-small" and sum(p.numel() for p in student.parameters()) == report["params_after"]
    assert {"down_blocks.1.attentions.0", "up_blocks.1.attentions.0", "mid_block"} <= set(report["removed"])
    assert torch.equal(student.up_blocks[2].attentions[1].proj_in.weight, teacher.up_blocks[2].attentions[2].proj_in.weight)
    with pytest.raises(UserError, match="down_blocks.0.attentions cannot go after the teacher, down_blocks.0.attentions"):
        prune_units(ref, ["down_blocks.0.attentions"] * 2, tmp_path / "twice")


def test_sdxl_architecture_prunes_to_a_target(tmp_path):
    from tests.test_inspect import SDXL_UNET

    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "config.json").write_text(json.dumps(SDXL_UNET))
    report = prune_to_target(modelio.open_model(tmp_path / "sdxl"), oneshot.Target("params", 0.6), tmp_path / "out",
                             criterion="random")
    assert report["params_after"] <= 0.6 * report["params_before"] and report["random_weights"]
    with torch.device("meta"):
        pruned = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tmp_path / "out"))
    assert sum(p.numel() for p in pruned.parameters()) == report["params_after"]


def test_prune_stage_takes_a_target_or_a_preset_and_named_units():
    from pocketdiff.apps.recipe import parse_recipe

    head = "name: p\nmodel: default\nstages:\n  - prune: "
    assert parse_recipe(head + "{target: macs=0.6, criterion: magnitude}\n", "p.yaml").stages[0].config.target == "macs=0.6"
    named = parse_recipe(head + "{preset: bk-small, remove: [down_blocks.1.attentions]}\n", "p.yaml").stages[0].config
    assert named.remove == ["down_blocks.1.attentions"]
    for body, message in [("{preset: bk-small, target: params=0.5}", "give preset and/or remove, or else target"),
                          ("{remove: [mid_block], target: params=0.5}", "give preset and/or remove, or else target"),
                          ("{criterion: random}", "give preset and/or remove, or else target"),
                          ("{target: latency=2}", "write params=R, macs=R or latency=R")]:
        with pytest.raises(UserError, match=message):
            parse_recipe(head + body + "\n", "p.yaml")
