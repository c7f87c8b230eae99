"""Each stage's config is the single source of its settings: every field can be set from a recipe and from the
command line, and an option left out leaves the config's own default."""

import json

import pytest
import typer
from pydantic import BaseModel
from typer.testing import CliRunner

from pocketdiff.apps.cli import app
from pocketdiff.apps.recipe import parse_recipe
from pocketdiff.apps.stages import STAGES

COMMANDS = {"slim_vae": ("distill", "vae"), "slim_text_encoder": ("distill", "text-encoder"),
            "step_distill": ("distill", "steps"), "kd": ("distill", "kd")}
RECIPE_ONLY = {("profile", "export_stage")}  # which earlier stage of the recipe it profiles: no stages on the CLI
NEEDED = {"prune": {"preset": "bk-small"}, "generate": {"prompts": ["red apple"]}}


def _fields(config) -> dict[str, str | None]:
    """Field name → the nested config holding it (None: the config itself)."""
    found = {}
    for name, field in config.model_fields.items():
        nested = field.get_default(call_default_factory=True)
        found.update({sub: name for sub in type(nested).model_fields} if isinstance(nested, BaseModel) else {name: None})
    return found


def _options(stage: str) -> set[str]:
    command = typer.main.get_command(app)
    for part in COMMANDS.get(stage, (stage,)):
        command = command.get_command(typer.Context(command), part)
    return {opt for param in command.params for opt in param.opts}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_config_field_is_an_option_and_a_recipe_key(stage):
    config = STAGES[stage].config
    options = _options(stage)
    for name, parent in _fields(config).items():
        if (stage, name) not in RECIPE_ONLY:
            assert f"--{name.replace('_', '-')}" in options, (stage, name)
        holder = type(config.model_fields[parent].get_default(call_default_factory=True)) if parent else config
        field = holder.model_fields[name]
        needed = NEEDED.get(stage, {})
        value = needed[name] if name in needed else field.get_default(call_default_factory=True)
        setting = {parent: {name: value}} if parent else {name: value}
        recipe = parse_recipe(f"name: r\nstages:\n  - {stage}: {json.dumps({**NEEDED.get(stage, {}), **setting})}\n",
                              "r.yaml")
        built = recipe.stages[0].config
        assert name in (getattr(built, parent) if parent else built).model_fields_set, (stage, name)


def test_an_option_sets_its_field_and_one_left_out_keeps_the_default(tmp_path, monkeypatch):
    from pocketdiff.compress import prune

    seen = {}
    monkeypatch.setattr(prune, "prune", lambda ref, config, out, table: seen.setdefault("config", config) and {
        "removed": [], "removed_units": [], "units": [], **{f"{k}_{w}": 1 for k in ("params", "macs", "attention_macs")
                                                for w in ("before", "after")}})
    result = CliRunner().invoke(app, ["prune", "default", "--out", str(tmp_path), "--target", "params=0.5",
                                                    "--prompt", "red apple, shiny", "--prompt", "ghost", "--steps", "3"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.prompts == ["red apple, shiny", "ghost"] and config.steps == 3  # free text keeps its commas
    assert config.guidance == 7.5 and "guidance" not in config.model_fields_set
