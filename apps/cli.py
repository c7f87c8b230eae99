"""The `pocketdiff` command line: one command per stage, plus `run` for whole recipes.

A stage's command takes one option per field of the stage's config (`options.with_config`), with
the config's own help and defaults, so the command and the recipe stage cannot drift apart; the
tables it prints are in `tables.py`. Every user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

import pocketdiff

from ..errors import UserError
from . import tables
from .options import with_config

class StageGroup(TyperGroup):
    """A command group whose stage commands are built when first asked for: a stage's options come from its config,
    whose module may load torch, and `generate --backend onnx` runs without it."""

    stages: dict[str, tuple] = {}  # command name → (function, "module:Config")
    prefix = ""  # the group's own words in a stage's one-line errors ("distill kd: ...")

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.stages})

    def get_command(self, ctx, name: str):
        if name not in self.stages:
            return super().get_command(ctx, name)
        command, path = self.stages[name]
        module, attribute = path.split(":")
        config = getattr(importlib.import_module(module, __package__), attribute)
        single = typer.Typer()
        single.command(name)(with_config(config, self.prefix + name)(command))
        return typer.main.get_command(single)


def stage_group(prefix: str = "") -> type[StageGroup]:
    return type("StageGroup", (StageGroup,), {"stages": {}, "prefix": prefix})


def stage(group: typer.Typer, name: str, config: str):
    """Register `command` (its last parameter `config`) as `group`'s stage command `name`, its options made from
    `config` ("module:Class", relative to this package) when the command is first asked for."""
    def register(command):
        group.info.cls.stages[name] = (command, config)
        return command

    return register


app = typer.Typer(help="Compress text-to-image diffusion models and ship them to phones.", cls=stage_group(),
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
zoo_app = typer.Typer(help="Train pocketdiff's embedded default model.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
devices_app = typer.Typer(help="Device profiles: list them, calibrate phone profiles on their published anchors.",
                           no_args_is_help=True)
app.add_typer(devices_app, name="devices")
distill_app = typer.Typer(help="Distillation: block-level KD of a pruned UNet, a slim VAE or text encoder, few-step students.",
                          cls=stage_group("distill "), no_args_is_help=True)
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
              help="The evaluate setting that is 'quality', e.g. in_distribution/steps=25/guidance=7.5 (default: its first).")] = None):
    """Run a recipe once per value, then plot quality against latency and parameters with the Pareto frontier."""
    from .sweep import run_sweep

    sweep_dir = run_sweep(recipe, vary or [], runs, set_ or [], setting, console)
    rows = json.loads((sweep_dir / "sweep.json").read_text())["variants"]
    console.print(tables.sweep_variants(sweep_dir.name, rows))
    console.print(f"sweep folder: {sweep_dir}  (sweep.html, sweep.csv, sweep.json, pareto.png)")


@app.command("inspect")
def inspect_(model: ModelArg,
             resolution: Annotated[Optional[int], typer.Option(help="Image size in pixels (default: the model's own).")] = None,
             json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the counts as JSON here ('-' for stdout).")] = None,
             allow_pickle: AllowPickle = False):
    """Parameters and MACs per block: conv+linear (BK-SDM's convention) and attention matmuls apart."""
    from ..macs import census_model

    censuses = census_model(_open(model, allow_pickle), resolution)
    if json_out == Path("-"):
        print(json.dumps([c.to_json() for c in censuses], indent=2))
        return
    for census in censuses:
        console.print(tables.census(census))
    if json_out:
        json_out.write_text(json.dumps([c.to_json() for c in censuses], indent=2))


@stage(app, "prune", "..compress.prune:PruneConfig")
def prune(model: ModelArg,
          out: Annotated[Path, typer.Option(help="Folder for the pruned model (diffusers format).")],
          allow_pickle: AllowPickle = False, *, config):
    """Remove UNet blocks (a BK-SDM preset, named units, or one-shot to a target) and save a model stock diffusers loads."""
    from ..compress.prune import prune as run_prune
    from ..devices.lookup import table_for

    ref = _open(model, allow_pickle)
    report = run_prune(ref, config, out, table_for(ref, config))
    if config.remove:
        title = (f"{config.preset or 'teacher'} without {len(report['removed_units'])} units: "
                 f"removed {len(report['removed'])} layers")
    elif config.preset:
        title = f"{config.preset}: removed {len(report['removed'])} layers"
    else:
        title = f"{config.target} by {config.criterion}: removed {len(report['removed_units'])} units"
        console.print(tables.pruning_units(report))
    console.print(tables.before_after(title, report))
    if "latency_ms_before" in report:
        console.print(f"predicted latency on {report['device']} ({report['runtime']}): {report['latency_ms_before']:.1f} → "
                      f"{report['latency_ms_after']:.1f} ms (lookup table: {out / 'latency_table.json'})")
    console.print("removed: " + ", ".join(report["removed"]))
    console.print(f"pruned model: {out}  (report: {out / 'prune_report.json'})")


@stage(app, "generate", ".configs:GenerateConfig")
def generate(model: Annotated[str, typer.Option(help="Pipeline folder or 'default'; an export folder with --backend.")] = "default",
             seed: int = 0,
             out: Annotated[Path, typer.Option(help="Output folder for PNGs.")] = Path("generated"),
             grid: Annotated[bool, typer.Option(help="Also write a labelled grid.png.")] = False,
             backend: Annotated[str, typer.Option(help="torch, or onnx / executorch to run an export's files.")] = "torch",
             etdump: Annotated[Optional[Path], typer.Option(
                 help="With --backend executorch: write each component's ETDump (per-op timings) here.")] = None,
             allow_pickle: AllowPickle = False, *, config):
    """Text → image PNGs (prompt i uses seed + i). onnx runs on onnxruntime and numpy alone, without torch."""
    from .generate import labelled_grid, save_images

    prompts, steps, guidance = config.prompts, config.steps, config.guidance
    if backend == "torch":
        from ..compress.saved import load_shipped_pipeline
        from .generate import generate_images

        if etdump:
            from ..export.runtime import ETDUMP_NEEDS_EXECUTORCH

            raise UserError(ETDUMP_NEEDS_EXECUTORCH)
        pipe = load_shipped_pipeline(_open(model, allow_pickle))
        images = generate_images(pipe, prompts, steps, guidance, seed)
    else:
        from ..export.runtime import ExportedPipeline

        exported = ExportedPipeline(Path(model), backend, etdump=etdump is not None)
        images = exported(prompts, steps, guidance, seed)
        if etdump:
            for path in exported.write_etdumps(etdump):
                console.print(f"ETDump: {path}")
    for path in save_images(images, prompts, out, seed):
        console.print(str(path))
    if grid:
        labelled_grid(images, prompts, title=f"{model}: {steps} steps, guidance {guidance:g}").save(out / "grid.png")
        console.print(str(out / "grid.png"))


@stage(app, "evaluate", ".configs:EvaluateConfig")
def evaluate(model: ModelArg = "default", seed: int = 0,
             json_out: Annotated[Optional[Path], typer.Option("--json", help="Write scores as JSON here.")] = None,
             *, config):
    """GenEval-style scores per prompt family and overall, and the Fréchet distance, with the reference renders as ceiling."""
    from ..compress.saved import load_shipped_pipeline
    from .evaluate import load_judge
    from .stages import evaluate_model

    pipe = load_shipped_pipeline(_open(model))
    results = evaluate_model(pipe, load_judge(config.judge), config, seed, log=console.print)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


@stage(app, "export", "..export.exporter:ExportConfig")
def export_(model: ModelArg,
            out: Annotated[Path, typer.Option(help="Folder that gets one subfolder per format.")],
            allow_pickle: AllowPickle = False, *, config):
    """Export every component to ONNX (optimum's layout), ExecuTorch (.pte) or Core ML (Swift layout), checked against PyTorch."""
    from ..export.exporter import export_model

    export_model(_open(model, allow_pickle), config, out, log=console.print)
    console.print(f"exported: {out}  (report: {out / 'export_report.json'})")


@stage(distill_app, "kd", ".stages:KDStageConfig")
def kd(student: Annotated[str, typer.Argument(help="The pruned model (pipeline or UNet folder) to train.")],
       out: Annotated[Path, typer.Option(help="Folder for the distilled pipeline, its log and checkpoint.")],
       *, config):
    """Block-level knowledge distillation: task + output KD + feature KD from the teacher. Resumes from OUT."""
    from ..distill.kd import KDConfig, distill_kd, resolve_teacher

    student_ref = _open(student)
    report = distill_kd(resolve_teacher(student_ref, config.teacher), student_ref,
                        KDConfig(**config.model_dump(exclude={"teacher"})), out, log=console.print)
    console.print(tables.last_terms(f"KD, {config.steps} steps: last logged terms", report["final"]))
    console.print(f"distilled pipeline: {out}  (report: {out / 'kd_report.json'}, log: {out / 'log.csv'})")


@stage(distill_app, "vae", "..distill.vae:SlimVAEConfig")
def vae(model: ModelArg,
        out: Annotated[Path, typer.Option(help="Folder for the pipeline with the slim VAE, its log and checkpoint.")],
        *, config):
    """Distil a slim VAE (decoder on the teacher's latents, encoder on its posterior); the UNet is untouched. Resumes."""
    from ..distill.vae import distill_vae

    report = distill_vae(_open(model), config, out, log=console.print)
    console.print(tables.slim_vae(report))
    console.print(f"decoder vs teacher's on its latents: {report['decoder_psnr_db']} dB; reconstruction of held-out "
                  f"images: slim {report['student_recon_psnr_db']} dB, teacher {report['teacher_recon_psnr_db']} dB")
    console.print(f"pipeline with the slim VAE: {out}  (report: {out / 'vae_report.json'})")


@stage(distill_app, "text-encoder", "..distill.text_encoder:SlimTextEncoderConfig")
def text_encoder(model: ModelArg,
                 out: Annotated[Path, typer.Option(help="Folder for the pipeline with the slim text encoder, its log "
                                                        "and checkpoint.")],
                 *, config):
    """Distil a text encoder with fewer layers toward the teacher's last hidden states; the rest is untouched. Resumes."""
    from ..distill.text_encoder import distill_text_encoder

    report = distill_text_encoder(_open(model), config, out, log=console.print)
    console.print(tables.slim_text_encoder(report))
    console.print(f"pipeline with the slim text encoder: {out}  (report: {out / 'text_encoder_report.json'})")


@stage(distill_app, "steps", "..distill.step_common:StepDistillConfig")
def steps_(model: ModelArg,
           out: Annotated[Path, typer.Option(help="Folder for the few-step pipeline, its log and checkpoints.")],
           *, config):
    """Distil MODEL to a 1–4 step student with guidance in its weights (LCM, progressive, DMD or ode). Resumes from OUT."""
    from ..distill.steps import distill_steps

    report = distill_steps(_open(model), config, out, log=console.print)
    console.print(tables.step_rounds(config.method, report["rounds"]))
    sample = "/".join(str(n) for n in report["sample_steps"])
    console.print(f"few-step pipeline: {out}  (sample it in {sample} steps with stock diffusers; "
                  f"report: {out / 'steps_report.json'})")


@stage(app, "quantize", "..compress.quantize:QuantizeConfig")
def quantize(model: ModelArg,
             out: Annotated[Path, typer.Option(help="Folder for the quantized pipeline, its log and checkpoints.")],
             *, config):
    """int8, palettized or W4A8 UNet for an export target, calibrated on MODEL's own trajectories, optionally trained (QAT). Resumes."""
    from ..compress.backends import BACKENDS
    from ..compress.quantize import quantize as run_quantize

    report = run_quantize(_open(model), config, out, log=console.print)
    console.print(f"quantized pipeline: {out}  (UNet relative error {report['unet_relative_error']:.4f}; "
                  f"{BACKENDS[config.backend].ships}; report: {out / 'quantize_report.json'})")


@zoo_app.command("train-default")
def train_default(out: Annotated[Path, typer.Option(help="Where the pipeline folder goes.")] = Path("default-model"),
                  quick: Annotated[bool, typer.Option(help="Seconds-long run on 64 scenes (tests, smoke checks).")] = False,
                  seed: int = 0):
    """Train the embedded default from its seed: tokenizer, VAE, then UNet with its text encoder. Resumes."""
    from ..distill.zoo import DefaultTrainConfig
    from ..distill.zoo import train_default as train

    config = DefaultTrainConfig.quick(seed) if quick else DefaultTrainConfig(seed=seed)
    console.print(f"pipeline folder: {train(out, config)}")


@stage(app, "profile", "..devices.profile:ProfileConfig")
def profile_(target: Annotated[Path, typer.Argument(help="An export folder (or one exported file); a model folder for --backend torch.")],
             out: Annotated[Optional[Path], typer.Option(help="Where profile.json and profile.png go.")] = None,
             *, config):
    """Time exported components on a device: median/p10/p90, peak memory, size, per-op breakdown, op coverage."""
    from ..devices.profile import profile, write_report

    report = profile(target, config, log=console.print)
    for printed in tables.profile(report):
        console.print(printed)
    written = write_report(report, out or Path(f"profile-{config.backend}-{config.device}"))
    console.print(f"report: {written[0]}  chart: {written[1]}")


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
    title = f"{ref.path.name} on {profile.name} ({profile.device}){' — estimates' if profile.estimate else ''}"
    console.print(tables.estimates(title, estimates))
    console.print("fraction: " + next(iter(estimates.values())).calibration)
    if json_out:
        json_out.write_text(json.dumps({k: v.to_json() for k, v in estimates.items()}, indent=2))


@devices_app.command("list")
def devices_list():
    """Every device profile, with its peaks, bandwidth and calibration."""
    from ..devices.profiles import DeviceProfile, names, profile_path
    import yaml

    console.print(tables.device_profiles([DeviceProfile(**yaml.safe_load(profile_path(name).read_text()))
                                          for name in names()]))


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
