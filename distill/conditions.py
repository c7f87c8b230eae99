"""The UNet's text conditions from token ids, as the pipelines compute them: SD's one encoder, SDXL's two.

Training loops tokenize captions once and encode each batch. For SDXL that is what diffusers'
SDXL pipeline feeds its UNet: both encoders' penultimate layers side by side, the second's
projected pooling as `text_embeds`, and the default size conditioning as `time_ids` (the training
resolution as original and target size, no crop). A dropped caption gets the pipeline's
unconditional input, so the student learns the branch guidance will ask of it: the empty prompt,
or zeros where the SDXL pipeline zeroes it (`force_zeros_for_empty_prompt`, the default).
"""

from __future__ import annotations

import torch

from ..modelio import is_sdxl

ID_KEYS = ("ids", "ids_2")  # the batch keys of each text encoder's token ids


def map_conditions(fn, *conditions):
    """`fn` over the tensors of one or more condition dicts, nested as a UNet's keyword arguments are."""
    if isinstance(conditions[0], dict):
        return {key: map_conditions(fn, *(c[key] for c in conditions)) for key in conditions[0]}
    return fn(*conditions)


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids of `captions` as the text encoder takes them: padded to the tokenizer's length, truncated."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def text_parts(pipe) -> list[tuple]:
    """(tokenizer, text encoder) of each text encoder the pipeline conditions on."""
    parts = [(pipe.tokenizer, pipe.text_encoder)]
    if is_sdxl(pipe):
        parts.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return parts


def frozen_teacher(pipe) -> list[torch.nn.Module]:
    """The teacher modules a training run calls but never trains: the UNet and the text encoder(s)."""
    return [pipe.unet, *(encoder for _, encoder in text_parts(pipe))]


def caption_ids(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """Each text encoder's token ids of `captions`, under the batch keys `TextConditions` reads."""
    return {key: token_ids(tokenizer, captions) for key, (tokenizer, _) in zip(ID_KEYS, text_parts(pipe))}


class TextConditions:
    """A batch's token ids → the UNet's text keyword arguments (`encoder_hidden_states`, SDXL's `added_cond_kwargs`)."""

    def __init__(self, pipe):
        parts = text_parts(pipe)
        self.encoders = [encoder for _, encoder in parts]
        self.sdxl = len(parts) == 2
        self.zero_empty = self.sdxl and pipe.config.get("force_zeros_for_empty_prompt", True)
        self.empty = [token_ids(tokenizer, [""])[0] for tokenizer, _ in parts]
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        self._unconditional: dict | None = None

    def __call__(self, batch: dict, drop: torch.Tensor | None = None) -> dict:
        ids = [batch[key] for key in ID_KEYS[:len(self.encoders)]]
        if drop is not None and not self.zero_empty:
            ids = [torch.where(drop[:, None], empty.to(i.device), i) for empty, i in zip(self.empty, ids)]
        if not self.sdxl:
            return {"encoder_hidden_states": self.encoders[0](ids[0])[0]}
        outputs = [encoder(i, output_hidden_states=True) for encoder, i in zip(self.encoders, ids)]
        states = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
        pooled = outputs[1].text_embeds
        if drop is not None and self.zero_empty:
            keep = (~drop).to(states.dtype)
            states, pooled = states * keep[:, None, None], pooled * keep[:, None]
        time_ids = self.time_ids.to(pooled.device).expand(len(pooled), -1)
        return {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def unconditional(self, count: int, device) -> dict:
        """`count` copies of the unconditional input, encoded once (the encoders are frozen)."""
        if self._unconditional is None or self._unconditional["encoder_hidden_states"].device != torch.device(device):
            ids = {key: empty[None].to(device) for key, empty in zip(ID_KEYS, self.empty)}
            self._unconditional = self(ids, drop=torch.ones(1, dtype=torch.bool, device=device))
        return map_conditions(lambda v: v.expand(count, *v.shape[1:]), self._unconditional)
