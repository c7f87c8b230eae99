"""One-shot pruning without retraining: quality and latency per parameter ratio, by criterion.

    python benchmarks/prune.py [--model default] [--ratios 0.9,0.8,0.7,0.6,0.5,0.4] [--per-family 32] [--json F]

For each kept-parameter ratio and criterion (distortion, magnitude, random over three seeds), the
teacher's UNet is pruned one-shot (scores computed once per criterion, as `pocketdiff prune
--target params=R` does) and swapped into the pipeline; the judge scores the in-distribution
prompts (GenEval-style overall ↑ and each family's pass rate, Fréchet distance ↓), and the pruned
UNet's latency on this host's CPU (torch eager, the guidance batch of two, fastest of 50) is divided
by the teacher's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pocketdiff import modelio
from pocketdiff.apps.evaluate import headline, load_judge
from pocketdiff.apps.stages import EvaluateConfig, evaluate_model
from pocketdiff.compress import oneshot
from pocketdiff.devices.timing import call_times
from pocketdiff.distill.blocks import build_student, teacher_plan
from pocketdiff.compress.prune import CALIBRATION_PROMPTS, calibration_batches
from pocketdiff.distill.scenes import FAMILIES

RANDOM_SEEDS = (0, 1, 2)


@torch.no_grad()
def latency_ms(unet, repeats: int = 50) -> float:
    """The fastest of `repeats` forwards: on a shared 2-core host the minimum is the repeatable figure."""
    inputs = modelio.unet_example_inputs(dict(unet.config), unet.config.sample_size, batch=2,
                                         generator=torch.Generator().manual_seed(0))
    return min(call_times(lambda: unet(**inputs), repeats, warmup=5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--ratios", default="0.9,0.8,0.7,0.6,0.5,0.4")
    parser.add_argument("--per-family", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    began = time.perf_counter()
    ref = modelio.open_model(args.model)
    pipe = modelio.load_pipeline(ref)
    teacher = pipe.unet
    judge = load_judge("default")
    evaluation = EvaluateConfig(per_family=args.per_family, steps=[args.steps], guidance=[7.5])

    def quality(unet) -> dict:
        pipe.unet = unet
        result = evaluate_model(pipe, judge, evaluation, seed=0, log=lambda _: None)[
            f"in_distribution/steps={args.steps}/guidance=7.5"]
        pipe.unet = teacher
        return result

    config = dict(teacher.config)
    costs = oneshot.Costs(config, "params")
    units = oneshot.removable_units(config, costs)
    batches = calibration_batches(ref, CALIBRATION_PROMPTS, 10, 7.5)
    scoring_began = time.perf_counter()
    scores = {"distortion": oneshot.distortion_scores(teacher, units, batches)}
    scoring_seconds = time.perf_counter() - scoring_began
    scores["magnitude"] = oneshot.magnitude_scores(teacher, units)
    for seed in RANDOM_SEEDS:
        scores[f"random/{seed}"] = oneshot.random_scores(units, seed)

    teacher_ms = latency_ms(teacher)
    rows = {"teacher": {"quality": quality(teacher), "latency_ms": teacher_ms, "params": costs(teacher_plan(config))}}
    start = teacher_plan(config)
    measured = {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        for name, unit_scores in scores.items():
            chosen = oneshot.select(units, unit_scores, costs, start, oneshot.Target("params", ratio))
            student, _ = build_student(teacher, oneshot.apply_all(start, chosen))
            student.eval()
            architecture = tuple(sorted(u.name for u in chosen))
            if architecture not in measured:  # same units removed, same network: measure once
                measured[architecture] = (quality(student), latency_ms(student) / teacher_ms)
            rows[f"{ratio}/{name}"] = {"quality": measured[architecture][0], "latency_ratio": measured[architecture][1],
                                       "params_ratio": costs(oneshot.apply_all(start, chosen)) / costs(start),
                                       "removed": [u.name for u in chosen]}

    teacher_quality = rows["teacher"]["quality"]
    print(f"teacher: overall {headline(teacher_quality):.3f}, Fréchet {teacher_quality['frechet_distance']:.3f}, "
          f"UNet {teacher_ms:.1f} ms (batch 2, {args.steps} steps, guidance 7.5, in-distribution prompts, "
          f"{args.per_family} per family)")
    print(f"\n| kept params | criterion | params | overall | {' | '.join(FAMILIES)} | Fréchet | latency ÷ teacher "
          "| removed |")
    print("| --- " * (len(FAMILIES) + 7) + "|")
    for key, row in rows.items():
        if key == "teacher":
            continue
        ratio, name = key.split("/", 1)
        q = row["quality"]
        families = " | ".join(f"{q['families'][f]:.2f}" for f in FAMILIES)
        print(f"| {ratio} | {name} | {row['params_ratio']:.3f} | {headline(q):.3f} | {families} | "
              f"{q['frechet_distance']:.3f} | {row['latency_ratio']:.2f} | {', '.join(row['removed'])} |")
    print("\n| kept params | overall: distortion − mean random | − best random seed "
          "| Fréchet: distortion − mean random (lower is better) |")
    print("| --- | --- | --- | --- |")
    for ratio in args.ratios.split(","):
        ours = rows[f"{float(ratio)}/distortion"]["quality"]
        randoms = [rows[f"{float(ratio)}/random/{s}"]["quality"] for s in RANDOM_SEEDS]
        print(f"| {ratio} | {headline(ours) - statistics.mean(headline(r) for r in randoms):+.3f} | "
              f"{headline(ours) - max(headline(r) for r in randoms):+.3f} | "
              f"{ours['frechet_distance'] - statistics.mean(r['frechet_distance'] for r in randoms):+.3f} |")
    print(f"\ndistortion scoring: {len(units)} units, {sum(len(b['sample']) for b in batches)} UNet calls, "
          f"{scoring_seconds:.0f} s; whole run {time.perf_counter() - began:.0f} s on {torch.get_num_threads()} threads")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"scores": scores, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
