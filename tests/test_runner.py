"""The recipe runner: stage folders with manifests, skip when unchanged, rerun when changed or failed."""

import json

import pytest
from rich.console import Console

from pocketdiff.errors import UserError
from pocketdiff.apps.recipe import parse_recipe
from pocketdiff.apps.runner import hash_model_folder, read_manifest, run_recipe

RECIPE = """\
name: tiny
model: {model}
seed: 5
stages:
  - generate: {{prompts: [red apple, ghost], steps: 2}}
"""


def _run(text, runs):
    console = Console(record=True, width=200)
    run_dir = run_recipe(parse_recipe(text, "tiny.yaml"), runs, console)
    return run_dir, console.export_text()


def test_stage_writes_outputs_and_manifest(tiny_pipeline, tmp_path):
    run_dir, _ = _run(RECIPE.format(model=tiny_pipeline), tmp_path)
    stage = run_dir / "01-generate"
    manifest = read_manifest(stage)
    assert manifest["status"] == "done" and manifest["stage"] == "generate" and manifest["seed"] == 5
    assert manifest["input_hash"] == hash_model_folder(tiny_pipeline)
    assert manifest["config"]["prompts"] == ["red apple", "ghost"]
    assert manifest["versions"]["torch"] and manifest["versions"]["diffusers"] == "0.42.1"
    assert manifest["wall_time_s"] > 0 and manifest["metrics"]["images"] == 2
    assert len(list((stage / "images").glob("*.png"))) == 2 and (stage / "grid.png").exists()
    assert (stage / "log.txt").read_text().startswith("01-generate (attempt 1)")


def test_rerun_skips_then_config_change_reruns(tiny_pipeline, tmp_path):
    text = RECIPE.format(model=tiny_pipeline)
    run_dir, _ = _run(text, tmp_path)
    first = read_manifest(run_dir / "01-generate")
    _, output = _run(text, tmp_path)
    assert "skipped" in output
    assert read_manifest(run_dir / "01-generate") == first
    stale = run_dir / "01-generate" / "checkpoint" / "state.pt"  # another config's checkpoint must not be resumed
    stale.parent.mkdir()
    stale.write_text("from the old config")
    _run(text.replace("steps: 2", "steps: 3"), tmp_path)
    changed = read_manifest(run_dir / "01-generate")
    assert changed["attempt"] == 2 and changed["config_hash"] != first["config_hash"]
    assert not stale.exists()


def test_input_change_reruns(tiny_pipeline, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    run_dir, _ = _run(RECIPE.format(model=model), tmp_path / "runs")
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    config["beta_end"] = 0.02
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    _, output = _run(RECIPE.format(model=model), tmp_path / "runs")
    assert "skipped" not in output and read_manifest(run_dir / "01-generate")["attempt"] == 2


def test_failed_stage_is_recorded_and_retried(tiny_pipeline, tmp_path):
    def text(judge):
        return RECIPE.format(model=tiny_pipeline) + f"  - evaluate: {{per_family: 2, steps: [1], judge: {judge}}}\n"

    with pytest.raises(UserError, match="no judge here"):
        _run(text(tmp_path / "no-judge"), tmp_path)
    failed = read_manifest(tmp_path / "tiny" / "02-evaluate")
    assert failed["status"] == "failed" and "no judge here" in failed["error"]
    assert (tmp_path / "tiny" / "02-evaluate" / "log.txt").read_text().startswith("02-evaluate (attempt 1)")
    _, output = _run(text("default"), tmp_path)
    assert "01-generate: done before" in output
    retried = read_manifest(tmp_path / "tiny" / "02-evaluate")
    assert retried["status"] == "done" and retried["attempt"] == 2
    assert 0 <= retried["metrics"]["in_distribution/steps=1/guidance=7.5"]["overall"] <= 1


def test_the_recipe_seed_reaches_every_stage_that_draws_random_numbers(three_stage_pipeline, tmp_path):
    from pocketdiff.apps.runner import seeded
    from pocketdiff.apps.stages import STAGES

    recipe = f"name: seeded\nmodel: {three_stage_pipeline}\nseed: 5\nstages:\n  - prune: {{target: params=0.8, criterion: random}}\n"
    run_dir, _ = _run(recipe, tmp_path)
    assert read_manifest(run_dir / "01-prune")["config"]["seed"] == 5
    assert json.loads((run_dir / "01-prune" / "prune_report.json").read_text())["seed"] == 5
    drawing = [stage.config for stage in STAGES.values() if "seed" in stage.config.model_fields]
    assert {c.__name__ for c in drawing} >= {"PruneConfig", "KDStageConfig", "StepDistillConfig", "QuantizeConfig"}
    for config in drawing:
        assert seeded(config.model_validate(_minimal(config)), 5).seed == 5
        assert seeded(config.model_validate({**_minimal(config), "seed": 2}), 5).seed == 2  # the stage's own wins


def _minimal(config) -> dict:
    return {"preset": "bk-small"} if config.__name__ == "PruneConfig" else {}
