"""Quality of a text-to-image model, scored GenEval's way on seeded scene prompts.

The default judge (`distill/judge.py`) reads objects, colours, counts and positions off each image
and checks every clause of its prompt: per family the fraction of images that satisfy all of
them, overall their mean. Beside it, the Fréchet distance between judge features of the generated
images and of the reference renders of the same prompts (the FID analogue). For users' SD-scale
models a real CLIP model (transformers `CLIPModel` folder) judges instead: CLIP score, Fréchet
distance on CLIP features and caption retrieval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..distill import judge as scene_judge
from ..distill import scenes
from ..errors import UserError

SPLITS = ("in_distribution", "held_out")


@dataclass(frozen=True)
class PromptSet:
    """Evaluation prompts with the reference render of each (the Fréchet reference), from one split."""

    split: str
    scenes: list[scenes.Scene]
    images: np.ndarray  # uint8 (N, H, W, 3)

    @property
    def captions(self) -> list[str]:
        return [s.prompt.caption for s in self.scenes]

    @cached_property
    def reference_features(self) -> np.ndarray:
        """The scene judge's features of the reference renders, read once however many settings are scored."""
        return np.stack([scene_judge.features(scene_judge.read(i)) for i in self.images])


def prompt_set(split: str = "in_distribution", per_family: int = 32) -> PromptSet:
    if split not in SPLITS:
        raise UserError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    chosen = scenes.evaluation_scenes(split, per_family)
    return PromptSet(split, chosen, scenes.render_set(chosen).images)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(Σa Σb)^½), the trace term through the symmetric form √Σa Σb √Σa."""
    import torch

    a64, b64 = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    mu = (a64.mean(0) - b64.mean(0)).pow(2).sum()
    cov_a, cov_b = torch.cov(a64.T), torch.cov(b64.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return max(0.0, float(mu + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross))  # ≥ 0 but for rounding


class SceneJudge:
    """pocketdiff's exact judge: GenEval-style clause checks and the Fréchet distance on its features."""

    def _at_judge_size(self, images: np.ndarray) -> np.ndarray:
        if images.shape[1] == scenes.RESOLUTION:
            return images
        from PIL import Image

        size = (scenes.RESOLUTION, scenes.RESOLUTION)
        return np.stack([np.asarray(Image.fromarray(i).resize(size, Image.Resampling.BOX)) for i in images])

    def score(self, images: np.ndarray, prompts: PromptSet) -> dict:
        images = self._at_judge_size(images)
        readings = [scene_judge.read(i) for i in images]
        feats = np.stack([scene_judge.features(r) for r in readings])
        return (scene_judge.geneval(readings, prompts.scenes)
                | {"frechet_distance": frechet_distance(feats, prompts.reference_features)})


def _projected(output):
    """transformers 5 returns the projected embedding as `pooler_output` of an output object; 4.x a tensor."""
    import torch

    return output if torch.is_tensor(output) else output.pooler_output


class ClipJudge:
    """A real CLIP model from a local folder, for SD-scale models: CLIP score, Fréchet distance, retrieval."""

    def __init__(self, folder: Path):
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(folder).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.size = self.model.config.vision_config.image_size

    def image_features(self, images):
        import torch

        mean = torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1)
        std = torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1)
        pixels = torch.nn.functional.interpolate((images + 1) / 2, size=self.size, mode="bicubic", antialias=True)
        return _projected(self.model.get_image_features(pixel_values=(pixels - mean) / std))

    def embed_texts(self, captions: list[str]):
        import torch

        tokens = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        return torch.nn.functional.normalize(_projected(self.model.get_text_features(**tokens)), dim=-1)

    def score(self, images: np.ndarray, prompts: PromptSet) -> dict:
        import torch

        def as_tensor(batch: np.ndarray):
            return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

        with torch.no_grad():
            generated = self.image_features(as_tensor(images))
            reference = self.image_features(as_tensor(prompts.images))
            similarity = torch.nn.functional.normalize(generated, dim=-1) @ self.embed_texts(prompts.captions).T
        own = torch.arange(len(images))
        return {
            "prompt_score": float(similarity[own, own].mean()),
            "frechet_distance": frechet_distance(generated.numpy(), reference.numpy()),
            "retrieval_accuracy": float((similarity.argmax(1) == own).float().mean()),
        }


def load_judge(spec: str | Path = "default"):
    if str(spec) == "default":
        return SceneJudge()
    folder = Path(spec)
    config = folder / "config.json"
    if not config.exists() or "CLIPModel" not in json.loads(config.read_text()).get("architectures", ["CLIPModel"]):
        raise UserError(f"{folder}: no judge here (give 'default' or a transformers CLIPModel folder)")
    return ClipJudge(folder)


def score(judge, images: np.ndarray, prompts: PromptSet) -> dict:
    """The judge's scores of `images` (uint8, one per prompt, in prompt order)."""
    if len(images) != len(prompts.scenes):
        raise ValueError("one image per prompt")
    return judge.score(images, prompts)


def headline(scores: dict) -> float:
    """The one number a stage is ranked by: GenEval-style overall, or CLIP score under a CLIP judge."""
    return scores["overall"] if "overall" in scores else scores["prompt_score"]


def details(scores: dict) -> str:
    """What the headline is made of: each family's pass rate, or (CLIP) caption retrieval."""
    if "overall" in scores:
        return ", ".join(f"{name} {value:.2f}" for name, value in scores["families"].items())
    return f"retrieval {scores['retrieval_accuracy']:.3f}"


def describe(scores: dict) -> str:
    name = "overall" if "overall" in scores else "CLIP score"
    return f"{name} {headline(scores):.3f} ({details(scores)}), Fréchet {scores['frechet_distance']:.3f}"
