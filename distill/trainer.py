"""The training loop every pocketdiff stage shares (default-model training, KD, step distillation, QAT).

Determinism is by construction: the batch and every random draw of step `k` come from
`batch_for(k)` and a generator seeded with `(seed, k)`, so a run killed at any moment and resumed
from its last checkpoint ends with exactly the weights of an uninterrupted run. accelerate places
the models and wraps backward, so the same code runs on the CPU, one GPU or many
(`accelerate launch`), with bf16 autocast where the hardware has it.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..progress import progress_bar


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "auto"  # "auto": bf16 on CUDA, fp32 elsewhere; or "no", "bf16"


class RunSettings(BaseModel):
    """The loop settings every distillation stage exposes (KD, step distillation, slim VAE), as one block."""

    model_config = ConfigDict(extra="forbid")

    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warm-up.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip; 0: none.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Training precision; auto: bf16 on CUDA, fp32 elsewhere.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints a killed run resumes from.")
    log_every: int = Field(10, ge=1, description="Steps between rows of log.csv.")
    seed: int = Field(0, description="Seed of every random draw: batches, noise, timesteps.")

    def train_config(self, steps: int, lr: float, ema_decay: float = 0.0) -> TrainConfig:
        return TrainConfig(steps=steps, lr=lr, warmup_steps=self.warmup_steps, grad_clip=self.grad_clip,
                           ema_decay=ema_decay, seed=self.seed, checkpoint_every=self.checkpoint_every,
                           log_every=self.log_every, mixed_precision=self.mixed_precision)


class NonFiniteLoss(RuntimeError):
    """The loss went NaN or inf; the last good checkpoint is kept on disk."""


LossFn = Callable[[dict, torch.Generator], dict[str, torch.Tensor]]


class _LossModule(torch.nn.Module):
    """The model with its loss as `forward`: data-parallel wrappers sync gradients only through forward."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.loss_fn(batch, generator)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one step, the same whether or not the run was resumed."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def epoch_batches(n: int, batch: int, seed: int) -> Callable[[int], np.ndarray]:
    """Index batches as a function of the step: a seeded permutation per epoch, no data position to save."""
    per_epoch = max(1, n // batch)

    def indices(step: int) -> np.ndarray:
        epoch, position = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        return order[position * batch:(position + 1) * batch]

    return indices


def _lr_factor(step: int, config: TrainConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Optimises `model` on `loss_fn(batch_for(step), generator)` for `config.steps` steps.

    `loss_fn` returns a dict of named scalar terms; 'loss' is the one optimised, every term is
    logged to `out/log.csv` (and to `out/tensorboard/` where tensorboard is installed).
    Checkpoints (`out/checkpoint/`) hold model, EMA, optimizer and the step; the LR schedule, the
    data position and every random draw are functions of the step, so they need no saved state.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, batch_for: Callable[[int], dict],
                 config: TrainConfig, out: Path, description: str = "training", identity: dict | None = None):
        """`identity`: what the run depends on beyond `config` (inputs, settings); a checkpoint written
        under another identity is refused rather than resumed into a run it does not belong to."""
        from accelerate import Accelerator

        precision = config.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = Accelerator(mixed_precision=precision)
        self.config, self.out, self.description = config, Path(out), description
        self.identity = json.dumps(identity, sort_keys=True, default=str) if identity is not None else None
        self.model, self.batch_for = model, batch_for
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.wrapped, self.optimizer = self.accelerator.prepare(_LossModule(model, loss_fn), optimizer)
        self.ema = ({name: p.detach().clone().float() for name, p in self._named_trainable()}
                    if config.ema_decay > 0 else None)
        self.step = 0
        self._resume()

    def _named_trainable(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def _resume(self) -> None:
        folder = self.checkpoint_dir
        if not (folder / "state.pt").exists():
            return
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        if self.identity is not None and state.get("identity") != self.identity:
            raise UserError(f"{folder} holds the checkpoint of a run with other inputs or settings; run with the "
                            "same ones to resume it, or write to another folder")
        self.model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema = {k: v.to(self.accelerator.device) for k, v in load_file(folder / "ema.safetensors").items()}
        self.step = int(state["step"])

    def save_checkpoint(self) -> None:
        """Write the checkpoint beside the old one, then swap, so a kill never leaves half a checkpoint."""
        if not self.accelerator.is_main_process:
            return
        tmp = self.out / "checkpoint.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(unshared(self.model.state_dict()), tmp / "model.safetensors")
        if self.ema is not None:
            save_file(self.ema, tmp / "ema.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step, "identity": self.identity},
                   tmp / "state.pt")
        old = self.out / "checkpoint.old"
        if self.checkpoint_dir.exists():
            self.checkpoint_dir.rename(old)
        tmp.rename(self.checkpoint_dir)
        if old.exists():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights (or the live ones where EMA is off), as a full state dict."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            state.update({k: v.to(state[k].dtype) for k, v in self.ema.items()})
        return state

    def _tensorboard(self):
        if not self.accelerator.is_main_process:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: log.csv is the record
            return None
        return SummaryWriter(self.out / "tensorboard")

    def _log(self, row: dict, board) -> None:
        if board is not None:
            for key, value in row.items():
                if key != "step":
                    board.add_scalar(key, value, row["step"])
        path = self.out / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _local_share(self, batch: dict) -> dict:
        """This process's slice of the step's batch (all of it on one device), on its device."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return {k: (v[rank::world].to(self.accelerator.device) if torch.is_tensor(v) else
                    v[rank::world] if isinstance(v, list) else v) for k, v in batch.items()}

    def run(self) -> "Trainer":
        config, device = self.config, self.accelerator.device
        self.out.mkdir(parents=True, exist_ok=True)
        self.wrapped.train()
        started, done_at_start = time.perf_counter(), self.step
        board = self._tensorboard()
        with progress_bar(self.description, config.steps, self.step, not self.accelerator.is_main_process) as advance:
            while self.step < config.steps:
                for group in self.optimizer.param_groups:
                    group["lr"] = config.lr * _lr_factor(self.step, config)
                batch = self._local_share(self.batch_for(self.step))
                with self.accelerator.autocast():
                    terms = self.wrapped(batch, step_generator(config.seed, self.step, device))
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"{self.description}: loss is {loss.item()} at step {self.step}; "
                        f"the last good checkpoint is kept in {self.checkpoint_dir}")
                self.optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                if config.grad_clip:
                    self.accelerator.clip_grad_norm_(self.wrapped.parameters(), config.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    with torch.no_grad():
                        for name, p in self._named_trainable():
                            self.ema[name].lerp_(p.detach().float(), 1.0 - config.ema_decay)
                self.step += 1
                advance()
                if self.step % config.log_every == 0 or self.step == config.steps:
                    rate = ((self.step - done_at_start) * _batch_size(batch) * self.accelerator.num_processes
                            / (time.perf_counter() - started))
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    advance(0, f"loss {values['loss']:.4f}  {rate:.0f} samples/s")
                    if self.accelerator.is_main_process:
                        self._log({"step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                                   "samples_per_s": round(rate, 2), **values}, board)
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save_checkpoint()
        if board is not None:
            board.close()
        return self


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict safetensors can write: a tensor that several keys share (one observer feeding
    several quantized layers) is copied for each key after the first."""
    seen, out = set(), {}
    for key, value in state.items():
        pointer = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        out[key] = value.clone().contiguous() if pointer in seen else value.contiguous()
        if pointer is not None:
            seen.add(pointer)
    return out


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if torch.is_tensor(value):
            return value.shape[0]
    return 1


def last_logged(log_csv: Path) -> dict:
    """The last row of a run's log.csv, as numbers (empty before the first log)."""
    rows = list(csv.DictReader(Path(log_csv).open())) if Path(log_csv).exists() else []
    return {k: float(v) for k, v in rows[-1].items()} if rows else {}
