"""Speed-ups of exported UNets over a reference, in their own runtime on this machine, measured in one run.

    python benchmarks/unet_speedups.py teacher=runs/teacher-unet/onnx/unet/model.onnx \
        bk-small=runs/bk-small-kd/04-export/onnx/unet/model.onnx ... [--rounds 3] [--runs 30] [--batch 2]

Files are ONNX (onnxruntime's CPU provider) or ExecuTorch `.pte` programs (ExecuTorch's runtime;
their static shapes fix batch and latent). The first NAME=FILE is the reference. On a shared
2-core machine one profile per model, minutes apart, drifts by tens of percent (the same teacher
file timed 10.6 and 13.6 ms in one session), so the models take turns: each round loads every
model in turn afresh, warms it up, times `--runs` calls and drops it before the next (idle
onnxruntime threads spin and slow whoever runs beside them). Printed per model and round: median
and 10th-percentile ms and the reference's p10 ÷ the model's p10, the steadiest ratio
(interference only ever adds time).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np

EXECUTORCH_LONG = 4  # ExecuTorch's ScalarType code for int64


def load(path) -> tuple:
    """A fresh runnable of the file, feed dict → outputs, and its declared inputs: (name, shape with None for
    a symbolic axis, integer?) each."""
    path = str(path)
    if path.endswith(".pte"):
        import torch
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(Path(path)).load_method("forward")
        names = json.loads((Path(path).parent / "io.json").read_text())["inputs"]
        metas = [method.metadata.input_tensor_meta(i) for i in range(len(names))]
        declared = [(name, tuple(m.sizes()), m.dtype() == EXECUTORCH_LONG) for name, m in zip(names, metas)]
        return (lambda feed: method.execute([torch.from_numpy(feed[name]) for name in names])), declared
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    declared = [(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), i.type == "tensor(int64)")
                for i in session.get_inputs()]
    return (lambda feed: session.run(None, feed)), declared


def feed(declared, batch: int, latent: int) -> dict[str, np.ndarray]:
    """Seeded inputs for the UNet's declared inputs: symbolic batch → `batch`, symbolic spatial axes → `latent`."""
    rng = np.random.default_rng(0)
    inputs = {}
    for name, shape, integer in declared:
        shape = [d if d is not None else (batch if n == 0 else latent) for n, d in enumerate(shape)]
        dtype = np.int64 if integer else np.float32
        inputs[name] = np.full(shape, 500, dtype) if name == "timestep" else rng.standard_normal(shape).astype(dtype)
    return inputs


def session_times(path, inputs: dict[str, np.ndarray], runs: int, warmup: int = 3) -> tuple[list[float], list]:
    """One model's turn: loaded afresh, warm-up calls, `runs` timed calls (ms), then dropped, so its idle threads do
    not spin beside the next model. Also returns the outputs of the last call."""
    run, _ = load(path)
    for _ in range(warmup):
        run(inputs)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        outputs = run(inputs)
        times.append((time.perf_counter() - began) * 1000)
    del run
    gc.collect()
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=model.onnx or NAME=model.pte; the first is the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=8)
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    reference = next(iter(models))
    feeds = {name: feed(load(path)[1], args.batch, args.latent)
             for name, path in models.items()}  # once per model; each round loads it afresh to time
    gc.collect()
    for round_ in range(1, args.rounds + 1):
        times = {}
        for name, path in models.items():
            times[name] = session_times(path, feeds[name], args.runs)[0]
            time.sleep(0.5)
        p10 = {name: float(np.percentile(t, 10)) for name, t in times.items()}
        for name, t in times.items():
            print(f"round {round_}  {name}: median {np.median(t):.2f} ms, p10 {p10[name]:.2f} ms, "
                  f"{p10[reference] / p10[name]:.2f}× {reference}", flush=True)


if __name__ == "__main__":
    main()
