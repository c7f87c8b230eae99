"""Charts for reports: PNGs a reader takes in at a glance, from the JSON the stages write."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def profile_chart(report: dict, path: Path, top: int = 10) -> Path:
    """Per component: its `top` operators by time, and time per UNet block where the backend gave it."""
    plt = _pyplot()
    rows = report["measurements"]
    columns = 2 if any(m.get("blocks_ms") for m in rows) else 1
    figure, axes = plt.subplots(len(rows), columns, figsize=(7 * columns, 0.35 * top * len(rows) + 1.2), squeeze=False)
    for row, measurement in zip(axes, rows):
        ops = measurement.get("ops", [])[:top][::-1]
        title = (f"{measurement['component']} on {report['backend']} ({report['device']}): "
                 f"median {measurement['median_ms']:.1f} ms")
        row[0].barh([o["op"][:40] for o in ops], [o["ms"] for o in ops],
                    color=["tab:blue" if o.get("delegated", True) else "tab:red" for o in ops])
        fell_back = any(not o.get("delegated", True) for o in ops)
        row[0].set_xlabel("ms per run (profiler)" + ("; red: fell back to portable CPU kernels" if fell_back else ""))
        row[0].set_title(title, fontsize=9)
        if columns == 2:
            blocks = list(measurement.get("blocks_ms", {}).items())[:top][::-1]
            row[1].barh([b for b, _ in blocks], [ms for _, ms in blocks], color="tab:green")
            row[1].set_xlabel("ms per run, per block")
    return _save(plt, figure, path)


def quality_chart(series: dict[str, dict[int, float]], real: float | None, path: Path, metric: str = "score") -> Path:
    """Quality against sampling steps, one line per evaluated model; the reference renders' score as the ceiling."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        steps = sorted(points)
        axis.plot(steps, [points[s] for s in steps], marker="o", label=label)
    if real is not None:
        axis.axhline(real, color="grey", linestyle="--", label="reference renders")
    axis.set_xscale("log")
    every = sorted({s for points in series.values() for s in points})
    axis.set_xticks(every, [str(s) for s in every])
    axis.set_xlabel("sampling steps")
    axis.set_ylabel(metric)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(plt, figure, path)


def latency_chart(bars: list[dict], path: Path) -> Path:
    """Median time per backend and component (bars), p10–p90 as the whisker."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(bars) + 1.4))
    labels = [b["label"] for b in bars][::-1]
    medians = [b["median_ms"] for b in bars][::-1]
    spread = [[b["median_ms"] - b["p10_ms"] for b in bars][::-1], [b["p90_ms"] - b["median_ms"] for b in bars][::-1]]
    axis.barh(labels, medians, xerr=spread, color="tab:blue", capsize=3)
    for y, value in enumerate(medians):
        axis.text(value, y, f" {value:.1f} ms", va="center", fontsize=8)
    axis.set_xlabel("ms per call (median; whisker p10–p90)")
    return _save(plt, figure, path)


def pareto_chart(rows: list[dict], path: Path, setting: str) -> Path:
    """Quality (the judge's score at `setting`) against latency and against UNet parameters, every variant labelled,
    the frontier in red."""
    plt = _pyplot()
    axes_spec = [(cost, scale, label) for cost, scale, label in
                 (("latency_ms", 1, "latency (ms per UNet call)"), ("unet_params", 1e-6, "UNet parameters (M)"))
                 if any(r["quality"] is not None and r[cost] is not None for r in rows)]
    figure, axes = plt.subplots(1, max(len(axes_spec), 1), figsize=(6.5 * max(len(axes_spec), 1), 4.5), squeeze=False)
    for axis, (cost, scale, label) in zip(axes[0], axes_spec):
        points = [r for r in rows if r["quality"] is not None and r[cost] is not None]
        front = sorted((r for r in points if r[f"front_{'latency' if cost == 'latency_ms' else 'params'}"]),
                       key=lambda r: r[cost])
        axis.scatter([r[cost] * scale for r in points], [r["quality"] for r in points], color="tab:blue")
        axis.plot([r[cost] * scale for r in front], [r["quality"] for r in front], color="tab:red", marker="o",
                  label="Pareto frontier")
        for r in points:
            axis.annotate(r["variant"], (r[cost] * scale, r["quality"]), fontsize=7, xytext=(4, 3),
                          textcoords="offset points")
        axis.set_xlabel(label)
        axis.set_ylabel("quality (judge score)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"quality: judge score at {setting}", fontsize=9)
    return _save(plt, figure, path)
