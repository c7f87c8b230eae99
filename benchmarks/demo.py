"""The browser demo against the Python ONNX pipeline: latency per image and PSNR, measured in one run.

    python benchmarks/demo.py EXPORT [--prompts "a red circle,two crosses,a triangle above a square"] [--runs 5] [--ep wasm|webgpu]

EXPORT is an ONNX export of a few-step student (the quickstart's `runs/quickstart/13-export`).
The page is served as `pocketdiff serve-demo` serves it and driven in headless Chromium; per prompt
it generates `--runs` images (1 step) and keeps the page's own latency per image (text encoder,
UNet and VAE decoder in onnxruntime-web). The Python ONNX pipeline (onnxruntime, this CPU) makes
the same images from the same starting noise and is timed the same way; the ratio browser ÷
Python and the PSNR between the two images are printed per prompt.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from pocketdiff.apps.demo import demo_noise, headless_generate, make_server
from pocketdiff.export import parity
from pocketdiff.export.runtime import ExportedPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--prompts", default="a red circle,two crosses,a triangle above a square")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--ep", default="wasm")
    args = parser.parse_args()

    server = make_server(args.export, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/?ep={args.ep}"
    pipe = ExportedPipeline(server.RequestHandlerClass.keywords["roots"]["model"], "onnx")
    shape = (1, pipe.latent_channels, pipe.latent_size, pipe.latent_size)
    print(f"{'prompt':<16} {'browser ms':>11} {'python ms':>10} {'ratio':>6} {'PSNR dB':>8}")
    for seed, prompt in enumerate(p.strip() for p in args.prompts.split(",")):
        image, latencies, provider = headless_generate(url, prompt, seed, 1, args.guidance, runs=args.runs + 1)
        browser_ms = statistics.median(latencies[1:])  # the first image warms the page up
        latents = demo_noise(seed, shape)
        times = []
        for _ in range(args.runs + 1):
            began = time.perf_counter()
            python = pipe([prompt], 1, args.guidance, latents=latents)
            times.append((time.perf_counter() - began) * 1000)
        python_ms = statistics.median(times[1:])
        psnr = parity.psnr(image[None], python)
        print(f"{prompt:<16} {browser_ms:>11.1f} {python_ms:>10.1f} {browser_ms / python_ms:>6.2f} {psnr:>8.1f}  ({provider})")
    server.shutdown()


if __name__ == "__main__":
    main()
