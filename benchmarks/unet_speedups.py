"""Speed-ups of exported UNets over a reference, in onnxruntime on this machine, measured in one run.

    python benchmarks/unet_speedups.py teacher=runs/teacher-unet/onnx/unet/model.onnx \
        bk-small=runs/bk-small-kd/04-export/onnx/unet/model.onnx ... [--rounds 3] [--runs 30] [--batch 2]

The first NAME=FILE is the reference. On a shared 2-core machine one profile per model, minutes
apart, drifts by tens of percent (the same teacher file timed 10.6 and 13.6 ms in one session), so
the models take turns: each round loads every model in turn in a fresh session, warms it up, times
`--runs` calls and closes it before the next (idle onnxruntime threads spin and slow whoever runs
beside them). Printed per model and round: median and 10th-percentile ms and the reference's p10 ÷
the model's p10, the steadiest ratio (interference only ever adds time).
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np


def feed(session, batch: int, latent: int) -> dict[str, np.ndarray]:
    """Seeded inputs for the UNet's declared inputs: symbolic batch → `batch`, symbolic spatial axes → `latent`."""
    rng = np.random.default_rng(0)
    inputs = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else (batch if n == 0 else latent) for n, d in enumerate(i.shape)]
        dtype = np.int64 if i.type == "tensor(int64)" else np.float32
        inputs[i.name] = np.full(shape, 500, dtype) if i.name == "timestep" else rng.standard_normal(shape).astype(dtype)
    return inputs


def session_times(path, inputs: dict[str, np.ndarray], runs: int, warmup: int = 3) -> tuple[list[float], list]:
    """One model's turn: a fresh onnxruntime session, warm-up calls, `runs` timed calls (ms), then closed, so its
    idle threads do not spin beside the next model. Also returns the outputs of the last call."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        session.run(None, inputs)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        outputs = session.run(None, inputs)
        times.append((time.perf_counter() - began) * 1000)
    del session
    gc.collect()
    return times, outputs


def main() -> None:
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=model.onnx; the first is the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=8)
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    reference = next(iter(models))
    feeds = {name: feed(onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]), args.batch, args.latent)
             for name, path in models.items()}  # once per model; each round loads a fresh session to time
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
