"""How few steps a distilled student needs: teacher vs LCM, progressive, DMD and ode students, scored by the judge.

    python benchmarks/steps.py [--model default] [--methods lcm,progressive,dmd,ode] [--lcm-steps 800]
                               [--progressive-steps 200] [--start-steps 16] [--dmd-steps 700]
                               [--fake-updates 1] [--regression-weight 1.0] [--ode-steps 1500]
                               [--ode-pairs 4096] [--ode-teacher-steps 25] [--ode-teacher default]
                               [--ode-lr 3e-4] [--ode-batch 64]
                               [--batch 32] [--per-family 32] [--work steps-bench] [--json F]

The teacher samples with DDIM and classifier-free guidance 7.5 at 1, 2, 4, 8 and 25 steps; each
student samples at 1, 2 and 4 steps with guidance 7.5 embedded (one UNet call per step), with the
scheduler saved in its folder (the ode student at 1 step only: it learns no other). Same
in-distribution prompts and seeds for every row: GenEval-style overall ↑ (also as a share of the
teacher's 25-step score) and each family's pass rate, Fréchet distance ↓. Training wall time is
per method on this machine. Runs resume: a student already trained in `--work` is only evaluated
again. Give `--model` a pruned + KD'd pipeline for the issue's second table, with `--ode-teacher`
the unpruned pipeline whose samples the ode student learns (scored at 25 steps in its own row).
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
from pocketdiff.distill.scenes import FAMILIES
from pocketdiff.distill.step_common import StepDistillConfig
from pocketdiff.distill.steps import distill_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--lcm-steps", type=int, default=800)
    parser.add_argument("--progressive-steps", type=int, default=200)
    parser.add_argument("--start-steps", type=int, default=16)
    parser.add_argument("--dmd-steps", type=int, default=700)
    parser.add_argument("--fake-updates", type=int, default=1, help="dmd: fake-score updates per generator update")
    parser.add_argument("--regression-weight", type=float, default=1.0, help="dmd: weight of the teacher-pair regression")
    parser.add_argument("--ode-steps", type=int, default=1500)
    parser.add_argument("--ode-pairs", type=int, default=4096, help="ode: prompts the guided teacher samples once")
    parser.add_argument("--ode-teacher-steps", type=int, default=25, help="ode: the teacher's DDIM steps per pair")
    parser.add_argument("--ode-teacher", default=None, help="ode: the pipeline whose samples the student learns "
                                                            "(default: --model)")
    parser.add_argument("--ode-lr", type=float, default=3e-4)
    parser.add_argument("--ode-batch", type=int, default=64)
    parser.add_argument("--methods", default="lcm,progressive,dmd")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--per-family", type=int, default=32)
    parser.add_argument("--work", default="steps-bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work, judge = Path(args.work), load_judge("default")
    teacher = modelio.open_model(args.model)

    def scores(ref, step_counts) -> dict:
        config = EvaluateConfig(per_family=args.per_family, steps=step_counts, guidance=[7.5])
        results = evaluate_model(modelio.load_pipeline(ref), judge, config, seed=0, log=lambda _: None)
        return {n: results[f"in_distribution/steps={n}/guidance=7.5"] for n in step_counts}

    rows = {"teacher (DDIM + CFG)": {"scores": scores(teacher, [1, 2, 4, 8, 25])}}
    methods = {"lcm": {"steps": args.lcm_steps},
               "progressive": {"steps": args.progressive_steps, "start_steps": args.start_steps},
               "dmd": {"steps": args.dmd_steps, "fake_updates": args.fake_updates,
                       "regression_weight": args.regression_weight},
               "ode": {"steps": args.ode_steps, "regression_pairs": args.ode_pairs, "teacher": args.ode_teacher,
                       "teacher_steps": args.ode_teacher_steps, "guidance_min": 7.5, "guidance_max": 7.5,
                       "lr": args.ode_lr, "batch": args.ode_batch, "warmup_steps": 20}}
    if "ode" in args.methods.split(",") and args.ode_teacher:
        rows["ode teacher (DDIM + CFG)"] = {"scores": scores(modelio.open_model(args.ode_teacher), [25])}
    for method in args.methods.split(","):
        if method not in methods:
            parser.error(f"--methods: {method!r} is not one of {', '.join(methods)}")
        changes = methods[method]
        config = StepDistillConfig(**{"method": method, "batch": args.batch, "lr": args.lr, "checkpoint_every": 100,
                                      **changes})
        began = time.perf_counter()
        report = distill_steps(teacher, config, work / method, log=lambda _: None)
        trained = sum(r["wall_time_s"] for r in report["rounds"])
        rows[f"{method} student"] = {"scores": scores(modelio.open_model(work / method), report["sample_steps"]),
                                     "train_wall_s": round(trained, 1), "this_run_s": round(time.perf_counter() - began, 1),
                                     "optimizer_steps": sum(config.steps for _ in report["rounds"]),
                                     "resumed": [r["resumed_at_step"] for r in report["rounds"]]}

    top = headline(rows["teacher (DDIM + CFG)"]["scores"][25])
    print(f"{args.model}: in-distribution prompts, {args.per_family} per family, guidance 7.5, seeds 0+i; "
          f"batch {args.batch}, lr {args.lr}, {torch.get_num_threads()} CPU threads\n")
    print(f"| model | steps | overall | ÷ teacher@25 | {' | '.join(FAMILIES)} | Fréchet | training wall s |")
    print("| --- " * (len(FAMILIES) + 6) + "|")
    for name, row in rows.items():
        for n, q in row["scores"].items():
            wall = f"{row['train_wall_s']:.0f}" if "train_wall_s" in row else "–"
            families = " | ".join(f"{q['families'][f]:.2f}" for f in FAMILIES)
            print(f"| {name} | {n} | {headline(q):.3f} | {headline(q) / top:.3f} | {families} | "
                  f"{q['frechet_distance']:.3f} | {wall} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
