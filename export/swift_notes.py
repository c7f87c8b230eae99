"""`SWIFT.md`, `swift.json` and `compile.sh` beside a Core ML export: exactly how Apple's Swift package runs it.

The options come from the model (does it embed guidance, what does it predict, is it SDXL) and
from the package's source at commit e12202c (apple/ml-stable-diffusion, `swift/`), whose limits
decide them: its schedulers are PNDM and DPM-Solver++ only and assume epsilon prediction
(DPMSolverMultistepScheduler.swift:21-25); PNDM cannot take one step (its timestep list is empty,
Scheduler.swift:197-199); DPM-Solver++ at one step evaluates t = 999 and the pipeline decodes its
x0 estimate (StableDiffusionPipeline.swift:332, 358), which is a 1-step consistency student's
own output; a guidance scale below 1 runs one unguided batch-one UNet call
(StableDiffusionPipeline.swift:216, 287); models load compiled, by fixed names
(StableDiffusionPipeline+Resources.swift:28-43).
"""

from __future__ import annotations

import json
from pathlib import Path

PACKAGE_COMMIT = "e12202c"
SD_SCALE, XL_SCALE = 0.18215, 0.13025


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def swift_options(ref, guidance: float, batch_one: bool) -> dict:
    """The Swift `StableDiffusionPipeline.Configuration` values that run this export, and what it cannot do."""
    root = ref.path if ref.kind == "pipeline" else ref.path.parent
    unet = _read(ref.unet_path / "config.json")
    scheduler = _read(root / "scheduler" / "scheduler_config.json")
    sdxl = unet.get("addition_embed_type") == "text_time"
    prediction = scheduler.get("prediction_type", "epsilon")
    student = bool(unet.get("time_cond_proj_dim"))
    limits = ["The package has no LCM scheduler: a consistency student runs at one step, where DPM-Solver++ "
              "computes what LCM computes; at 2-4 steps DPM-Solver++ is not the sampler it was trained for.",
              "PNDM (the package's default scheduler) cannot take one step: choose DPM-Solver++."]
    options = {
        "scheduler": "dpmSolverMultistepScheduler", "schedulerTimestepSpacing": "linspace",
        "stepCount": 1 if student else 25,
        "guidanceScale": 0.0 if student else guidance,
        "decoderScaleFactor": XL_SCALE if sdxl else SD_SCALE, "encoderScaleFactor": XL_SCALE if sdxl else SD_SCALE,
        "unetBatch": 1 if student or batch_one else 2,
        "embeddedGuidance": guidance if student else None,
        "xl": sdxl, "limits": limits,
    }
    if prediction != "epsilon":
        limits.insert(0, f"This model predicts {prediction}; the package's schedulers assume epsilon prediction, so "
                         "the Core ML UNet returns the ε its output implies at the timestep it is given, and is "
                         "exported whole, not chunked.")
    return options


def _markdown(options: dict, packages: list[str]) -> str:
    cli = (f"swift run StableDiffusionSample \"a red circle\" --resource-path Resources --scheduler dpmpp "
           f"--step-count {options['stepCount']} --guidance-scale {options['guidanceScale']:g} --seed 0"
           f"{' --xl' if options['xl'] else ''} --output-path out")
    if options["embeddedGuidance"] is not None:
        guidance = (f"`guidanceScale` {options['guidanceScale']:g} (below 1): one batch-one UNet call per step, no "
                    f"unconditional pass. The student's guidance, {options['embeddedGuidance']:g}, is folded into "
                    "the UNet (export with `--guidance` to choose another).")
    else:
        calls = "one batch-two call" if options["unetBatch"] == 2 else "two batch-one calls"
        guidance = f"`guidanceScale` {options['guidanceScale']:g}: classifier-free guidance, {calls} per step."
    lines = [
        "# Running this export with Apple's Swift StableDiffusion package", "",
        f"Checked against apple/ml-stable-diffusion at commit {PACKAGE_COMMIT} (`swift/StableDiffusion/pipeline/`).", "",
        "## 1. Compile (macOS, Xcode command-line tools)", "",
        "The package loads compiled models by fixed names, so compile each package into `Resources/`:", "",
        "    sh compile.sh", "",
        *[f"    xcrun coremlcompiler compile Resources/{p} Resources/" for p in packages], "",
        "`vocab.json` and `merges.txt` are already in `Resources/`.", "",
        "## 2. Pipeline options", "",
        "- `schedulerType`: `.dpmSolverMultistepScheduler` (timestep spacing `.linspace`, the default).",
        f"- `stepCount`: {options['stepCount']}.",
        f"- {guidance}",
        f"- `decoderScaleFactor` and `encoderScaleFactor`: {options['decoderScaleFactor']} (the package's "
        "default for this family; the VAE packages convert to this model's own latent scale).", "",
        "The sample CLI, from the package's checkout:", "", f"    {cli}", "",
        "## What it cannot do", "",
        *[f"- {limit}" for limit in options["limits"]], "",
    ]
    return "\n".join(lines)


def write_swift_notes(ref, out: Path, guidance: float, batch_one: bool) -> None:
    """`SWIFT.md` for people, `swift.json` for apps and tests, `compile.sh` for the `.mlmodelc` files."""
    out = Path(out)
    packages = sorted(p.name for p in (out / "Resources").glob("*.mlpackage"))
    options = swift_options(ref, guidance, batch_one)
    (out / "swift.json").write_text(json.dumps({**options, "packageCommit": PACKAGE_COMMIT}, indent=2) + "\n")
    (out / "SWIFT.md").write_text(_markdown(options, packages))
    script = ["#!/bin/sh", "# Compile each Core ML package to the .mlmodelc the Swift package loads (macOS).", "set -e",
              'cd "$(dirname "$0")"',
              *[f"xcrun coremlcompiler compile Resources/{p} Resources/" for p in packages]]
    (out / "compile.sh").write_text("\n".join(script) + "\n")
    (out / "compile.sh").chmod(0o755)
