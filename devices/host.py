"""Time exported models on this machine, with each runtime's own profiler and op coverage.

One `Measurement` per component and backend: N timed runs after warm-up (median, p10, p90), the
peak resident memory the load and the runs added, the file size, a per-operator breakdown taken
from the runtime's own profiler (onnxruntime's profiling JSON; ExecuTorch's ETDump read with its
devtools Inspector; torch.profiler), and op coverage: which ops the execution provider or delegate
took and which fell back to portable CPU kernels.

Timings come from our own wall clock around each call, runs with the profiler on are separate
(profiling slows small ops), so the headline numbers are what an app would see. Each measurement
runs in a fresh process (`measure`): memory freed by an earlier model would otherwise be reused
and hide the next one's peak, and thread settings would leak between backends.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import modelio
from ..errors import UserError
from ..macs import block_name
from .timing import call_times

BACKEND_FILES = {"onnxruntime": "model.onnx", "executorch": "model.pte"}


@dataclass
class Measurement:
    backend: str
    component: str
    file: str
    file_bytes: int
    inputs: dict[str, list[int]]
    times_ms: list[float]
    peak_memory_bytes: int  # resident memory the load and the runs added at their peak
    ops: list[dict] = field(default_factory=list)  # per op type: calls and ms per run, largest first
    blocks_ms: dict[str, float] = field(default_factory=dict)  # per UNet block, where the runtime can tell
    coverage: dict = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.times_ms, q))

    def to_json(self) -> dict:
        return {**asdict(self), "median_ms": self.median_ms, "p10_ms": self.percentile(10),
                "p90_ms": self.percentile(90)}


class _PeakMemory:
    """Peak resident set growth over a block (Linux: reset the high-water mark, read VmHWM)."""

    def __enter__(self):
        self.start = _status("VmRSS")
        if self.start is not None:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.start = None
        if self.start is None:
            import resource

            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        peak = _status("VmHWM")
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # whole-process on macOS
        self.added = max(0, peak - self.start)


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
        path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


def spatial_size(folder: Path, component: str) -> int:
    """The height and width a component's spatial inputs take, from the config.json beside it."""
    config = json.loads((folder / "config.json").read_text())
    if component.startswith("text_encoder"):
        return 0  # no spatial inputs
    if component == "unet":
        return config["sample_size"]
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    return config["sample_size"] // factor if component == "vae_decoder" else config["sample_size"]


def default_batch(folder: Path, component: str) -> int:
    """What the pipeline feeds per call: a guided teacher's UNet sees the prompt and the empty prompt."""
    if component != "unet":
        return 1
    return modelio.unet_batch(json.loads((folder / "config.json").read_text()))


def example_feed(shapes: dict[str, list], types: dict[str, str], sizes: dict[str, int], seed: int = 0) -> dict:
    """Seeded inputs: symbolic dims named like optimum's (`batch_size`, `height`, `latent_width`…) resolved by `sizes`."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, shape in shapes.items():
        dims = []
        for dim in shape:
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            else:
                key = "batch" if "batch" in str(dim) else "sequence" if "sequence" in str(dim) else "spatial"
                dims.append(sizes[key])
        if "int" in types[name]:
            feed[name] = np.zeros(dims, dtype=np.int64)
        elif name == "timestep":
            feed[name] = np.full(dims, 501.0, dtype=np.float32)
        else:
            feed[name] = rng.standard_normal(dims, dtype=np.float32)
    return feed


def measure(backend: str, target: str, component: str, runs: int, warmup: int, batch: int | None = None,
            threads: int | None = None) -> Measurement:
    """Profile one component file (or, for torch, one component of a model folder) in a fresh process."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "measurement.json"
        args = [backend, target, component, runs, warmup, batch, threads, str(result_file)]
        done = subprocess.run([sys.executable, "-m", __name__, json.dumps(args)], capture_output=True, text=True)
        if done.returncode == 2:
            raise UserError(done.stderr.strip().splitlines()[-1])
        if done.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"profiling {component} on {backend} failed:\n{done.stderr[-3000:]}")
        return Measurement(**json.loads(result_file.read_text()))


def _measure(backend: str, target: str, component: str, runs: int, warmup: int, batch: int | None,
             threads: int | None) -> Measurement:
    path = Path(target)
    if backend == "onnxruntime":
        return profile_onnx(path, component, runs, warmup, batch, threads)
    if backend == "executorch":
        return profile_executorch(path, component, runs, warmup)
    if backend == "coreml":
        return profile_coreml(path, component, runs, warmup)
    return profile_torch(modelio.open_model(target), component, runs, warmup, batch, threads)


# --- onnxruntime ---------------------------------------------------------------------------------

def _onnx_blocks(path: Path) -> dict[str, str]:
    """ONNX node name → UNet block, from the module scopes torch's exporter writes into node metadata
    (a Python list literal: '', the wrapper's attribute, then each module path down to the node)."""
    import ast

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    blocks = {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes:
            names = ast.literal_eval(scopes)
            module = names[-2] if len(names) > 1 else ""
            inner = module.split(".", 1)[1] if "." in module else ""  # drop the export wrapper's attribute
            blocks[node.name] = block_name(inner) if inner else "(root)"
    return blocks


def profile_onnx(path: Path, component: str, runs: int, warmup: int, batch: int | None, threads: int | None) -> Measurement:
    import onnxruntime as ort

    folder = path.parent
    batch = batch or default_batch(folder, component)
    with _PeakMemory() as memory:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=ort.get_available_providers()[-1:])
        shapes = {i.name: i.shape for i in session.get_inputs()}
        types = {i.name: i.type for i in session.get_inputs()}
        feed = example_feed(shapes, types, {"batch": batch, "sequence": 77, "spatial": spatial_size(folder, component)})
        times = call_times(lambda: session.run(None, feed), runs, warmup)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        profiled = ort.InferenceSession(str(path), options, providers=session.get_providers())
        profiled_runs = max(1, min(runs, 5))
        call_times(lambda: profiled.run(None, feed), profiled_runs)
        events = json.loads(Path(profiled.end_profiling()).read_text())
    ops, blocks, coverage = onnx_breakdown(events, _onnx_blocks(path), profiled_runs)
    return Measurement("onnxruntime", component, str(path), _size(path), {k: list(v.shape) for k, v in feed.items()},
                       times, memory.added, ops, blocks, coverage)


def onnx_breakdown(events: list[dict], blocks: dict[str, str], runs: int) -> tuple[list[dict], dict, dict]:
    """Per-op-type time, per-block time and provider coverage from onnxruntime's profiling events."""
    per_op, calls, per_block = defaultdict(float), Counter(), defaultdict(float)
    providers: dict[str, Counter] = defaultdict(Counter)
    run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    warm_end = run_ends[-runs - 1] if len(run_ends) > runs else 0  # the profiled session's own warm-up run
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < warm_end:
            continue
        args = event["args"]
        op, ms = args["op_name"], event["dur"] / 1000 / runs
        per_op[op] += ms
        calls[op] += 1
        node = event["name"][: -len("_kernel_time")].split("/")[0]
        per_block[blocks.get(node, "(runtime-inserted)")] += ms
        providers[args.get("provider", "?")][op] += 1
    total = sum(per_op.values()) or 1.0
    ops = [{"op": op, "calls": calls[op] // runs, "ms": ms, "share": ms / total}
           for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])]
    coverage = {"kind": "execution providers",
                "nodes": {p: sum(c.values()) // runs for p, c in providers.items()},
                "ops": {p: {op: n // runs for op, n in c.most_common()} for p, c in providers.items()}}
    return ops, dict(sorted(per_block.items(), key=lambda kv: -kv[1])), coverage


# --- ExecuTorch ----------------------------------------------------------------------------------

_INSTANCE = re.compile(r" #\d+$")
_WRAPPERS = {"OPERATOR_CALL", "DELEGATE_CALL", "Method::execute", "Method::init", "Program::load_method"}


def profile_executorch(path: Path, component: str, runs: int, warmup: int) -> Measurement:
    import torch
    from executorch.runtime import Runtime

    io = json.loads((path.parent / "io.json").read_text())
    shapes = {name: io["shapes"][name] for name in io["inputs"]}
    types = {name: "int64" if name == "input_ids" else "float" for name in shapes}
    feed = example_feed(shapes, types, {})
    tensors = [torch.from_numpy(np.array(feed[name], order="C")) for name in io["inputs"]]
    with _PeakMemory() as memory:
        method = Runtime.get().load_program(path).load_method("forward")
        times = call_times(lambda: method.execute(tensors), runs, warmup)
    program = Runtime.get().load_program(path, enable_etdump=True)
    traced = program.load_method("forward")
    profiled_runs = max(1, min(runs, 5))
    for _ in range(profiled_runs):
        traced.execute(tensors)
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(dump), None)
        ops, coverage = etdump_breakdown(dump, io.get("backends", []))
    return Measurement("executorch", component, str(path), _size(path), {k: list(v.shape) for k, v in feed.items()},
                       times, memory.added, ops, {}, coverage)


def etdump_breakdown(dump: Path, backends: list[str]) -> tuple[list[dict], dict]:
    """Per-op time and delegate coverage from an ETDump: delegated ops are the delegate's own events
    (XNNPACK names its operators, e.g. 'Convolution (NHWC, F32) IGEMM'); the rest ran as portable
    CPU kernels ('native_call_<op>')."""
    from executorch.devtools import Inspector

    inspector = Inspector(etdump_path=str(dump))
    (block,) = [b for b in inspector.event_blocks if b.name == "Execute"]
    per_op, calls = defaultdict(float), Counter()
    delegated, fallback = Counter(), Counter()
    runs = 1
    for event in block.events:
        if event.name in _WRAPPERS or not event.perf_data:
            continue
        raw = event.perf_data.raw
        runs = max(runs, len(raw))
        if event.is_delegated_op:
            op = _INSTANCE.sub("", event.name)
            delegated[op] += 1
        else:
            op = event.name.removeprefix("native_call_")
            fallback[op] += 1
        per_op[op] += sum(raw) / len(raw)
        calls[op] += 1
    total = sum(per_op.values()) or 1.0
    ops = [{"op": op, "calls": calls[op], "ms": ms, "share": ms / total, "delegated": op in delegated}
           for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])]
    delegate = "+".join(backends) or "delegate"
    coverage = {"kind": "delegates", "nodes": {delegate: sum(delegated.values()), "portable CPU kernels": sum(fallback.values())},
                "ops": {delegate: dict(delegated.most_common()), "portable CPU kernels": dict(fallback.most_common())}}
    return ops, coverage


# --- torch (eager, the reference every export is checked against) --------------------------------

def profile_torch(ref, component: str, runs: int, warmup: int, batch: int | None, threads: int | None) -> Measurement:
    import torch

    from ..export.components import model_components, unet_component

    if threads:
        torch.set_num_threads(threads)
    with _PeakMemory() as memory:
        if component == "unet":
            wrapped = unet_component(modelio.load_unet(ref), modelio.unet_config(ref)["sample_size"], batch)
        else:
            if ref.kind != "pipeline":
                raise UserError(f"{ref.path}: a bare UNet folder has no {component}")
            wrapped, = model_components(ref, modelio.load_pipeline(ref), (component,))
        times = call_times(wrapped.run, runs, warmup)
    ops, blocks = torch_breakdown(wrapped, max(1, min(runs, 5)))
    files = [ref.path / ("unet" if ref.kind == "pipeline" and component == "unet" else "")]
    return Measurement("torch", component, str(files[0]), _size(files[0]),
                       {k: list(v.shape) for k, v in wrapped.inputs.items()}, times, memory.added, ops, blocks,
                       {"kind": "eager", "nodes": {"torch CPU": sum(o["calls"] for o in ops)}})


def torch_breakdown(wrapped, runs: int) -> tuple[list[dict], dict]:
    """Self CPU time per aten op from torch.profiler, and wall time per block from forward hooks."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    per_block, starts, handles = defaultdict(float), {}, []
    for name, module in wrapped.module.named_modules():
        parts = name.split(".")
        if len(parts) < 2 or name != _block_root(name):
            continue
        key = block_name(".".join(parts[1:]))
        handles.append(module.register_forward_pre_hook(lambda m, a, key=key: starts.__setitem__(key, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, key=key: per_block.__setitem__(key, per_block[key] + (time.perf_counter() - starts[key]) * 1000 / runs)
            and None))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
            for _ in range(runs):
                wrapped.run()
    finally:
        for handle in handles:
            handle.remove()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = [{"op": e.key.removeprefix("aten::"), "calls": e.count // runs, "ms": e.self_cpu_time_total / 1000 / runs,
            "share": e.self_cpu_time_total / total} for e in sorted(events, key=lambda e: -e.self_cpu_time_total)]
    return ops, dict(sorted(per_block.items(), key=lambda kv: -kv[1]))


def _block_root(name: str) -> str:
    """The module that is a block's root: 'unet.down_blocks.1' for anything under it."""
    parts = name.split(".")
    inner = ".".join(parts[1:])
    return parts[0] + "." + block_name(inner) if inner else name


# --- Core ML -------------------------------------------------------------------------------------

def profile_coreml(path: Path, component: str, runs: int, warmup: int) -> Measurement:
    import platform

    if platform.system() != "Darwin":
        raise UserError(f"Core ML models run only on macOS (this is {platform.system()}); profile {path.name} on a Mac, "
                        "or estimate with `pocketdiff estimate MODEL --device iphone-15-pro`")
    import coremltools as ct

    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL)
    spec = model.get_spec()
    shapes = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
    types = {i.name: "int" if i.type.multiArrayType.dataType == 131104 else "float" for i in spec.description.input}
    feed = example_feed(shapes, types, {})
    with _PeakMemory() as memory:
        times = call_times(lambda: model.predict(feed), runs, warmup)
    return Measurement("coreml", component, str(path), _size(path), shapes, times, memory.added, [], {},
                       {"kind": "compute units", "nodes": {"ALL (CPU, GPU, Neural Engine; Core ML decides)": 0}})


if __name__ == "__main__":  # the fresh process `measure` starts
    import sys

    *arguments, result = json.loads(sys.argv[1])
    try:
        Path(result).write_text(json.dumps(asdict(_measure(*arguments))))
    except UserError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
