"""The command line: help everywhere, one-line refusals of bad input, README and CI in step."""

import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pocketdiff.apps.cli import app

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["run", "inspect", "generate", "evaluate", "export", "zoo", "zoo train-default", "distill",
            "distill kd", "distill vae", "distill steps", "quantize", "profile", "estimate", "devices", "devices list",
            "devices calibrate", "report", "sweep", "serve-demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_unknown_option_is_a_usage_error_not_a_traceback():
    result = subprocess.run(["pocketdiff", "quantize", "default", "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "No such option: --bogus" in result.stderr and "Traceback" not in result.stderr


def test_sweep_without_vary_and_report_of_no_run_exit_2(tmp_path):
    result = subprocess.run(["pocketdiff", "sweep", str(ROOT / "recipes" / "quickstart.yaml"), "--runs", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: sweep needs at least one --vary STAGE.FIELD=V1,V2,..."
    result = subprocess.run(["pocketdiff", "report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path}: not a run folder (no stage folders with a manifest.json)"
    assert not list(tmp_path.iterdir())


def test_unknown_quantization_backend_lists_the_built_ones_and_exits_2(tmp_path):
    result = subprocess.run(["pocketdiff", "quantize", "default", "--out", str(tmp_path / "q"), "--backend", "tflite-int8"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: quantize: backend: Input should be 'xnnpack', 'onnx-int8', 'coreml-w8a8', "
                                     "'coreml-palette4', 'coreml-palette6' or 'brevitas-w4a8'")
    assert not (tmp_path / "q").exists()


def test_bad_recipe_exits_2_with_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  - generate: {prompts: [a], bogus: 1}\n")
    result = subprocess.run(["pocketdiff", "run", str(recipe)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {recipe}:3: stages.0.generate.bogus: Extra inputs are not permitted"


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up and run\n.*?```(?:bash|sh)\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "pocketdiff run recipes/quickstart.yaml" in commands[0]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci[-1] == commands[1] and all("apt-get install" in line for line in ci[:-1])  # system packages, then the README's line


def test_generate_writes_pngs_and_grid(tiny_pipeline, tmp_path):
    from PIL import Image

    result = subprocess.run(["pocketdiff", "generate", "--model", str(tiny_pipeline), "--prompt", "red apple",
                             "--prompt", "ghost", "--steps", "2", "--seed", "4", "--grid", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    pngs = sorted(p.name for p in tmp_path.glob("0*.png"))
    assert pngs == ["000-red-apple-seed4.png", "001-ghost-seed5.png"]
    assert Image.open(tmp_path / pngs[0]).size == (32, 32)
    assert Image.open(tmp_path / "grid.png").size[0] >= 2 * 128


def test_evaluate_writes_scores(tiny_pipeline, tmp_path):
    import json

    out = tmp_path / "scores.json"
    result = subprocess.run(["pocketdiff", "evaluate", str(tiny_pipeline), "--per-family", "2", "--steps", "1,2",
                             "--guidance", "1", "--json", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    scores = json.loads(out.read_text())
    assert set(scores) == {"in_distribution/real", "in_distribution/steps=1/guidance=1",
                           "in_distribution/steps=2/guidance=1"}
    assert scores["in_distribution/real"]["overall"] == 1.0  # the judge passes every reference render
    assert set(scores["in_distribution/steps=1/guidance=1"]["families"]) == {
        "single_object", "two_objects", "counting", "colors", "position", "color_attr"}
    one, two = scores["in_distribution/steps=1/guidance=1"], scores["in_distribution/steps=2/guidance=1"]
    for latency in (one, two):  # each component's share of the image, the UNet's over every call
        parts = [latency[k] for k in ("text_encoder_ms", "unet_ms", "vae_decoder_ms")]
        assert min(parts) > 0 and sum(parts) <= latency["image_ms"], latency
    bad = subprocess.run(["pocketdiff", "evaluate", str(tiny_pipeline), "--steps", "one"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: evaluate:")
