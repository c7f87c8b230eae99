"""Time exported models on an attached Android phone over adb.

The phone runs the runtime's own benchmark binary: ExecuTorch's `executor_runner` (with
`--etdump_path` when it was built with the event tracer, for the per-op breakdown) or
onnxruntime's `onnxruntime_perf_test`. We push the model and the binary, run it, pull what it
wrote, and parse its console output. Command construction and parsing are separate functions, so
both are tested from recorded real outputs without a phone; with no phone attached the runner
stops with one line saying so.

Apple devices are reached through a Mac: `pocketdiff profile --backend coreml` run on macOS times
the .mlpackage with Core ML itself (see `host.profile_coreml`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

WORKDIR = "/data/local/tmp/pocketdiff"
RUNNERS = {"executorch": "executor_runner", "onnxruntime": "onnxruntime_perf_test"}

_ITERATION = re.compile(r"Iteration \d+ of \d+: ([\d.]+) ms")
_EXECUTED = re.compile(r"Model executed successfully (\d+) time\(s\) in ([\d.]+) ms")
_LOADED = re.compile(r"Model loaded in ([\d.]+) ms")
_PERF = {"average_ms": re.compile(r"Average (?:inference )?time cost:\s*([\d.]+) ms"),
         "session_creation_s": re.compile(r"Session creation time cost:\s*([\d.]+) s"),
         "runs": re.compile(r"Total (?:inference requests|iterations):\s*(\d+)"),
         "peak_memory_bytes": re.compile(r"Peak working set size:\s*(\d+) bytes"),
         "p50_s": re.compile(r"P50 Latency(?: is)?:?\s*([\d.]+) s"),
         "p90_s": re.compile(r"P90 Latency(?: is)?:?\s*([\d.]+) s")}


def parse_executor_runner(text: str) -> dict:
    """Per-iteration and total times from executor_runner's log; a run that did not finish is an error."""
    done = _EXECUTED.search(text)
    if not done:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise UserError(f"executor_runner did not finish: {last[0].strip()}")
    runs, total = int(done.group(1)), float(done.group(2))
    iterations = [float(v) for v in _ITERATION.findall(text)]
    loaded = _LOADED.search(text)
    return {"runs": runs, "total_ms": total, "times_ms": iterations or [total / runs],
            "load_ms": float(loaded.group(1)) if loaded else None}


def parse_perf_test(text: str) -> dict:
    """Average (and, where printed, P50/P90) latency and peak working set from onnxruntime_perf_test."""
    found = {key: pattern.search(text) for key, pattern in _PERF.items()}
    if not found["average_ms"]:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise UserError(f"onnxruntime_perf_test did not finish: {last[0].strip()}")
    values = {key: float(m.group(1)) for key, m in found.items() if m}
    if "runs" in values:
        values["runs"] = int(values["runs"])
    if "peak_memory_bytes" in values:
        values["peak_memory_bytes"] = int(values["peak_memory_bytes"])
    return values


def parse_devices(text: str) -> list[str]:
    """Serials `adb devices` lists as ready ('device'; not 'unauthorized' or 'offline')."""
    return [line.split()[0] for line in text.splitlines()[1:] if line.strip().endswith("\tdevice") or
            (len(line.split()) == 2 and line.split()[1] == "device")]


@dataclass
class Adb:
    """One phone over adb; `run` is subprocess.run unless a test records the calls."""

    serial: str | None = None
    adb: str = "adb"
    run: Callable = subprocess.run

    def _call(self, *args: str) -> str:
        command = [self.adb, *(["-s", self.serial] if self.serial else []), *args]
        result = self.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"{' '.join(command)} failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
        return result.stdout

    def connect(self) -> None:
        """Check that adb exists and a phone is attached (the one named, when `serial` is given)."""
        if self.run is subprocess.run and shutil.which(self.adb) is None:
            raise UserError(f"'{self.adb}' not found: install Android platform-tools to profile on a phone")
        serials = parse_devices(self.run([self.adb, "devices"], capture_output=True, text=True).stdout)
        if not serials:
            raise UserError("no Android device attached (`adb devices` lists none ready); connect one with USB "
                            "debugging on, or estimate instead: `pocketdiff estimate MODEL --device <profile>`")
        if self.serial and self.serial not in serials:
            raise UserError(f"device {self.serial} is not attached (attached: {', '.join(serials)})")
        self.serial = self.serial or serials[0]

    def commands(self, backend: str, model: Path, runner: Path | None, runs: int, threads: int | None) -> list[list[str]]:
        """The adb invocations that push `model` (and the runner binary, when given) and time it on the phone."""
        if backend not in RUNNERS:
            raise UserError(f"backend '{backend}' has no phone runner (choose {' or '.join(RUNNERS)})")
        binary = f"{WORKDIR}/{RUNNERS[backend]}"
        remote_model = f"{WORKDIR}/{model.name}"
        steps = [["shell", "mkdir", "-p", WORKDIR], ["push", str(model), remote_model]]
        if runner:
            steps += [["push", str(runner), binary], ["shell", "chmod", "755", binary]]
        if backend == "executorch":
            run = [binary, f"--model_path={remote_model}", f"--num_executions={runs}",
                   f"--etdump_path={WORKDIR}/run.etdp"] + ([f"--cpu_threads={threads}"] if threads else [])
        else:
            run = [binary, "-m", "times", "-r", str(runs), "-e", "cpu", "-I"] + (["-x", str(threads)] if threads else []) + \
                  [remote_model]
        return steps + [["shell", *run]]

    def time_model(self, backend: str, model: Path, runner: Path | None, runs: int, threads: int | None,
                   etdump_to: Path | None = None) -> dict:
        """Push, run and parse; with ExecuTorch, also pull the ETDump when the runner wrote one."""
        self.connect()
        output = ""
        for step in self.commands(backend, model, runner, runs, threads):
            output = self._call(*step)
        parsed = parse_executor_runner(output) if backend == "executorch" else parse_perf_test(output)
        if backend == "executorch" and etdump_to is not None and "ETDump written" in output:
            self._call("pull", f"{WORKDIR}/run.etdp", str(etdump_to))
            parsed["etdump"] = str(etdump_to)
        return {**parsed, "serial": self.serial, "model": self._call("shell", "getprop", "ro.product.model").strip()}
