"""What block-level KD wins back after pruning, and what feature KD adds to output-only KD.

    python benchmarks/kd.py [--model default] [--preset bk-small] [--steps 750] [--batch 64]
                            [--per-family 32] [--work kd-bench] [--json F]

The teacher is pruned with the preset, then distilled three times with the same budget, seed and
data (the scene training stream): with the full loss (task + output KD + normalised block-feature
KD, BK-SDM / LAPTOP-Diff), with self-attention features instead (KOALA), and with output KD alone.
The judge scores the teacher, the pruned model before KD and every student on the in-distribution
prompts (GenEval-style overall ↑ and each family's pass rate, Fréchet distance ↓); the table gives
each overall score as a share of the teacher's.
Runs resume: a student already trained in `--work` is only evaluated again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pocketdiff import modelio
from pocketdiff.apps.evaluate import headline, load_judge
from pocketdiff.apps.stages import EvaluateConfig, evaluate_model
from pocketdiff.compress.prune import prune_preset
from pocketdiff.distill.kd import KDConfig, distill_kd
from pocketdiff.distill.scenes import FAMILIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--preset", default="bk-small")
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--per-family", type=int, default=32)
    parser.add_argument("--work", default="kd-bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(args.work)
    teacher = modelio.open_model(args.model)
    pruned_folder = work / args.preset
    if not (pruned_folder / "prune_report.json").exists():
        prune_preset(teacher, args.preset, pruned_folder)
    pruned = modelio.open_model(pruned_folder)
    judge = load_judge("default")
    evaluation = EvaluateConfig(per_family=args.per_family, steps=[25], guidance=[7.5])

    def quality(ref) -> dict:
        return evaluate_model(modelio.load_pipeline(ref), judge, evaluation, seed=0, log=lambda _: None)[
            "in_distribution/steps=25/guidance=7.5"]

    rows = {"teacher": {"quality": quality(teacher)}, f"{args.preset}, no KD": {"quality": quality(pruned)}}
    variants = {"feature KD (task + output + normalised blocks)": {},
                "self-attention KD (task + output + normalised self-attention, KOALA)": {"features": "self-attention"},
                "output-only KD (task + output)": {"feature_weight": 0.0, "features": "none"}}
    for name, changes in variants.items():
        config = KDConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup_steps=args.steps // 20, **changes)
        report = distill_kd(teacher, pruned, config, work / name.split(" ")[0], log=lambda _: None)
        rows[name] = {"quality": quality(modelio.open_model(work / name.split(" ")[0])),
                      "kd_wall_s": report["wall_time_s"], "samples_per_s": report["final"]["samples_per_s"],
                      "resumed_at_step": report["resumed_at_step"]}

    top = headline(rows["teacher"]["quality"])
    print(f"{args.model} → {args.preset}, KD {args.steps} steps × batch {args.batch}, lr {args.lr}, "
          f"{torch.get_num_threads()} CPU threads; in-distribution prompts, {args.per_family} per family, "
          "25 DDIM steps, guidance 7.5\n")
    print(f"| model | overall | ÷ teacher | {' | '.join(FAMILIES)} | Fréchet | KD wall s | samples/s |")
    print("| --- " * (len(FAMILIES) + 6) + "|")
    for name, row in rows.items():
        q = row["quality"]
        trained = (f"{row['kd_wall_s']:.0f} | {row['samples_per_s']:.1f}" if "kd_wall_s" in row else "– | –")
        families = " | ".join(f"{q['families'][f]:.2f}" for f in FAMILIES)
        print(f"| {name} | {headline(q):.3f} | {headline(q) / top:.3f} | {families} | {q['frechet_distance']:.3f} | "
              f"{trained} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s")
