"""Profiling figures for issue #9, measured in one run on this machine.

    python benchmarks/latency.py [--latent 16] [--runs 10] [--variants 10] [--json FILE]

1. The latency lookup table's error: build the table for the SD-1.5 UNet config at `--latent`
   (random weights, torch on this CPU), then for the BK-SDM presets and seeded random one-shot
   plans, predict each variant by summing table entries and measure the variant whole. MAPE goal
   ≤ 10 %. Variants are measured best-of-N over three passes in rotating order, and the table's
   scale is anchored on the teacher measured in those same passes.
2. The phone estimates for the SD-1.5 UNet and its BK-SDM presets at 512 px (calibrated rooflines).
"""

from __future__ import annotations

import argparse
import json
import random
import time

from pocketdiff.distill.blocks import preset_config, student_config, teacher_plan
from pocketdiff.compress.oneshot import Costs, apply_all, removable_units
from pocketdiff.devices.anchors import SD15_UNET
from pocketdiff.devices.lookup import build_table
from pocketdiff.devices.opcount import unet_ops
from pocketdiff.devices.profiles import load_profile
from pocketdiff.devices.roofline import estimate


def variants(config: dict, count: int, seed: int) -> dict[str, dict]:
    """BK-SDM's three presets, then seeded random one-shot plans (2–5 units each) until `count`."""
    chosen = {preset: preset_config(config, preset) for preset in ("bk-base", "bk-small", "bk-tiny")}
    units = removable_units(config, Costs(config, "params"))
    rng = random.Random(seed)
    start = teacher_plan(config)
    while len(chosen) < count:
        picked = rng.sample(units, rng.randint(2, 5))
        plan = apply_all(start, picked)
        if plan is not None:
            chosen["+".join(sorted(u.name for u in picked))] = student_config(config, plan)
    return chosen


def measure_passes(configs: dict[str, dict], latent: int, runs: int, passes: int = 3) -> dict[str, float]:
    """Best ms per variant over `passes` passes in rotating order, so slow spells on a shared machine
    fall on every variant alike; one SD-scale model in memory at a time."""
    from pocketdiff.devices.lookup import unet_times

    names = list(configs)
    times = {name: [] for name in names}
    for shift in range(passes):
        for name in names[shift:] + names[:shift]:
            times[name] += unet_times(configs[name], latent, 1, runs)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--variants", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    config = {**SD15_UNET, "sample_size": args.latent}

    began = time.perf_counter()
    table = build_table(config, latent=args.latent, runs=args.runs)
    print(f"lookup table: {len(table.entries)} layers, glue {table.glue:.3f}, teacher {table.teacher_ms:.1f} ms, "
          f"built in {time.perf_counter() - began:.0f} s")
    configs = variants(config, args.variants, args.seed)
    measured = measure_passes({"teacher": config, **configs}, args.latent, args.runs)
    at_build = table.teacher_ms
    table.anchor(config, measured["teacher"])  # scale from the teacher measured beside the variants
    predicted = {name: table.predict(c) for name, c in configs.items()}
    errors = []
    print(f"{'variant':70s} {'measured ms':>12s} {'predicted ms':>12s} {'error':>7s}")
    for name in configs:
        error = (predicted[name] - measured[name]) / measured[name]
        errors.append(abs(error))
        print(f"{name[:70]:70s} {measured[name]:12.1f} {predicted[name]:12.1f} {error:+7.1%}")
    mape = sum(errors) / len(errors)
    print(f"teacher: {at_build:.1f} ms when the table was built, {measured['teacher']:.1f} ms beside the variants "
          f"(glue {table.glue:.3f})")
    print(f"MAPE over {len(errors)} variants: {mape:.1%} (goal ≤ 10 %)")

    phones = {}
    sd = {"sd15": SD15_UNET, **{p: preset_config(SD15_UNET, p) for p in ("bk-base", "bk-small", "bk-tiny")}}
    ops = {name: unet_ops(c, 64, 1) for name, c in sd.items()}
    for device in ("galaxy-s24", "snapdragon-8-elite-gen5", "iphone-14", "iphone-15-pro"):
        profile = load_profile(device)
        phones[device] = {name: estimate(o, profile).estimate_ms for name, o in ops.items()}
        print(f"{device}: " + ", ".join(f"{n} {ms:.0f} ms" for n, ms in phones[device].items()) + " (512 px, batch 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mape": mape, "measured": measured, "predicted": predicted, "glue": table.glue,
                       "phones": phones, "latent": args.latent, "runs": args.runs}, f, indent=2)


if __name__ == "__main__":
    main()
