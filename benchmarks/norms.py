"""Group and layer norm in ExecuTorch: portable kernels against forms XNNPACK delegates, in an SD-1.5 block.

    python benchmarks/norms.py [--latent 64] [--rounds 2] [--runs 5] [--work norms]

ExecuTorch's XNNPACK partitioner takes neither `native_group_norm` nor `native_layer_norm`, so
every norm of a UNet runs on a portable kernel and splits the delegated graph around it; around a
group norm each split is also a layout change between XNNPACK's channels-last and the portable
kernel's channels-first tensors. The alternatives compute the same norms from ops XNNPACK takes.
Group norm works on per-channel (N, C, 1, 1) statistics so nothing leaves channels-last: spatial
means, a 1×1 convolution that averages the channels of each group, subtract, rsqrt, multiply, add.
Layer norm takes its token means as a linear layer with one output (XNNPACK's mean only pools the
spatial axes of 4-D tensors), then the same subtract, rsqrt, multiply, add. SD-1.5's first down
block (2 ResNet blocks and 2 transformers at 320 channels, the downsampler; 6 group norms, 6 layer
norms) is lowered each way as the export lowers it (`export.executorch.lower`) and run in
ExecuTorch's runtime at batch 2, beside torch eager, taking turns. Printed: fastest ms per round,
and each program's largest difference from eager.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from attention_forms import program_times  # beside this script
from pocketdiff.devices.anchors import SD15_UNET
from pocketdiff.devices.timing import call_times
from pocketdiff.export.executorch import lower


def delegable_group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    channels, groups = x.shape[1], norm.num_groups
    width = channels // groups
    average = torch.kron(torch.eye(groups), torch.full((width, width), 1.0 / width)).view(channels, channels, 1, 1)
    mean = torch.nn.functional.conv2d(x.mean(dim=(2, 3), keepdim=True), average)
    centred = x - mean
    variance = torch.nn.functional.conv2d((centred * centred).mean(dim=(2, 3), keepdim=True), average)
    scaled = centred * torch.rsqrt(variance + norm.eps)
    return scaled * norm.weight.view(1, channels, 1, 1) + norm.bias.view(1, channels, 1, 1)


def delegable_layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    channels = x.shape[-1]
    average = torch.full((1, channels), 1.0 / channels)
    centred = x - torch.nn.functional.linear(x, average)
    scaled = centred * torch.rsqrt(torch.nn.functional.linear(centred * centred, average) + norm.eps)
    return scaled * norm.weight + norm.bias


@contextmanager
def delegable(module: torch.nn.Module, kinds: dict):
    """Every norm of a kind in `kinds` ({class: form}) computed by its delegable form while inside."""
    norms = [(m, kinds[type(m)]) for m in module.modules() if type(m) in kinds]
    for norm, form in norms:
        norm.forward = form.__get__(norm)
    try:
        yield
    finally:
        for norm, _ in norms:
            del norm.forward


class DownBlock(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden, embedding, text):
        return self.block(hidden, embedding, encoder_hidden_states=text)[0]


def main() -> None:
    from diffusers import UNet2DConditionModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", default="norms")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = DownBlock(UNet2DConditionModel.from_config(SD15_UNET).down_blocks[0]).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 320, args.latent, args.latent, generator=generator),
              torch.randn(2, 1280, generator=generator), torch.randn(2, 77, 768, generator=generator))
    with torch.no_grad():
        reference = model(*inputs)
    group, layer = {torch.nn.GroupNorm: delegable_group_norm}, {torch.nn.LayerNorm: delegable_layer_norm}
    forms = {"portable norms (the export's)": (work / "portable.pte", {}),
             "delegable group norm": (work / "delegable-group.pte", group),
             "delegable layer norm": (work / "delegable-layer.pte", layer),
             "delegable group and layer norm": (work / "delegable-both.pte", group | layer)}
    for name, (path, kinds) in forms.items():
        if not path.exists():
            began = time.perf_counter()
            with delegable(model, kinds):
                path.write_bytes(lower(model, inputs))
            print(f"{name}: lowered in {time.perf_counter() - began:.0f} s", flush=True)

    fastest, errors = {name: [] for name in ["torch eager", *forms]}, {}
    for _ in range(args.rounds):
        with torch.inference_mode():
            fastest["torch eager"].append(min(call_times(lambda: model(*inputs), args.runs)))
        for name, (path, _) in forms.items():
            times, out = program_times(path, inputs, args.runs)
            fastest[name].append(min(times))
            errors[name] = float((out - reference).abs().max())
    groups, layers = (sum(isinstance(m, kind) for m in model.modules())
                      for kind in (torch.nn.GroupNorm, torch.nn.LayerNorm))
    print(f"\nSD-1.5 down_blocks.0 ({groups} group norms, {layers} layer norms), {args.latent}×{args.latent} latents, "
          f"batch 2, {torch.get_num_threads()} threads; fastest of {args.runs} calls per round\n")
    print("| form | " + " | ".join(f"round {i + 1} ms" for i in range(args.rounds)) + " | max-abs vs eager |")
    print("| --- " * (args.rounds + 2) + "|")
    for name, values in fastest.items():
        error = f"{errors[name]:.1e}" if name in errors else "–"
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in values) + f" | {error} |")


if __name__ == "__main__":
    main()
