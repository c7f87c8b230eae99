"""This machine's peaks, measured once and cached: what `host-cpu` / `host-gpu` profiles stand on.

Peak compute is the best of a few large GEMMs (what a well-tuned conv or matmul kernel reaches on
this machine with torch's threads), memory bandwidth the best of a few large copies (read + write).
Both are achieved figures, not datasheet ones, so a backend's roofline efficiency on the host says
how close it comes to what this machine demonstrably does.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ..errors import UserError


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def gemm_tops(dtype: torch.dtype, size: int, device: str = "cpu") -> float | None:
    """Tera-ops/s of a size³ matmul at `dtype`; None where this machine has no kernel for it."""
    a = torch.randn(size, size, device=device).to(dtype) if dtype.is_floating_point else \
        torch.randint(-100, 100, (size, size), dtype=dtype, device=device)
    b = a.clone()
    mm = torch.mm if dtype.is_floating_point else torch._int_mm
    try:
        mm(a, b)
    except RuntimeError:
        return None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = _best_seconds(lambda: (mm(a, b), sync()))
    return 2 * size**3 / seconds / 1e12


def copy_gb_s(megabytes: int, device: str = "cpu") -> float:
    source = torch.empty(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = _best_seconds(lambda: (target.copy_(source), sync()))
    return 2 * source.numel() * 4 / seconds / 1e9


def measure(name: str) -> dict:
    if name == "host-gpu":
        if not torch.cuda.is_available():
            raise UserError("host-gpu: this machine has no CUDA GPU (torch.cuda.is_available() is false); "
                            "use --device host-cpu")
        peaks = {"fp32": gemm_tops(torch.float32, 8192, "cuda"), "fp16": gemm_tops(torch.float16, 8192, "cuda"),
                 "int8": gemm_tops(torch.int8, 8192, "cuda")}
        return {"device": torch.cuda.get_device_name(), "compute": {"gpu": peaks},
                "memory_bandwidth_gb_s": copy_gb_s(1024, "cuda")}
    # torch's CPU int8 matmul is a reference kernel, far from what XNNPACK reaches: no int8 peak to measure with
    peaks = {"fp32": gemm_tops(torch.float32, 2048), "int8": None}
    return {"device": json.loads(host_key())[0], "compute": {"cpu": peaks}, "memory_bandwidth_gb_s": copy_gb_s(512)}


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETDIFF_CACHE", Path.home() / ".cache" / "pocketdiff")) / "devices"


def host_key() -> str:
    """What a host measurement is valid for: processor, core count, torch build."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return json.dumps([cpu, os.cpu_count(), torch.get_num_threads(), torch.__version__])


def measured_host(name: str) -> dict:
    """The cached measurement for this machine, measured now (a few seconds) when missing or stale."""
    path = cache_dir() / f"{name}.json"
    key = host_key()
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    result = {**measure(name), "key": key, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result
