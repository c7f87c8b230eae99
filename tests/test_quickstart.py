"""The README's main job, end to end on the embedded default, exactly as shipped."""

import json
import subprocess
from pathlib import Path

import pytest

from pocketdiff.apps.runner import read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_recipe_runs_and_resumes(tmp_path):
    command = ["pocketdiff", "run", str(ROOT / "recipes" / "quickstart.yaml"), "--runs", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    run_dir = tmp_path / "quickstart"
    stages = sorted(p.name for p in run_dir.glob("[0-9][0-9]-*"))
    assert stages == ["01-generate", "02-evaluate", "03-prune", "04-evaluate", "05-kd", "06-evaluate",
                      "07-step-distill", "08-evaluate", "09-export", "10-profile"]
    manifests = {name: read_manifest(run_dir / name) for name in stages}
    assert all(m["status"] == "done" for m in manifests.values())
    assert (run_dir / "01-generate" / "grid.png").exists()
    teacher = manifests["02-evaluate"]["metrics"]
    pruned = manifests["04-evaluate"]["metrics"]
    distilled = manifests["06-evaluate"]["metrics"]
    key = "validation/steps=25/guidance=7.5"
    assert teacher["validation/real"]["retrieval_accuracy"] > 0.4  # the judge knows real images (chance: 1/256)
    assert teacher[key]["retrieval_accuracy"] > 5 / 256  # the teacher is far above chance, though far below real
    assert pruned[key]["prompt_score"] < teacher[key]["prompt_score"]  # pruning without KD costs quality
    assert manifests["03-prune"]["metrics"]["params_after"] < 0.7 * manifests["03-prune"]["metrics"]["params_before"]
    assert distilled[key]["prompt_score"] > 0.7 * teacher[key]["prompt_score"]  # KD wins most of it back
    assert distilled[key]["prompt_score"] > pruned[key]["prompt_score"] + 0.1
    assert manifests["05-kd"]["metrics"]["feature_pairs"] == 8  # bk-small keeps 4 down and 4 up stage outputs
    one_step = "validation/steps=1/guidance=7.5"
    few_step = manifests["08-evaluate"]["metrics"]
    assert few_step[one_step]["prompt_score"] > distilled[one_step]["prompt_score"]  # beats its teacher at 1 step
    exported = manifests["09-export"]["metrics"]
    assert exported["onnx/image_psnr"] >= 40 and exported["onnx/unet/max_abs"] < 1e-3
    onnx_unet = run_dir / "09-export" / "onnx" / "unet"
    assert (onnx_unet / "model.onnx").exists() and json.loads((onnx_unet / "config.json").read_text())["time_cond_proj_dim"]
    profiled = manifests["10-profile"]["metrics"]
    assert profiled["unet/median_ms"] > 0 and 0 < profiled["unet/roofline_efficiency"] < 1.5
    page = (run_dir / "report" / "report.html").read_text()
    assert all(name in page for name in stages) and "CPUExecutionProvider" in page
    again = subprocess.run(command, check=True, capture_output=True, text=True)
    assert again.stdout.count("skipped") == 10 and "sampling" not in again.stdout
