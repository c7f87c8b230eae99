"""How attention is traced, timed where it matters: SD-1.5's first transformer as fp32 ExecuTorch (XNNPACK) programs.

    python benchmarks/attention_forms.py [--latent 64] [--rounds 3] [--runs 3] [--work attention-forms]

Three traces of the same math: `scaled_dot_product_attention` (diffusers' default processor, which torch
decomposes into a "safe" softmax whose guards run on portable kernels), diffusers' classic processor
(`baddbmm(empty, Q, Kᵀ, beta=0, alpha=scale)`: the empty input expanded and two scalar multiplies and an add
over all heads × tokens² scores), and `classic_attention`, what every ExecuTorch export and int8 graph
traces (plain `bmm` of the scaled query). Each is lowered with `to_edge_transform_and_lower` and XNNPACK's
partitioner, as the export does, and run in ExecuTorch's runtime on this host at batch 2, taking turns
(each program loaded afresh per round). Printed: median and p10 ms per form, each one's speed-up over the
classic processor (p10 ÷ p10), and its largest difference from PyTorch's output.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import torch

from attention_int8 import command_line, print_table, transformer_inputs  # beside this script
from pocketdiff.compress.unet_graph import attention_processor, classic_attention


def lower(model: torch.nn.Module, args: tuple, path: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = to_edge_transform_and_lower(torch.export.export(model, args), partitioner=[XnnpackPartitioner()])
    path.write_bytes(program.to_executorch().buffer)
    return path


def program_times(path: Path, args: tuple, runs: int) -> tuple[list[float], torch.Tensor]:
    """One form's turn: the program loaded afresh, one warm-up call, `runs` timed calls (ms)."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    method.execute(list(args))
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        out = method.execute(list(args))[0]
        times.append((time.perf_counter() - began) * 1000)
    del method
    gc.collect()
    return times, out


def main() -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    args, work, model = command_line(__doc__.splitlines()[0], runs=3, work="attention-forms")
    inputs = transformer_inputs(args.latent, torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(*inputs)
    forms = {"scaled_dot_product_attention": lambda: attention_processor(model, AttnProcessor2_0),
             "classic processor (baddbmm)": lambda: attention_processor(model, AttnProcessor),
             "classic_attention (scaled-query bmm)": lambda: classic_attention(model)}
    programs = {}
    for n, (name, form) in enumerate(forms.items()):
        began = time.perf_counter()
        with form():
            programs[name] = lower(model, inputs, work / f"form{n}.pte")
        print(f"{name}: lowered in {time.perf_counter() - began:.0f} s", flush=True)

    times, outputs = {name: [] for name in programs}, {}
    for round_ in range(args.rounds):
        for name, path in programs.items():
            timed, outputs[name] = program_times(path, inputs, args.runs)
            times[name] += timed
            print(f"round {round_}: {name} median {np.median(timed):.0f} ms", flush=True)

    print_table(args, "ExecuTorch fp32 (XNNPACK)", ("attention traced as", "max abs diff vs PyTorch"), times,
                "classic processor (baddbmm)",
                {name: f"{(out - reference).abs().max().item():.1e}" for name, out in outputs.items()})


if __name__ == "__main__":
    main()
