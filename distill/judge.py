"""The judge: a small contrastive image–text model that scores generated images, trained apart from the teacher.

Every stage must show it keeps quality, and CLIP / Inception cannot be downloaded here, so we
train our own CLIP analogue on the same OpenMoji data: a CNN image tower and a word-level text
tower (its own vocabulary, nothing shared with the teacher's text encoder), aligned with the
symmetric InfoNCE loss. Its pooled image features feed the Fréchet distance; its embeddings give
the prompt score and caption retrieval. Shipped as `config.json` + `model.safetensors`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn

from . import data
from .trainer import Trainer, TrainConfig, epoch_batches

_WORD = re.compile(r"[a-z]+|[0-9]")


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocabulary: list[str]
    resolution: int = 32
    width: int = 32
    embed_dim: int = 128
    text_layers: int = 2
    max_words: int = 24


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.image_tower = nn.Sequential(  # a strided stem: full-resolution convolutions cost most on a CPU
            nn.Conv2d(3, w, 4, stride=2, padding=1), nn.SiLU(), _block(w, 2 * w), nn.AvgPool2d(2),
            _block(2 * w, 4 * w), nn.AvgPool2d(2), _block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.image_proj = nn.Linear(4 * w, config.embed_dim)
        self.word_embedding = nn.Embedding(len(config.vocabulary) + 2, config.embed_dim)  # 0 pad, 1 unknown
        self.position = nn.Parameter(torch.zeros(config.max_words, config.embed_dim))
        layer = nn.TransformerEncoderLayer(config.embed_dim, 4, 4 * config.embed_dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.text_tower = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.text_proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self._index = {word: i + 2 for i, word in enumerate(config.vocabulary)}

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(captions), self.config.max_words, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = [self._index.get(w, 1) for w in _WORD.findall(caption.lower())][: self.config.max_words]
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        return ids

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled CNN features (the Fréchet-distance space) of images in [-1, 1], resized to the judge's size."""
        if images.shape[-1] != self.config.resolution:
            images = F.interpolate(images, size=self.config.resolution, mode="bilinear", antialias=True)
        return self.image_tower(images)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_features(images)), dim=-1)

    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenize(captions).to(self.position.device)
        mask = ids == 0
        hidden = self.text_tower(self.word_embedding(ids) + self.position, src_key_padding_mask=mask)
        keep = (~mask).unsqueeze(-1).float()
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"_class_name": "PocketdiffJudge", **self.config.model_dump()}))
        save_file({k: v.detach().half().contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")

    @classmethod
    def load(cls, folder: Path) -> "Judge":
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        config.pop("_class_name", None)
        judge = cls(JudgeConfig(**config))
        judge.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
        return judge.eval()


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shifts by up to 2 px and, for half the batch, a blur: generated images are softer than renders."""
    n, _, h, w = images.shape
    padded = F.pad(images, (2, 2, 2, 2), value=1.0)
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    shifted = padded[:, :, dy:dy + h, dx:dx + w]
    blurred = F.interpolate(F.avg_pool2d(shifted, 2), size=(h, w), mode="bilinear")
    pick = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5).float()
    return pick * blurred + (1 - pick) * shifted


def contrastive_loss(judge: Judge, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    logits = judge.logit_scale.exp().clamp(max=100) * judge.embed_images(images) @ judge.embed_texts(captions).T
    target = torch.arange(len(captions), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_judge(out: Path, steps: int = 500, batch: int = 128, lr: float = 2e-3, seed: int = 1,
                subset: int | None = None, work: Path | None = None) -> Judge:
    """Train on the training split and save to `out`; seeded apart from the teacher's run."""
    train = data.load_emoji(32, "train")
    if subset:
        train = train.subset(np.arange(subset))
    words = sorted({w for c in train.captions for w in _WORD.findall(c.lower())})
    judge = Judge(JudgeConfig(vocabulary=words))
    images = train.tensors()
    pick = epoch_batches(len(train), min(batch, len(train)), seed)

    def batch_for(step: int) -> dict:
        index = pick(step)
        return {"images": images[index], "captions": [train.captions[i] for i in index]}

    def loss_fn(batch_: dict, generator: torch.Generator) -> dict:
        return {"loss": contrastive_loss(judge, _augment(batch_["images"], generator), batch_["captions"])}

    config = TrainConfig(steps=steps, lr=lr, weight_decay=0.05, warmup_steps=min(50, steps // 10),
                         checkpoint_every=100, seed=seed)
    work = Path(work) if work else Path(out).with_name(Path(out).name + ".work")
    Trainer(judge, loss_fn, batch_for, config, work, "judge").run()
    judge.eval().save(out)
    return judge
