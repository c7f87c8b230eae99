"""The Core ML export against Apple's Swift `StableDiffusion` package, written from its source (apple/ml-stable-diffusion
at commit e12202c, `swift/StableDiffusion/pipeline/`, P below), not from our exporter: the inputs Swift builds for
each package, the outputs it reads, and its 1-step text-to-image path run on the PyTorch modules that were
converted, which must draw pocketdiff's own 1-step image."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from pocketdiff import modelio
from pocketdiff.export import coreml
from pocketdiff.export.exporter import ExportConfig, export_model
from pocketdiff.export.formats import FORMATS
from pocketdiff.export.parity import psnr
from tests.conftest import tiny_unet_config

SWIFT_TOKENS = 77  # P/TextEncoder.swift:55-58: ids padded to the model's input length, CLIP's 77


def _spec(package):
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32

    def features(items):
        return {f.name: (tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType == float32) for f in items}

    return features(spec.description.input), features(spec.description.output)


def _check_text_encoder(package):
    inputs, outputs = _spec(package)
    # P/TextEncoder.swift:79-80, 92-100: the first (only) input gets the ids as Float32, shape (1, 77)
    assert list(inputs.values()) == [((1, SWIFT_TOKENS), True)]
    # P/TextEncoder.swift:88-89: reads "last_hidden_state" as Float32 (float16 crashes on iOS 16 / macOS 13)
    assert outputs["last_hidden_state"][1] and all(is_float32 for _, is_float32 in outputs.values())


def _check_unet(packages, batch: int):
    """P/Unet.swift:90-144: one feature provider per call with Float32 `sample`, `timestep` of shape (B,) and
    `encoder_hidden_states` (B, C, 1, 77) (P/StableDiffusionPipeline.swift:449-463); B is `sample`'s first
    dimension (Unet.swift:61-70, pipeline :287). It reads the first output name of an unordered set (:128), so
    the last package has exactly one output. Chunks (P/ManagedMLModel.swift:83-110): the second gets the first's
    outputs merged over the UNet's inputs."""
    first_inputs, first_outputs = _spec(packages[0])
    assert set(first_inputs) == {"sample", "timestep", "encoder_hidden_states"}
    sample = first_inputs["sample"][0]
    assert sample[0] == batch and first_inputs["timestep"][0] == (batch,)
    assert first_inputs["encoder_hidden_states"][0][0] == batch
    assert first_inputs["encoder_hidden_states"][0][2:] == (1, SWIFT_TOKENS)
    assert all(is_float32 for _, is_float32 in first_inputs.values())
    last_inputs, last_outputs = _spec(packages[-1])
    assert len(last_outputs) == 1 and next(iter(last_outputs.values()))[1]
    if len(packages) == 2:
        assert set(last_inputs) <= set(first_outputs) | set(first_inputs)
    return sample


def _check_vae(resources, latent_shape):
    _, channels, height, width = latent_shape
    decoder_in, decoder_out = _spec(resources / "VAEDecoder.mlpackage")
    # P/Decoder.swift:47-68: first input gets latent / scale factor; first output read as Float32, 3 channels
    assert list(decoder_in.values()) == [((1, channels, height, width), True)]
    (image_shape, image_float32), = decoder_out.values()
    assert image_shape[:2] == (1, 3) and image_float32
    encoder_in, encoder_out = _spec(resources / "VAEEncoder.mlpackage")
    # P/Encoder.swift:53-89: one image input of the image's shape; first output: mean and log-variance, 8 channels
    assert list(encoder_in.values()) == [((1, 3, *image_shape[2:]), True)]
    assert list(encoder_out.values()) == [((1, 2 * channels, height, width), True)]
    return (1, 3, *image_shape[2:])


def _scaled_linear_alphas_cumprod() -> np.ndarray:
    """P/DPMSolverMultistepScheduler.swift:61-84: betas linspace(√0.00085, √0.012, 1000)², cumulative ᾱ."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float32) ** 2
    return np.cumprod(1 - betas, dtype=np.float32)


def swift_one_step(converted: dict, resources, prompt: str, latent: np.ndarray) -> np.ndarray:
    """Swift's text → image at stepCount 1, DPM-Solver++, guidance below 1, on the converted modules."""
    from transformers import CLIPTokenizer

    # swift/StableDiffusion/tokenizer/BPETokenizer.swift:36-73: start + BPE + end, padded with <|endoftext|>
    tokenizer = CLIPTokenizer(str(resources / "vocab.json"), str(resources / "merges.txt"), pad_token="<|endoftext|>")
    ids = tokenizer(prompt, padding="max_length", max_length=SWIFT_TOKENS, truncation=True).input_ids
    with torch.no_grad():
        states = converted["TextEncoder"](torch.tensor([ids], dtype=torch.float32))[0]  # "last_hidden_state"
        hidden = states.transpose(1, 2).unsqueeze(2)  # P/StableDiffusionPipeline.swift:449-463: [B, C, 1, 77]
        # P/DPMSolverMultistepScheduler.swift:88: linspace spacing, one step → t = 999; guidance < 1: one batch-one call
        eps = converted["Unet"](torch.from_numpy(latent), torch.tensor([999.0]), hidden).numpy()
        alpha_bar = _scaled_linear_alphas_cumprod()[999]
        # :135-151 convertModelOutput (epsilon): x0 = (x − σ·ε) / α; the pipeline decodes that x0 (:332, :358)
        x0 = (latent - np.sqrt(1 - alpha_bar) * eps) / np.sqrt(alpha_bar)
        image = converted["VAEDecoder"](torch.from_numpy(x0 / 0.18215)).numpy()[0]  # P/Decoder.swift:50
    # P/CGImage+vImage.swift:45-54: (x + 1) · 0.5, then [0, 1] → [0, 255] clipped
    return (np.clip((image.transpose(1, 2, 0) + 1) * 0.5, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture
def converted_modules(monkeypatch) -> dict:
    """Every PyTorch module the Core ML export converts, by the package name it is saved as."""
    seen, convert = [], coreml._convert

    def spy(module, inputs, outputs, precision, quantization):
        seen.append(module)
        return convert(module, inputs, outputs, precision, quantization)

    def save(component, *args, **kw):
        path = export_component(component, *args, **kw)
        modules[path.stem] = seen[-1]
        return path

    modules, export_component = {}, coreml.export_component
    monkeypatch.setattr(coreml, "_convert", spy)
    monkeypatch.setitem(FORMATS, "coreml", dataclasses.replace(FORMATS["coreml"], export_component=save))
    return modules


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_a_one_step_student_runs_as_swift_runs_it_and_draws_our_image(prediction, lcm_student, converted_modules,
                                                                       tmp_path):
    """An x̂0-predicting student (the ode method's) ships a UNet that returns ε, which Swift's scheduler reads."""
    folder = tmp_path / "student"
    shutil.copytree(lcm_student[0], folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": prediction}))
    export_model(modelio.open_model(folder), ExportConfig(to=["coreml"]), tmp_path, log=lambda _: None)
    out = tmp_path / "coreml"
    resources = out / "Resources"
    _check_text_encoder(resources / "TextEncoder.mlpackage")
    sample = _check_unet([resources / "Unet.mlpackage"], batch=1)  # guidance folded in: Swift's unguided call
    image_shape = _check_vae(resources, sample)
    options = json.loads((out / "swift.json").read_text())
    assert (options["scheduler"], options["stepCount"], options["embeddedGuidance"]) == (
        "dpmSolverMultistepScheduler", 1, 7.5) and options["guidanceScale"] < 1
    assert "xcrun coremlcompiler compile Resources/Unet.mlpackage Resources/" in (out / "compile.sh").read_text()
    assert "--step-count 1 --guidance-scale 0" in (out / "SWIFT.md").read_text()

    pipe = modelio.load_pipeline(modelio.open_model(folder))
    for seed, prompt in enumerate(["red apple", "rocket", "snowman"]):
        latent = np.random.default_rng(seed).standard_normal(sample, dtype=np.float32)  # initNoiseSigma 1
        swift = swift_one_step(converted_modules, resources, prompt, latent)
        ours = pipe(prompt, num_inference_steps=1, guidance_scale=7.5, latents=torch.from_numpy(latent),
                    output_type="np").images[0]
        assert psnr(swift, (np.clip(ours, 0, 1) * 255).round().astype(np.uint8)) >= 40, prompt

    # P/Encoder.swift:69-89: mean, log-variance clamped to [-30, 20], N(mean, exp(logvar/2)) × 0.18215 = our latent
    image = torch.rand(image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(sample, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean, logvar = converted_modules["VAEEncoder"](image).chunk(2, dim=1)
        swift_latent = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * 0.18215
        posterior = pipe.vae.encode(image).latent_dist
        ours = (posterior.mean + posterior.std * noise) * pipe.vae.config.scaling_factor
    torch.testing.assert_close(swift_latent, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_one", [False, True])
def test_a_guided_unet_takes_the_batch_swift_feeds_and_chunks_merge_as_swift_merges(tmp_path, batch_one):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "unet"
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(tiny_unet_config(**{"block_out_channels": [32, 64, 64], "layers_per_block": 2,
                                     "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                                     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]})
                                     ).save_pretrained(folder)
    config = ExportConfig(to=["coreml"], unet_batch_one=batch_one, chunk_unet=not batch_one)
    export_model(modelio.open_model(folder), config, tmp_path / "out", log=lambda _: None)
    resources = tmp_path / "out" / "coreml" / "Resources"
    packages = [resources / "Unet.mlpackage"] if batch_one else [resources / f"UnetChunk{i}.mlpackage" for i in (1, 2)]
    # P/StableDiffusionPipeline.swift:287: B 2 → one guided call; B 1 → two calls (uncond, then text) per step
    _check_unet(packages, batch=1 if batch_one else 2)
    options = json.loads((tmp_path / "out" / "coreml" / "swift.json").read_text())
    assert options["unetBatch"] == (1 if batch_one else 2) and options["guidanceScale"] >= 1
