"""Recipes: a YAML list of stages, each validated by its own pydantic config class.

A recipe names a run, the input model and a seed, then the stages in order:

    name: quickstart
    model: default
    seed: 0
    stages:
      - generate: {prompts: ["a red circle"], steps: 25}
      - evaluate: {}

Unknown keys are errors, and every error names the field and the recipe line it came from, so a
typo fails before hours of training rather than silently using a default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError
from .stages import STAGES


class RecipeHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = "default"
    seed: int = 0
    stages: list[dict[str, dict | None]] = Field(min_length=1)


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: BaseModel


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    seed: int
    stages: list[StageSpec]
    source: str  # where it came from, for error messages and manifests


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """The 1-based line of the YAML node at pydantic location `loc` (a key's own line where it is the last step)."""
    node, line = root, None
    for step in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == step]
            if not match:
                return line
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            node = node.value[step]
        else:
            break
    if node is not None and not isinstance(node, yaml.MappingNode):
        line = node.start_mark.line + 1
    return line


def _message(error: dict) -> str:
    """pydantic's message, with how to write a list where one was wanted (`--set` values are YAML too)."""
    return error["msg"] + (" (in YAML and in --set: [a, b])" if error["type"] == "list_type" else "")


def _describe(errors: list[tuple[tuple, str]], root: yaml.Node | None, source: str) -> str:
    parts = []
    for loc, message in errors:
        line = _line_of(root, loc)
        where = f"{source}:{line}" if line else source
        parts.append(f"{where}: {'.'.join(str(p) for p in loc) or '(top)'}: {message}")
    return "; ".join(parts)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set key=value` on the raw recipe: top-level keys, or `<stage>.<field>` on the first stage of that name."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value) if value else None
        head, _, rest = key.partition(".")
        if not rest:
            raw[head] = parsed
            continue
        matches = [s for s in raw.get("stages") or [] if isinstance(s, dict) and head in s]
        if not matches:
            raise UserError(f"--set {key}: the recipe has no stage named {head!r}")
        config = matches[0][head] = matches[0][head] or {}
        *path, leaf = rest.split(".")
        for part in path:
            config = config.setdefault(part, {})
        config[leaf] = parsed
    return raw


def parse_recipe(text: str, source: str = "recipe", overrides: list[str] = ()) -> Recipe:
    """Validate recipe text; every problem becomes one `UserError` line naming field and line."""
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise UserError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe is a mapping with name, model, seed and stages")
    raw = apply_overrides(raw, list(overrides))
    try:
        header = RecipeHeader.model_validate(raw)
    except ValidationError as err:
        raise UserError(_describe([(e["loc"], _message(e)) for e in err.errors()], root, source)) from None
    stages, errors = [], []
    for index, entry in enumerate(header.stages):
        if len(entry) != 1:
            errors.append(((("stages", index)), "each stage is a mapping with exactly one key, the stage name"))
            continue
        (name, body), = entry.items()
        if name not in STAGES:
            known = ", ".join(sorted(STAGES))
            errors.append((("stages", index, name), f"unknown stage (built so far: {known})"))
            continue
        try:
            stages.append(StageSpec(name, STAGES[name].config.model_validate(body or {})))
        except ValidationError as err:
            errors.extend(((("stages", index, name) + tuple(e["loc"])), _message(e)) for e in err.errors())
    if errors:
        raise UserError(_describe(errors, root, source))
    return Recipe(header.name, header.model, header.seed, stages, source)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    return parse_recipe(path.read_text(), str(path), overrides)


def stage_folder_name(index: int, name: str) -> str:
    return f"{index:02d}-{re.sub(r'[^a-z0-9-]', '-', name)}"
