"""Export: each format's files run (where their runtime exists here) and compute what PyTorch computes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pocketdiff import modelio
from pocketdiff.errors import UserError
from pocketdiff.export.exporter import ExportConfig, export_model

from tests.conftest import CAPTIONS, SDXL_STYLE, tiny_unet_config


@pytest.fixture(scope="module")
def onnx_export(tiny_exports):
    return tiny_exports["onnx"]


def test_clip_bpe_matches_transformers(tiny_pipeline):
    from transformers import CLIPTokenizer

    from pocketdiff.export.clip_bpe import ClipBPE

    ours, theirs = ClipBPE(tiny_pipeline / "tokenizer"), CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    texts = [*CAPTIONS, "", "Red  APPLE!", "a zebra's unknown-word 42", "apple " * 60]
    for text in texts:
        expected = theirs(text, padding="max_length", max_length=theirs.model_max_length, truncation=True).input_ids
        assert ours.encode(text) == expected, text


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_numpy_ddim_matches_diffusers(spacing, prediction):
    from diffusers import DDIMScheduler

    from pocketdiff.distill.zoo import scheduler_config
    from pocketdiff.export.ddim import DDIM

    config = {**scheduler_config(), "timestep_spacing": spacing, "prediction_type": prediction}
    theirs, ours = DDIMScheduler.from_config(config), DDIM(config)
    theirs.set_timesteps(4)
    assert ours.timesteps(4).tolist() == theirs.timesteps.tolist()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    for t in ours.timesteps(4):
        eps = rng.standard_normal(x.shape, dtype=np.float32)
        expected = theirs.step(torch.from_numpy(eps), int(t), torch.from_numpy(x)).prev_sample.numpy()
        x_next = ours.step(eps, int(t), x, 4)
        np.testing.assert_allclose(x_next, expected, rtol=1e-6, atol=1e-5)  # float32 rounding
        x = x_next


def test_a_one_step_program_takes_the_samplers_own_step_and_refuses_a_clipping_one():
    from pocketdiff.distill.zoo import scheduler_config
    from pocketdiff.export.ddim import DDIM
    from pocketdiff.export.lcm import LCM
    from pocketdiff.export.runtime import one_step_affine

    x, output = np.random.default_rng(1).standard_normal((2, 4, 8, 8), dtype=np.float32)
    for sampler in (DDIM(scheduler_config()), DDIM({**scheduler_config(), "prediction_type": "v_prediction"}),
                    LCM({**scheduler_config(), "prediction_type": "sample"})):
        t, keep, weight = one_step_affine(sampler)
        assert t == sampler.timesteps(1)[0] == 999
        np.testing.assert_allclose(keep * x + weight * output, sampler.step(output, t, x, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="one step is not affine"):
        one_step_affine(DDIM({**scheduler_config(), "clip_sample": True}))


def test_onnx_layout_is_optimums(onnx_export):
    import onnx

    assert json.loads((onnx_export / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    for part in ("tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert (onnx_export / part).exists(), part
    contract = {
        "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
        "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
        "vae_encoder": (["sample"], ["latent_parameters"]),
        "vae_decoder": (["latent_sample"], ["sample"]),
    }
    for name, (inputs, outputs) in contract.items():
        assert (onnx_export / name / "config.json").exists(), name
        model = onnx.load(str(onnx_export / name / "model.onnx"))
        assert [i.name for i in model.graph.input] == inputs
        assert [o.name for o in model.graph.output] == outputs
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    unet = onnx.load(str(onnx_export / "unet" / "model.onnx"))
    sample = [d.dim_param or d.dim_value for d in unet.graph.input[0].type.tensor_type.shape.dim]
    assert sample == ["batch_size", 4, "height", "width"]
    assert len(unet.graph.input[1].type.tensor_type.shape.dim) == 0  # timestep is a scalar, as optimum feeds it


def test_onnx_parity_report_and_dynamic_shapes(onnx_export, tiny_pipeline):
    report = json.loads((onnx_export / "parity.json").read_text())
    assert report["ok"] and report["image_psnr"] >= 40
    for entry in report["components"].values():
        assert entry["max_abs"] < 1e-4
    from pocketdiff.export.runtime import OnnxModel

    unet = modelio.load_unet(modelio.open_model(tiny_pipeline))
    session = OnnxModel(onnx_export / "unet" / "model.onnx")
    for batch, size in ((1, 8), (3, 16), (2, 24)):
        sample, context = torch.randn(batch, 4, size, size), torch.randn(batch, 77, 32)
        with torch.no_grad():
            expected = unet(sample, 321, context).sample.numpy()
        got = session({"sample": sample.numpy(), "timestep": np.float32(321), "encoder_hidden_states": context.numpy()})
        assert np.abs(got["out_sample"] - expected).max() < 1e-4, (batch, size)


def test_generate_from_onnx_export_runs_without_torch(onnx_export, tmp_path):
    script = (
        "import sys\n"
        "from pocketdiff.apps.cli import main\n"
        f"sys.argv = ['pocketdiff', 'generate', '--backend', 'onnx', '--model', {str(onnx_export)!r}, "
        f"'--prompt', 'red apple', '--prompt', 'rocket', '--steps', '3', '--out', {str(tmp_path)!r}, '--grid']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.glob("*seed*.png"))) == 2 and (tmp_path / "grid.png").exists()


def test_image_check_samples_torch_as_the_runtime_does(tiny_pipeline):
    from diffusers import PNDMScheduler

    from pocketdiff.export.exporter import torch_images

    ddim = modelio.load_pipeline(modelio.open_model(tiny_pipeline))
    pndm = modelio.load_pipeline(modelio.open_model(tiny_pipeline))
    pndm.scheduler = PNDMScheduler.from_config(ddim.scheduler.config, skip_prk_steps=True)  # SD-1.5's own sampler
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    own = pndm(["red apple", "rocket"], num_inference_steps=4, output_type="np", latents=torch.from_numpy(latents)).images
    assert not np.array_equal((np.clip(own, 0, 1) * 255).round().astype(np.uint8),
                              torch_images(ddim, ["red apple", "rocket"], 4, 7.5, latents))  # PNDM's image differs
    np.testing.assert_array_equal(torch_images(pndm, ["red apple", "rocket"], 4, 7.5, latents),
                                  torch_images(ddim, ["red apple", "rocket"], 4, 7.5, latents))
    assert isinstance(pndm.scheduler, PNDMScheduler)  # the pipeline keeps its own scheduler


def test_parity_failure_names_component_and_exits_2(tiny_pipeline, tmp_path):
    result = subprocess.run(["pocketdiff", "export", str(tiny_pipeline), "--to", "onnx", "--components", "text_encoder",
                             "--max-abs-fp32", "1e-12", "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "onnx text_encoder: max-abs error" in result.stderr
    assert not json.loads((tmp_path / "onnx" / "parity.json").read_text())["ok"]


@pytest.mark.parametrize("args, message", [
    (["--to", "tflite"], "to.0: Input should be 'onnx', 'executorch' or 'coreml'"),
    (["--to", "onnx", "--precision", "int8"], "ONNX int8 ships the UNet `pocketdiff quantize --backend "
                                              "onnx-int8|brevitas-w4a8` makes; this model is not quantized"),
    (["--to", "coreml", "--precision", "int8"], "Core ML int8 ships the UNet `pocketdiff quantize --backend "
                                                "coreml-w8a8` makes; this model is not quantized"),
    (["--components", "safety_checker"], "components.0: Input should be"),
    (["--to", "onnx", "--chunk-unet"], "chunk_unet is a Core ML UNet option: export the unet to coreml"),
    (["--to", "coreml", "--components", "one_step"], "one_step is not a Core ML component"),
    (["--to", "onnx", "--coreml-attention", "split_einsum"], "coreml_attention is a Core ML UNet option"),
    (["--to", "coreml", "--coreml-attention", "einsum"], "coreml_attention: Input should be 'original', 'split_einsum' or 'split_einsum_v2'"),
])
def test_bad_export_requests_exit_2(tiny_pipeline, tmp_path, args, message):
    result = subprocess.run(["pocketdiff", "export", str(tiny_pipeline), *args, "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_etdump_needs_executorch(tiny_pipeline, tmp_path, backend):
    result = subprocess.run(["pocketdiff", "generate", "--prompt", "rocket", "--model", str(tiny_pipeline), "--backend",
                             backend, "--etdump", str(tmp_path / "d"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: ETDump is ExecuTorch's trace: --etdump needs --backend executorch"


def test_workers_export_what_one_process_exports(tiny_pipeline, tiny_exports, tmp_path):
    from pocketdiff.export.runtime import load_model

    config = ExportConfig(to=["onnx"], components=["text_encoder", "vae_decoder"])  # one process, in order
    report = export_model(modelio.open_model(tiny_pipeline), config, tmp_path, log=lambda _: None)["onnx"]
    parallel = tiny_exports["reports"]["onnx"]["components"]  # two worker processes, longest job first
    for name, entry in report["components"].items():
        assert entry["max_abs"] == parallel[name]["max_abs"], name  # the same seeded inputs, the same numbers
        inputs = {"latent_sample": np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)} \
            if name == "vae_decoder" else {"input_ids": np.arange(77, dtype=np.int64)[None] % 10}
        ours, theirs = (load_model(folder / name / "model.onnx")(inputs) for folder in (tmp_path / "onnx", tiny_exports["onnx"]))
        assert all(np.array_equal(ours[k], theirs[k]) for k in ours), name


def test_onnx_fp16_stays_close(tiny_pipeline, tmp_path):
    config = ExportConfig(to=["onnx"], precision="fp16", components=["unet"])
    report = export_model(modelio.open_model(tiny_pipeline), config, tmp_path, log=lambda _: None)["onnx"]
    assert report["ok"] and report["components"]["unet"]["rel"] < 5e-2
    assert "image_psnr" not in report  # a UNet alone has no end-to-end check


@pytest.mark.slow
def test_executorch_pipeline_matches_pytorch(tiny_exports, tmp_path):
    report = tiny_exports["reports"]["executorch"]
    assert report["ok"] and report["image_psnr"] >= 40
    io = json.loads((tiny_exports["executorch"] / "unet" / "io.json").read_text())
    assert io["inputs"] == ["sample", "timestep", "encoder_hidden_states"] and io["shapes"]["sample"][0] == 2
    from pocketdiff.export.runtime import ExportedPipeline

    traced = ExportedPipeline(tiny_exports["executorch"], "executorch", etdump=True)
    unguided = traced(["rocket"], 2, 1.0)  # batch 1 on a batch-2 program
    assert unguided.shape == (1, 32, 32, 3)
    from executorch.devtools import Inspector

    dumps = traced.write_etdumps(tmp_path / "etdump")
    assert [d.name for d in dumps] == ["text_encoder.etdp", "unet.etdp", "vae_decoder.etdp"]
    (execute,) = [b for b in Inspector(etdump_path=str(dumps[1])).event_blocks if b.name == "Execute"]
    assert {len(e.perf_data.raw) for e in execute.events} == {2}  # every op timed in each of the 2 UNet calls
    names = {e.name for e in execute.events}
    assert "DELEGATE_CALL" in names and any("GEMM" in n for n in names)  # XNNPACK's own kernels are named


@pytest.mark.slow
def test_executorch_int8_unet_keeps_the_image(tiny_pipeline, tmp_path):
    from diffusers import UNet2DConditionModel

    config = ExportConfig(to=["executorch"], precision="int8", components=["text_encoder", "unet", "vae_decoder"])
    report = export_model(modelio.open_model(tiny_pipeline), config, tmp_path, log=lambda _: None)["executorch"]
    unet = report["components"]["unet"]
    assert report["ok"] and report["image_psnr"] >= 25 and unet["precision"] == "int8"
    assert report["components"]["text_encoder"]["precision"] == "fp32"
    assert unet["rel"] > 1e-4  # quantized for real: far from fp32's 1e-6
    params = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet").parameters())
    assert unet["bytes"] < 4 * params  # int8 linears: below the fp32 weights alone


def _unet_folder(tmp_path, name, **overrides):
    folder = tmp_path / name
    folder.mkdir()
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_config(tiny_unet_config(**overrides)).save_pretrained(folder)
    return folder


def test_coreml_pipeline_follows_swift_contract(tiny_pipeline, tmp_path):
    report = export_model(modelio.open_model(tiny_pipeline), ExportConfig(to=["coreml"]), tmp_path,
                          log=lambda _: None)["coreml"]
    resources = tmp_path / "coreml" / "Resources"
    for name in ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"):
        assert (resources / f"{name}.mlpackage").is_dir(), name
    assert (resources / "vocab.json").exists() and (resources / "merges.txt").exists()
    parts = report["components"]
    assert parts["text_encoder"]["inputs"] == {"input_ids": [1, 77]}
    assert parts["text_encoder"]["outputs"] == ["last_hidden_state", "pooled_outputs"]
    assert parts["unet"]["inputs"] == {"sample": [2, 4, 8, 8], "timestep": [2], "encoder_hidden_states": [2, 32, 1, 77]}
    assert parts["unet"]["outputs"] == ["noise_pred"]
    assert parts["vae_decoder"]["inputs"] == {"z": [1, 4, 8, 8]} and parts["vae_decoder"]["outputs"] == ["image"]
    assert "FLOAT16" in parts["unet"]["const_dtypes"] and report["precision"] == "fp16"
    if sys.platform != "darwin":
        assert parts["unet"]["numeric"].startswith("numeric check skipped")


def test_coreml_split_einsum_v2_attends_in_query_chunks_of_512(tmp_path):
    from diffusers.models.attention_processor import Attention

    from pocketdiff.export.split_einsum import QUERY_CHUNK

    folder = _unet_folder(tmp_path, "unet", sample_size=32)  # 1,024 queries in the outer stage, 256 in the mid block
    unet, lengths = modelio.load_unet(modelio.open_model(folder)), {}
    for module in unet.modules():
        if isinstance(module, Attention):
            module.register_forward_hook(lambda m, args, _: lengths.__setitem__(m, args[0].shape[1]))
    with torch.no_grad():
        unet(**modelio.unet_example_inputs(dict(unet.config), 32, batch=1))
    config = ExportConfig(to=["coreml"], coreml_attention="split_einsum_v2")
    ops = export_model(modelio.open_model(folder), config, tmp_path / "out", log=lambda _: None)["coreml"]["components"]["unet"]["ops"]
    assert ops["softmax"] == sum(m.heads * -(-length // QUERY_CHUNK) for m, length in lengths.items()) > sum(
        m.heads for m in lengths)  # a softmax per head and query chunk: the outer stage's in two


def test_coreml_sdxl_unet_takes_swifts_text_embeds_and_time_ids_chunked_and_split_einsum(tmp_path):
    sdxl = _unet_folder(tmp_path, "sdxl", **SDXL_STYLE)
    config = ExportConfig(to=["coreml"], chunk_unet=True, coreml_attention="split_einsum")
    unet = export_model(modelio.open_model(sdxl), config, tmp_path / "out", log=lambda _: None)["coreml"]["components"]["unet"]
    assert unet["inputs"] == {"sample": [2, 4, 8, 8], "timestep": [2], "encoder_hidden_states": [2, 32, 1, 77],
                              "text_embeds": [2, 32], "time_ids": [2, 6]}  # the names and shapes Swift's SDXL Unet feeds
    assert set(unet["chunks"]) == {"UnetChunk1.mlpackage", "UnetChunk2.mlpackage"} and unet["ops"]["einsum"] > 0


def test_coreml_takes_midblockless_and_guidance_embedded_unets(tmp_path):
    pruned = _unet_folder(tmp_path, "no-mid", mid_block_type=None)
    report = export_model(modelio.open_model(pruned), ExportConfig(to=["coreml"]), tmp_path / "a", log=lambda _: None)
    assert report["coreml"]["components"]["unet"]["outputs"] == ["noise_pred"]
    lcm = _unet_folder(tmp_path, "lcm", time_cond_proj_dim=16)
    report = export_model(modelio.open_model(lcm), ExportConfig(to=["coreml"]), tmp_path / "b", log=lambda _: None)
    inputs = report["coreml"]["components"]["unet"]["inputs"]
    # Swift feeds no guidance input: the student's guidance is folded in, and it runs unguided at batch one
    assert "timestep_cond" not in inputs and inputs["sample"][0] == 1


@pytest.mark.parametrize("query_chunk", [None, 24])  # 24: the 64 queries of the outer stage in 24 + 24 + 16
@pytest.mark.parametrize("overrides", [{}, {"use_linear_projection": True, "transformer_layers_per_block": 2},
                                       {"time_cond_proj_dim": 8, "mid_block_type": None}])
def test_split_einsum_unet_computes_the_unet_with_its_own_weights(overrides, query_chunk):
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from pocketdiff.export.split_einsum import SplitEinsumTransformer, split_einsum_unet

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_unet_config(**overrides)).eval()
    rewritten = split_einsum_unet(unet, query_chunk)
    kinds = lambda model: {type(m) for m in model.modules()}  # noqa: E731
    assert SplitEinsumTransformer not in kinds(unet) and SplitEinsumTransformer in kinds(rewritten)
    assert sum(isinstance(m, SplitEinsumTransformer) for m in rewritten.modules()) == \
        sum(isinstance(m, Transformer2DModel) for m in unet.modules())
    assert [p.data_ptr() for p in rewritten.parameters()] == [p.data_ptr() for p in unet.parameters()]  # shared
    sample, context, timesteps = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor([10.0, 700.0])
    extra = {"timestep_cond": torch.randn(2, 8)} if "time_cond_proj_dim" in overrides else {}
    with torch.no_grad():
        expected, ours = (model(sample, timesteps, context, **extra).sample for model in (unet, rewritten))
    assert (ours - expected).abs().max() < 1e-5 * expected.abs().max()


def test_split_einsum_refuses_what_it_would_not_compute_exactly():
    from diffusers import UNet2DConditionModel

    from pocketdiff.export.split_einsum import split_einsum_unet

    unet = UNet2DConditionModel.from_config(tiny_unet_config(only_cross_attention=True))
    with pytest.raises(UserError, match=r"cannot rewrite down_blocks\.0\.attentions\.0\.transformer_blocks\.0: .*cross-only"):
        split_einsum_unet(unet)


def test_coreml_split_einsum_unet_attends_per_head_in_the_neural_engine_layout(tiny_pipeline, tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    config = ExportConfig(to=["coreml"], components=["unet"], coreml_attention="split_einsum")
    entry = export_model(modelio.open_model(tiny_pipeline), config, tmp_path, log=lambda _: None)["coreml"]
    unet_entry = entry["components"]["unet"]
    ops, unet = unet_entry["ops"], UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    heads = sum(m.heads for m in unet.modules() if isinstance(m, Attention))
    assert ops["softmax"] == heads and ops["einsum"] == 2 * heads  # one softmax and two einsums per head
    assert "matmul" not in ops and "layer_norm" not in ops  # no (B, heads, S, d) products; norms over channels
    inside = {id(m) for t in unet.modules() if isinstance(t, Transformer2DModel) for m in t.modules()}
    outside = sum(isinstance(m, torch.nn.Linear) and id(m) not in inside for m in unet.modules())
    assert ops["linear"] == outside  # every transformer projection became a 1x1 convolution
    assert unet_entry["inputs"]["encoder_hidden_states"] == [2, 32, 1, 77] and unet_entry["outputs"] == ["noise_pred"]


@pytest.mark.parametrize("overrides", [{}, {"mid_block_type": None}, {"time_cond_proj_dim": 16}, SDXL_STYLE,
                                       {"layers_per_block": 1, "block_out_channels": [32, 64, 64]}])
def test_unet_chunks_compute_the_unet(tmp_path, overrides):
    from pocketdiff.export import coreml, unet_chunks
    from pocketdiff.export.components import model_components

    if "block_out_channels" in overrides:
        overrides.update(down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    ref = modelio.open_model(_unet_folder(tmp_path, "unet", **overrides))
    (component,) = model_components(ref, None, ("unet",), None)
    component = coreml.adapt(component, None, ref, ExportConfig())
    chunks = unet_chunks.chunks(component.module.unet, component.inputs)  # a student's with its guidance folded in
    (first, first_inputs, names), (second, second_inputs, outputs) = chunks
    with torch.no_grad():
        handed = {**component.inputs, **dict(zip(names, first(*first_inputs.values())))}  # as Swift merges them
        chunked = second(*(handed[name] for name in second_inputs))
        whole = component.module(*component.inputs.values())
    assert torch.equal(chunked, whole) and outputs == ["noise_pred"]
    assert set(second_inputs) <= set(names) | set(component.inputs) and "sample" not in names
    assert len({id(t) for t in handed.values()}) == len(handed)  # Core ML merges outputs that are one tensor


def test_sd15_unet_chunks_each_run_about_half_the_weights():
    from diffusers import UNet2DConditionModel

    from pocketdiff.devices.anchors import SD15_UNET
    from pocketdiff.export import unet_chunks

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET).eval()
        inputs = {"sample": torch.zeros(2, 4, 64, 64), "timestep": torch.zeros(2),
                  "encoder_hidden_states": torch.zeros(2, 768, 1, 77)}
    ran, owners = [], [m for m in unet.modules() if any(True for _ in m.parameters(recurse=False))]
    hooks = [m.register_forward_hook(lambda module, *_: ran.append(module)) for m in owners]
    weights = []
    for module, example, _ in unet_chunks.chunks(unet, inputs):
        ran.clear()
        module(*example.values())
        weights.append(sum(p.numel() for m in set(ran) for p in m.parameters(recurse=False)))
    for hook in hooks:
        hook.remove()
    assert sum(weights) == sum(p.numel() for p in unet.parameters())  # every weight runs, in one chunk only
    assert 0.45 < weights[0] / sum(weights) < 0.55, weights


def test_coreml_unet_ships_in_two_chunks_swift_runs_in_turn(tmp_path):
    from pocketdiff.export import coreml

    lcm = modelio.open_model(_unet_folder(tmp_path, "lcm", time_cond_proj_dim=16, mid_block_type=None))
    config = ExportConfig(to=["coreml"], chunk_unet=True)
    entry = export_model(lcm, config, tmp_path / "out", log=lambda _: None)["coreml"]["components"]["unet"]
    resources = tmp_path / "out" / "coreml" / "Resources"
    assert sorted(p.name for p in resources.glob("*.mlpackage")) == ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]
    first, second = entry["chunks"].values()
    assert entry["inputs"] == {"sample": [1, 4, 8, 8], "timestep": [1], "encoder_hidden_states": [1, 32, 1, 77]}
    assert first["inputs"] == list(entry["inputs"]) and second["outputs"] == ["noise_pred"] == entry["outputs"]
    assert set(second["inputs"]) <= set(first["outputs"]) | set(entry["inputs"])
    assert entry["bytes"] == first["bytes"] + second["bytes"]
    whole = export_model(lcm, ExportConfig(to=["coreml"]), tmp_path / "out", log=lambda _: None)["coreml"]
    assert sorted(p.name for p in resources.glob("*.mlpackage")) == ["Unet.mlpackage"]  # no stale chunks for Swift
    assert abs(whole["components"]["unet"]["bytes"] - entry["bytes"]) < 0.02 * entry["bytes"]
    assert max(first["bytes"], second["bytes"]) < 0.75 * entry["bytes"]
    component = type("Int8", (), {"name": "unet"})()
    with pytest.raises(UserError, match="chunking takes a float or palettized UNet"):
        coreml._parts(component, "int8", None, chunked=True, attention="original")
    with pytest.raises(UserError, match="split-einsum attention rewrites a float UNet"):
        coreml._parts(component, "int8", None, chunked=False, attention="split_einsum")


@pytest.fixture(scope="module")
def sdxl_export(tiny_sdxl_pipeline, tmp_path_factory):
    """A tiny SDXL pipeline and its ONNX export (every component, both text encoders)."""
    folder = tiny_sdxl_pipeline
    out = tmp_path_factory.mktemp("export-sdxl")
    report = export_model(modelio.open_model(folder), ExportConfig(to=["onnx"], workers=2), out, log=lambda _: None)["onnx"]
    return folder, out / "onnx", report


def test_sdxl_pipeline_exports_to_onnx_in_optimums_layout(sdxl_export):
    import onnx

    _, out, report = sdxl_export
    contract = {  # optimum's SDXL exports: every hidden state from both encoders, the UNet's added conditions
        "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output", "hidden_states.0", "hidden_states.1"]),
        "text_encoder_2": (["input_ids"], ["text_embeds", "last_hidden_state", "hidden_states.0", "hidden_states.1"]),
        "unet": (["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"], ["out_sample"]),
    }
    for name, (inputs, outputs) in contract.items():
        model = onnx.load(str(out / name / "model.onnx"))
        assert ([i.name for i in model.graph.input], [o.name for o in model.graph.output]) == (inputs, outputs), name
        assert (out / name / "config.json").exists()
    assert (out / "tokenizer_2" / "vocab.json").exists() and (out / "tokenizer_2" / "merges.txt").exists()
    assert report["ok"] and report["image_psnr"] >= 40 and report["components"]["text_encoder_2"]["max_abs"] < 1e-4


def test_sdxl_runtime_conditions_the_unet_as_diffusers_does(sdxl_export):
    from pocketdiff.export.runtime import ExportedPipeline

    folder, out, _ = sdxl_export
    pipe, ours = modelio.load_pipeline(modelio.open_model(folder)), ExportedPipeline(out, "onnx")
    for prompt in ("red apple", "grinning face with a rocket"):
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompt, do_classifier_free_guidance=True)
        cond = ours.conditions(prompt)
        np.testing.assert_allclose(cond["encoder_hidden_states"], embeds.numpy(), atol=1e-5)  # both penultimate layers
        np.testing.assert_allclose(cond["text_embeds"], pooled.numpy(), atol=1e-5)  # the second encoder's projection
        unconditional = ours.negative_conditions(cond)
        assert not negative.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt
        assert not unconditional["encoder_hidden_states"].any() and not unconditional["text_embeds"].any()
    expected = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32)
    np.testing.assert_array_equal(cond["time_ids"], expected.numpy())


def test_sdxl_unet_export_without_its_second_encoder_is_refused(sdxl_export, tmp_path):
    import shutil

    from pocketdiff.export.runtime import ExportedPipeline

    partial = tmp_path / "partial"
    shutil.copytree(sdxl_export[1], partial, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(UserError, match="also takes text_embeds, time_ids .*needs text_encoder_2"):
        ExportedPipeline(partial, "onnx")


def test_coreml_sdxl_text_encoders_follow_swifts_xl_contract(sdxl_export, tmp_path):
    from pocketdiff.export import coreml
    from pocketdiff.export.components import model_components

    folder = sdxl_export[0]
    config = ExportConfig(to=["coreml"], components=["text_encoder"])
    report = export_model(modelio.open_model(folder), config, tmp_path, log=lambda _: None)["coreml"]["components"]
    assert list(report) == ["text_encoder", "text_encoder_2"]
    for entry in report.values():
        assert entry["inputs"] == {"input_ids": [1, 77]} and entry["outputs"] == ["hidden_embeds", "pooled_outputs"]
    assert (tmp_path / "coreml" / "Resources" / "TextEncoder2.mlpackage").is_dir()
    ref = modelio.open_model(folder)
    pipe = modelio.load_pipeline(ref)
    (decoder,) = model_components(ref, pipe, ("vae_decoder",))
    # Swift apps scale an XL pipeline's latents by 0.13025: the package undoes that, then the VAE's own scale
    assert coreml.adapt(decoder, pipe, ref, ExportConfig()).module.rescale == pytest.approx(0.13025 / pipe.vae.config.scaling_factor)


def test_sdxl_second_text_encoder_is_profiled_counted_and_estimated(sdxl_export, tiny_pipeline):
    from pocketdiff.macs import census_model
    from pocketdiff.devices.profile import ProfileConfig, profile
    from pocketdiff.devices.profiles import load_profile
    from pocketdiff.devices.roofline import estimate_model

    folder, out, _ = sdxl_export
    ref = modelio.open_model(folder)
    config = ProfileConfig(components=["text_encoder", "text_encoder_2"], runs=2, warmup=1)
    first, second = profile(out, config, log=lambda _: None)["measurements"]
    assert second["component"] == "text_encoder_2" and second["inputs"] == {"input_ids": [1, 77]}
    # the two encoders are alike but for the second's projection of its pooled state, which is counted: the
    # encoder is built as its config's class (CLIPTextModelWithProjection), not AutoModel's CLIPTextModel
    encoder_2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    projection = encoder_2["hidden_size"] * encoder_2["projection_dim"]
    census = {c.component: c for c in census_model(ref)}
    assert census["text_encoder_2"].macs - census["text_encoder"].macs == projection
    assert (second["roofline"]["gflop"] - first["roofline"]["gflop"]) * 1e9 == pytest.approx(2 * projection)
    assert estimate_model(ref, load_profile("galaxy-s24"), ["text_encoder_2"])["text_encoder_2"].flops > 0
    with pytest.raises(UserError, match="no text_encoder_2"):
        estimate_model(modelio.open_model(tiny_pipeline), load_profile("galaxy-s24"), ["text_encoder_2"])


@pytest.mark.parametrize("backend, message", [("tpu", "unknown ExecuTorch backend 'tpu'"),
                                              ("qnn", "needs a Qualcomm SoC compile spec")])
def test_executorch_backends_refuse_clearly(backend, message):
    from pocketdiff.export.executorch import partitioner

    with pytest.raises(UserError, match=message):
        partitioner(backend)


def test_a_fixed_prompt_set_ships_its_text_states_instead_of_the_text_encoder(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pocketdiff.export.prompt_table import FILE, PromptTable
    from pocketdiff.export.runtime import ExportedPipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red apple\n\nblue square\nred apple\n")
    config = ExportConfig(to=["onnx"], components=["unet", "vae_decoder"], prompt_embeddings=str(prompts), steps=2)
    report = export_model(modelio.open_model(tiny_pipeline), config, tmp_path / "out", log=lambda _: None)["onnx"]
    folder = tmp_path / "out" / "onnx"
    assert not (folder / "text_encoder").exists() and (folder / FILE).exists()
    assert report["prompt_embeddings"]["prompts"] == 2  # blank lines and repeats dropped
    assert report["image_check"]["prompts"] == ["red apple", "blue square"] and report["image_psnr"] >= 40
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    ids = pipe.tokenizer(["blue square"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder(ids).last_hidden_state.numpy()
    table = PromptTable(folder / FILE)
    assert table.prompts == ["", "red apple", "blue square"]
    np.testing.assert_allclose(table.conditions("blue square")["encoder_hidden_states"], expected, atol=1e-6)
    images = ExportedPipeline(folder, "onnx")(["blue square"], steps=2, guidance=7.5)
    assert images.shape == (1, 32, 32, 3)
    with pytest.raises(UserError, match="'green circle' is not in this export's prompt set"):
        ExportedPipeline(folder, "onnx")(["green circle"], steps=2, guidance=7.5)
    with pytest.raises(UserError, match="no such captions file"):
        export_model(modelio.open_model(tiny_pipeline), ExportConfig(to=["onnx"], prompt_embeddings=str(tmp_path / "none")),
                     tmp_path / "x", log=lambda _: None)


def test_an_int8_component_holds_the_image_to_the_int8_limit(tmp_path):
    from pocketdiff.export.parity import ParityThresholds, write_report

    def image_check(text_encoder_precision):
        report = {"format": "onnx", "precision": "fp32", "image_psnr": 30.0,
                  "components": {"text_encoder": {"precision": text_encoder_precision, "max_abs": 0.01, "rel": 0.01},
                                 "unet": {"precision": "fp32", "max_abs": 1e-6, "rel": 1e-6}}}
        write_report(report, tmp_path, ParityThresholds())
        return report

    assert image_check("int8")["ok"]  # 30 dB: above int8's 25, below fp32's 40
    with pytest.raises(UserError, match="onnx end-to-end: image PSNR 30.00 dB < 40 dB"):
        image_check("fp32")


@pytest.mark.slow
def test_text_encoder_int8_is_each_formats_own_int8_and_stays_close(tiny_pipeline, tmp_path):
    import onnx

    from pocketdiff.export.runtime import OnnxModel

    config = ExportConfig(to=["onnx", "executorch", "coreml"], components=["text_encoder"], text_encoder_int8=True)
    reports = export_model(modelio.open_model(tiny_pipeline), config, tmp_path, log=lambda _: None)
    for fmt in ("onnx", "executorch"):
        entry = reports[fmt]["components"]["text_encoder"]
        assert entry["precision"] == "int8" and 1e-4 < entry["rel"] < 0.1, (fmt, entry)  # quantized, and close
    path = tmp_path / "onnx" / "text_encoder" / "model.onnx"
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {node.op_type for node in onnx.load(path).graph.node}
    states = OnnxModel(path)({"input_ids": np.zeros((3, 77), dtype=np.int64)})["last_hidden_state"]
    assert states.shape == (3, 77, 32)  # the batch axis stays dynamic
    coreml = reports["coreml"]["components"]["text_encoder"]
    assert coreml["ops"]["constexpr_affine_dequantize"] == 7  # six linears and the token embedding
    assert reports["onnx"]["components"]["text_encoder"]["quantization"].startswith("onnxruntime dynamic int8")
