"""Recipes: validated per stage, unknown keys rejected, errors naming the field and the line."""

import re
import subprocess
from pathlib import Path

import pytest

from pocketdiff.errors import UserError
from pocketdiff.apps.recipe import load_recipe, parse_recipe
from pocketdiff.apps.stages import STAGES, EvaluateConfig, GenerateConfig

GOOD = """\
name: demo
model: default
seed: 3
stages:
  - generate:
      prompts: [red apple]
      steps: 4
  - evaluate: {per_family: 8, steps: [1, 4]}
"""


def test_valid_recipe_gives_typed_configs():
    recipe = parse_recipe(GOOD, "demo.yaml")
    assert (recipe.name, recipe.model, recipe.seed) == ("demo", "default", 3)
    assert [s.name for s in recipe.stages] == ["generate", "evaluate"]
    assert recipe.stages[0].config == GenerateConfig(prompts=["red apple"], steps=4)
    assert isinstance(recipe.stages[1].config, EvaluateConfig) and recipe.stages[1].config.steps == [1, 4]


def test_unknown_stage_key_names_field_and_line():
    with pytest.raises(UserError) as err:
        parse_recipe(GOOD.replace("      steps: 4", "      stepz: 4"), "demo.yaml")
    assert "demo.yaml:7: stages.0.generate.stepz: Extra inputs are not permitted" in str(err.value)


def test_wrong_type_names_value_line():
    with pytest.raises(UserError) as err:
        parse_recipe(GOOD.replace("steps: 4", "steps: four"), "demo.yaml")
    assert str(err.value).startswith("demo.yaml:7: stages.0.generate.steps:")


def test_unknown_top_level_key_and_missing_name():
    with pytest.raises(UserError, match=r"demo.yaml:1: name: Field required.*demo.yaml:8: sed: Extra inputs"):
        parse_recipe(GOOD.replace("name: demo\n", "") + "sed: 1\n", "demo.yaml")


def test_unknown_stage_lists_built_ones():
    built = re.escape(", ".join(sorted(STAGES)))
    with pytest.raises(UserError, match=rf"demo.yaml:5: stages.0.generat: unknown stage \(built so far: {built}\)"):
        parse_recipe(GOOD.replace("- generate:", "- generat:"), "demo.yaml")


def test_invalid_yaml_names_line():
    with pytest.raises(UserError, match=r"demo.yaml:\d+: not valid YAML"):
        parse_recipe("name: [unclosed\nstages: 1\n", "demo.yaml")


def test_overrides_set_stage_fields_and_top_level():
    recipe = parse_recipe(GOOD, "demo.yaml", ["generate.steps=2", "seed=9", "evaluate.guidance=[1.0, 3.0]"])
    assert recipe.stages[0].config.steps == 2 and recipe.seed == 9
    assert recipe.stages[1].config.guidance == [1.0, 3.0]
    with pytest.raises(UserError, match="no stage named 'prune'"):
        parse_recipe(GOOD, "demo.yaml", ["prune.target=0.5"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_recipe(GOOD, "demo.yaml", ["seed"])
    with pytest.raises(UserError, match=r"demo.yaml:\d+: stages.1.evaluate.guidance: Input should be a valid list "
                                         r"\(in YAML and in --set: \[a, b\]\)"):
        parse_recipe(GOOD, "demo.yaml", ["evaluate.guidance=1.0,3.0"])


def test_shipped_recipes_parse():
    for path in sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml")):
        assert load_recipe(path).stages


@pytest.mark.parametrize("template", ["sd15", "sdxl"])
def test_templates_ask_for_the_users_own_folders(template, tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / f"{template}.yaml"
    result = subprocess.run(["pocketdiff", "run", str(recipe), "--runs", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: /path/to/stable-diffusion")
    assert not list(tmp_path.iterdir())
    teacher = load_recipe(recipe, [f"model={tmp_path}", "evaluate.judge=/clip"])
    assert teacher.model == str(tmp_path) and any(s.config.model_dump().get("judge") == "/clip" for s in teacher.stages)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
