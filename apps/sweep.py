"""`pocketdiff sweep RECIPE --vary STAGE.FIELD=V1,V2,...`: one run per value (per combination, with
several --vary), then quality against latency and against parameters with the Pareto frontier marked.

Variants live in `runs/<recipe>-sweep/<variant>/`. The stages before the first one a variant changes
are the same run for every variant: later variants link to the folders an earlier one finished, and
the runner skips them as done, so a sweep of pruning targets teaches and judges the teacher once.
Rerunning a sweep skips whatever is done, like `pocketdiff run`; a variant that fails is reported
and the others still run.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import re
from pathlib import Path

from rich.console import Console

from ..charts import pareto_chart
from ..macs import census_model
from .. import modelio
from ..errors import UserError
from .page import Figure, Section, Table, write_page
from .recipe import Recipe, load_recipe, stage_folder_name
from .evaluate import headline
from .report import SETTING, read_run
from .runner import read_manifest, run_recipe


def parse_vary(item: str) -> tuple[str, list[str]]:
    """`prune.target=params=0.5,params=0.7` → ("prune.target", ["params=0.5", "params=0.7"]); commas inside
    brackets belong to the value (`steps=[1,4],[25]`)."""
    key, _, values = item.partition("=")
    parts, depth, current = [], 0, ""
    for char in values:
        depth += 1 if char in "[{" else -1 if char in "]}" else 0
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    parts = [p.strip() for p in parts if p.strip()]
    if not key or not parts:
        raise UserError(f"--vary {item}: expected STAGE.FIELD=VALUE1,VALUE2,...")
    return key, parts


def variants(recipe_path: Path, vary: list[str], overrides: list[str] = ()) -> list[tuple[str, Recipe]]:
    """Every combination of the varied values, each a validated recipe named after its values."""
    axes = [parse_vary(item) for item in vary]
    if not axes:
        raise UserError("sweep needs at least one --vary STAGE.FIELD=V1,V2,...")
    result = []
    for combination in itertools.product(*[[(key, value) for value in values] for key, values in axes]):
        name = "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", f"{key.split('.')[-1]}-{value}") for key, value in combination)
        recipe = load_recipe(recipe_path, list(overrides) + [f"{key}={value}" for key, value in combination])
        result.append((name, dataclasses.replace(recipe, name=name)))
    names = [name for name, _ in result]
    if len(set(names)) != len(names):
        raise UserError(f"--vary: two variants would share a folder name ({', '.join(names)})")
    return result


def _shared_prefix(a: Recipe, b: Recipe) -> int:
    if (a.model, a.seed) != (b.model, b.seed):
        return 0
    count = 0
    for x, y in zip(a.stages, b.stages):
        if x.name != y.name or x.config.model_dump(mode="json") != y.config.model_dump(mode="json"):
            break
        count += 1
    return count


def link_shared_stages(recipe: Recipe, run_dir: Path, earlier: list[tuple[Recipe, Path]]) -> int:
    """Link this variant's leading stages to the finished folders of the earlier variant that shares the most."""
    if not earlier:
        return 0
    source_recipe, source_dir = max(earlier, key=lambda e: _shared_prefix(recipe, e[0]))
    linked = 0
    for index, spec in enumerate(recipe.stages[:_shared_prefix(recipe, source_recipe)], 1):
        name = stage_folder_name(index, spec.name)
        source, target = (source_dir / name).resolve(), run_dir / name
        if (read_manifest(source) or {}).get("status") != "done":
            break
        if not target.exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.path.relpath(source, run_dir), target_is_directory=True)
        linked += 1
    return linked


def collect(name: str, run_dir: Path, setting: str | None, error: str | None = None) -> dict:
    """One variant's row: quality from its last evaluate stage, latency from its last profile stage."""
    row = {"variant": name, "status": "failed" if error else "done", "error": error, "quality": None,
           "setting": setting, "frechet": None, "latency_ms": None, "latency_source": None,
           "unet_params": None}
    try:
        records = read_run(run_dir)
    except UserError:
        return row
    model = Path(records[0].manifest["input"])
    for record in records:
        if not record.done:
            row["status"] = "failed"
            continue
        if record.manifest.get("produced_model"):
            model = record.folder
        if record.stage == "evaluate":
            keys = [k for k in record.metrics if SETTING.match(k)]
            key = setting or keys[0]
            if key not in record.metrics:
                raise UserError(f"--setting {key}: {record.folder} scored {', '.join(keys)}")
            scores = record.metrics[key]
            row.update(quality=headline(scores), setting=key, frechet=scores.get("frechet_distance"))
        if record.stage == "profile" and (record.folder / "profile.json").exists():
            report = json.loads((record.folder / "profile.json").read_text())
            first = report["measurements"][0]
            row.update(latency_ms=first["median_ms"],
                       latency_source=f"{report['backend']} {first['component']} on {report['device']}")
    row["unet_params"] = census_model(modelio.open_model(str(model)), unet_only=True)[0].params
    return row


def pareto_front(rows: list[dict], cost: str) -> set[str]:
    """Variants no other beats on both quality (higher) and `cost` (lower)."""
    points = [r for r in rows if r["quality"] is not None and r[cost] is not None]
    front = set()
    for r in points:
        dominated = any(o["quality"] >= r["quality"] and o[cost] <= r[cost]
                        and (o["quality"] > r["quality"] or o[cost] < r[cost]) for o in points)
        if not dominated:
            front.add(r["variant"])
    return front


def run_sweep(recipe_path: Path, vary: list[str], runs_root: Path = Path("runs"), overrides: list[str] = (),
              setting: str | None = None, console: Console | None = None) -> Path:
    console = console or Console()
    planned = variants(Path(recipe_path), vary, overrides)
    sweep_dir = Path(runs_root) / f"{load_recipe(recipe_path, list(overrides)).name}-sweep"
    finished, rows = [], []
    for name, recipe in planned:
        run_dir = sweep_dir / name
        linked = link_shared_stages(recipe, run_dir, finished)
        console.print(f"[bold]variant {name}[/bold]" + (f" ({linked} stages shared with an earlier variant)" if linked else ""))
        error = None
        try:
            run_recipe(recipe, sweep_dir, console)
        except Exception as err:  # one variant's failure is a row in the table, not the end of the sweep
            error = f"{type(err).__name__}: {err}"
            console.print(f"[red]variant {name} failed: {error}[/red]")
        finished.append((recipe, run_dir))
        rows.append(collect(name, run_dir, setting, error))
    write_sweep(sweep_dir, rows, recipe_path, vary)
    return sweep_dir


def write_sweep(sweep_dir: Path, rows: list[dict], recipe_path: Path, vary: list[str]) -> list[Path]:
    """sweep.json, sweep.csv, pareto.png and the sweep page (HTML and Markdown) in the sweep folder."""
    fronts = {cost: pareto_front(rows, cost) for cost in ("latency_ms", "unet_params")}
    for row in rows:
        row["front_latency"] = row["variant"] in fronts["latency_ms"]
        row["front_params"] = row["variant"] in fronts["unet_params"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"recipe": str(recipe_path), "vary": vary, "variants": rows}, indent=2))
    with (sweep_dir / "sweep.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    setting = next((r["setting"] for r in rows if r["setting"]), "the last evaluate stage's first setting")
    chart = pareto_chart(rows, sweep_dir / "pareto.png", setting)
    table = Table(["variant", "status", "quality", "Fréchet", "latency ms", "UNet params (M)",
                   "frontier (latency / params)"],
                  [[r["variant"], r["status"], r["quality"], r["frechet"], r["latency_ms"],
                    round(r["unet_params"] / 1e6, 3) if r["unet_params"] else None,
                    " / ".join("yes" if f else "no" for f in (r["front_latency"], r["front_params"]))] for r in rows])
    source = next((r["latency_source"] for r in rows if r["latency_source"]), "no profile stage")
    intro = [f"Recipe {recipe_path}, varied: {'; '.join(vary)}.",
             f"Quality: judge score at {setting} (higher is better). Latency: {source}."]
    sections = [Section("Pareto frontier", [Figure(chart, "Quality against latency and against UNet parameters; "
                                                          "the frontier (no variant better on both) joined in red."), table])]
    failed = [r for r in rows if r["error"]]
    if failed:
        sections.append(Section("Failed variants", [Table(["variant", "error"], [[r["variant"], r["error"]] for r in failed])]))
    pages = write_page(sweep_dir, "sweep", f"pocketdiff sweep: {sweep_dir.name}", intro, sections)
    return [sweep_dir / "sweep.json", sweep_dir / "sweep.csv", chart, *pages]
