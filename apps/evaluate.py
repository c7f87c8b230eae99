"""Quality of a text-to-image model, scored by a judge that never saw the model.

Three numbers, all from the judge's embeddings of the same fixed, seeded prompts:
- prompt score: mean cosine similarity of each image to its own caption (the CLIP-score analogue);
- Fréchet distance between judge features of generated images and of the real images of the same
  captions (the FID analogue);
- retrieval accuracy: how often an image's best-matching caption, among all evaluation prompts,
  is its own.
The judge is pocketdiff's embedded one, or a real CLIP model (transformers `CLIPModel` folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..distill import data
from ..errors import UserError

DEFAULT_JUDGE = Path(__file__).resolve().parent / "zoo" / "judge"
PROMPT_SEED = 7


@dataclass(frozen=True)
class PromptSet:
    """Evaluation prompts with their real images (the Fréchet reference), from one data split."""

    split: str
    captions: list[str]
    images: np.ndarray  # uint8 (N, H, W, 3)


def prompt_set(split: str = "validation", count: int = 256, resolution: int = 32) -> PromptSet:
    source = data.load_emoji(resolution, split)
    if count > len(source):
        raise UserError(f"{count} prompts asked, the {split} split has {len(source)}")
    index = np.sort(np.random.default_rng([PROMPT_SEED, count]).choice(len(source), count, replace=False))
    chosen = source.subset(index)
    return PromptSet(split, chosen.captions, chosen.images)


def _projected(output) -> torch.Tensor:
    """transformers 5 returns the projected embedding as `pooler_output` of an output object; 4.x a tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


class ClipJudge:
    """A real CLIP model from a local folder, for SD-scale models (same interface as our judge)."""

    def __init__(self, folder: Path):
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(folder).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.size = self.model.config.vision_config.image_size

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1)
        std = torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1)
        pixels = torch.nn.functional.interpolate((images + 1) / 2, size=self.size, mode="bicubic", antialias=True)
        return _projected(self.model.get_image_features(pixel_values=(pixels - mean) / std))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.image_features(images), dim=-1)

    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        return torch.nn.functional.normalize(_projected(self.model.get_text_features(**tokens)), dim=-1)


def load_judge(spec: str | Path = "default"):
    from ..distill.judge import Judge

    folder = DEFAULT_JUDGE if str(spec) == "default" else Path(spec)
    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: no judge here (expected pocketdiff's judge or a CLIPModel folder)")
    import json

    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    return Judge.load(folder) if name == "PocketdiffJudge" else ClipJudge(folder)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(Σa Σb)^½), the trace term through the symmetric form √Σa Σb √Σa."""
    a64, b64 = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    mu = (a64.mean(0) - b64.mean(0)).pow(2).sum()
    cov_a, cov_b = torch.cov(a64.T), torch.cov(b64.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return max(0.0, float(mu + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross))  # ≥ 0 but for rounding


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def score(judge, images: np.ndarray, prompts: PromptSet) -> dict:
    """The three scores of `images` (uint8, one per prompt, in prompt order)."""
    if len(images) != len(prompts.captions):
        raise ValueError("one image per prompt")
    generated = _as_tensor(images)
    image_emb = judge.embed_images(generated)
    text_emb = judge.embed_texts(prompts.captions)
    similarity = image_emb @ text_emb.T
    own = torch.arange(len(images))
    return {
        "prompt_score": float(similarity[own, own].mean()),
        "frechet_distance": frechet_distance(judge.image_features(generated).numpy(),
                                             judge.image_features(_as_tensor(prompts.images)).numpy()),
        "retrieval_accuracy": float((similarity.argmax(1) == own).float().mean()),
    }
