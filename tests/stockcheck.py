"""Generating from a folder with stock libraries, here (transformers 5) and in a second environment (transformers 4
and optimum's ONNX pipeline, `compat/`), and with pocketdiff's own loader, to compare the images."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

from pocketdiff import modelio

COMPAT = Path(__file__).parent / "compat"
PROMPT = "red apple"


def compat_python() -> str:
    """transformers 4.57 + optimum-onnx beside this torch: built once per machine, then reused from the cache."""
    if os.environ.get("POCKETDIFF_COMPAT_PYTHON"):
        return os.environ["POCKETDIFF_COMPAT_PYTHON"]
    built = subprocess.run(["bash", str(COMPAT / "environment.sh")], capture_output=True, text=True,
                           env={**os.environ, "PYTHON": os.environ.get("PYTHON", "python")})
    assert built.returncode == 0, f"the transformers 4 / optimum environment did not build:\n{built.stderr[-2000:]}"
    return built.stdout.strip().splitlines()[-1]


def latents_for(folder: Path, seed: int = 0) -> np.ndarray:
    config = modelio.unet_config(modelio.open_model(folder))
    shape = (1, config["in_channels"], config["sample_size"], config["sample_size"])
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def run_stock(pipe, latents: np.ndarray, steps: int, guidance: float = 7.5, seed: int = 0) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe([PROMPT], num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
                generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def ours(folder: Path, latents: np.ndarray, steps: int) -> np.ndarray:
    return run_stock(modelio.load_pipeline(modelio.open_model(folder)), latents, steps)


def elsewhere(python: str, jobs: list[dict], tmp_path: Path) -> dict:
    """Each job's image from the second environment (`compat/stock_generate.py`), and its versions."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i, job in enumerate(jobs):
        np.save(tmp_path / f"latents-{i}.npy", job.pop("array"))
        job.update(latents=str(tmp_path / f"latents-{i}.npy"), folder=str(job["folder"]), prompt=PROMPT)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([python, str(COMPAT / "stock_generate.py"), str(tmp_path / "out.npz"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(tmp_path / "out.npz"))


def assert_stock_generates_ours(folders: dict[str, Path], steps: int = 2) -> None:
    """Plain `StableDiffusionPipeline.from_pretrained(path)` here draws pocketdiff's loader's image from each folder."""
    from diffusers import StableDiffusionPipeline

    for name, folder in folders.items():
        latents = latents_for(folder)
        stock = run_stock(StableDiffusionPipeline.from_pretrained(folder), latents, steps)
        np.testing.assert_allclose(stock, ours(folder, latents, steps), atol=1e-5, err_msg=name)


def transformers_4_images(python: str, folders: dict[str, Path], tmp_path: Path, steps: int = 2) -> dict:
    """Each folder's image from stock diffusers on transformers 4, beside the versions that drew them."""
    jobs = [{"name": name, "folder": folder, "kind": "diffusers", "steps": steps, "guidance": 7.5, "seed": 0,
             "array": latents_for(folder)} for name, folder in folders.items()]
    images = elsewhere(python, jobs, tmp_path)
    assert images["versions"][0].startswith("4."), images["versions"]
    return images


def assert_transformers_4_generates_ours(python: str, folders: dict[str, Path], tmp_path: Path, steps: int = 2) -> None:
    images = transformers_4_images(python, folders, tmp_path, steps)
    for name, folder in folders.items():
        np.testing.assert_allclose(images[name], ours(folder, latents_for(folder), steps), atol=1e-4, err_msg=name)
