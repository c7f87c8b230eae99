"""Charts for reports: PNGs a reader takes in at a glance, from the JSON the stages write."""

from __future__ import annotations

from pathlib import Path


def profile_chart(report: dict, path: Path, top: int = 10) -> Path:
    """Per component: its `top` operators by time, and time per UNet block where the backend gave it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
