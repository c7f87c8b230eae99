"""Slim VAE: fewer channels and layers, distilled toward the pipeline's own VAE, loaded by stock diffusers."""

import shutil

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from pocketdiff import modelio
from pocketdiff.errors import UserError
from pocketdiff.distill.latents import image_folder as read_folder
from pocketdiff.distill.vae import SlimVAEConfig, distill_vae, fidelity, slim_config


def test_slim_config_keeps_channels_in_norm_groups():
    sd = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
          "latent_channels": 4, "scaling_factor": 0.18215, "_class_name": "AutoencoderKL"}
    half = slim_config(sd, 0.5, 1)
    assert half["block_out_channels"] == [64, 128, 256, 256] and half["layers_per_block"] == 1
    assert half["scaling_factor"] == 0.18215 and "_class_name" not in half
    assert slim_config(sd, 0.1, None)["block_out_channels"] == [32, 32, 64, 64]  # never below one norm group
    narrow = slim_config(sd, 0.05, 1, norm_groups=4)  # fewer groups let a stage go below 32 channels
    assert narrow["block_out_channels"] == [8, 12, 24, 24] and narrow["norm_num_groups"] == 4


@pytest.fixture(scope="module")
def wide_vae_pipeline(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline with a VAE wide enough to slim: 64 channels, two layers per stage."""
    folder = tmp_path_factory.mktemp("vae") / "wide"
    shutil.copytree(tiny_pipeline, folder, ignore=shutil.ignore_patterns("vae"))
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, sample_size=32,
                  layers_per_block=2).save_pretrained(folder / "vae")
    return folder


def test_slim_vae_learns_the_teacher_decoder_and_loads_in_stock_diffusers(wide_vae_pipeline, image_folder, tmp_path):
    config = SlimVAEConfig(width=0.25, layers_per_block=1, norm_groups=4, steps=40, batch=8, lr=2e-3, warmup_steps=4,
                           data=str(image_folder), samples=6, sample_steps=1)
    report = distill_vae(modelio.open_model(wide_vae_pipeline), config, tmp_path / "slim")
    assert report["own_samples"] == 6  # half of each batch: the pipeline's own latents, as it decodes them in use
    assert report["vae_decoder_macs_after"] < 0.1 * report["vae_decoder_macs_before"]
    assert report["vae_encoder_params_after"] < 0.1 * report["vae_encoder_params_before"]
    teacher = AutoencoderKL.from_pretrained(wide_vae_pipeline / "vae").eval()
    torch.manual_seed(0)  # the student's starting point: the same seeded init, untrained
    untrained = AutoencoderKL.from_config(slim_config(dict(teacher.config), 0.25, 1, 4)).eval()
    images, _ = read_folder(image_folder, 32)
    start = fidelity(teacher, untrained, images[-3:])
    assert report["held_out_images"] == 3
    assert report["decoder_psnr_db"] > start["decoder_psnr_db"] + 3, (start, report)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert list(pipe.vae.config.block_out_channels) == [16, 16, 16] and pipe.vae.config.layers_per_block == 1
    assert pipe.vae.config.norm_num_groups == 4
    assert pipe.vae.config.scaling_factor == teacher.config.scaling_factor  # same latent space, same UNet
    image = pipe("red apple", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_slim_vae_refusals(tiny_pipeline, tmp_path):
    from PIL import Image

    with pytest.raises(UserError, match="needs a pipeline folder with weights"):
        distill_vae(modelio.open_model(tiny_pipeline / "unet"), SlimVAEConfig(steps=1), tmp_path / "x")
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (32, 32), "red").save(one / "a.png")
    (one / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "red square"}\n')
    with pytest.raises(UserError, match="at least 2 images are needed"):
        distill_vae(modelio.open_model(tiny_pipeline), SlimVAEConfig(steps=1, data=str(one)), tmp_path / "y")
    with pytest.raises(ValueError, match="width"):
        SlimVAEConfig(width=1.5)
