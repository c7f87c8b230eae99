"""SD-1.5's UNet with int8 convolutions and linears against fp32, in ExecuTorch (XNNPACK) and onnxruntime, in one run.

    python benchmarks/sd15_int8.py [--work sd15-int8] [--rounds 2] [--runs 3] [--calibration 4] [--json F]

SD-1.5's UNet config with random weights (seeded), at 512 px (64×64 latents, 77 tokens, guidance
batch 2), is quantized post-training for each runtime with the backend `pocketdiff quantize` uses
(`xnnpack`, `onnx-int8`: conv + linear, per-channel weights, per-tensor activations, conv_in,
conv_out and the time embedding kept fp32), its observers calibrated on `--calibration` random
UNet calls, and written as a quantized UNet folder. The stock exporter then ships each: the fp32
UNet to ExecuTorch and ONNX, each quantized folder to its own runtime. Random weights make the
speed real and the error only a sanity check; a trained model's ranges come from its own sampling.

Then every program and torch eager take turns: each round loads one afresh, warms it up, times
`--runs` calls at the guidance batch, and drops it before the next. Printed per round: each
one's fastest call, and the speed-ups (one fastest over another, in the same round): int8 over
fp32 in each runtime, each runtime's fp32 over torch eager; `--json` adds the medians. Exports
resume: a program already in `--work` is kept.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pocketdiff import modelio
from pocketdiff.compress.backends import BACKENDS, SPEC_FILE, STATE_FILE
from pocketdiff.compress.quantize import QuantizeConfig, quantization_spec
from pocketdiff.compress.unet_graph import quantizer_state
from pocketdiff.devices.anchors import SD15_UNET
from pocketdiff.devices.timing import call_times
from pocketdiff.distill.trainer import unshared
from pocketdiff.export.exporter import ExportConfig, export_model
from unet_speedups import feed, load, session_times  # beside this script

BATCH, LATENT, TOKENS = 2, 64, 77
PROGRAMS = {"ExecuTorch fp32": ("fp32", "executorch"), "ExecuTorch int8": ("xnnpack", "executorch"),
            "onnxruntime fp32": ("fp32", "onnx"), "onnxruntime int8": ("onnx-int8", "onnx")}
RATIOS = [("ExecuTorch int8", "ExecuTorch fp32"), ("onnxruntime int8", "onnxruntime fp32"),
          ("ExecuTorch fp32", "torch eager"), ("onnxruntime fp32", "torch eager")]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def calibration_rows(count: int) -> dict[str, torch.Tensor]:
    """Random UNet calls spread over the noise schedule, as rows of the traced graph's inputs."""
    generator = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(count, 4, LATENT, LATENT, generator=generator),
            "timestep": torch.linspace(999, 0, count),
            "encoder_hidden_states": torch.randn(count, TOKENS, SD15_UNET["cross_attention_dim"], generator=generator)}


def float_unet(work: Path) -> Path:
    folder = work / "fp32"
    if not (folder / "diffusion_pytorch_model.safetensors").exists():
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        UNet2DConditionModel.from_config(SD15_UNET).save_pretrained(folder, safe_serialization=True)
    return folder


def quantized_unet(source: Path, backend: str, calibration: int, work: Path) -> Path:
    """A quantized UNet folder for `backend`: the float weights (linked) and the calibrated observers' state."""
    folder = work / backend
    if (folder / STATE_FILE).exists():
        return folder
    config = QuantizeConfig(backend=backend)
    spec = quantization_spec(config, config.keep)
    unet = modelio.load_unet(modelio.open_model(source))
    began = time.perf_counter()
    calibrated, counts = BACKENDS[backend].prepare(unet, spec, calibration_rows(calibration), BATCH)
    print(f"{backend}: {counts} quantized layers, calibrated on {calibration} calls in "
          f"{time.perf_counter() - began:.0f} s", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        if not (folder / name).exists():
            (folder / name).symlink_to((source / name).resolve())
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    save_file(unshared(quantizer_state(calibrated.state_dict())), folder / STATE_FILE)
    return folder


def exported(folder: Path, fmt: str, out: Path) -> tuple[Path, dict]:
    """The exported UNet file and the exporter's parity entry for it; exports once."""
    path = out / fmt / "unet" / ("model.onnx" if fmt == "onnx" else "model.pte")
    record = out / "export.json"
    if not record.exists():
        began = time.perf_counter()
        report = export_model(modelio.open_model(folder), ExportConfig(to=[fmt]), out, log=lambda _: None)[fmt]
        entry = report["components"]["unet"]
        record.write_text(json.dumps({"export_s": round(time.perf_counter() - began, 1), "bytes": entry.get("bytes"),
                                      "max_abs": entry.get("max_abs"), "rel": entry.get("rel"),
                                      "quantization": entry.get("quantization")}))
        print(f"{out.name}: exported in {time.perf_counter() - began:.0f} s, peak RSS {peak_rss_gb():.1f} GB",
              flush=True)
    return path, json.loads(record.read_text())


def eager_times(folder: Path, runs: int) -> list[float]:
    """torch eager's turn, on the same seeded inputs as the programs (batch 2, timestep 500)."""
    unet = modelio.load_unet(modelio.open_model(folder)).eval()
    inputs = feed([("sample", (None, 4, None, None), False), ("timestep", (None,), True),
                   ("encoder_hidden_states", (None, TOKENS, SD15_UNET["cross_attention_dim"]), False)], BATCH, LATENT)
    args = (torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timestep"]),
            torch.from_numpy(inputs["encoder_hidden_states"]))
    with torch.inference_mode():
        times = call_times(lambda: unet(*args), runs)
    unet = None  # freed before the next model loads
    gc.collect()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="sd15-int8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(args.work)
    source = float_unet(work)
    folders = {"fp32": source}
    folders.update({backend: quantized_unet(source, backend, args.calibration, work)
                    for backend in ("xnnpack", "onnx-int8")})
    programs, exports = {}, {}
    for name, (model, fmt) in PROGRAMS.items():
        programs[name], exports[name] = exported(folders[model], fmt, work / f"export-{model}-{fmt}")
    gc.collect()

    feeds = {name: feed(load(path)[1], BATCH, LATENT) for name, path in programs.items()}
    rounds = []
    for round_ in range(1, args.rounds + 1):
        times = {"torch eager": eager_times(source, args.runs)}
        for name, path in programs.items():
            times[name] = session_times(path, feeds[name], args.runs, warmup=1)[0]
        fastest = {name: min(t) for name, t in times.items()}
        rounds.append({"median_ms": {n: float(np.median(t)) for n, t in times.items()}, "fastest_ms": fastest,
                       "speedups": {f"{a} vs {b}": fastest[b] / fastest[a] for a, b in RATIOS}})
        print(f"round {round_}: " + ", ".join(f"{n} {fastest[n] / 1000:.2f} s" for n in fastest), flush=True)

    print(f"\nSD-1.5 UNet, random weights, 512 px, batch {BATCH}, {torch.get_num_threads()} threads; fastest of "
          f"{args.runs} calls per round, {args.rounds} rounds\n")
    print("| UNet | file | export | max-abs vs PyTorch | " + " | ".join(f"round {i + 1}" for i in range(len(rounds)))
          + " |")
    print("| --- " * (4 + len(rounds)) + "|")
    for name in ["torch eager", *programs]:
        record = exports.get(name, {})
        size = f"{record['bytes'] / 1e9:.2f} GB" if record.get("bytes") else "–"
        error = f"{record['max_abs']:.2g}" if record.get("max_abs") is not None else "–"
        export = f"{record['export_s']:.0f} s" if record else "–"
        timing = " | ".join(f"{r['fastest_ms'][name] / 1000:.2f} s" for r in rounds)
        print(f"| {name} | {size} | {export} | {error} | {timing} |")
    print("\n| speed-up | " + " | ".join(f"round {i + 1}" for i in range(len(rounds))) + " |")
    print("| --- " * (1 + len(rounds)) + "|")
    for a, b in RATIOS:
        key = f"{a} vs {b}"
        print(f"| {a} over {b} | " + " | ".join(f"{r['speedups'][key]:.2f}×" for r in rounds) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"exports": exports, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
