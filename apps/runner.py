"""Run a recipe: a short loop over stages, each writing `runs/<name>/<NN>-<stage>/` and its manifest.

A stage whose manifest says done, with the same config hash and input hash, is skipped; one that
died (status `running` or `failed`) runs again, and finds its own checkpoint in its folder, so
training stages pick up where they stopped. A stage folder left by another config or input is
emptied first: its checkpoint belongs to a different run. A stage that produces a model writes a
diffusers folder into its stage folder; that folder is the next stage's input. Everything a stage
prints is also kept in its folder's `log.txt`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from rich.console import Console

from .. import modelio
from ..folderhash import LOG, MANIFEST, hash_model_folder
from .recipe import Recipe, stage_folder_name
from .stages import STAGES, LoggedConsole, StageContext

_VERSIONED = ("pocketdiff", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "executorch",
              "coremltools", "nncf", "brevitas", "accelerate")


def config_hash(stage: str, config: dict, seed: int) -> str:
    payload = json.dumps({"stage": stage, "config": config, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write through a temporary file, so a kill never leaves a half-written manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(folder / MANIFEST)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def seeded(config, seed: int):
    """The stage's config with the recipe's seed wherever the config draws random numbers and the recipe did not
    give the stage a seed of its own."""
    if "seed" in type(config).model_fields and "seed" not in config.model_fields_set:
        return config.model_copy(update={"seed": seed})
    return config


def run_recipe(recipe: Recipe, runs_root: Path = Path("runs"), console: Console | None = None) -> Path:
    """Execute the recipe's stages in order; returns the run folder."""
    console = console or Console()
    run_dir = Path(runs_root) / recipe.name
    model = modelio.open_model(recipe.model)
    if model.random_weights:
        console.print(modelio.RANDOM_WEIGHTS_NOTE)
    for index, spec in enumerate(recipe.stages, 1):
        out = run_dir / stage_folder_name(index, spec.name)
        stage_config = seeded(spec.config, recipe.seed)
        config = stage_config.model_dump(mode="json")
        expected = {"config_hash": config_hash(spec.name, config, recipe.seed),
                    "input_hash": hash_model_folder(model.path)}
        previous = read_manifest(out) or {}
        same = all(previous.get(k) == v for k, v in expected.items())
        if previous.get("status") == "done" and same:
            console.print(f"[dim]{out.name}: done before with the same config and input; skipped[/dim]")
            if previous.get("produced_model"):
                model = modelio.open_model(out)
            continue
        if previous and not same:
            out.unlink() if out.is_symlink() else shutil.rmtree(out)  # a link: a sweep's shared stage, not ours
            previous = {"attempt": previous.get("attempt", 0)}
        manifest = {
            "stage": spec.name, "index": index, "recipe": recipe.source, "config": config, **expected,
            "input": str(model.path), "seed": recipe.seed, "versions": package_versions(),
            "attempt": previous.get("attempt", 0) + 1, "status": "running", "started_at": _now(),
        }
        write_manifest(out, manifest)
        began = time.perf_counter()
        with (out / LOG).open("a") as log:
            logged = LoggedConsole(console, Console(file=log, width=120, no_color=True, highlight=False))
            logged.print(f"[bold]{out.name}[/bold] (attempt {manifest['attempt']})")
            try:
                result = STAGES[spec.name].run(stage_config, StageContext(model, out, recipe.seed, logged))
            except BaseException as err:
                manifest.update(status="failed", error=f"{type(err).__name__}: {err}",
                                wall_time_s=round(time.perf_counter() - began, 3), finished_at=_now())
                write_manifest(out, manifest)
                logged.log.print(f"failed: {manifest['error']}")
                raise
        manifest.update(status="done", metrics=result.metrics, produced_model=result.produced_model,
                        wall_time_s=round(time.perf_counter() - began, 3), finished_at=_now())
        write_manifest(out, manifest)
        if result.produced_model:
            model = modelio.open_model(out)
    return run_dir
