"""The configs of the stages that live in apps/ (generate, evaluate): data alone, so the command line loads them
without torch (`generate --backend onnx` runs on onnxruntime and numpy).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateConfig(StageConfig):
    """Images for fixed prompts and seeds, saved as PNGs and one labelled grid."""

    prompts: list[str] = Field(min_length=1, description="Prompts; prompt i uses seed + i.",
                               json_schema_extra={"free_text": True, "also": ["--prompt"]})
    steps: int = Field(25, ge=1, description="Sampling steps.")
    guidance: float = Field(7.5, ge=0, description="Classifier-free guidance scale.")


class EvaluateConfig(StageConfig):
    """GenEval-style judge scores over seeded scene prompts, at every (steps, guidance) pair asked for."""

    split: Literal["in_distribution", "held_out", "both"] = Field(
        "in_distribution", description="Which prompts: in-distribution, held-out combinations, or both.")
    per_family: int = Field(32, ge=1, description="Seeded prompts per GenEval family.")
    steps: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [25], min_length=1,
                                                     description="Step counts to sample at.")
    guidance: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [7.5], min_length=1,
                                                          description="Guidance scales to sample at.")
    judge: str = Field("default", description="'default' (exact GenEval-style judge) or a local CLIPModel folder.")
