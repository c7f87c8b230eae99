"""The `pocketdiff` command line: one command per stage, plus `run` for whole recipes.

Every user error is one line on stderr and exit status 2; options whose backend is not built yet
say so and exit 2 rather than pretend.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

import pocketdiff

from ..errors import UserError

app = typer.Typer(help="Compress text-to-image diffusion models and ship them to phones.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
zoo_app = typer.Typer(help="Train pocketdiff's embedded default model and its judge.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
devices_app = typer.Typer(help="Device profiles: list them, calibrate phone profiles on their published anchors.",
                           no_args_is_help=True)
app.add_typer(devices_app, name="devices")
distill_app = typer.Typer(help="Distillation: block-level KD of a pruned UNet, a slim VAE, few-step students.",
                          no_args_is_help=True)
app.add_typer(distill_app, name="distill")
console = Console()

ModelArg = Annotated[str, typer.Argument(help="A local diffusers folder (pipeline or UNet), or 'default'.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.ckpt weights (runs pickle code).")]


def _open(model: str, allow_pickle: bool = False):
    from .. import modelio

    ref = modelio.open_model(model, allow_pickle)
    if ref.random_weights:
        console.print(modelio.RANDOM_WEIGHTS_NOTE)
    return ref


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
        runs: Annotated[Path, typer.Option(help="Folder that holds run folders.")] = Path("runs"),
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override: KEY=VALUE or STAGE.FIELD=VALUE.")] = None):
    """Run a recipe's stages in order into runs/<name>/, skipping stages already done with the same config."""
    from .recipe import load_recipe
    from .runner import run_recipe

    parsed = load_recipe(recipe, set_ or [])
    try:
        run_dir = run_recipe(parsed, runs, console)
    except Exception:
        if (runs / parsed.name).is_dir():
            _report_anyway(runs / parsed.name)  # the page shows which stage failed, and what the others got
        raise
    console.print(f"run folder: {run_dir}")
    _print_report(run_dir, images=True)


def _print_report(run_dir: Path, images: bool) -> None:
    from .report import write_report

    html, markdown = write_report(run_dir, images, log=console.print)
    console.print(f"report: {html}  (Markdown: {markdown})")


def _report_anyway(run_dir: Path) -> None:
    try:
        _print_report(run_dir, images=False)
    except Exception as err:  # the stage's own error is the one to show
        console.print(f"[dim]no report: {err}[/dim]")


@app.command()
def report(run: Annotated[Path, typer.Argument(help="A run folder (runs/<recipe name>).")],
           images: Annotated[bool, typer.Option(help="Sample the teacher-vs-students image grid.")] = True):
    """One self-contained HTML page (and Markdown) of a run: stages, images, quality, parity, latency, op coverage."""
    _print_report(run, images)


@app.command()
def sweep(recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
          vary: Annotated[Optional[list[str]], typer.Option(
              help="STAGE.FIELD=V1,V2,... (repeat for a grid), e.g. prune.target=params=0.5,params=0.7.")] = None,
          runs: Annotated[Path, typer.Option(help="Folder that holds run folders.")] = Path("runs"),
          set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override for every variant: KEY=VALUE.")] = None,
          setting: Annotated[Optional[str], typer.Option(
              help="The evaluate setting that is 'quality', e.g. validation/steps=25/guidance=7.5 (default: its first).")] = None):
    """Run a recipe once per value, then plot quality against latency and parameters with the Pareto frontier."""
    from .sweep import run_sweep

    sweep_dir = run_sweep(recipe, vary or [], runs, set_ or [], setting, console)
    rows = json.loads((sweep_dir / "sweep.json").read_text())["variants"]
    table = Table(title=f"sweep {sweep_dir.name} (★: on the quality-latency frontier)")
    for column in ("variant", "status", "quality", "latency ms", "UNet params (M)"):
        table.add_column(column, justify="left" if column in ("variant", "status") else "right")
    for r in rows:
        table.add_row(("★ " if r["front_latency"] else "") + r["variant"], r["status"],
                      "–" if r["quality"] is None else f"{r['quality']:.4f}",
                      "–" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}",
                      f"{r['unet_params'] / 1e6:.3f}" if r["unet_params"] else "–")
    console.print(table)
    console.print(f"sweep folder: {sweep_dir}  (sweep.html, sweep.csv, sweep.json, pareto.png)")


@app.command("inspect")
def inspect_(model: ModelArg,
             resolution: Annotated[Optional[int], typer.Option(help="Image size in pixels (default: the model's own).")] = None,
             json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the counts as JSON here ('-' for stdout).")] = None,
             allow_pickle: AllowPickle = False):
    """Parameters and MACs per block: conv+linear (BK-SDM's convention) and attention matmuls apart."""
    from ..devices.macs import census_model

    censuses = census_model(_open(model, allow_pickle), resolution)
    if json_out == Path("-"):
        print(json.dumps([c.to_json() for c in censuses], indent=2))
        return
    for census in censuses:
        unit, scale = ("G", 1e9) if census.macs >= 1e9 else ("M", 1e6)
        table = Table(title=f"{census.component}  input {tuple(census.input_shape)}")
        for column in ("block", "params (M)", f"conv+linear MACs ({unit})", f"attention MACs ({unit})"):
            table.add_column(column, justify="left" if column == "block" else "right", no_wrap=True)
        for name, block in census.blocks.items():
            table.add_row(name, f"{block.params / 1e6:.3f}", f"{block.macs / scale:.3f}", f"{block.attention_macs / scale:.3f}")
        table.add_row("total", f"{census.params / 1e6:.2f}", f"{census.macs / scale:.2f}",
                      f"{census.attention_macs / scale:.2f}", style="bold")
        console.print(table)
    if json_out:
        json_out.write_text(json.dumps([c.to_json() for c in censuses], indent=2))


@app.command()
def prune(model: ModelArg,
          out: Annotated[Path, typer.Option(help="Folder for the pruned model (diffusers format).")],
          preset: Annotated[Optional[str], typer.Option(help="BK-SDM preset: bk-base, bk-small or bk-tiny.")] = None,
          remove: Annotated[Optional[str], typer.Option(
              help="Comma-separated units to remove, named as a --target run's report names them "
                   "(e.g. mid_block,down_blocks.2.attentions), after --preset when given.")] = None,
          target: Annotated[Optional[str], typer.Option(
              help="One-shot pruning to a target: params=R, macs=R or latency=R keeps at most R of the teacher's.")] = None,
          device: Annotated[str, typer.Option(help="With latency=R: the device profile the latency is judged on.")] = "host-cpu",
          latency_table: Annotated[Optional[Path], typer.Option(
              help="With latency=R: a saved lookup table (latency_table.json of an earlier run) instead of timing again.")] = None,
          runtime: Annotated[str, typer.Option(
              help="With latency=R on host-cpu: time the table's layers in torch (eager), onnxruntime or executorch "
                   "(XNNPACK).")] = "torch",
          criterion: Annotated[str, typer.Option(help="With --target: distortion, magnitude or random.")] = "distortion",
          prompt: Annotated[Optional[list[str]], typer.Option(
              help="Calibration prompt for the distortion criterion; repeat for several (default: 16 built in).")] = None,
          steps: Annotated[int, typer.Option(min=1, help="Sampling steps of each calibration trajectory.")] = 10,
          guidance: Annotated[float, typer.Option(min=0.0)] = 7.5,
          seed: Annotated[int, typer.Option(help="Seed of the random criterion.")] = 0,
          allow_pickle: AllowPickle = False):
    """Remove UNet blocks (a BK-SDM preset, named units, or one-shot to a target) and save a model stock diffusers loads."""
    from ..compress.oneshot import parse_target
    from ..compress.prune import prune_preset, prune_to_target, prune_units

    if (preset is None and remove is None) == (target is None):
        raise UserError("prune needs --preset bk-base|bk-small|bk-tiny and/or --remove UNIT,..., or else "
                        "--target params=R|macs=R|latency=R")
    ref = _open(model, allow_pickle)
    if remove is not None:
        report = prune_units(ref, [n.strip() for n in remove.split(",") if n.strip()], out, preset)
        title = f"{preset or 'teacher'} without {len(report['removed_units'])} units: removed {len(report['removed'])} layers"
    elif preset is not None:
        report = prune_preset(ref, preset, out)
        title = f"{preset}: removed {len(report['removed'])} layers"
    else:
        report = prune_to_target(ref, parse_target(target), out, criterion, prompt, steps, guidance, seed,
                                 device=device, table_file=latency_table, runtime=runtime)
        title = f"{target} by {criterion}: removed {len(report['removed_units'])} units"
        units = Table(title="units (score: relative output error when removed alone)")
        for column in ("unit", "score", "saves", "removed"):
            units.add_column(column, justify="left" if column == "unit" else "right")
        for unit in sorted(report["units"], key=lambda u: u["score"]):
            units.add_row(unit["name"], f"{unit['score']:.4g}", f"{unit['saves']:.1%}",
                          str(unit["removed_order"] or ""))
        console.print(units)
    table = Table(title=title)
    for column in ("", "before", "after", "ratio"):
        table.add_column(column, justify="right" if column else "left")
    for label, key, scale in (("params (M)", "params", 1e6), ("conv+linear MACs (G)", "macs", 1e9),
                              ("attention MACs (G)", "attention_macs", 1e9)):
        before, after = report[f"{key}_before"], report[f"{key}_after"]
        table.add_row(label, f"{before / scale:.3f}", f"{after / scale:.3f}", f"{after / max(before, 1):.3f}")
    console.print(table)
    if "latency_ms_before" in report:
        console.print(f"predicted latency on {report['device']} ({report['runtime']}): {report['latency_ms_before']:.1f} → "
                      f"{report['latency_ms_after']:.1f} ms (lookup table: {out / 'latency_table.json'})")
    console.print("removed: " + ", ".join(report["removed"]))
    console.print(f"pruned model: {out}  (report: {out / 'prune_report.json'})")


@app.command()
def generate(prompt: Annotated[list[str], typer.Option(help="Prompt; repeat for several.")],
             model: Annotated[str, typer.Option(help="Pipeline folder or 'default'; an export folder with --backend.")] = "default",
             steps: Annotated[int, typer.Option(min=1)] = 25,
             guidance: Annotated[float, typer.Option(min=0.0)] = 7.5,
             seed: int = 0,
             out: Annotated[Path, typer.Option(help="Output folder for PNGs.")] = Path("generated"),
             grid: Annotated[bool, typer.Option(help="Also write a labelled grid.png.")] = False,
             backend: Annotated[str, typer.Option(help="torch, or onnx / executorch to run an export's files.")] = "torch",
             etdump: Annotated[Optional[Path], typer.Option(
                 help="With --backend executorch: write each component's ETDump (per-op timings) here.")] = None,
             allow_pickle: AllowPickle = False):
    """Text → image PNGs (prompt i uses seed + i). onnx runs on onnxruntime and numpy alone, without torch."""
    from .generate import labelled_grid, save_images

    if backend == "torch":
        from ..compress.saved import load_shipped_pipeline
        from .generate import generate_images

        if etdump:
            from ..export.runtime import ETDUMP_NEEDS_EXECUTORCH

            raise UserError(ETDUMP_NEEDS_EXECUTORCH)
        pipe = load_shipped_pipeline(_open(model, allow_pickle))
        images = generate_images(pipe, prompt, steps, guidance, seed)
    else:
        from ..export.runtime import ExportedPipeline

        exported = ExportedPipeline(Path(model), backend, etdump=etdump is not None)
        images = exported(prompt, steps, guidance, seed)
        if etdump:
            for path in exported.write_etdumps(etdump):
                console.print(f"ETDump: {path}")
    for path in save_images(images, prompt, out, seed):
        console.print(str(path))
    if grid:
        labelled_grid(images, prompt, title=f"{model}: {steps} steps, guidance {guidance:g}").save(out / "grid.png")
        console.print(str(out / "grid.png"))


@app.command()
def evaluate(model: ModelArg = "default",
             split: Annotated[str, typer.Option(help="Prompts from 'validation', 'train' or 'both'.")] = "validation",
             prompts: Annotated[int, typer.Option(help="Number of seeded prompts per split.")] = 256,
             steps: Annotated[str, typer.Option(help="Comma-separated step counts.")] = "25",
             guidance: Annotated[str, typer.Option(help="Comma-separated guidance scales.")] = "7.5",
             judge: Annotated[str, typer.Option(help="'default' or a local CLIPModel folder.")] = "default",
             seed: int = 0,
             json_out: Annotated[Optional[Path], typer.Option("--json", help="Write scores as JSON here.")] = None):
    """Judge scores: prompt score, Fréchet distance and caption retrieval, with the real images as ceiling."""
    from pydantic import ValidationError

    from ..compress.saved import load_shipped_pipeline
    from .evaluate import load_judge
    from .stages import EvaluateConfig, evaluate_model

    try:
        config = EvaluateConfig(split=split, prompts=prompts, judge=judge,
                                steps=[int(s) for s in steps.split(",")],
                                guidance=[float(g) for g in guidance.split(",")])
    except (ValueError, ValidationError) as err:
        raise UserError(f"evaluate: {str(err).splitlines()[0]}") from None
    pipe = load_shipped_pipeline(_open(model))
    results = evaluate_model(pipe, load_judge(config.judge), config, seed, log=console.print)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


@app.command("export")
def export_(model: ModelArg,
            out: Annotated[Path, typer.Option(help="Folder that gets one subfolder per format.")],
            to: Annotated[str, typer.Option(help="Comma-separated formats: onnx, executorch, coreml.")] = "onnx",
            precision: Annotated[Optional[str], typer.Option(help="fp32, fp16 or int8 (default: fp32; Core ML fp16; ExecuTorch int8 for a model `quantize` made).")] = None,
            components: Annotated[Optional[str], typer.Option(help="Comma-separated subset of text_encoder (SDXL: both encoders), unet, vae_encoder, vae_decoder.")] = None,
            executorch_backends: Annotated[str, typer.Option(help="Comma-separated ExecuTorch partitioners: xnnpack, coreml, mps, vulkan, qnn.")] = "xnnpack",
            max_abs: Annotated[float, typer.Option(help="fp32 per-component max-abs error limit.")] = 1e-3,
            min_psnr: Annotated[Optional[float], typer.Option(help="End-to-end image PSNR limit in dB (default by precision: 40 fp32, 30 fp16, 25 int8).")] = None,
            workers: Annotated[int, typer.Option(help="Processes exporting components side by side (each loads the model).")] = 1,
            chunk_unet: Annotated[bool, typer.Option(help="Core ML: the UNet as UnetChunk1 + UnetChunk2, as Swift loads large UNets on iOS.")] = False,
            coreml_attention: Annotated[str, typer.Option(help="Core ML UNet attention: original, split_einsum (Apple's Neural Engine layout) or split_einsum_v2 (its queries in chunks).")] = "original",
            guidance: Annotated[float, typer.Option(help="Guidance of the image check; a guidance-distilled student's Core ML UNet has it folded in.")] = 7.5,
            unet_batch_one: Annotated[bool, typer.Option(help="Core ML: a batch-one UNet, called twice per guided step (Apple's --unet-batch-one).")] = False,
            allow_pickle: AllowPickle = False):
    """Export every component to ONNX (optimum's layout), ExecuTorch (.pte) or Core ML (Swift layout), checked against PyTorch."""
    from pydantic import ValidationError

    from ..export.exporter import ExportConfig, export_model
    from ..export.parity import ParityThresholds

    fields = {"to": to.split(","), "precision": precision, "executorch_backends": executorch_backends.split(","),
              "workers": workers, "chunk_unet": chunk_unet, "coreml_attention": coreml_attention, "guidance": guidance,
              "unet_batch_one": unet_batch_one}
    if components:
        fields["components"] = components.split(",")
    limits = {"max_abs_fp32": max_abs}
    if min_psnr is not None:
        limits.update(psnr_fp32=min_psnr, psnr_fp16=min_psnr, psnr_int8=min_psnr)
    try:
        config = ExportConfig(**fields, thresholds=ParityThresholds(**limits))
    except ValidationError as err:
        raise UserError(f"export: {_first_error(err)}") from None
    export_model(_open(model, allow_pickle), config, out, log=console.print)
    console.print(f"exported: {out}  (report: {out / 'export_report.json'})")


@distill_app.command("kd")
def kd(student: Annotated[str, typer.Argument(help="The pruned model (pipeline or UNet folder) to train.")],
       out: Annotated[Path, typer.Option(help="Folder for the distilled pipeline, its log and checkpoint.")],
       teacher: Annotated[Optional[str], typer.Option(
           help="Teacher pipeline folder or 'default' (default: the teacher named in the student's prune report).")] = None,
       steps: int = 300, batch: int = 64, lr: float = 1e-4, warmup_steps: int = 0,
       features: Annotated[str, typer.Option(help="Feature KD places: blocks, self-attention or none.")] = "blocks",
       normalize: Annotated[bool, typer.Option(help="LAPTOP-Diff's normalised feature terms.")] = True,
       task_weight: float = 1.0, output_weight: float = 1.0, feature_weight: float = 1.0,
       data: Annotated[str, typer.Option(help="'openmoji' or a folder of images with metadata.jsonl.")] = "openmoji",
       captions: Annotated[Optional[Path], typer.Option(
           help="Data-free: a captions file (one per line); the teacher's samples become the data.")] = None,
       teacher_steps: Annotated[int, typer.Option(help="Data-free: sampling steps of the teacher.")] = 25,
       teacher_guidance: Annotated[float, typer.Option(help="Data-free: guidance of the teacher.")] = 7.5,
       ema_decay: float = 0.0,
       gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in backward: less memory.")] = False,
       mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA), no, bf16 or fp16.")] = "auto",
       checkpoint_every: int = 100, seed: int = 0):
    """Block-level knowledge distillation: task + output KD + feature KD from the teacher. Resumes from OUT."""
    from pydantic import ValidationError

    from ..distill.kd import KDConfig, distill_kd, resolve_teacher

    try:
        config = KDConfig(steps=steps, batch=batch, lr=lr, warmup_steps=warmup_steps, features=features,
                          normalize=normalize, task_weight=task_weight, output_weight=output_weight,
                          feature_weight=feature_weight, data=data, captions=str(captions) if captions else None,
                          teacher_steps=teacher_steps, teacher_guidance=teacher_guidance, ema_decay=ema_decay,
                          gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
                          checkpoint_every=checkpoint_every, seed=seed)
    except ValidationError as err:
        raise UserError(f"distill kd: {_first_error(err)}") from None
    student_ref = _open(student)
    report = distill_kd(resolve_teacher(student_ref, teacher), student_ref, config, out, log=console.print)
    table = Table(title=f"KD, {config.steps} steps: last logged terms")
    table.add_column("term")
    table.add_column("value", justify="right")
    for key, value in report["final"].items():
        if key not in ("step", "lr"):
            table.add_row(key, f"{value:.4g}")
    console.print(table)
    console.print(f"distilled pipeline: {out}  (report: {out / 'kd_report.json'}, log: {out / 'log.csv'})")


@distill_app.command("vae")
def vae(model: ModelArg,
        out: Annotated[Path, typer.Option(help="Folder for the pipeline with the slim VAE, its log and checkpoint.")],
        width: Annotated[float, typer.Option(help="Share of the channels each VAE stage keeps.")] = 0.5,
        layers_per_block: Annotated[Optional[int], typer.Option(help="Resnets per stage (default: the teacher's).")] = None,
        steps: int = 1000, batch: int = 32, lr: float = 5e-4,
        data: Annotated[str, typer.Option(help="'openmoji' or a folder of images with metadata.jsonl.")] = "openmoji",
        mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA), no, bf16 or fp16.")] = "auto",
        checkpoint_every: int = 200, seed: int = 0):
    """Distil a slim VAE (decoder on the teacher's latents, encoder on its posterior); the UNet is untouched. Resumes."""
    from pydantic import ValidationError

    from ..distill.vae import SlimVAEConfig, distill_vae

    try:
        config = SlimVAEConfig(width=width, layers_per_block=layers_per_block, steps=steps, batch=batch, lr=lr,
                               data=data, mixed_precision=mixed_precision, checkpoint_every=checkpoint_every, seed=seed)
    except ValidationError as err:
        raise UserError(f"distill vae: {_first_error(err)}") from None
    report = distill_vae(_open(model), config, out, log=console.print)
    table = Table(title="slim VAE")
    for column in ("", "before", "after", "ratio"):
        table.add_column(column, justify="right" if column else "left")
    for half in ("vae_decoder", "vae_encoder"):
        for what, scale in (("params (M)", 1e6), ("macs (G)", 1e9)):
            key = what.split()[0]
            before, after = report[f"{half}_{key}_before"], report[f"{half}_{key}_after"]
            table.add_row(f"{half} {what}", f"{before / scale:.3f}", f"{after / scale:.3f}", f"{after / before:.3f}")
    console.print(table)
    console.print(f"decoder vs teacher's on its latents: {report['decoder_psnr_db']} dB; reconstruction of held-out "
                  f"images: slim {report['student_recon_psnr_db']} dB, teacher {report['teacher_recon_psnr_db']} dB")
    console.print(f"pipeline with the slim VAE: {out}  (report: {out / 'vae_report.json'})")


@distill_app.command("steps")
def steps_(model: ModelArg,
           out: Annotated[Path, typer.Option(help="Folder for the few-step pipeline, its log and checkpoints.")],
           method: Annotated[str, typer.Option(help="lcm, progressive or dmd (distribution matching, 1 step).")] = "lcm",
           steps: Annotated[int, typer.Option(help="Optimiser steps (per round for progressive).")] = 500,
           batch: int = 32, lr: float = 1e-4, warmup_steps: int = 0,
           guidance_min: Annotated[float, typer.Option(help="Lowest guidance scale distilled into the student.")] = 3.0,
           guidance_max: Annotated[float, typer.Option(help="Highest guidance scale distilled into the student.")] = 9.0,
           solver_steps: Annotated[int, typer.Option(help="lcm: the teacher's DDIM grid.")] = 50,
           loss: Annotated[str, typer.Option(help="lcm: huber or l2.")] = "huber",
           target_decay: Annotated[float, typer.Option(help="lcm: EMA rate of the target network.")] = 0.95,
           start_steps: Annotated[int, typer.Option(help="progressive: the teacher's steps in round 1.")] = 16,
           final_steps: Annotated[int, typer.Option(help="progressive: the last student's steps.")] = 1,
           prediction: Annotated[str, typer.Option(
               help="progressive: the student's output (teacher, epsilon, v_prediction, sample).")] = "teacher",
           fake_updates: Annotated[int, typer.Option(
               help="dmd: fake-score updates per generator update (DMD2's two time-scale rule uses 5).")] = 1,
           regression_weight: Annotated[float, typer.Option(
               help="dmd: weight of the regression to the teacher's samples; 0: distribution matching only.")] = 1.0,
           regression_pairs: Annotated[int, typer.Option(help="dmd: prompts the guided teacher samples once.")] = 1024,
           data: Annotated[str, typer.Option(help="'openmoji' or a folder of images with metadata.jsonl.")] = "openmoji",
           captions: Annotated[Optional[Path], typer.Option(
               help="Data-free: a captions file (one per line); the teacher's samples become the data.")] = None,
           mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA), no, bf16 or fp16.")] = "auto",
           checkpoint_every: int = 100, seed: int = 0):
    """Distil MODEL to a 1–4 step student with guidance in its weights (LCM, progressive or DMD). Resumes from OUT."""
    from pydantic import ValidationError

    from ..distill.steps import StepDistillConfig, distill_steps

    try:
        config = StepDistillConfig(method=method, steps=steps, batch=batch, lr=lr, warmup_steps=warmup_steps,
                                   guidance_min=guidance_min, guidance_max=guidance_max, solver_steps=solver_steps,
                                   loss=loss, target_decay=target_decay, start_steps=start_steps,
                                   final_steps=final_steps, prediction=prediction, fake_updates=fake_updates,
                                   regression_weight=regression_weight, regression_pairs=regression_pairs, data=data,
                                   captions=str(captions) if captions else None, mixed_precision=mixed_precision,
                                   checkpoint_every=checkpoint_every, seed=seed)
    except ValidationError as err:
        raise UserError(f"distill steps: {_first_error(err)}") from None
    report = distill_steps(_open(model), config, out, log=console.print)
    table = Table(title=f"{method}: training")
    for column in ("student steps", "wall s", "final loss"):
        table.add_column(column, justify="right")
    for done in report["rounds"]:
        table.add_row(str(done["student_steps"]), f"{done['wall_time_s']:.1f}", f"{done['final'].get('loss', float('nan')):.4g}")
    console.print(table)
    sample = "/".join(str(n) for n in report["sample_steps"])
    console.print(f"few-step pipeline: {out}  (sample it in {sample} steps with stock diffusers; "
                  f"report: {out / 'steps_report.json'})")


@app.command()
def quantize(model: ModelArg,
             out: Annotated[Path, typer.Option(help="Folder for the quantized pipeline, its log and checkpoints.")],
             backend: Annotated[str, typer.Option(
                 help="xnnpack (ExecuTorch), onnx-int8 (onnxruntime QDQ), coreml-w8a8, coreml-palette4, coreml-palette6 "
                      "(Core ML), brevitas-w4a8 (ONNX QCDQ, research).")] = "xnnpack",
             qat_steps: Annotated[int, typer.Option(help="Quantization-aware training steps; 0: post-training only.")] = 0,
             feature_weight: Annotated[float, typer.Option(
                 help="QAT: weight of the normalised stage-output KD terms beside the output term; 0: output only.")] = 0.0,
             layers: Annotated[str, typer.Option(help="conv+linear or linear.")] = "conv+linear",
             attention: Annotated[bool, typer.Option(
                 help="Also int8 the attention matmuls' operands (QKᵀ, AV): onnx-int8, coreml-w8a8.")] = False,
             keep: Annotated[str, typer.Option(help="Comma-separated UNet modules kept fp32.")] = "conv_in,conv_out,time_embedding",
             keep_sensitive: Annotated[int, typer.Option(
                 help="Also keep fp32 the N layers quantization hurts most (measured one by one).")] = 0,
             batch: int = 8, lr: float = 1e-5,
             prompts: Annotated[int, typer.Option(help="Training captions whose trajectories calibrate and train.")] = 64,
             sampling_steps: Annotated[int, typer.Option(help="Steps of each recorded trajectory.")] = 4,
             guidance: float = 7.5, checkpoint_every: int = 100, seed: int = 0):
    """int8, palettized or W4A8 UNet for an export target, calibrated on MODEL's own trajectories, optionally trained (QAT). Resumes."""
    from pydantic import ValidationError

    from ..compress.backends import BACKENDS
    from ..compress.quantize import QuantizeConfig, quantize as run_quantize

    try:
        config = QuantizeConfig(backend=backend, qat_steps=qat_steps, feature_weight=feature_weight, layers=layers,
                                attention=attention,
                                keep=[k for k in keep.split(",") if k], keep_sensitive=keep_sensitive, batch=batch, lr=lr, prompts=prompts,
                                sampling_steps=sampling_steps, guidance=guidance, checkpoint_every=checkpoint_every,
                                seed=seed)
    except ValidationError as err:
        raise UserError(f"quantize: {_first_error(err)}") from None
    report = run_quantize(_open(model), config, out, log=console.print)
    console.print(f"quantized pipeline: {out}  (UNet relative error {report['unet_relative_error']:.4f}; "
                  f"{BACKENDS[config.backend].ships}; report: {out / 'quantize_report.json'})")


def _first_error(err) -> str:
    first = err.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


@zoo_app.command("train-default")
def train_default(out: Annotated[Path, typer.Option(help="Where the pipeline folder goes.")] = Path("default-model"),
                  quick: Annotated[bool, typer.Option(help="Seconds-long run on 64 images (tests, smoke checks).")] = False,
                  seed: int = 0):
    """Train the embedded default from its seed: tokenizer, VAE, then UNet with its text encoder. Resumes."""
    from ..distill.zoo import DefaultTrainConfig
    from ..distill.zoo import train_default as train

    config = DefaultTrainConfig.quick(seed) if quick else DefaultTrainConfig(seed=seed)
    console.print(f"pipeline folder: {train(out, config)}")


@zoo_app.command("train-judge")
def train_judge(out: Annotated[Path, typer.Option(help="Where the judge folder goes.")] = Path("judge"),
                steps: int = 500, quick: bool = False):
    """Train the contrastive judge (separately from the teacher) on the training split. Resumes."""
    from ..distill.judge import train_judge as train

    train(out, steps=4 if quick else steps, batch=32 if quick else 128, subset=64 if quick else None)
    console.print(f"judge folder: {out}")


@app.command("profile")
def profile_(target: Annotated[Path, typer.Argument(help="An export folder (or one exported file); a model folder for --backend torch.")],
             backend: Annotated[str, typer.Option(help="onnxruntime, executorch, coreml (macOS) or torch.")] = "onnxruntime",
             device: Annotated[str, typer.Option(help="Device profile: host-cpu, host-gpu, or a phone (over adb / a Mac).")] = "host-cpu",
             components: Annotated[str, typer.Option(help="Comma-separated: text_encoder, text_encoder_2 (SDXL), unet, vae_encoder, vae_decoder.")] = "unet",
             runs: int = 20, warmup: int = 3,
             batch: Annotated[Optional[int], typer.Option(help="Batch per call (default: what the pipeline feeds).")] = None,
             threads: Annotated[Optional[int], typer.Option(help="Runtime threads (default: the runtime's).")] = None,
             runner: Annotated[Optional[Path], typer.Option(help="Phone: the runtime's benchmark binary to push.")] = None,
             out: Annotated[Optional[Path], typer.Option(help="Where profile.json and profile.png go.")] = None):
    """Time exported components on a device: median/p10/p90, peak memory, size, per-op breakdown, op coverage."""
    from pydantic import ValidationError

    from ..devices.profile import ProfileConfig, profile, write_report

    try:
        config = ProfileConfig(backend=backend, device=device, components=components.split(","), runs=runs,
                               warmup=warmup, batch=batch, threads=threads, runner=runner)
    except ValidationError as err:
        raise UserError(f"profile: {_first_error(err)}") from None
    report = profile(target, config, log=console.print)
    _print_profile(report)
    out = out or Path(f"profile-{backend}-{device}")
    written = write_report(report, out)
    console.print(f"report: {written[0]}  chart: {written[1]}")


def _print_profile(report: dict) -> None:
    table = Table(title=f"{report['backend']} on {report['device']} ({report['device_description']})")
    for column in ("component", "inputs", "median ms", "p10 ms", "p90 ms", "peak memory MB", "file MB",
                   "roofline efficiency"):
        table.add_column(column, justify="left" if column in ("component", "inputs") else "right")
    for m in report["measurements"]:
        shapes = " ".join("×".join(map(str, s)) or "()" for s in m.get("inputs", {}).values())
        roof = m.get("roofline")
        peak = m.get("peak_memory_bytes")
        table.add_row(m["component"], shapes, f"{m['median_ms']:.2f}", f"{m.get('p10_ms', m['median_ms']):.2f}",
                      f"{m.get('p90_ms', m['median_ms']):.2f}", f"{peak / 1e6:.1f}" if peak is not None else "n/a",
                      f"{m['file_bytes'] / 1e6:.1f}", f"{roof['efficiency']:.1%}" if roof else "n/a")
    console.print(table)
    for m in report["measurements"]:
        ops = Table(title=f"{m['component']}: top operators (runtime profiler)")
        for column in ("op", "calls", "ms", "share"):
            ops.add_column(column, justify="left" if column == "op" else "right")
        for op in m.get("ops", [])[:10]:
            name = op["op"] if op.get("delegated", True) else f"{op['op']} (fallback)"
            ops.add_row(name, str(op["calls"]), f"{op['ms']:.3f}", f"{op['share']:.1%}")
        console.print(ops)
        coverage = m.get("coverage", {})
        if coverage.get("nodes"):
            console.print(f"{coverage['kind']}: " + ", ".join(f"{k}: {v} calls" for k, v in coverage["nodes"].items()))


@app.command()
def estimate(model: ModelArg,
             device: Annotated[str, typer.Option(help="Device profile (see `pocketdiff devices list`).")],
             components: Annotated[str, typer.Option(help="Comma-separated components.")] = "unet",
             unit: Annotated[Optional[str], typer.Option(help="npu, gpu or cpu (default: the profile's anchor unit).")] = None,
             dtype: Annotated[Optional[str], typer.Option(help="fp32, fp16 or int8 (default: the anchor's).")] = None,
             resolution: Annotated[Optional[int], typer.Option(help="Image size in pixels (default: the model's).")] = None,
             batch: Annotated[Optional[int], typer.Option(help="UNet batch (default: 2 guided, 1 for a guidance student).")] = None,
             json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the estimates here.")] = None):
    """Latency estimate on a device not at hand: a roofline per op, scaled by the device's calibrated fraction."""
    from ..devices.profiles import load_profile
    from ..devices.roofline import estimate_model

    from .. import modelio

    ref = _open(model)
    latent = None
    if resolution:
        factor = modelio.vae_scale_factor(ref)
        if resolution % factor:
            raise UserError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
        latent = resolution // factor
    profile = load_profile(device)
    estimates = estimate_model(ref, profile, components.split(","), unit, dtype, latent, batch)
    table = Table(title=f"{ref.path.name} on {profile.name} ({profile.device}){' — estimates' if profile.estimate else ''}")
    for column in ("component", "unit/dtype", "GFLOP", "MB moved", "ideal ms", "fraction", "estimate ms", "top blocks"):
        table.add_column(column, justify="left" if column in ("component", "top blocks", "unit/dtype") else "right")
    for name, e in estimates.items():
        blocks = ", ".join(f"{b} {ms:.1f}" for b, ms in sorted(e.blocks_ms.items(), key=lambda kv: -kv[1])[:3])
        table.add_row(name, f"{e.unit}/{e.dtype}", f"{e.flops / 1e9:.2f}", f"{e.bytes / 1e6:.1f}", f"{e.ideal_ms:.2f}",
                      f"{e.achieved_fraction:.3f}" if e.achieved_fraction else "—",
                      f"{e.estimate_ms:.2f}" if e.estimate_ms else "—", blocks)
    console.print(table)
    console.print("fraction: " + next(iter(estimates.values())).calibration)
    if json_out:
        json_out.write_text(json.dumps({k: v.to_json() for k, v in estimates.items()}, indent=2))


@devices_app.command("list")
def devices_list():
    """Every device profile, with its peaks, bandwidth and calibration."""
    from ..devices.profiles import DeviceProfile, names, profile_path
    import yaml

    table = Table()
    for column in ("name", "device", "peaks (TOPS)", "GB/s", "reach", "calibration"):
        table.add_column(column)
    for name in names():
        p = DeviceProfile(**yaml.safe_load(profile_path(name).read_text()))
        peaks = "; ".join(f"{u} " + ", ".join(f"{d} {v:g}" for d, v in dt.items() if v) for u, dt in p.compute.items())
        cal = p.calibration
        table.add_row(p.name, p.device, peaks or "measured at first use",
                      f"{p.memory_bandwidth_gb_s:g}" if p.memory_bandwidth_gb_s else "measured",
                      p.reach, f"{cal.model} {cal.measured_ms:g} ms → {cal.achieved_fraction}" if cal else "—")
    console.print(table)


@devices_app.command("calibrate")
def devices_calibrate(write: Annotated[bool, typer.Option(help="Record the fractions in the YAML files.")] = False):
    """Each phone profile's achieved fraction of roofline peak, from its published anchor measurement."""
    from ..devices.profiles import load_profile, names, write_fraction
    from ..devices.roofline import calibrate

    for name in names():
        profile = load_profile(name) if not name.startswith("host") else None
        if profile is None or profile.calibration is None:
            continue
        fraction = calibrate(profile)
        recorded = profile.calibration.achieved_fraction
        console.print(f"{name}: {fraction:.4f} of roofline on {profile.calibration.model} "
                      f"({profile.calibration.measured_ms:g} ms measured); recorded {recorded}")
        if write:
            write_fraction(name, fraction)


@app.command("serve-demo")
def serve_demo(export: Annotated[Path, typer.Argument(help="An ONNX export of a few-step student (the folder holding onnx/, or onnx/ itself).")],
               port: Annotated[int, typer.Option(help="Port on localhost.")] = 8000,
               host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1"):
    """Serve the in-browser demo: type a prompt, get an image made on your own device by onnxruntime-web."""
    from .demo import make_server

    server = make_server(export, host, port)
    console.print(f"demo: http://{host}:{server.server_address[1]}/  (Ctrl-C stops it)")
    try:
        server.serve_forever()
    finally:
        server.server_close()


@app.callback()
def _version(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False):
    if version:
        console.print(pocketdiff.__version__)
        raise typer.Exit()


def main() -> None:
    """Entry point: user errors are one line on stderr and exit 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # click's usage errors arrive here in non-standalone mode
        if isinstance(err, _usage_errors()):
            err.show()
            sys.exit(2)
        raise


def _usage_errors() -> tuple[type, ...]:
    """Click's usage errors, and their copies in typer >= 0.29, which vendors click under its own names."""
    import click

    return (click.exceptions.ClickException, getattr(typer, "TyperException", click.exceptions.ClickException))


if __name__ == "__main__":  # `accelerate launch -m pocketdiff.apps.cli distill kd ...`
    main()
