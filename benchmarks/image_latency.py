"""Whole-image latency in one runtime: the teacher at 25 guided steps against few-step students, per component.

    python benchmarks/image_latency.py --students runs/quickstart/11-quantize [--model default]
                                       [--runtime executorch] [--student-steps 1] [--per-family 16]
                                       [--runs 20] [--rounds 5] [--sd15-text-encoder] [--work DIR] [--json F]

Each model is exported to the runtime (`pocketdiff export`: a student quantized for it ships its int8
UNet), each student a second time with `--text-encoder-int8`, a third time without its text encoder
(`--prompt-embeddings`: the states of the scored prompts ship as a table, as an app with a fixed prompt
set does; its text encoder column reads "table"), and at one step twice more with its UNet, sampler step
and decoder as one program (`--components one_step`), with its text encoder and with the table; every
export runs through the torch-free `ExportedPipeline`. Per model, measured in this run on this host, in
`--rounds` rounds in which the models take turns (the host's speed drifts by up to 2× for minutes): of
`--runs` images, the fastest end to end, and the least each component took within an image (text
encoder, every UNet call together, VAE decoder, or the one program), each the least over the rounds;
the teacher's time over each model's (and its range over the rounds); the GenEval-style score of the
exported pipeline's own images (in-distribution prompts, seeds 0+i, guidance 7.5); and the export's
image PSNR against PyTorch (its end-to-end check, whose int8 limit is lowered to 20 dB here so that every
row is measured). `--sd15-text-encoder` adds SD-1.5's text encoder architecture (random weights, 77
tokens) in fp32 and int8 in onnxruntime and ExecuTorch:
latency, file size and relative error of its states.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pocketdiff import modelio
from pocketdiff.apps.evaluate import headline, load_judge, prompt_set, score
from pocketdiff.devices.timing import call_times
from pocketdiff.export.components import Component, TextEncoder
from pocketdiff.export.exporter import ExportConfig, export_model
from pocketdiff.export.formats import FORMATS
from pocketdiff.export.parity import ParityThresholds
from pocketdiff.export.runtime import ExportedPipeline


TIMED_PROMPT = "a red circle"


def exported(model: str, runtime: str, folder: Path, variant: str, prompts: list[str]) -> tuple[ExportedPipeline, float]:
    """The model's export to `runtime` in `folder` (kept between runs), loaded as a pipeline, and its image PSNR
    against PyTorch. `variant`: "" as exported by default, "text encoder int8", "fixed prompts" (no text
    encoder: the states of `prompts` ship as a table), "one program" (the one-step program instead of the
    UNet and decoder), or the last two together. The image limit is lowered to 20 dB: here the judge's score
    is the quality measure."""
    report = folder / runtime / "parity.json"
    if not report.exists():
        table = None
        components = ["one_step"] if "one program" in variant else ["unet", "vae_decoder"]
        if "fixed prompts" in variant:
            folder.mkdir(parents=True, exist_ok=True)
            table = folder / "prompts.txt"
            table.write_text("\n".join([TIMED_PROMPT, *prompts]) + "\n")  # the table drops repeats
        else:
            components.insert(0, "text_encoder")
        config = ExportConfig(to=[runtime], components=components, text_encoder_int8=variant == "text encoder int8",
                              prompt_embeddings=str(table) if table else None,
                              thresholds=ParityThresholds(psnr_int8=20.0))
        export_model(modelio.open_model(model), config, folder, log=lambda _: None)
    checked = json.loads(report.read_text())
    return ExportedPipeline(folder / runtime, runtime), checked.get("image_psnr", checked.get("one_step_image_psnr"))


class Timed:
    """A runtime model that adds the ms of each call to `spent[key]`, so one image splits into its components."""

    def __init__(self, model, key: str, spent: dict):
        self.model, self.key, self.spent = model, key, spent

    def __call__(self, inputs: dict) -> dict:
        began = time.perf_counter()
        outputs = self.model(inputs)
        self.spent[self.key] = self.spent.get(self.key, 0.0) + (time.perf_counter() - began) * 1e3
        return outputs

    def __getattr__(self, name):  # input names, static shapes: the runtime reads them from the model
        return getattr(self.model, name)


def timed(pipe: ExportedPipeline) -> tuple[ExportedPipeline, dict]:
    """`pipe` with its text encoder(s), UNet and decoder (or its one-step program) timed into the returned dict."""
    spent: dict[str, float] = {}
    pipe.encoders = [(tokenizer, Timed(encoder, "text_encoder_ms", spent), config)
                     for tokenizer, encoder, config in pipe.encoders]
    for name in ("unet", "vae_decoder", "one_step"):
        if getattr(pipe, name) is not None:
            setattr(pipe, name, Timed(getattr(pipe, name), f"{name}_ms", spent))
    return pipe, spent


def image_costs(pipe: ExportedPipeline, spent: dict, steps: int, guidance: float, runs: int) -> dict:
    """ms of the image end to end and of its text encoder, UNet calls and decoder: each the fastest of `runs`
    images (after three untimed ones)."""
    parts = []

    def one_image():
        spent.clear()
        pipe([TIMED_PROMPT], steps, guidance)
        parts.append(dict(spent))

    image_ms = call_times(one_image, runs, warmup=3)
    return {"image_ms": min(image_ms), **{key: min(p[key] for p in parts[3:]) for key in parts[-1]}}


def sd15_text_encoder(runtime: str, work: Path, runs: int) -> dict:
    """SD-1.5's text encoder (random weights, 77 tokens) in fp32 and int8: ms, MB, relative error of its states."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, max_position_embeddings=77,
                                           hidden_act="quick_gelu")).eval()
    ids = torch.randint(0, 49408, (1, 77))
    component = Component("text_encoder", TextEncoder(encoder), {"input_ids": ids}, ["last_hidden_state", "pooler_output"])
    reference = component.run()["last_hidden_state"].detach().numpy()
    export_format, rows = FORMATS[runtime], {}
    for precision in ("fp32", "int8"):
        path = export_format.export_component(component, work / f"sd15-text-encoder-{precision}", precision, ExportConfig())
        model = export_format.load(path)
        states = model({"input_ids": ids.numpy()})["last_hidden_state"]
        rows[precision] = {"ms": min(call_times(lambda: model({"input_ids": ids.numpy()}), runs, warmup=2)),
                           "mb": export_format.file_bytes(path) / 1e6,
                           "relative_error": float(np.linalg.norm(states - reference) / np.linalg.norm(reference))}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--students", required=True, help="comma-separated student pipeline folders")
    parser.add_argument("--runtime", default="executorch", choices=["executorch", "onnx"])
    parser.add_argument("--student-steps", type=int, default=1)
    parser.add_argument("--per-family", type=int, default=16)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sd15-text-encoder", action="store_true")
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="image-latency-"))
    judge, prompts = load_judge("default"), prompt_set("in_distribution", args.per_family)
    models = [("teacher", args.model, 25, "")]
    for i, student in enumerate(args.students.split(",")):
        models += [(f"student {i + 1}{', ' + variant if variant else ''}", student, args.student_steps, variant)
                   for variant in ("", "text encoder int8", "fixed prompts") + (
                       ("one program", "fixed prompts, one program") if args.student_steps == 1 else ())]
    rows, pipes = {}, {}
    for name, model, steps, variant in models:
        pipe, psnr = exported(model, args.runtime, work / name.replace(" ", "-").replace(",", ""), variant,
                              prompts.captions)
        pipes[name] = timed(pipe)
        images = pipe(prompts.captions, steps, 7.5)
        rows[name] = {"model": model, "steps": steps, "score": headline(score(judge, images, prompts)),
                      "image_psnr": psnr, "rounds": []}
    for _ in range(args.rounds):  # the models take turns, so a slow spell of the host falls on all of them
        for name, model, steps, _ in models:
            rows[name]["rounds"].append(image_costs(*pipes[name], steps, 7.5, args.runs))
    for row in rows.values():
        row.update({key: min(r[key] for r in row["rounds"]) for key in row["rounds"][0]})
    teacher = rows["teacher"]
    print(f"{args.runtime}, {torch.get_num_threads()} threads; guidance 7.5 (the teacher classifier-free, students "
          f"embedded); score: GenEval-style overall, {args.per_family} in-distribution prompts per family\n")
    print("| model | steps | text encoder ms | UNet ms | VAE decoder ms | image ms | teacher ÷ (per round) | score | "
          "÷ teacher | image PSNR vs PyTorch |")
    print("| --- " * 10 + "|")
    for name, row in rows.items():
        per_round = [t["image_ms"] / r["image_ms"] for t, r in zip(teacher["rounds"], row["rounds"])]
        text_ms = f"{row['text_encoder_ms']:.2f}" if "text_encoder_ms" in row else "table"
        unet_ms, decoder_ms = ((f"{row['unet_ms']:.2f}", f"{row['vae_decoder_ms']:.2f}") if "unet_ms" in row else
                               (f"{row['one_step_ms']:.2f} with the decoder (one program)", "in the UNet's program"))
        print(f"| {name} | {row['steps']} | {text_ms} | {unet_ms} | {decoder_ms} | {row['image_ms']:.2f} | "
              f"{teacher['image_ms'] / row['image_ms']:.1f}× ({min(per_round):.1f}–{max(per_round):.1f}×) | {row['score']:.3f} | "
              f"{row['score'] / max(teacher['score'], 1e-9):.2f} | {row['image_psnr']:.1f} dB |")
    if args.sd15_text_encoder:
        rows["sd15_text_encoder"] = sd15_text_encoder(args.runtime, work, args.runs)
        print("\nSD-1.5 text encoder architecture (random weights, 77 tokens):")
        for precision, row in rows["sd15_text_encoder"].items():
            print(f"  {precision}: {row['ms']:.1f} ms, {row['mb']:.0f} MB, relative error {row['relative_error']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
