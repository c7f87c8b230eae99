"""The run report and pruning sweeps, on real tiny pipelines run through the CLI."""

import csv
import json
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from pocketdiff.errors import UserError
from pocketdiff.apps.runner import read_manifest
from pocketdiff.apps.sweep import pareto_front, parse_vary


def _run(*args, check=True):
    result = subprocess.run(["pocketdiff", *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_run_writes_a_report_people_can_read(three_stage_pipeline, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
name: r
model: {three_stage_pipeline}
seed: 3
stages:
  - generate: {{prompts: [red apple, ghost, rocket], steps: 2}}
  - prune: {{target: params=0.7, criterion: magnitude}}
  - evaluate: {{per_family: 2, steps: [1, 2]}}
  - export: {{to: [onnx], components: [unet]}}
  - profile: {{backend: onnxruntime, components: [unet], runs: 3, warmup: 1}}
""")
    done = _run("run", recipe, "--runs", tmp_path / "runs")
    folder = tmp_path / "runs" / "r" / "report"
    assert f"report: {folder / 'report.html'}" in done.stdout.replace("\n", "")
    page = (folder / "report.html").read_text()
    sources = re.findall(r"<img src='([^']*)'", page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    for text in ("01-generate", "02-prune", "03-evaluate", "04-export", "05-profile", "onnx unet", "CPUExecutionProvider",
                 "Teacher and students", "Quality", "Exported files and parity", "Latency", "Op coverage"):
        assert text in page, text
    markdown = (folder / "report.md").read_text()
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (folder / name).is_file()
    grid = np.asarray(Image.open(next(folder.glob("grid-*.png"))).convert("RGB"))
    assert grid.shape == (28 + 96 * 2, 170 + 96 * 3, 3)  # input and pruned model, three prompts
    for j, png in enumerate(sorted((tmp_path / "runs" / "r" / "01-generate" / "images").glob("*.png"))):
        teacher = np.asarray(Image.open(png).convert("RGB").resize((96, 96), Image.NEAREST))
        assert np.array_equal(grid[28:28 + 96, 170 + 96 * j:170 + 96 * (j + 1)], teacher)  # same prompts, seeds, steps
    assert not np.array_equal(grid[28:124, 170:], grid[124:220, 170:])  # the pruned model draws otherwise
    again = _run("report", tmp_path / "runs" / "r")
    assert "sampling" not in again.stdout and len(list(folder.glob("grid-*.png"))) == 1  # cached: nothing resampled


def test_failed_run_still_reports_which_stage_failed(tiny_pipeline, tmp_path):
    recipe = tmp_path / "f.yaml"
    recipe.write_text(f"name: f\nmodel: {tiny_pipeline}\nstages:\n  - generate: {{prompts: [ghost], steps: 1}}\n"
                      "  - profile: {backend: onnxruntime}\n")
    failed = _run("run", recipe, "--runs", tmp_path, check=False)
    assert failed.returncode == 2 and "put an export stage before it" in failed.stderr
    markdown = (tmp_path / "f" / "report" / "report.md").read_text()
    assert "| 02-profile | input | failed |" in markdown and "put an export stage before it" in markdown


@pytest.mark.slow
def test_sweep_shares_stages_and_marks_the_frontier(three_stage_pipeline, tmp_path):
    recipe = tmp_path / "s.yaml"
    recipe.write_text(f"""\
name: s
model: {three_stage_pipeline}
stages:
  - generate: {{prompts: [ghost], steps: 1}}
  - prune: {{target: params=0.9, criterion: magnitude}}
  - evaluate: {{per_family: 2, steps: [1]}}
  - profile: {{backend: torch, runs: 2, warmup: 1}}
""")
    command = ["sweep", recipe, "--vary", "prune.target=params=0.55,params=0.85", "--runs", tmp_path / "runs"]
    done = _run(*command)
    sweep = tmp_path / "runs" / "s-sweep"
    first, second = sweep / "target-params-0.55", sweep / "target-params-0.85"
    assert (second / "01-generate").is_symlink() and not (first / "01-generate").is_symlink()
    assert not (second / "02-prune").is_symlink()  # the varied stage and everything after it run per variant
    assert read_manifest(first / "02-prune")["config"]["target"] == "params=0.55"
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [r["variant"] for r in rows] == ["target-params-0.55", "target-params-0.85"]
    small, large = (int(r["unet_params"]) for r in rows)
    teacher = read_manifest(first / "02-prune")["metrics"]["params_before"]
    assert small <= 0.55 * teacher < large <= 0.85 * teacher
    assert all(float(r["latency_ms"]) > 0 and 0 <= float(r["quality"]) <= 1 for r in rows)  # a pass rate
    assert "True" in [r["front_params"] for r in rows]  # someone is on every frontier
    data = json.loads((sweep / "sweep.json").read_text())
    assert data["vary"] == ["prune.target=params=0.55,params=0.85"]
    assert (sweep / "pareto.png").exists() and "Pareto frontier" in (sweep / "sweep.html").read_text()
    assert "sweep folder" in done.stdout
    again = _run(*command)
    assert again.stdout.count("skipped") == 8  # 4 stages × 2 variants, all done before


def test_vary_values_and_pareto_front():
    assert parse_vary("prune.target=params=0.5, params=0.7") == ("prune.target", ["params=0.5", "params=0.7"])
    assert parse_vary("evaluate.steps=[1,4],[25]") == ("evaluate.steps", ["[1,4]", "[25]"])
    with pytest.raises(UserError, match="expected STAGE.FIELD=VALUE1,VALUE2"):
        parse_vary("prune.target")
    rows = [{"variant": v, "quality": q, "latency_ms": ms} for v, q, ms in
            [("a", 0.5, 10.0), ("b", 0.4, 12.0), ("c", 0.6, 20.0), ("d", 0.3, 5.0), ("e", None, 1.0), ("f", 0.6, 21.0)]]
    assert pareto_front(rows, "latency_ms") == {"a", "c", "d"}  # b: a is better and faster; f: c equal and faster


def test_report_of_an_architecture_only_run_draws_no_images(sd15_unet_folder, tmp_path):
    recipe = tmp_path / "a.yaml"
    recipe.write_text(f"name: a\nmodel: {sd15_unet_folder}\nstages:\n  - prune: {{preset: bk-tiny}}\n")
    _run("run", recipe, "--runs", tmp_path)
    markdown = (tmp_path / "a" / "report" / "report.md").read_text()
    assert "No images: the input is a bare UNet folder." in markdown
    assert "UNet params 859.52 M → 323.38 M" in markdown  # BK-SDM's bk-tiny: 0.32 B
    assert not list((tmp_path / "a" / "report").glob("*.png"))
