"""int8 attention matmuls at Stable Diffusion's scale: one SD-1.5 high-resolution transformer in onnxruntime.

    python benchmarks/attention_int8.py [--latent 64] [--rounds 3] [--runs 5] [--work attention-bench]

The embedded default's attention sees at most 64 tokens, too few for its matmuls to matter; SD-1.5's
first down-stage transformer sees 4,096 (64×64 latents), where QKᵀ and AV dominate. This builds that
transformer (`Transformer2DModel`: 320 channels, 8 heads of 40, cross-attention to 77×768 text
states, conv projections; seeded random weights), quantizes it with `pocketdiff quantize`'s own PT2E
flow for onnx-int8 (conv+linear, then with `attention`), calibrated on seeded random inputs, exports
each to ONNX as the UNet export does, and times fp32 and both int8 files in onnxruntime's CPU
provider on this host at batch 2, taking turns (a fresh session per model per round). Printed: median
ms per model and round, each one's speed-up over fp32 (p10 ÷ p10), and the relative error of its
residual branch (output − input) against the fp32 file's on the timed input (random weights: the error
is indicative, the time is the point).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pocketdiff.compress import pt2e_int8
from pocketdiff.export.onnx import OPSET
from unet_speedups import session_times  # beside this script


class Transformer(torch.nn.Module):
    """The transformer under the name quantization expects its model at (`unet`), called as the UNet calls it."""

    def __init__(self, block):
        super().__init__()
        self.unet = block

    def forward(self, hidden_states, encoder_hidden_states):
        return self.unet(hidden_states, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def sd15_transformer() -> Transformer:
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    return Transformer(Transformer2DModel(num_attention_heads=8, attention_head_dim=40, in_channels=320,
                                          cross_attention_dim=768, norm_num_groups=32)).eval()


def transformer_inputs(latent: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded hidden states at `latent`×`latent` and CLIP-shaped text states, at batch 2 (guidance's batch)."""
    return torch.randn(2, 320, latent, latent, generator=generator), torch.randn(2, 77, 768, generator=generator)


def command_line(description: str, runs: int, work: str) -> tuple[argparse.Namespace, Path, Transformer]:
    """What both SD-1.5 transformer benchmarks take (--latent, --rounds, --runs, --work), their work folder and model."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--work", default=work)
    args = parser.parse_args()
    folder = Path(args.work)
    folder.mkdir(parents=True, exist_ok=True)
    return args, folder, sd15_transformer()


def print_table(args: argparse.Namespace, runtime: str, columns: tuple[str, str], times: dict[str, list[float]],
                base: str, accuracy: dict[str, str]) -> None:
    """Both transformer benchmarks' table: median and p10 ms per row, speed-up over row `base` (p10 ÷ p10), accuracy."""
    print(f"\nSD-1.5 down_blocks.0 transformer, {args.latent}×{args.latent} latents ({args.latent ** 2} tokens), batch 2, "
          f"{runtime}, {args.rounds}×{args.runs} runs each\n")
    print(f"| {columns[0]} | median ms | p10 ms | speed-up (p10) | {columns[1]} |")
    print("| --- | --- | --- | --- | --- |")
    for name, timed in times.items():
        p10 = np.percentile(timed, 10)
        print(f"| {name} | {np.median(timed):.0f} | {p10:.0f} | {np.percentile(times[base], 10) / p10:.2f}× | {accuracy[name]} |")


def export(module, args: tuple, path: Path) -> Path:
    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=OPSET, optimize=False,
                      input_names=["hidden_states", "encoder_hidden_states"], output_names=["out"], verbose=False)
    return path


def int8(model: Transformer, args: tuple, calibration: list[tuple], attention: bool) -> torch.nn.Module:
    prepared = pt2e_int8.prepare(model, args, "conv+linear", [], False, "onnx-int8", attention)
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch)
    return pt2e_int8.convert(prepared)


def main() -> None:
    import onnxruntime

    args, work, model = command_line(__doc__.splitlines()[0], runs=5, work="attention-bench")
    generator = torch.Generator().manual_seed(0)
    example = transformer_inputs(args.latent, generator)
    calibration = [transformer_inputs(args.latent, generator) for _ in range(4)]
    files = {"fp32": export(model, example, work / "fp32.onnx")}
    for name, attention in (("int8 conv+linear", False), ("int8 conv+linear+attention", True)):
        began = time.perf_counter()
        files[name] = export(int8(model, example, calibration, attention), example, work / f"{name.replace(' ', '_')}.onnx")
        print(f"{name}: quantized and exported in {time.perf_counter() - began:.0f} s", flush=True)

    feed = {"hidden_states": example[0].numpy(), "encoder_hidden_states": example[1].numpy()}
    times, outputs = {name: [] for name in files}, {}
    for round_ in range(args.rounds):
        for name, path in files.items():
            timed, (outputs[name],) = session_times(path, feed, args.runs, warmup=1)
            times[name] += timed
            print(f"round {round_}: {name} median {np.median(timed):.0f} ms", flush=True)

    reference = outputs["fp32"] - feed["hidden_states"]  # the residual branch: the input itself passes through exactly
    errors = {name: np.linalg.norm(out - feed["hidden_states"] - reference) / np.linalg.norm(reference)
              for name, out in outputs.items()}
    print_table(args, f"onnxruntime {onnxruntime.__version__} CPU", ("model", "branch rel. error vs fp32"), times,
                "fp32", {name: f"{error:.4f}" for name, error in errors.items()})


if __name__ == "__main__":
    main()
