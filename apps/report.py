"""`pocketdiff report RUN`: one page that says what a run did and what it got.

Everything on it comes from what the stages wrote (manifests, `export_report.json`, `profile.json`),
except the image grid: the run's input model and every model a stage produced, sampled for the same
prompts and seeds, so each student sits under its teacher image by image. The grid is cached under a
key of the models' hashes, prompts and steps: reporting an unchanged run again samples nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import modelio
from ..compress.saved import load_shipped_pipeline
from ..macs import census_model
from ..distill import scenes
from ..errors import UserError
from ..export.parity import IMAGE_CHECKS
from ..charts import latency_chart, quality_chart
from .page import Details, Figure, Section, Table, write_page
from .evaluate import details, headline
from .runner import read_manifest

SAMPLE_LIMIT = 100_000_000  # UNet parameters above which the grid waits for a GPU (SD-1.5's is 860 M)
GRID_PROMPTS = scenes.SHOWCASE_PROMPTS[::2]
SETTING = re.compile(r"^(?P<split>\w+)/steps=(?P<steps>\d+)/guidance=(?P<guidance>[\d.]+)$")


@dataclass
class StageRecord:
    folder: Path
    manifest: dict
    model: str  # the model this stage worked on: "input" or the folder name of the stage that produced it

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics") or {}

    @property
    def done(self) -> bool:
        return self.manifest.get("status") == "done"


def read_run(run_dir: Path) -> list[StageRecord]:
    """The run's stages in order, each with the label of the model it took as input."""
    run_dir = Path(run_dir)
    folders = sorted(p for p in run_dir.glob("[0-9][0-9]-*") if p.is_dir()) if run_dir.is_dir() else []
    records, model = [], "input"
    for folder in folders:
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        records.append(StageRecord(folder, manifest, model))
        if manifest.get("status") == "done" and manifest.get("produced_model"):
            model = folder.name
    if not records:
        raise UserError(f"{run_dir}: not a run folder (no stage folders with a manifest.json)")
    return records


def write_report(run_dir: Path, images: bool = True, log=print) -> tuple[Path, Path]:
    """`report/report.html` (self-contained) and `report/report.md` (+ its PNGs) in the run folder."""
    run_dir = Path(run_dir)
    records = read_run(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    sections = [_stages_section(records)]
    if images:
        sections.append(_images_section(records, out, log))
    sections += [s for s in (_quality_section(records, out), _trade_section(records), _parity_section(records),
                             _latency_section(records, out), _coverage_section(records)) if s.items]
    sections.append(_details_section(records))
    first = records[0].manifest
    total = sum(r.manifest.get("wall_time_s") or 0 for r in records)
    status = "done" if all(r.done for r in records) else "not finished"
    intro = [f"Recipe {first.get('recipe')}, input model {first.get('input')}, seed {first.get('seed')}: "
             f"{len(records)} stages, {status}, {_duration(total)} of stage time.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items() if v)]
    return write_page(out, "report", f"pocketdiff run: {run_dir.name}", intro, sections)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _headline(record: StageRecord) -> str:
    """The few figures that say how a stage went, for the overview table."""
    m, stage = record.metrics, record.stage
    if record.manifest.get("status") != "done":
        return record.manifest.get("error", record.manifest.get("status", ""))
    if stage == "prune":
        return (f"UNet params {m['params_before'] / 1e6:.2f} M → {m['params_after'] / 1e6:.2f} M, "
                f"{m['removed_layers']} layers removed")
    if stage == "evaluate":
        return "; ".join(f"{key}: {headline(value):.3f}" for key, value in m.items() if SETTING.match(key))
    if stage == "export":
        psnr = [f"{k.split('/')[0]} {IMAGE_CHECKS[k.split('/')[1]]}: image {v:.1f} dB"
                for k, v in m.items() if k.split("/")[-1] in IMAGE_CHECKS]
        worst = max((v for k, v in m.items() if k.endswith("max_abs")), default=None)
        return ", ".join(psnr + ([f"worst max-abs {worst:.2e}"] if worst is not None else []))
    if stage == "profile":
        return ", ".join(f"{k.split('/')[0]} {v:.1f} ms" for k, v in m.items() if k.endswith("median_ms"))
    scalars = [(k, v) for k, v in m.items() if isinstance(v, (int, float)) and not k.endswith("wall_time_s")]
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars[:3])


def _stages_section(records: list[StageRecord]) -> Section:
    rows = [[r.folder.name, r.model, r.manifest.get("status"), _duration(r.manifest.get("wall_time_s") or 0),
             r.manifest.get("attempt"), _headline(r)] for r in records]
    return Section("Stages", [Table(["stage", "input", "status", "wall time", "attempt", "result"], rows)])


def _sampling(records: list[StageRecord]) -> tuple[list[str], float, list[tuple[str, Path, int]]]:
    """Prompts, guidance and (label, folder, steps) per model: a step-distilled student and the models made
    from it are shown at their fewest steps, the rest at the run's first generate stage's steps."""
    generate = next((r for r in records if r.stage == "generate"), None)
    config = generate.manifest["config"] if generate else {}
    prompts, steps, guidance = config.get("prompts", GRID_PROMPTS)[:8], config.get("steps", 25), config.get("guidance", 7.5)
    models = [("input", Path(records[0].manifest["input"]), steps)]
    for record in records:
        if record.done and record.manifest.get("produced_model"):
            report = record.folder / "steps_report.json"
            if report.exists():
                steps = min(json.loads(report.read_text())["sample_steps"])
            models.append((record.folder.name, record.folder, steps))
    return prompts, guidance, models


def _images_section(records: list[StageRecord], out: Path, log) -> Section:
    from .generate import generate_images

    title = "Teacher and students, same prompts and seeds"
    teacher = modelio.open_model(records[0].manifest["input"])
    if teacher.kind != "pipeline" or teacher.random_weights:
        return Section(title, ["No images: the input is " + ("a bare UNet folder." if teacher.kind != "pipeline"
                                                             else "an architecture with random weights.")])
    if census_model(teacher, unet_only=True)[0].params > SAMPLE_LIMIT and not torch.cuda.is_available():
        return Section(title, [f"No images: sampling every model of a run at this scale on a CPU takes hours; run "
                               f"`pocketdiff report {records[0].folder.parent}` where a GPU is."])
    prompts, guidance, models = _sampling(records)
    seed = records[0].manifest.get("seed", 0)
    key = json.dumps([prompts, guidance, seed, [(label, _model_hash(records, label), steps) for label, _, steps in models]])
    path = out / f"grid-{hashlib.sha256(key.encode()).hexdigest()[:12]}.png"
    if not path.exists():
        for stale in out.glob("grid-*.png"):
            stale.unlink()
        rows = []
        for label, folder, steps in models:
            log(f"report: sampling {label} ({steps} steps) for the image grid …")
            pipe = load_shipped_pipeline(modelio.open_model(str(folder)))
            rows.append((f"{label}, {steps} step{'s' if steps > 1 else ''}", generate_images(pipe, prompts, steps, guidance, seed)))
        model_grid(rows, prompts).save(path)
    caption = (f"Each row one model, each column one prompt (seed {seed} + column), guidance {guidance:g}; "
               "students at their own step counts.")
    return Section(title, [Figure(path, caption)])


def _model_hash(records: list[StageRecord], label: str) -> str:
    if label == "input":
        return records[0].manifest.get("input_hash", "")
    record = next(r for r in records if r.folder.name == label)
    return record.manifest.get("config_hash", "") + record.manifest.get("input_hash", "")


def model_grid(rows: list[tuple[str, np.ndarray]], prompts: list[str], cell: int = 96):
    """Rows of images with the row's label on the left and the prompts as column heads."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    label_w, head_h = 170, 28
    grid = Image.new("RGB", (label_w + cell * len(prompts), head_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, prompt in enumerate(prompts):
        draw.text((label_w + j * cell + 3, 8), prompt[:cell // 6], fill="black", font=font)
    for i, (label, images) in enumerate(rows):
        y = head_h + i * cell
        draw.text((4, y + cell // 2 - 6), label[:label_w // 6], fill="black", font=font)
        for j, image in enumerate(images):
            grid.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (label_w + j * cell, y))
    return grid


def _quality_section(records: list[StageRecord], out: Path) -> Section:
    series, real, rows = {}, None, []
    for record in records:
        if record.stage != "evaluate" or not record.done:
            continue
        for key, scores in record.metrics.items():
            if key.endswith("/real"):
                real = headline(scores) if real is None else real
                continue
            match = SETTING.match(key)
            if not match:
                continue
            label = f"{record.model} ({match['split']}, guidance {match['guidance']})"
            series.setdefault(label, {})[int(match["steps"])] = headline(scores)
            rows.append([record.model, match["split"], int(match["steps"]), float(match["guidance"]),
                         headline(scores), scores.get("frechet_distance"), details(scores)])
    if not rows:
        return Section("Quality")
    items = [Table(["model", "prompts", "steps", "guidance", "score", "Fréchet", "detail"], rows,
                   "Judge scores: GenEval-style overall (mean of the families' pass rates; CLIP score under a CLIP "
                   "judge), higher is better; Fréchet distance on judge features, lower is better.")]
    if series:
        items.insert(0, Figure(quality_chart(series, real, out / "quality.png"),
                               "Judge score against sampling steps; dashed: the reference renders' score."))
    return Section("Quality", items)


def _trade_section(records: list[StageRecord]) -> Section:
    """Per evaluated model and setting: score and whole-image latency (PyTorch, batch one, this machine);
    then the teacher's most expensive setting against the last stage's cheapest, both measured in this run."""
    rows = []
    for record in records:
        if record.stage != "evaluate" or not record.done:
            continue
        for key, scores in record.metrics.items():
            match = SETTING.match(key)
            if match and "image_ms" in scores:
                rows.append([record.model, match["split"], int(match["steps"]), float(match["guidance"]),
                             headline(scores), scores["image_ms"],
                             *(scores.get(part, "") for part in ("text_encoder_ms", "unet_ms", "vae_decoder_ms"))])
    if not rows:
        return Section("Quality against image latency")
    teacher = max((r for r in rows if r[0] == rows[0][0]), key=lambda r: r[5])
    final = min((r for r in rows if r[0] == rows[-1][0]), key=lambda r: r[5])
    items = [Table(["model", "prompts", "steps", "guidance", "score", "image ms", "text encoder ms", "UNet ms",
                    "VAE decoder ms"], rows,
                   "Whole images in PyTorch at batch one on this machine, median of 3, and the time spent in each "
                   "component (the UNet's over every call).")]
    if final is not teacher:
        share = f"{final[4] / teacher[4]:.0%}" if teacher[4] else "n/a"
        items.append(f"{teacher[0]} at {teacher[2]} steps ({teacher[5]:.1f} ms, score {teacher[4]:.3f}) against "
                     f"{final[0]} at {final[2]} step{'s' if final[2] > 1 else ''} ({final[5]:.1f} ms, score "
                     f"{final[4]:.3f}): {teacher[5] / final[5]:.1f}x faster per image, keeping {share} of the score.")
    return Section("Quality against image latency", items)


def _parity_section(records: list[StageRecord]) -> Section:
    rows = []
    for record in records:
        file = record.folder / "export_report.json"
        if record.stage != "export" or not file.exists():
            continue
        for fmt, report in json.loads(file.read_text()).items():
            for name, entry in report["components"].items():
                rows.append([f"{fmt} {name}", entry["precision"], round(entry["bytes"] / 1e6, 2),
                             entry.get("max_abs"), entry.get("rel"), entry.get("export_seconds"),
                             entry.get("numeric", "")])
            for key, what in IMAGE_CHECKS.items():
                if key in report:
                    rows.append([f"{fmt} {what}", report["precision"], None, None, None, None,
                                 f"image PSNR {report[key]:.1f} dB vs PyTorch"])
    return Section("Exported files and parity", [Table(
        ["file", "precision", "MB", "max-abs vs PyTorch", "relative", "export s", "note"], rows)] if rows else [])


def _profiles(records: list[StageRecord]):
    for record in records:
        file = record.folder / "profile.json"
        if record.stage == "profile" and file.exists():
            yield record, json.loads(file.read_text())


def _latency_section(records: list[StageRecord], out: Path) -> Section:
    rows, bars, items = [], [], []
    for record, report in _profiles(records):
        for m in report["measurements"]:
            label = f"{report['backend']} {m['component']} ({report['device']})"
            bars.append({"label": label, "median_ms": m["median_ms"], "p10_ms": m.get("p10_ms", m["median_ms"]),
                         "p90_ms": m.get("p90_ms", m["median_ms"])})
            efficiency = m.get("roofline", {}).get("efficiency")
            rows.append([label, m["median_ms"], m.get("p10_ms"), m.get("p90_ms"),
                         round(m["peak_memory_bytes"] / 1e6, 1) if m.get("peak_memory_bytes") else None,
                         round(m["file_bytes"] / 1e6, 2), f"{efficiency:.1%}" if efficiency else None])
        chart = record.folder / "profile.png"
        if chart.exists():
            items.append(Figure(Path(shutil.copy(chart, out / f"{record.folder.name}-ops.png")),
                                f"{record.folder.name}: top operators and time per UNet block"))
    if not rows:
        return Section("Latency")
    items.insert(0, Table(["backend, component (device)", "median ms", "p10 ms", "p90 ms", "peak memory MB",
                           "file MB", "roofline efficiency"], rows))
    items.insert(0, Figure(latency_chart(bars, out / "latency.png"), "Latency per backend"))
    return Section("Latency", items)


def _coverage_section(records: list[StageRecord]) -> Section:
    rows = []
    for _, report in _profiles(records):
        for m in report["measurements"]:
            coverage = m.get("coverage") or {}
            groups = list((coverage.get("nodes") or {}).items())
            if not groups:
                continue
            total = sum(n for _, n in groups) or 1
            main = max(groups, key=lambda g: g[1])[0]
            others = {op: n for group, ops in coverage.get("ops", {}).items() if group != main for op, n in ops.items()}
            rows.append([f"{report['backend']} {m['component']}", coverage.get("kind"),
                         ", ".join(f"{g} {n}" for g, n in groups), f"{dict(groups)[main] / total:.1%}",
                         ", ".join(f"{op} ×{n}" for op, n in sorted(others.items(), key=lambda kv: -kv[1])[:8])])
    return Section("Op coverage", [Table(["model", "counted by", "ops (or calls) per run", "on the main runtime",
                                          "elsewhere (most frequent)"], rows)] if rows else [])


def _details_section(records: list[StageRecord]) -> Section:
    items = []
    for record in records:
        body = {"config": record.manifest.get("config"), "metrics": record.metrics,
                **{k: record.manifest.get(k) for k in ("input", "started_at", "finished_at", "config_hash", "input_hash")}}
        items.append(Details(f"{record.folder.name}: config and every metric", json.dumps(body, indent=2, default=str)))
    return Section("Stage details", items)
