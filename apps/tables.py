"""The tables the command line prints: each from a verb's report, apart from the commands that run the verbs."""

from __future__ import annotations

from rich.table import Table


def _columns(table: Table, names: tuple[str, ...], left: tuple[str, ...]) -> Table:
    for name in names:
        table.add_column(name, justify="left" if name in left else "right")
    return table


def pruning_units(report: dict) -> Table:
    table = _columns(Table(title="units (score: relative output error when removed alone)"),
                     ("unit", "score", "saves", "removed"), ("unit",))
    for unit in sorted(report["units"], key=lambda u: u["score"]):
        table.add_row(unit["name"], f"{unit['score']:.4g}", f"{unit['saves']:.1%}", str(unit["removed_order"] or ""))
    return table


def before_after(title: str, report: dict) -> Table:
    table = _columns(Table(title=title), ("", "before", "after", "ratio"), ("",))
    for label, key, scale in (("params (M)", "params", 1e6), ("conv+linear MACs (G)", "macs", 1e9),
                              ("attention MACs (G)", "attention_macs", 1e9)):
        before, after = report[f"{key}_before"], report[f"{key}_after"]
        table.add_row(label, f"{before / scale:.3f}", f"{after / scale:.3f}", f"{after / max(before, 1):.3f}")
    return table


def last_terms(title: str, final: dict) -> Table:
    table = _columns(Table(title=title), ("term", "value"), ("term",))
    for key, value in final.items():
        if key not in ("step", "lr"):
            table.add_row(key, f"{value:.4g}")
    return table


def slim_vae(report: dict) -> Table:
    table = _columns(Table(title="slim VAE"), ("", "before", "after", "ratio"), ("",))
    for half in ("vae_decoder", "vae_encoder"):
        for what, scale in (("params (M)", 1e6), ("macs (G)", 1e9)):
            key = what.split()[0]
            before, after = report[f"{half}_{key}_before"], report[f"{half}_{key}_after"]
            table.add_row(f"{half} {what}", f"{before / scale:.3f}", f"{after / scale:.3f}", f"{after / before:.3f}")
    return table


def slim_text_encoder(report: dict) -> Table:
    table = _columns(Table(title=f"slim text encoder (layers {report['kept_layers']} of the teacher's)"),
                     ("", "before", "after", "ratio"), ("",))
    for what, scale in (("params (M)", 1e6), ("macs (G)", 1e9)):
        key = what.split()[0]
        before, after = report[f"{key}_before"], report[f"{key}_after"]
        table.add_row(what, f"{before / scale:.3f}", f"{after / scale:.3f}", f"{after / before:.3f}")
    table.add_row("held-out relative error", f"{report['relative_error_start']:.4f} (start)",
                  f"{report['relative_error']:.4f}", "")
    return table


def step_rounds(method: str, rounds: list[dict]) -> Table:
    table = _columns(Table(title=f"{method}: training"), ("student steps", "wall s", "final loss"), ())
    for done in rounds:
        table.add_row(str(done["student_steps"]), f"{done['wall_time_s']:.1f}", f"{done['final'].get('loss', float('nan')):.4g}")
    return table


def sweep_variants(name: str, rows: list[dict]) -> Table:
    table = _columns(Table(title=f"sweep {name} (★: on the quality-latency frontier)"),
                     ("variant", "status", "quality", "latency ms", "UNet params (M)"), ("variant", "status"))
    for r in rows:
        table.add_row(("★ " if r["front_latency"] else "") + r["variant"], r["status"],
                      "–" if r["quality"] is None else f"{r['quality']:.4f}",
                      "–" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}",
                      f"{r['unet_params'] / 1e6:.3f}" if r["unet_params"] else "–")
    return table


def census(census) -> Table:
    unit, scale = ("G", 1e9) if census.macs >= 1e9 else ("M", 1e6)
    table = Table(title=f"{census.component}  input {tuple(census.input_shape)}")
    for column in ("block", "params (M)", f"conv+linear MACs ({unit})", f"attention MACs ({unit})"):
        table.add_column(column, justify="left" if column == "block" else "right", no_wrap=True)
    for name, block in census.blocks.items():
        table.add_row(name, f"{block.params / 1e6:.3f}", f"{block.macs / scale:.3f}", f"{block.attention_macs / scale:.3f}")
    table.add_row("total", f"{census.params / 1e6:.2f}", f"{census.macs / scale:.2f}",
                  f"{census.attention_macs / scale:.2f}", style="bold")
    return table


def profile(report: dict) -> list:
    """The measurements, then each component's top operators and what its runtime delegated."""
    table = _columns(Table(title=f"{report['backend']} on {report['device']} ({report['device_description']})"),
                     ("component", "inputs", "median ms", "p10 ms", "p90 ms", "peak memory MB", "file MB",
                      "roofline efficiency"), ("component", "inputs"))
    for m in report["measurements"]:
        shapes = " ".join("×".join(map(str, s)) or "()" for s in m.get("inputs", {}).values())
        roof = m.get("roofline")
        peak = m.get("peak_memory_bytes")
        table.add_row(m["component"], shapes, f"{m['median_ms']:.2f}", f"{m.get('p10_ms', m['median_ms']):.2f}",
                      f"{m.get('p90_ms', m['median_ms']):.2f}", f"{peak / 1e6:.1f}" if peak is not None else "n/a",
                      f"{m['file_bytes'] / 1e6:.1f}", f"{roof['efficiency']:.1%}" if roof else "n/a")
    printed = [table]
    for m in report["measurements"]:
        ops = _columns(Table(title=f"{m['component']}: top operators (runtime profiler)"), ("op", "calls", "ms", "share"),
                       ("op",))
        for op in m.get("ops", [])[:10]:
            name = op["op"] if op.get("delegated", True) else f"{op['op']} (fallback)"
            ops.add_row(name, str(op["calls"]), f"{op['ms']:.3f}", f"{op['share']:.1%}")
        printed.append(ops)
        coverage = m.get("coverage", {})
        if coverage.get("nodes"):
            printed.append(f"{coverage['kind']}: " + ", ".join(f"{k}: {v} calls" for k, v in coverage["nodes"].items()))
    return printed


def estimates(title: str, found: dict) -> Table:
    table = _columns(Table(title=title), ("component", "unit/dtype", "GFLOP", "MB moved", "ideal ms", "fraction",
                                          "estimate ms", "top blocks"), ("component", "top blocks", "unit/dtype"))
    for name, e in found.items():
        blocks = ", ".join(f"{b} {ms:.1f}" for b, ms in sorted(e.blocks_ms.items(), key=lambda kv: -kv[1])[:3])
        table.add_row(name, f"{e.unit}/{e.dtype}", f"{e.flops / 1e9:.2f}", f"{e.bytes / 1e6:.1f}", f"{e.ideal_ms:.2f}",
                      f"{e.achieved_fraction:.3f}" if e.achieved_fraction else "—",
                      f"{e.estimate_ms:.2f}" if e.estimate_ms else "—", blocks)
    return table


def device_profiles(profiles: list) -> Table:
    table = Table()
    for column in ("name", "device", "peaks (TOPS)", "GB/s", "reach", "calibration"):
        table.add_column(column)
    for p in profiles:
        peaks = "; ".join(f"{u} " + ", ".join(f"{d} {v:g}" for d, v in dt.items() if v) for u, dt in p.compute.items())
        cal = p.calibration
        table.add_row(p.name, p.device, peaks or "measured at first use",
                      f"{p.memory_bandwidth_gb_s:g}" if p.memory_bandwidth_gb_s else "measured",
                      p.reach, f"{cal.model} {cal.measured_ms:g} ms → {cal.achieved_fraction}" if cal else "—")
    return table
