"""Export figures: time, peak memory, file sizes, parity, and UNet latency per runtime, in one run.

    python benchmarks/export.py [--sd15] [--out DIR] [--json FILE]

For the embedded default (every component) and, with --sd15, the SD-1.5 UNet config at 64×64
latents (random weights, nothing downloaded), each format runs in its own process so its peak RSS
is its own. UNet latency is measured at the guidance batch (2) on this host's CPU: torch eager,
onnxruntime, ExecuTorch XNNPACK fp32 and int8, each the median of several forwards after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [("default", "onnx", "fp32"), ("default", "executorch", "fp32"), ("default", "executorch", "int8"),
         ("default", "coreml", "fp16"), ("default", "coreml", "fp16-split_einsum")]
SD15_CASES = [("sd15", "onnx", "fp32"), ("sd15", "executorch", "fp32"), ("sd15", "executorch", "int8"),
              ("sd15", "coreml", "fp16"), ("sd15", "coreml", "fp16-chunked"),  # chunked: UnetChunk1 + UnetChunk2
              ("sd15", "coreml", "fp16-split_einsum"), ("sd15", "coreml", "fp16-split_einsum_v2")]  # Neural Engine layouts
UNET_OPS = ("softmax", "einsum", "matmul", "layer_norm", "linear", "conv")  # what split-einsum changes


def child(model: str, fmt: str, precision: str, out: Path, repeats: int) -> dict:
    """One export in this process; then the exported UNet's and torch eager's latency on the same inputs."""
    import warnings

    warnings.simplefilter("ignore")

    from pocketdiff import modelio
    from pocketdiff.devices.timing import median_seconds
    from pocketdiff.export.components import model_components
    from pocketdiff.export.exporter import ExportConfig, export_model
    from pocketdiff.export.runtime import load_model

    if model == "sd15":
        folder = out / "sd15-unet"
        folder.mkdir(parents=True, exist_ok=True)
        from pocketdiff.devices.anchors import SD15_UNET

        (folder / "config.json").write_text(json.dumps(SD15_UNET))
        model = str(folder)
    ref = modelio.open_model(model)
    began = time.perf_counter()
    precision, _, option = precision.partition("-")  # a Core ML option: chunked, split_einsum, split_einsum_v2
    config = ExportConfig(to=[fmt], precision=precision, chunk_unet=option == "chunked",
                          coreml_attention=option if option.startswith("split_einsum") else "original")
    report = export_model(ref, config, out, log=lambda _: None)[fmt]
    result = {"export_seconds": round(time.perf_counter() - began, 1),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2),
              "components": {k: {f: v.get(f) for f in ("bytes", "export_seconds", "max_abs", "rel")}
                             for k, v in report["components"].items()},
              "image_psnr": report.get("image_psnr")}
    if fmt == "coreml":
        result["unet_ops"] = {op: report["components"]["unet"]["ops"].get(op, 0) for op in UNET_OPS}
        if option == "chunked":
            result["chunk_bytes"] = {k: v["bytes"] for k, v in report["components"]["unet"]["chunks"].items()}
        return result
    pipe = modelio.load_pipeline(ref) if ref.kind == "pipeline" else None
    (unet,) = model_components(ref, pipe, ("unet",))
    inputs = {k: v.numpy() for k, v in unet.inputs.items()}
    runner = load_model(out / fmt / "unet" / ("model.onnx" if fmt == "onnx" else "model.pte"))
    result["unet_seconds"] = median_seconds(lambda: runner(inputs), repeats)
    result["torch_eager_unet_seconds"] = median_seconds(unet.run, repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", action="store_true", help="also the SD-1.5 UNet config (tens of minutes)")
    parser.add_argument("--out", type=Path, default=None, help="keep the exports here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "FORMAT", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.out, args.repeats)))
        return
    root = args.out or Path(tempfile.mkdtemp(prefix="pocketdiff-export-bench-"))
    figures = {}
    for model, fmt, precision in CASES + (SD15_CASES if args.sd15 else []):
        out = root / f"{model}-{fmt}-{precision}"
        repeats = 2 if model == "sd15" else args.repeats
        run = subprocess.run([sys.executable, __file__, "--child", model, fmt, precision, "--out", str(out),
                              "--repeats", str(repeats)], capture_output=True, text=True)
        key = f"{model}/{fmt}/{precision}"
        if run.returncode != 0:
            figures[key] = {"error": (run.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            figures[key] = json.loads(run.stdout.strip().splitlines()[-1])
        print(key, json.dumps(figures[key]), flush=True)
    for key, entry in figures.items():
        if "unet_seconds" in entry:
            print(f"{key}: UNet {entry['unet_seconds'] * 1e3:.1f} ms vs torch eager "
                  f"{entry['torch_eager_unet_seconds'] * 1e3:.1f} ms → {entry['torch_eager_unet_seconds'] / entry['unet_seconds']:.2f}× "
                  f"(batch 2); export {entry['export_seconds']} s, peak RSS {entry['peak_rss_gb']} GB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
