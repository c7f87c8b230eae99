"""Quantization for one export target: fp32 vs post-training vs quantization-aware training, judged, sized and timed in one run.

    python benchmarks/quantize.py --model STUDENT
                                  [--backend xnnpack|onnx-int8|coreml-w8a8|coreml-palette4|coreml-palette6|brevitas-w4a8]
                                  [--sample-steps 1]
                                  [--qat-steps 600] [--lr 1e-5] [--feature-weight W] [--per-family 32]
                                  [--calibration-prompts 256] [--attention]
                                  [--work quantize-bench] [--json F]

Rows: the fp32 model; for ExecuTorch, post-training int8 of the linear layers alone (what `export
--precision int8` does to a float model); post-training int8 of convolutions and linears; the same
after QAT (palettes: post-training tables, then trained tables); with `--attention` (onnx-int8,
coreml-w8a8), post-training int8 with the attention matmuls' operands too. Each quantized model is the one
`pocketdiff quantize --backend B` writes, calibrated (and trained) on trajectories of `--sample-steps` steps at
`--guidance`, the calls it is judged on; judged through its int8 graph (torch's reference int8
ops; a palette is its float weights) on the same in-distribution prompts and seeds: GenEval-style
overall ↑ (and as a share of fp32's) and each family's pass rate, Fréchet distance ↓. Each is then
exported to the backend's format (xnnpack: ExecuTorch; onnx-int8, brevitas-w4a8: ONNX; coreml-*:
Core ML, whose float row is its default fp16), UNet only, as that format ships it, checked against
fp32 PyTorch (relative error of the exported file's output) and timed in that format's runtime on
this host at the export's batch, once every file is written: `--rounds` rounds in which the files
take turns, each loaded afresh, warmed up and called `--repeats` times (timed one by one, each right
after its export in the exporting process, two int8 programs of one graph timed 8.6 and 5.7 ms).
Latency is the 10th percentile over all rounds; the speed-up over the float file is given per
round, as a range. Core ML runs only on macOS: elsewhere its rows have sizes and no error or time.
Quantized folders in `--work` are reused, so a rerun only evaluates and times.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from pocketdiff import modelio
from pocketdiff.apps.evaluate import headline, load_judge
from pocketdiff.apps.stages import EvaluateConfig, evaluate_model
from pocketdiff.compress.quantize import QuantizeConfig, quantize
from pocketdiff.compress.saved import load_shipped_pipeline
from pocketdiff.distill.scenes import FAMILIES
from pocketdiff.export.components import model_components
from pocketdiff.export.exporter import ExportConfig, export_model
from unet_speedups import session_times  # beside this script

FORMATS = {"xnnpack": "executorch", "onnx-int8": "onnx", "coreml-w8a8": "coreml", "coreml-palette4": "coreml",
           "coreml-palette6": "coreml", "brevitas-w4a8": "onnx"}  # the export format each backend ships in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", choices=list(FORMATS), default="xnnpack")
    parser.add_argument("--sample-steps", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--qat-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--feature-weight", type=float, default=QuantizeConfig.model_fields["feature_weight"].default,
                        help="QAT: weight of the stage-output KD terms (0: output distillation only)")
    parser.add_argument("--per-family", type=int, default=32)
    parser.add_argument("--calibration-prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attention", action="store_true", help="add a post-training row with int8 attention matmuls")
    parser.add_argument("--work", default="quantize-bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work, judge, model = Path(args.work), load_judge("default"), modelio.open_model(args.model)
    evaluation = EvaluateConfig(per_family=args.per_family, steps=[args.sample_steps], guidance=[args.guidance])
    key = f"in_distribution/steps={args.sample_steps}/guidance={args.guidance:g}"
    fmt = FORMATS[args.backend]
    common = {"backend": args.backend, "prompts": args.calibration_prompts,  # calibrated on the calls it is judged on
              "sampling_steps": args.sample_steps, "guidance": args.guidance}
    kind = {"coreml-palette4": "palette4", "coreml-palette6": "palette6", "brevitas-w4a8": "W4A8"}.get(args.backend, "int8")
    variants = {
        f"PTQ {kind}, linear": QuantizeConfig(layers="linear", keep=[], **common),
        f"PTQ {kind}, conv+linear": QuantizeConfig(**common),
        f"QAT {kind}, conv+linear": QuantizeConfig(qat_steps=args.qat_steps, lr=args.lr, feature_weight=args.feature_weight,
                                                    checkpoint_every=100, **common),
    }
    if fmt != "executorch":
        del variants[f"PTQ {kind}, linear"]  # the row stands for ExecuTorch's own post-training int8 of a float model
    if args.attention:
        variants[f"PTQ {kind}, conv+linear+attention"] = QuantizeConfig(attention=True, **common)
    rows = {"fp32": {"folder": model.path}}
    for name, config in variants.items():
        layers = config.layers + ("+attention" if config.attention else "")
        folder = work / args.backend / f"{name.split()[0].lower()}-{layers.replace('+', '-')}"
        began = time.perf_counter()
        report = (json.loads((folder / "quantize_report.json").read_text()) if (folder / "quantize_report.json").exists()
                  else quantize(model, config, folder, log=print))
        rows[name] = {"folder": folder, "unet_relative_error": report["unet_relative_error"],
                      "quantize_wall_s": report["wall_time_s"], "this_run_s": round(time.perf_counter() - began, 1)}

    for name, row in rows.items():
        ref = modelio.open_model(row["folder"])
        pipe = load_shipped_pipeline(ref)
        row["scores"] = evaluate_model(pipe, judge, evaluation, seed=0, log=lambda _: None)[key]
        out = work / args.backend / "exports" / name.replace(" ", "_").replace(",", "")
        exported = export_model(ref, ExportConfig(to=[fmt], components=["unet"]),  # as the format ships it
                                out, log=lambda _: None)[fmt]["components"]["unet"]
        row.update(file_bytes=exported["bytes"], export_s=exported["export_seconds"], exported_rel=exported.get("rel"),
                   precision=exported["precision"], unet_ms=[])
        print(name, json.dumps({k: v for k, v in row.items() if k != "folder"}, default=str), flush=True)
        if fmt != "coreml" or platform.system() == "Darwin":
            (unet,) = model_components(ref, modelio.load_pipeline(ref), ("unet",))
            row["timed"] = (out / fmt / exported["file"], {k: v.numpy() for k, v in unet.inputs.items()})

    speedups = {name: [] for name in rows}
    for _ in range(args.rounds if "timed" in rows["fp32"] else 0):
        p10 = {}
        for name, row in rows.items():
            times = session_times(*row["timed"], args.repeats)[0]
            row["unet_ms"] += times
            p10[name] = np.percentile(times, 10)
        for name in rows:
            speedups[name].append(p10["fp32"] / p10[name])

    base = rows["fp32"]
    print(f"\nin-distribution prompts, {args.per_family} per family, {args.sample_steps} step(s), "
          f"guidance {args.guidance:g}; {fmt} UNet (backend {args.backend}) on this host")
    print(f"| model (exported as) | overall | vs fp32 | {' | '.join(FAMILIES)} | Fréchet | UNet rel. error (in torch) "
          f"| {fmt} rel. error | file MB | size ratio | UNet p10 ms | speed-up over float (per round) |")
    print("| --- " * (len(FAMILIES) + 10) + "|")
    def figure(value, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for name, row in rows.items():
        s, timed = row["scores"], bool(row["unet_ms"])
        families = " | ".join(f"{s['families'][f]:.2f}" for f in FAMILIES)
        print(f"| {name} ({row['precision']}) | {headline(s):.3f} | {headline(s) / headline(base['scores']):.3f} | "
              f"{families} | {s['frechet_distance']:.3f} | {row.get('unet_relative_error', 0):.4f} | "
              f"{figure(row['exported_rel'], '.4f')} | "
              f"{row['file_bytes'] / 1e6:.1f} | {row['file_bytes'] / base['file_bytes']:.3f} | "
              f"{figure(np.percentile(row['unet_ms'], 10) if timed else None, '.1f')} | "
              f"{f'{min(speedups[name]):.2f}–{max(speedups[name]):.2f}×' if timed else '–'} |")
    if args.json:
        saved = {name: {**{k: v for k, v in row.items() if k != "timed"}, "speedups": speedups[name]}
                 for name, row in rows.items()}
        Path(args.json).write_text(json.dumps(saved, indent=2, default=str))


if __name__ == "__main__":
    main()
