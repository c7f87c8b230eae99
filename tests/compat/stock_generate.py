"""Generate from pipeline folders with stock diffusers alone, as a user of another environment would.

Run by the tests under a second interpreter (transformers 4, optimum): it imports nothing of
pocketdiff. `python stock_generate.py OUT.npz JOBS.json`, where JOBS.json lists
{"name", "folder", "kind": "diffusers" | "optimum", "prompt", "steps", "guidance", "latents" (.npy), "seed"}.
Each job's float image (H, W, 3 in [0, 1]) is saved under its name, with the versions that made it.
"""

import json
import sys

import numpy as np
import torch


def load(kind: str, folder: str):
    if kind == "optimum":
        from optimum.onnxruntime import ORTDiffusionPipeline

        return ORTDiffusionPipeline.from_pretrained(folder)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)  # no dtype, no options: what a user types


def main(out: str, jobs_file: str) -> None:
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    images = {}
    pipes = {}
    for job in json.loads(open(jobs_file).read()):
        key = (job["kind"], job["folder"])
        if key not in pipes:
            pipes[key] = load(*key)
            pipes[key].set_progress_bar_config(disable=True)
        pipe = pipes[key]
        result = pipe([job["prompt"]], num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                      latents=torch.from_numpy(np.load(job["latents"])), output_type="np",
                      generator=torch.Generator().manual_seed(job["seed"]))
        images[job["name"]] = np.asarray(result.images[0], dtype=np.float32)
        images[job["name"] + ":classes"] = np.array([type(pipe).__name__, type(pipe.scheduler).__name__])
    images["versions"] = np.array([transformers.__version__, diffusers.__version__])
    np.savez(out, **images)


if __name__ == "__main__":
    main(*sys.argv[1:])
