"""The in-browser demo: its server, and the page itself in headless Chromium against the Python ONNX pipeline."""

import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest

from pocketdiff.apps.demo import check_export, demo_noise, headless_generate, make_server
from pocketdiff.errors import UserError
from pocketdiff.export import parity
from pocketdiff.export.runtime import ExportedPipeline

BROWSER = shutil.which("chromium") and shutil.which("chromedriver")


@pytest.fixture(scope="module")
def student_export(tiny_exports, tmp_path_factory):
    """The tiny pipeline's ONNX export with an LCM scheduler: the layout of an exported few-step student."""
    from diffusers import LCMScheduler

    folder = tmp_path_factory.mktemp("demo") / "onnx"
    shutil.copytree(tiny_exports["onnx"], folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    LCMScheduler.from_config(config).save_config(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def server(student_export):
    if not shutil.which("npm"):
        pytest.skip("the demo loads onnxruntime-web from npm, and npm is not installed here")
    server = make_server(student_export, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_demo_needs_a_few_step_onnx_export(tiny_exports, tmp_path):
    with pytest.raises(UserError, match="needs a few-step student \\(LCMScheduler\\), not DDIMScheduler"):
        check_export(tiny_exports["onnx"])
    with pytest.raises(UserError, match="not an ONNX pipeline export \\(missing text_encoder/model.onnx"):
        check_export(tmp_path)


def test_server_sends_page_runtime_and_model_only(server):
    page = urllib.request.urlopen(server + "/")
    assert "pocketdiff demo" in page.read().decode() and page.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    runtime = urllib.request.urlopen(server + "/ort/ort.all.min.mjs")
    assert runtime.headers["Content-Type"] == "text/javascript"
    assert json.loads(urllib.request.urlopen(server + "/model/unet/config.json").read())["in_channels"] == 4
    for outside in ("/model/../../../etc/passwd", "/model/%2e%2e/%2e%2e/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(server + outside)


@pytest.mark.skipif(not BROWSER, reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_page_draws_what_the_python_onnx_pipeline_draws(server, student_export):
    browser, latencies, provider = headless_generate(server + "/?ep=wasm", "red apple", seed=3, steps=1, guidance=7.5)
    pipe = ExportedPipeline(student_export, "onnx")
    latents = demo_noise(3, (1, pipe.latent_channels, pipe.latent_size, pipe.latent_size))
    python = pipe(["red apple"], 1, 7.5, latents=latents)
    assert provider == "wasm" and browser.shape == python.shape[1:] and latencies[0] > 0
    assert parity.psnr(browser[None], python) >= 40
    other = pipe(["red apple"], 1, 7.5, latents=demo_noise(4, latents.shape))
    assert parity.psnr(browser[None], other) < 30  # the seed matters: the match is not a constant image
