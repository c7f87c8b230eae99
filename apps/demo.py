"""`pocketdiff serve-demo EXPORT`: the in-browser demo (`apps/web/`) served on localhost.

The page runs the exported ONNX generator with onnxruntime-web, installed from npm into pocketdiff's
cache on first use. The server sends the page, onnxruntime-web's files and the export folder, and
the cross-origin isolation headers that let WebAssembly use threads; it serves nothing outside them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

from ..errors import UserError

ORT_WEB = "onnxruntime-web@1.23.0"
WEB = Path(__file__).parent / "web"
_NEEDED = ("text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx", "unet/config.json",
           "vae_decoder/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json")


def ort_web() -> Path:
    """onnxruntime-web's `dist/` folder, installed with npm into the cache the first time."""
    from ..distill.data import cache_dir

    prefix = cache_dir() / "web"
    dist = prefix / "node_modules" / "onnxruntime-web" / "dist"
    if not (dist / "ort.all.min.mjs").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise UserError("the browser demo loads onnxruntime-web from npm: install Node.js and npm first")
        prefix.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", ORT_WEB],
                              capture_output=True, text=True)
        if done.returncode != 0 or not (dist / "ort.all.min.mjs").exists():
            raise UserError(f"npm install {ORT_WEB} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    return dist


def check_export(folder: Path) -> Path:
    """An ONNX pipeline export of a few-step student: the files the page fetches, and an LCM scheduler."""
    folder = Path(folder)
    root = folder / "onnx" if (folder / "onnx" / "unet").is_dir() else folder
    missing = [name for name in _NEEDED if not (root / name).is_file()]
    if missing:
        raise UserError(f"{folder}: not an ONNX pipeline export (missing {', '.join(missing)}); "
                        "make one with pocketdiff export MODEL --to onnx")
    import onnx

    sample = next(i for i in onnx.load(str(root / "unet" / "model.onnx"), load_external_data=False).graph.input
                  if i.name == "sample")
    if sample.type.tensor_type.shape.dim[0].HasField("dim_value"):
        raise UserError(f"{root}: this UNet was traced at a fixed batch (an int8 export) and the page feeds it one "
                        "sample at a time; export the model with --precision fp32 for the demo")
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text()).get("_class_name")
    if scheduler != "LCMScheduler":
        raise UserError(f"{root}: the demo generates in 1–4 steps, which needs a few-step student (LCMScheduler), "
                        f"not {scheduler}: pocketdiff distill steps MODEL --method lcm, then export the student")
    return root


class _Handler(SimpleHTTPRequestHandler):
    """`/` and the page's files from apps/web, `/ort/` from onnxruntime-web, `/model/` from the export."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def __init__(self, *args, roots: dict[str, Path], **kwargs):
        self.roots = roots
        super().__init__(*args, directory=str(WEB), **kwargs)

    def translate_path(self, path: str) -> str:
        parts = [p for p in unquote(urlsplit(path).path).split("/") if p]
        if not parts:
            return str(WEB / "index.html")
        base, rest = (self.roots[parts[0]], parts[1:]) if parts[0] in self.roots else (WEB, parts)
        target = base.joinpath(*rest).resolve()
        return str(target) if target.is_relative_to(base.resolve()) else str(WEB / "missing")

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # the page's requests are not the user's business
        pass


def make_server(export: Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    roots = {"model": check_export(export), "ort": ort_web()}
    return ThreadingHTTPServer((host, port), partial(_Handler, roots=roots))


def demo_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The page's starting noise (mulberry32 + Box–Muller, `demoNoise` in demo.js), for comparing with Python."""
    count = int(np.prod(shape))
    state, values = seed & 0xFFFFFFFF, np.empty(count + 1, dtype=np.float64)

    def uniform() -> float:
        nonlocal state
        state = (state + 0x6D2B79F5) & 0xFFFFFFFF
        t = ((state ^ (state >> 15)) * (1 | state)) & 0xFFFFFFFF
        t = ((t + (((t ^ (t >> 7)) * (61 | t)) & 0xFFFFFFFF)) & 0xFFFFFFFF) ^ t
        return (t ^ (t >> 14)) / 4294967296

    for i in range(0, count, 2):
        radius, angle = np.sqrt(-2 * np.log(1 - uniform())), 2 * np.pi * uniform()
        values[i], values[i + 1] = radius * np.cos(angle), radius * np.sin(angle)
    return values[:count].astype(np.float32).reshape(shape)


def headless_generate(url: str, prompt: str, seed: int, steps: int = 1, guidance: float = 7.5,
                      runs: int = 1) -> tuple[np.ndarray, list[float], str]:
    """Type a prompt into the served page in headless Chromium (selenium + Debian's chromium-driver),
    `runs` times; the last image (uint8 HWC), each run's latency in ms as the page shows it, and the
    execution provider. How the test and the benchmark see what a user sees."""
    import base64
    import io

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "chromium"
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url)
        body = driver.find_element(By.TAG_NAME, "body")

        def status() -> str:
            return driver.find_element(By.ID, "status").text

        WebDriverWait(driver, 120).until(lambda d: body.get_attribute("data-provider") or body.get_attribute("data-state"))
        if not body.get_attribute("data-provider"):
            raise RuntimeError(f"the page did not load its models: {status()}")
        for field, value in (("prompt", prompt), ("seed", seed), ("steps", steps), ("guidance", guidance)):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(str(value))
        latencies = []
        for _ in range(runs):
            driver.find_element(By.ID, "go").click()
            WebDriverWait(driver, 120).until(lambda d: body.get_attribute("data-state") in ("done", "error"))
            if body.get_attribute("data-state") != "done":
                raise RuntimeError(f"the page failed to generate: {status()}")
            latencies.append(float(driver.find_element(By.ID, "latency").get_attribute("data-ms")))
            driver.execute_script("document.body.dataset.state = 'waiting'")
        data = driver.execute_script("return document.getElementById('image').toDataURL('image/png')")
        provider = body.get_attribute("data-provider")
    finally:
        driver.quit()
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB"))
    return image, latencies, provider
