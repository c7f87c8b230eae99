"""Quantization-aware training's loss: the quantized UNet distilled from the fp32 one on recorded trajectories."""

from __future__ import annotations

import torch

from ..distill.kd import Taps, block_pairs, feature_term
from .pt2e_int8 import GraphTaps
from .unet_graph import ROOT, batch_args


class QATLoss:
    """Distillation from the fp32 UNet on recorded trajectories: output term + weighted feature terms (BK-SDM, LAPTOP-Diff).

    The output term is the mean square error to the fp32 prediction; each feature term is one
    stage output's (every down block, the mid block, every up block) mean square error divided
    by the fp32 feature's mean square, so quantization error early in the UNet is corrected where
    it arises, not only as it reaches the output."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, feature_weight: float):
        self.student, self.teacher, self.feature_weight = student, teacher, feature_weight
        config = dict(teacher.unet.config)
        names = [name for name, _ in block_pairs(config, config)] if feature_weight else []
        self.student_taps = (GraphTaps(student, names, ROOT) if isinstance(student, torch.fx.GraphModule)
                             else Taps(student.unet, names))
        self.teacher_taps = Taps(teacher.unet, names)

    def __call__(self, batch: dict, _generator) -> dict[str, torch.Tensor]:
        args = batch_args(batch)
        with torch.no_grad():
            target = self.teacher(*args).float()
        terms = {"output_kd": (self.student(*args).float() - target).pow(2).mean()}
        per_block = {f"feature/{name}": feature_term(kept, self.teacher_taps.outputs[name], normalize=True)
                     for name, kept in self.student_taps.outputs.items()}
        terms["feature_kd"] = sum(per_block.values()) if per_block else torch.zeros_like(terms["output_kd"])
        self.student_taps.outputs.clear()
        self.teacher_taps.outputs.clear()
        return {"loss": terms["output_kd"] + self.feature_weight * terms["feature_kd"], **terms, **per_block}

    def remove(self) -> None:
        self.student_taps.remove()
        self.teacher_taps.remove()
