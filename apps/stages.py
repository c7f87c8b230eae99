"""The stage table: every recipe stage is one typed function with one pydantic config.

Stages that later work adds register here the same way; the runner and the recipe
parser read only this table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field
from rich.console import Console

from .. import modelio
from ..compress.prune import PruneConfig, prune
from ..compress.quantize import QuantizeConfig
from ..compress.saved import load_shipped_pipeline
from ..devices.lookup import table_for
from ..devices.profile import ProfileConfig
from ..distill.kd import KDConfig
from ..distill.step_common import StepDistillConfig
from ..distill.text_encoder import SlimTextEncoderConfig
from ..distill.vae import SlimVAEConfig
from ..export.exporter import ExportConfig
from ..export.parity import IMAGE_CHECKS
from ..errors import UserError
from ..progress import progress_bar
from .configs import EvaluateConfig, GenerateConfig, StageConfig


class LoggedConsole:
    """What a stage prints goes to the terminal and, as plain text, to its folder's log.txt."""

    def __init__(self, console: Console, log: Console):
        self.console, self.log = console, log

    def print(self, *args, **kwargs) -> None:
        self.console.print(*args, **kwargs)
        self.log.print(*args, **kwargs)


@dataclass
class StageContext:
    """What a stage function gets besides its config."""

    model: modelio.ModelRef  # the input model
    out: Path  # the stage folder: write outputs (and a diffusers model, for producing stages) here
    seed: int
    console: Console | LoggedConsole = field(default_factory=Console)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"


@dataclass
class StageResult:
    metrics: dict = field(default_factory=dict)
    produced_model: bool = False


def run_prune(config: PruneConfig, ctx: StageContext) -> StageResult:
    report = prune(ctx.model, config, ctx.out, table_for(ctx.model, config))
    keys = ("params_before", "params_after", "macs_before", "macs_after", "attention_macs_before", "attention_macs_after")
    return StageResult({**{k: report[k] for k in keys}, "removed_layers": len(report["removed"])}, produced_model=True)


class KDStageConfig(KDConfig):
    """Block-level KD of the stage's input (a pruned model) from `teacher`; the distilled pipeline is the output."""

    teacher: str | None = Field(None, description="Teacher pipeline folder or 'default' (default: the teacher named "
                                                  "in the student's prune report).")


def run_kd(config: KDStageConfig, ctx: StageContext) -> StageResult:
    from ..distill.kd import distill_kd, resolve_teacher

    kd_config = KDConfig(**config.model_dump(exclude={"teacher"}))
    report = distill_kd(resolve_teacher(ctx.model, config.teacher), ctx.model, kd_config, ctx.out,
                        log=ctx.console.print)
    final = {k: v for k, v in report["final"].items() if k in ("loss", "task", "output_kd", "feature_kd", "samples_per_s")}
    return StageResult({**final, "feature_pairs": len(report["pairs"]), "wall_time_s": report["wall_time_s"]},
                       produced_model=True)


def run_step_distill(config: StepDistillConfig, ctx: StageContext) -> StageResult:
    from ..distill.steps import distill_steps

    report = distill_steps(ctx.model, config, ctx.out, log=ctx.console.print)
    last = report["rounds"][-1]["final"]
    return StageResult({"loss": last.get("loss"), "samples_per_s": last.get("samples_per_s"),
                        "wall_time_s": report["wall_time_s"]}, produced_model=True)


def run_slim_vae(config: SlimVAEConfig, ctx: StageContext) -> StageResult:
    from ..distill.vae import distill_vae

    report = distill_vae(ctx.model, config, ctx.out, log=ctx.console.print)
    keys = [k for k in report if k.endswith(("_psnr_db", "_macs_before", "_macs_after", "_params_after"))]
    return StageResult({k: report[k] for k in keys}, produced_model=True)


def run_slim_text_encoder(config: SlimTextEncoderConfig, ctx: StageContext) -> StageResult:
    from ..distill.text_encoder import distill_text_encoder

    report = distill_text_encoder(ctx.model, config, ctx.out, log=ctx.console.print)
    keys = ("relative_error_start", "relative_error", "params_before", "params_after", "macs_before", "macs_after")
    return StageResult({k: report[k] for k in keys}, produced_model=True)


def run_quantize(config: QuantizeConfig, ctx: StageContext) -> StageResult:
    from ..compress.quantize import quantize

    report = quantize(ctx.model, config, ctx.out, log=ctx.console.print)
    return StageResult({"unet_relative_error": report["unet_relative_error"], "wall_time_s": report["wall_time_s"],
                        **{f"quantized_{k}": v for k, v in report["quantized_layers"].items()}}, produced_model=True)


def run_generate(config: GenerateConfig, ctx: StageContext) -> StageResult:
    import time

    from .generate import generate_images, labelled_grid, sampling_calls, save_images

    pipe = load_shipped_pipeline(ctx.model)
    began = time.perf_counter()
    with progress_bar("generate", sampling_calls(len(config.prompts), config.steps)) as advance:
        images = generate_images(pipe, config.prompts, config.steps, config.guidance, ctx.seed, on_step=advance)
    seconds = time.perf_counter() - began
    save_images(images, config.prompts, ctx.out / "images", ctx.seed)
    title = f"{ctx.model.path.name}: {config.steps} steps, guidance {config.guidance}, seeds {ctx.seed}+i"
    labelled_grid(images, config.prompts, title=title).save(ctx.out / "grid.png")
    return StageResult({"images": len(images), "seconds_per_image": round(seconds / len(images), 4)})


LATENCY_PARTS = {"text_encoder_ms": "text_encoder", "unet_ms": "unet", "vae_decoder_ms": "vae.decoder"}


def image_latency(pipe, prompt: str, steps: int, guidance: float, seed: int, runs: int = 3) -> dict[str, float]:
    """Wall time of one whole image at batch one, in ms, median of `runs`: `image_ms` end to end, and the
    part spent in the text encoder, in every UNet call together, and in the VAE decoder."""
    import statistics
    import time

    from ..devices.timing import call_times
    from .generate import generate_images

    began: dict[str, float] = {}
    spent: dict[str, float] = {}
    handles = []
    for key, path in LATENCY_PARTS.items():
        module = pipe
        for name in path.split("."):
            module = getattr(module, name)

        def started(*_, key=key):
            began[key] = time.perf_counter()

        def finished(*_, key=key):
            spent[key] = spent.get(key, 0.0) + (time.perf_counter() - began[key]) * 1e3

        handles += [module.register_forward_pre_hook(started), module.register_forward_hook(finished)]
    parts: list[dict[str, float]] = []

    def one_image():
        spent.clear()
        generate_images(pipe, [prompt], steps, guidance, seed)
        parts.append({key: spent.get(key, 0.0) for key in LATENCY_PARTS})

    try:
        image_ms = call_times(one_image, runs)  # after one untimed image: first calls allocate
    finally:
        for handle in handles:
            handle.remove()
    rows = [{"image_ms": ms, **shares} for ms, shares in zip(image_ms, parts[1:])]
    return {key: round(statistics.median(row[key] for row in rows), 2) for key in rows[0]}


def evaluate_model(pipe, judge, config: EvaluateConfig, seed: int, log=print) -> dict:
    """Scores of the reference renders (the ceiling) and of the model at every steps × guidance setting,
    each with its PyTorch image latency at batch one, so every stage's trade reads off one run."""
    from .evaluate import describe, prompt_set, score
    from .generate import generate_images, sampling_calls

    splits = ["in_distribution", "held_out"] if config.split == "both" else [config.split]
    prompt_sets = {split: prompt_set(split, config.per_family) for split in splits}
    total = len(config.guidance) * sum(sampling_calls(len(p.scenes), steps)
                                       for p in prompt_sets.values() for steps in config.steps)
    results = {}
    with progress_bar("evaluate: sampling", total) as advance:
        for split, prompts in prompt_sets.items():
            results[f"{split}/real"] = score(judge, prompts.images, prompts)
            log(f"{split} reference renders: {describe(results[f'{split}/real'])}")
            for guidance in config.guidance:
                for steps in config.steps:
                    images = generate_images(pipe, prompts.captions, steps, guidance, seed, on_step=advance)
                    key = f"{split}/steps={steps}/guidance={guidance:g}"
                    latency = image_latency(pipe, prompts.captions[0], steps, guidance, seed)
                    results[key] = score(judge, images, prompts) | latency
                    log(f"{key}: {describe(results[key])}, {latency['image_ms']:.1f} ms per image (text encoder "
                        f"{latency['text_encoder_ms']:.1f}, UNet {latency['unet_ms']:.1f}, VAE decoder "
                        f"{latency['vae_decoder_ms']:.1f})")
    return results


def run_evaluate(config: EvaluateConfig, ctx: StageContext) -> StageResult:
    from .evaluate import load_judge

    results = evaluate_model(load_shipped_pipeline(ctx.model), load_judge(config.judge), config, ctx.seed,
                             log=ctx.console.print)
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "scores.json").write_text(json.dumps(results, indent=2))
    return StageResult(results)


def run_export(config: ExportConfig, ctx: StageContext) -> StageResult:
    from ..export.exporter import export_model

    reports = export_model(ctx.model, config, ctx.out, seed=ctx.seed, log=ctx.console.print)
    metrics = {}
    for fmt, report in reports.items():
        for name, entry in report["components"].items():
            metrics[f"{fmt}/{name}/bytes"] = entry["bytes"]
            if "max_abs" in entry:
                metrics[f"{fmt}/{name}/max_abs"] = entry["max_abs"]
        for key in IMAGE_CHECKS:
            if key in report:
                metrics[f"{fmt}/{key}"] = report[key]
    return StageResult(metrics)


class ProfileStageConfig(ProfileConfig):
    """Time the model on a device: its own weights (backend torch) or an earlier export stage's files."""

    export_stage: str | None = Field(None, description="The export stage's name in the recipe (default: the latest "
                                                       "before this one).")


def run_profile(config: ProfileStageConfig, ctx: StageContext) -> StageResult:
    from ..devices.profile import profile, write_report

    if config.backend == "torch":
        target = ctx.model.path
    else:
        earlier = sorted(p for p in ctx.out.parent.glob(f"*-{config.export_stage or 'export'}")
                         if p.is_dir() and p.name < ctx.out.name)
        if not earlier:
            raise UserError(f"profile with backend {config.backend} profiles an export stage's files: "
                            "put an export stage before it (or use backend: torch)")
        target = earlier[-1]
    report = profile(target, ProfileConfig(**config.model_dump(exclude={"export_stage"})), log=ctx.console.print)
    write_report(report, ctx.out)
    metrics = {}
    for m in report["measurements"]:
        metrics[f"{m['component']}/median_ms"] = m["median_ms"]
        metrics[f"{m['component']}/peak_memory_bytes"] = m["peak_memory_bytes"]
        if "roofline" in m:
            metrics[f"{m['component']}/roofline_efficiency"] = m["roofline"]["efficiency"]
    return StageResult(metrics)


@dataclass(frozen=True)
class Stage:
    config: type[StageConfig]
    run: Callable[[StageConfig, StageContext], StageResult]


STAGES: dict[str, Stage] = {
    "prune": Stage(PruneConfig, run_prune),
    "kd": Stage(KDStageConfig, run_kd),
    "slim_vae": Stage(SlimVAEConfig, run_slim_vae),
    "slim_text_encoder": Stage(SlimTextEncoderConfig, run_slim_text_encoder),
    "step_distill": Stage(StepDistillConfig, run_step_distill),
    "quantize": Stage(QuantizeConfig, run_quantize),
    "generate": Stage(GenerateConfig, run_generate),
    "evaluate": Stage(EvaluateConfig, run_evaluate),
    "export": Stage(ExportConfig, run_export),
    "profile": Stage(ProfileStageConfig, run_profile),
}
