"""Parameter and MAC counts against BK-SDM's published table (SD-1.5 config, random weights)."""

import json
import math
import subprocess

from pocketdiff import modelio
from pocketdiff.macs import block_name, census_model

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4, "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


def test_sd15_matches_bk_sdm_table(sd15_unet_folder):
    (unet,) = census_model(modelio.open_model(sd15_unet_folder), resolution=512)
    assert unet.input_shape == (1, 4, 64, 64)
    assert unet.params == 859_520_964
    assert math.isclose(unet.macs, 338.7e9, rel_tol=0.005)
    assert math.isclose(unet.attention_macs, 63e9, rel_tol=0.02)
    assert set(unet.blocks) >= {f"down_blocks.{i}" for i in range(4)} | {f"up_blocks.{i}" for i in range(4)} | {"mid_block"}
    # high-resolution attention sits in the outermost stages
    assert unet.blocks["up_blocks.3"].attention_macs > 10 * unet.blocks["up_blocks.1"].attention_macs


def test_macs_scale_with_resolution(sd15_unet_folder):
    (full,) = census_model(modelio.open_model(sd15_unet_folder), resolution=512)
    (half,) = census_model(modelio.open_model(sd15_unet_folder), resolution=256)
    assert 3.5 < full.macs / half.macs < 4.1  # convolutions scale with pixels; text-side linears do not
    assert full.params == half.params


def test_sdxl_config_with_added_conditions(tmp_path):
    folder = tmp_path / "sdxl-unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SDXL_UNET))
    (unet,) = census_model(modelio.open_model(folder), resolution=1024)
    assert math.isclose(unet.params, 2_567.5e6, rel_tol=0.001)
    assert unet.input_shape == (1, 4, 128, 128)


def test_pipeline_census_covers_every_network(tiny_pipeline):
    censuses = {c.component: c for c in census_model(modelio.open_model(tiny_pipeline))}
    assert set(censuses) == {"unet", "text_encoder", "vae_decoder", "vae_encoder"}
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_pipeline / "vae")
    vae_params = sum(p.numel() for p in vae.parameters())
    assert censuses["vae_decoder"].params + censuses["vae_encoder"].params == vae_params
    assert censuses["vae_decoder"].input_shape == (1, 4, 8, 8)  # 32 px, three-stage VAE: factor 4


def test_block_names():
    assert block_name("down_blocks.1.attentions.0.proj_in") == "down_blocks.1"
    assert block_name("mid_block.resnets.0.conv1") == "mid_block"
    assert block_name("decoder.up_blocks.2.resnets.1") == "decoder.up_blocks.2"
    assert block_name("decoder.mid_block.attentions.0") == "decoder.mid_block"
    assert block_name("text_model.encoder.layers.3.mlp.fc1") == "text_model.encoder.layers.3"
    assert block_name("conv_in") == "conv_in"


def test_cli_inspect_json_and_random_weights_note(sd15_unet_folder):
    result = subprocess.run(["pocketdiff", "inspect", str(sd15_unet_folder), "--resolution", "512", "--json", "-"],
                            capture_output=True, text=True, check=True)
    first, _, rest = result.stdout.partition("\n")
    assert first == "random weights: architecture only"
    (unet,) = json.loads(rest)
    assert unet["params"] == 859_520_964
    assert round(unet["macs"] / 1e9, 1) in (338.6, 338.7)
