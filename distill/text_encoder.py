"""A slim text encoder distilled from the pipeline's own: at one step it is a third of an image's cost.

A 1-step student calls the text encoder, the UNet and the VAE decoder once each, so the text encoder
stops being negligible (on the embedded default it takes longer than the 1-step UNet in ExecuTorch).
The UNet reads the encoder's last hidden states through cross-attention, so those states are the
target: a `CLIPTextModel` with fewer layers, started from the teacher's own layers evenly spaced
(as DistilBERT starts), learns to reproduce them on the training captions, every position, padding
included (the UNet attends to all of them). The output space does not change: UNet, VAE, tokenizer
and scheduler stay as they are, and stock diffusers loads the result.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from .. import modelio
from ..errors import UserError
from ..folderhash import hash_model_folder
from ..macs import census_model
from . import data, scenes
from .conditions import token_ids
from .latents import SCENE_POOL, folder_rows, read_captions
from .trainer import RunSettings, Trainer, epoch_batches


class SlimTextEncoderConfig(RunSettings):
    layers: int = Field(2, ge=1, description="Transformer layers the student keeps (it starts from the teacher's, "
                                             "evenly spaced).")
    steps: int = Field(300, ge=1, description="Optimiser steps.")
    batch: int = Field(64, ge=1, description="Captions per step.")
    lr: float = Field(3e-4, gt=0, description="Learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Steps of linear learning-rate warm-up.")
    data: str = Field("scenes", description="Captions: 'scenes', 'openmoji', a folder with metadata.jsonl, or a "
                                            "text file with one prompt per line.")


def kept_layers(teacher_layers: int, layers: int) -> list[int]:
    """Indices of the teacher layers the student starts from: evenly spaced, first and last included."""
    if layers >= teacher_layers:
        raise UserError(f"layers={layers}: the teacher has {teacher_layers}; keep fewer")
    return [int(i) for i in np.linspace(0, teacher_layers - 1, layers).round()]


def slim_text_encoder(teacher, layers: int):
    """A copy of `teacher` (a CLIPTextModel) with `layers` of its transformer layers."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = layers
    student = teacher.__class__(config)
    kept = kept_layers(teacher.config.num_hidden_layers, layers)
    state = teacher.state_dict()
    student.load_state_dict({key: state[re.sub(r"encoder\.layers\.(\d+)\.", lambda m: f"encoder.layers.{kept[int(m[1])]}.", key)]
                             for key in student.state_dict()})
    return student


def caption_set(source: str) -> tuple[list[str], list[str]]:
    """Training and held-out captions: scenes (the training stream; the evaluation prompts held out),
    OpenMoji (train / validation), an image folder's metadata.jsonl or a prompts file (one in ten held out)."""
    if source == "scenes":
        train = [scenes.scene_at(i).prompt.caption for i in range(SCENE_POOL)]
        held_out = [s.prompt.caption for split in ("in_distribution", "held_out")
                    for s in scenes.evaluation_scenes(split, 16)]
        return train, held_out
    if source == "openmoji":
        return data.load_emoji(32, "train").captions, data.load_emoji(32, "validation").captions
    path = Path(source)
    if path.is_dir():
        captions = [caption for _, caption in folder_rows(path)]
    elif path.is_file():
        captions = read_captions(path)
    else:
        raise UserError(f"data {source!r}: give 'scenes', 'openmoji', a folder with metadata.jsonl or a prompts file")
    if len(captions) < 2:
        raise UserError(f"{source}: at least 2 captions are needed (one in ten is held out for the figures)")
    cut = max(1, len(captions) // 10)
    return captions[:-cut], captions[-cut:]


@torch.no_grad()
def relative_error(teacher, student, ids: torch.Tensor) -> float:
    """‖student − teacher‖² / ‖teacher − its mean‖² of the last hidden states: 0 is exact, 1 is no better than
    the mean state."""
    target = teacher(ids).last_hidden_state
    error = (student(ids).last_hidden_state - target).pow(2).sum()
    return float(error / (target - target.mean(0, keepdim=True)).pow(2).sum())


def distill_text_encoder(ref: modelio.ModelRef, config: SlimTextEncoderConfig, out: Path, log=print) -> dict:
    """Distil a text encoder of `config.layers` layers from `ref`'s; write the pipeline with it and
    `text_encoder_report.json` to `out`."""
    from accelerate import PartialState

    out, processes = Path(out), PartialState()
    modelio.require_trained_pipeline(ref, "text-encoder distillation")
    pipe = modelio.load_pipeline(ref)
    if modelio.is_sdxl(pipe):
        raise UserError(f"{ref.path}: SDXL's two text encoders are not distilled yet; give an SD-1.x/2.x pipeline")
    teacher = pipe.text_encoder.eval().requires_grad_(False)
    student = slim_text_encoder(teacher, config.layers)
    train, held_out = caption_set(config.data)
    ids, held_out_ids = token_ids(pipe.tokenizer, train), token_ids(pipe.tokenizer, held_out)
    start_error = relative_error(teacher, student.eval(), held_out_ids)
    pick = epoch_batches(len(ids), min(config.batch, len(ids)), config.seed)

    def loss_fn(batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = teacher(batch["ids"]).last_hidden_state
        return {"loss": (student(batch["ids"]).last_hidden_state.float() - target).pow(2).mean()}

    identity = {"teacher": hash_model_folder(ref.path), "config": config.model_dump()}
    began = time.perf_counter()
    trainer = Trainer(student, loss_fn, lambda step: {"ids": ids[pick(step)]}, config.train_config(config.steps, config.lr),
                      out, "slim text encoder", identity)
    teacher.to(trainer.accelerator.device)
    trainer.run()
    student.load_state_dict(trainer.ema_state_dict())
    student, teacher = student.to("cpu").eval(), teacher.to("cpu")
    report = {"teacher": str(ref.path.resolve()), "config": config.model_dump(),
              "kept_layers": kept_layers(teacher.config.num_hidden_layers, config.layers),
              "wall_time_s": round(time.perf_counter() - began, 1), "held_out_captions": len(held_out),
              "relative_error_start": round(start_error, 5),
              "relative_error": round(relative_error(teacher, student, held_out_ids), 5)}
    if processes.is_main_process:
        modelio.save_pipeline_with(ref.path, out, "text_encoder", student)
        for label, model in (("before", ref), ("after", modelio.open_model(out))):
            for census in census_model(model):
                if census.component == "text_encoder":
                    report[f"params_{label}"], report[f"macs_{label}"] = census.params, census.macs
        (out / "text_encoder_report.json").write_text(json.dumps(report, indent=2))
        log(f"held-out relative error of the last hidden states: {start_error:.4f} at the start, "
            f"{report['relative_error']:.4f} after {config.steps} steps")
    processes.wait_for_everyone()
    return report
