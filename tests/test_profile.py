"""Profiling (#9): op census, rooflines anchored on published figures, host runners with each
runtime's own profiler, phone runners parsed from recorded real outputs, the latency lookup table."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pocketdiff import modelio
from pocketdiff.errors import UserError
from pocketdiff.devices import remote
from pocketdiff.devices.anchors import SD15_UNET
from pocketdiff.devices.host import _PeakMemory
from pocketdiff.devices.profiles import DeviceProfile, load_profile, names
from pocketdiff.devices.roofline import anchor_ops, calibrate, estimate, roofline

RECORDED = Path(__file__).parent / "data" / "device_outputs"


def _profile(*args):
    return subprocess.run(["pocketdiff", "profile", *args], capture_output=True, text=True)


def test_sd15_op_census_matches_published_counts():
    ops = anchor_ops("sd15-unet-512")  # SD-1.5's UNet at 512 px, batch 1, counted once per process
    weights = sum(o.weight_elements for o in ops)
    assert weights == 859_520_964  # every weight read once: the UNet's parameter count
    matmul = sum(o.flops for o in ops if o.op in ("convolution", "addmm", "mm"))
    assert math.isclose(matmul / 2, 338.7e9, rel_tol=0.005)  # BK-SDM's MACs
    attention = [o for o in ops if o.op == "scaled_dot_product_attention"]
    assert len(attention) == 32  # 16 transformer blocks, self- and cross-attention, each one fused op
    assert math.isclose(sum(o.flops for o in ops) / 1e12, 0.80, rel_tol=0.02)  # REFERENCE: ~0.8 TFLOP per call
    assert {o.block for o in ops} >= {"down_blocks.0", "mid_block", "up_blocks.3"}


def test_roofline_takes_the_slower_of_compute_and_memory():
    from pocketdiff.devices.opcount import Op

    device = DeviceProfile(name="toy", device="toy", soc="toy", kind="android", estimate=True,
                           compute={"npu": {"int8": 10.0}}, memory_bandwidth_gb_s=100.0, runtimes=[], reach="adb")
    gemm = Op("mm", "a", flops=2 * 10**12, activation_elements=10**6, weight_elements=10**6)  # 200 ms vs 0.02 ms
    norm = Op("native_group_norm", "b", flops=8 * 10**8, activation_elements=10**9, weight_elements=0)  # 0.08 vs 10 ms
    result = roofline([gemm, norm], device, "npu", "int8")
    assert math.isclose(result.compute_bound_ms, 200.0) and math.isclose(result.memory_bound_ms, 10.0)
    assert math.isclose(result.ideal_ms, 210.0) and result.estimate_ms is None
    assert math.isclose(roofline([gemm, norm], device, "npu", "int8", fraction=0.5).blocks_ms["b"], 20.0)
    with pytest.raises(UserError, match="no published fp16 peak for its npu"):
        roofline([gemm], device, "npu", "fp16")


def test_phone_profiles_reproduce_their_anchor_measurements():
    phones = [n for n in names() if not n.startswith("host")]
    assert {"galaxy-s24", "snapdragon-8-elite-gen5", "iphone-14", "iphone-15-pro"} <= set(phones)
    for name in phones:
        profile = load_profile(name)
        cal = profile.calibration
        assert profile.estimate and profile.sources and cal.source
        assert cal.achieved_fraction == pytest.approx(calibrate(profile), rel=1e-3), name  # the YAML is current
        if not cal.borrowed_from:
            assert estimate(list(anchor_ops(cal.model)), profile).estimate_ms == pytest.approx(cal.measured_ms, rel=2e-3)


def test_estimate_cli_orders_presets_and_refuses_unknown_peaks(sd15_unet_folder, tmp_path):
    from pocketdiff.distill.blocks import preset_config
    from pocketdiff.devices.roofline import estimate_model

    out = tmp_path / "sd15.json"
    done = subprocess.run(["pocketdiff", "estimate", str(sd15_unet_folder), "--device", "galaxy-s24", "--batch", "1",
                           "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["unet"]["estimate_ms"] == pytest.approx(79, rel=2e-3)  # the anchor itself
    assert "Qualcomm AI Hub" in done.stdout
    small = tmp_path / "bk-small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                   **preset_config(SD15_UNET, "bk-small")}))
    (estimated,) = estimate_model(modelio.open_model(small), load_profile("galaxy-s24"), ["unet"], batch=1).values()
    assert estimated.estimate_ms < 0.8 * 79
    with pytest.raises(UserError, match="no published int8 peak for its gpu"):
        estimate_model(modelio.open_model("default"), load_profile("galaxy-s24"), ["unet"], "gpu", "int8")
    done = subprocess.run(["pocketdiff", "estimate", "default", "--device", "pixel-99"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown device profile 'pixel-99' (known: galaxy-s24" in done.stderr


def test_host_profile_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETDIFF_CACHE", str(tmp_path))
    first = load_profile("host-cpu")
    cached = json.loads((tmp_path / "devices" / "host-cpu.json").read_text())
    assert first.compute["cpu"]["fp32"] > 0.001 and first.memory_bandwidth_gb_s > 0.1  # tera-ops/s, GB/s
    assert load_profile("host-cpu").compute == first.compute and cached["compute"] == first.compute


def test_peak_memory_sees_an_allocation():
    with _PeakMemory() as memory:
        block = np.ones(200 * 2**20 // 8)
        del block
    assert memory.added > 150 * 2**20


def test_profile_onnxruntime_breakdown_blocks_and_chart(tiny_exports, tmp_path):
    result = _profile(str(tiny_exports["onnx"]), "--backend", "onnxruntime", "--components", "unet,vae_decoder", "--runs", "5",
                      "--out", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "p" / "profile.json").read_text())
    unet, decoder = report["measurements"]
    assert unet["inputs"]["sample"][0] == 2  # a guided teacher: prompt and empty prompt per call
    assert unet["p10_ms"] <= unet["median_ms"] <= unet["p90_ms"] and unet["peak_memory_bytes"] > 0
    ops = {o["op"] for o in unet["ops"]}
    assert {"Conv", "MatMul"} <= ops and sum(o["share"] for o in unet["ops"]) == pytest.approx(1.0)
    assert {"down_blocks.0", "mid_block", "up_blocks.1"} <= set(unet["blocks_ms"])
    assert unet["coverage"]["nodes"]["CPUExecutionProvider"] > 100
    assert 0 < unet["roofline"]["efficiency"] < 1.5 and unet["roofline"]["gflop"] > 0
    assert decoder["component"] == "vae_decoder" and "Conv" in {o["op"] for o in decoder["ops"]}
    assert (tmp_path / "p" / "profile.png").stat().st_size > 10_000
    assert "top operators" in result.stdout


def test_profile_executorch_reads_etdump_coverage(tiny_exports, tmp_path):
    result = _profile(str(tiny_exports["executorch"].parent), "--backend", "executorch", "--runs", "3", "--out", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    (unet,) = json.loads((tmp_path / "p" / "profile.json").read_text())["measurements"]
    coverage = unet["coverage"]["ops"]
    assert any("Convolution" in op for op in coverage["xnnpack"])  # XNNPACK's own operator names
    assert unet["coverage"]["nodes"]["xnnpack"] > 0
    delegated = [o for o in unet["ops"] if o["delegated"]]
    fallback = [o for o in unet["ops"] if not o["delegated"]]
    assert delegated and {o["op"] for o in fallback} == set(coverage["portable CPU kernels"])
    # attention traced as matmul-softmax-matmul: no safe-softmax guards left on portable kernels
    assert not {"where.self_out", "any.out", "logical_not.out"} & set(coverage["portable CPU kernels"])
    assert "Softmax (NC, F32)" in coverage["xnnpack"]


def test_profile_torch_and_the_errors(tiny_pipeline, tiny_exports, tmp_path):
    from pocketdiff.devices.profile import ProfileConfig, profile

    result = _profile(str(tiny_pipeline), "--backend", "torch", "--components", "unet,text_encoder", "--runs", "3",
                      "--out", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    unet, text = json.loads((tmp_path / "p" / "profile.json").read_text())["measurements"]
    assert "convolution" in " ".join(o["op"] for o in unet["ops"]) and "down_blocks.0" in unet["blocks_ms"]
    assert text["inputs"] == {"input_ids": [1, 77]} and text["roofline"]["gflop"] > 0
    for target, config, message in [
        (tiny_exports["executorch"], ProfileConfig(backend="executorch", components=["vae_encoder"]),
         "no executorch export of vae_encoder"),
        (tmp_path, ProfileConfig(backend="coreml", device="iphone-15-pro"), "'iphone-15-pro' is reached through a Mac"),
        (tmp_path, ProfileConfig(backend="torch", device="galaxy-s24"), "on an Android phone, profile executorch or onnxruntime"),
    ]:
        with pytest.raises(UserError, match=message):
            profile(target, config)
    done = _profile(str(tmp_path), "--backend", "tflite")
    assert done.returncode == 2 and "profile: backend: Input should be" in done.stderr


def test_executor_runner_outputs_parse():
    docs = remote.parse_executor_runner((RECORDED / "executor_runner_mv2_xnnpack.txt").read_text())
    assert docs == {"runs": 1, "total_ms": 15.013292, "times_ms": [15.013292], "load_ms": None}
    newer = remote.parse_executor_runner((RECORDED / "executor_runner_iterations.txt").read_text())
    assert newer["load_ms"] == 4463.268273 and newer["times_ms"] == [241.944288]
    with pytest.raises(UserError, match="executor_runner did not finish: .*failed with status 0x12"):
        remote.parse_executor_runner("I executorch:executor_runner.cpp] Execution of method forward failed with status 0x12\n")


def test_perf_test_outputs_parse():
    arm = remote.parse_perf_test((RECORDED / "perf_test_arm.txt").read_text())
    assert arm == {"average_ms": 144.871, "session_creation_s": 0.127918, "runs": 10, "peak_memory_bytes": 158171136}
    percentiles = remote.parse_perf_test((RECORDED / "perf_test_percentiles.txt").read_text())
    assert percentiles["average_ms"] == 58.8053 and percentiles["runs"] == 1000
    assert percentiles["p50_s"] == 0.0587108 and percentiles["p90_s"] == 0.0599845


class _Phone:
    """Stands in for subprocess.run: answers adb with recorded outputs, and records the commands."""

    def __init__(self, devices: str, runner_output: str):
        self.devices, self.runner_output, self.commands = devices, runner_output, []

    def __call__(self, command, **_):
        self.commands.append(command)
        stdout = self.devices if command[1:] == ["devices"] else \
            self.runner_output if "shell" in command and any("runner" in c or "perf_test" in c for c in command) else \
            "SM-S921B\n" if "getprop" in command else ""
        return subprocess.CompletedProcess(command, 0, stdout, "")


def test_adb_runner_pushes_runs_and_parses(tmp_path):
    model = tmp_path / "model.pte"
    model.write_bytes(b"pte")
    phone = _Phone("List of devices attached\nR5CX10ABCDE\tdevice\nemulator-5554\tunauthorized\n\n",
                   (RECORDED / "executor_runner_iterations.txt").read_text())
    adb = remote.Adb(run=phone)
    timed = adb.time_model("executorch", model, tmp_path / "executor_runner", runs=1, threads=4)
    assert timed["times_ms"] == [241.944288] and timed["serial"] == "R5CX10ABCDE" and timed["model"] == "SM-S921B"
    base = ["adb", "-s", "R5CX10ABCDE"]
    assert base + ["push", str(model), f"{remote.WORKDIR}/model.pte"] in phone.commands
    assert base + ["shell", f"{remote.WORKDIR}/executor_runner", f"--model_path={remote.WORKDIR}/model.pte",
                   "--num_executions=1", f"--etdump_path={remote.WORKDIR}/run.etdp", "--cpu_threads=4"] in phone.commands
    onnx = remote.Adb(serial="R5CX10ABCDE").commands("onnxruntime", tmp_path / "model.onnx", None, 10, None)
    assert onnx[-1] == ["shell", f"{remote.WORKDIR}/onnxruntime_perf_test", "-m", "times", "-r", "10", "-e", "cpu", "-I",
                        f"{remote.WORKDIR}/model.onnx"]


def test_no_phone_attached_is_one_line():
    with pytest.raises(UserError, match=r"no Android device attached \(`adb devices` lists none ready\)"):
        remote.Adb(run=_Phone("List of devices attached\nemulator-5554\tunauthorized\n\n", "")).connect()
    with pytest.raises(UserError, match="'adb-missing' not found: install Android platform-tools"):
        remote.Adb(adb="adb-missing").connect()


def test_lookup_table_shares_layers_and_is_exact_on_the_teacher(three_stage_pipeline):
    from pocketdiff.distill.blocks import preset_config
    from pocketdiff.devices.lookup import build_table

    config = modelio.unet_config(modelio.open_model(three_stage_pipeline))
    table = build_table(config, runs=3)
    assert table.predict(config) == pytest.approx(table.teacher_ms)  # the glue factor makes the teacher exact
    layers = len(table.entries)
    small = preset_config(config, "bk-small")
    assert 0 < table.predict(small) < table.predict(config)
    assert len(table.entries) - layers < layers / 2  # most of the student's layers were already in the table
    phone = build_table(config, "galaxy-s24")  # no phone here: entries from its calibrated roofline
    assert phone.source == "roofline" and 0 < phone.predict(small) < phone.predict(config)


def test_an_onnxruntime_table_runs_every_layer_in_onnxruntime(three_stage_pipeline, monkeypatch):
    import onnxruntime

    from pocketdiff.distill.blocks import preset_config
    from pocketdiff.devices.lookup import build_table

    sessions = []

    class Counted(onnxruntime.InferenceSession):
        def __init__(self, path, **kwargs):
            super().__init__(path, **kwargs)
            sessions.append(path)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counted)
    config = modelio.unet_config(modelio.open_model(three_stage_pipeline))
    table = build_table(config, runs=3, runtime="onnxruntime")
    assert table.runtime == "onnxruntime" and table.predict(config) == pytest.approx(table.teacher_ms)
    assert len(sessions) == len(table.entries) + 1  # each layer alone, and the whole UNet for the glue factor
    assert 0 < table.predict(preset_config(config, "bk-small")) < table.predict(config)
    with pytest.raises(UserError, match="timed on this machine \\(device host-cpu\\), not galaxy-s24"):
        build_table(config, "galaxy-s24", runtime="onnxruntime")
    with pytest.raises(UserError, match="runtime 'tvm': a latency table is timed in torch, onnxruntime or executorch"):
        build_table(config, runtime="tvm")


def test_an_executorch_table_lowers_every_layer_to_xnnpack(monkeypatch):
    from executorch.runtime import Runtime

    from pocketdiff.devices.lookup import build_table
    from tests.conftest import tiny_unet_config

    programs = []
    load_program = Runtime.load_program

    def counted(self, data, **kwargs):
        programs.append(len(data))
        return load_program(self, data, **kwargs)

    monkeypatch.setattr(Runtime, "load_program", counted)
    config = tiny_unet_config()
    table = build_table(config, batch=2, runs=3, runtime="executorch")
    assert table.runtime == "executorch" and table.predict(config) == pytest.approx(table.teacher_ms)
    assert len(programs) == len(table.entries) + 1  # each layer alone, and the whole UNet for the glue factor
    assert 0 < table.predict({**config, "mid_block_type": None}) < table.predict(config)


def test_prune_to_a_latency_target(three_stage_pipeline, tmp_path):
    from pocketdiff.compress.oneshot import Target
    from pocketdiff.compress.prune import PruneConfig, prune_to_target
    from pocketdiff.devices.lookup import LatencyTable, table_for

    result = subprocess.run(["pocketdiff", "prune", str(three_stage_pipeline), "--target", "latency=0.8", "--criterion",
                             "random", "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "a" / "prune_report.json").read_text())
    assert report["latency_ms_after"] <= 0.8 * report["latency_ms_before"] and report["device"] == "host-cpu"
    assert "predicted latency on host-cpu" in result.stdout
    ref, table = modelio.open_model(three_stage_pipeline), tmp_path / "a" / "latency_table.json"
    again = prune_to_target(ref, Target("latency", 0.8), tmp_path / "b", criterion="random",
                            table=LatencyTable.load(table))
    assert again["removed"] == report["removed"]  # the saved table, read back, makes the same choice
    from rich.console import Console

    from pocketdiff.apps.recipe import parse_recipe
    from pocketdiff.apps.runner import run_recipe

    stage = f"{{target: latency=0.8, criterion: random, latency_table: {table}}}"
    run = run_recipe(parse_recipe(f"name: t\nmodel: {three_stage_pipeline}\nstages:\n  - prune: {stage}\n", "t.yaml"),
                     tmp_path / "runs", Console(record=True))
    assert json.loads((run / "01-prune" / "prune_report.json").read_text())["removed"] == report["removed"]
    with pytest.raises(UserError, match="latency_table goes with a latency=R target"):
        parse_recipe(f"name: t\nmodel: default\nstages:\n  - prune: {{target: params=0.5, latency_table: {table}}}\n",
                     "t.yaml")
    with pytest.raises(UserError, match=r"a table for host-cpu \(torch\), not galaxy-s24 \(torch\)"):
        table_for(ref, PruneConfig(target="latency=0.8", criterion="random", device="galaxy-s24", latency_table=table))


def test_recipe_profile_stage(tiny_pipeline, tmp_path):
    from rich.console import Console

    from pocketdiff.apps.recipe import parse_recipe
    from pocketdiff.apps.runner import read_manifest, run_recipe

    text = f"name: p\nmodel: {tiny_pipeline}\nstages:\n  - profile: {{backend: torch, runs: 2, warmup: 1}}\n"
    run_dir = run_recipe(parse_recipe(text, "p.yaml"), tmp_path, Console(record=True))
    metrics = read_manifest(run_dir / "01-profile")["metrics"]
    assert metrics["unet/median_ms"] > 0 and 0 < metrics["unet/roofline_efficiency"] < 1.5
    assert (run_dir / "01-profile" / "profile.png").exists()
    with pytest.raises(UserError, match="put an export stage before it"):
        run_recipe(parse_recipe(text.replace("backend: torch", "backend: onnxruntime"), "p.yaml"), tmp_path / "b",
                   Console(record=True))
