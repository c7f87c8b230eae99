"""Text-encoder states of a fixed prompt set, shipped instead of the text encoder.

An app that offers a fixed set of prompts (a sticker maker, a style picker) need not run the text
encoder on the phone at all: its states for those prompts are constants. DreamLite keeps the text
encoder out of the per-image path the same way. The table holds, for the empty prompt (guidance's
unconditional half) and each prompt, the last hidden state the UNet's cross-attention reads, in a
safetensors file an app reads with any safetensors library; the prompt list is in its metadata.
Reading it needs numpy and safetensors only, as the rest of the ONNX path does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError

FILE = "prompt_embeddings.safetensors"


def write_prompt_table(pipe, prompts: list[str], folder: Path) -> dict:
    """The states of `""` and each of `prompts` under `pipe`'s text encoder, written to `folder/FILE`."""
    import torch
    from safetensors.numpy import save_file

    from ..distill.conditions import token_ids
    from ..modelio import is_sdxl

    if is_sdxl(pipe):
        raise UserError("prompt embeddings: SD-1.x/2.x pipelines only (SDXL's UNet also takes pooled text embeds)")
    if not prompts:
        raise UserError("prompt embeddings: the prompts file holds no prompt")
    listed = ["", *dict.fromkeys(prompts)]
    with torch.no_grad():
        states = pipe.text_encoder(token_ids(pipe.tokenizer, listed)).last_hidden_state.float().numpy()
    path = Path(folder) / FILE
    save_file({"encoder_hidden_states": states}, str(path), metadata={"prompts": json.dumps(listed)})
    return {"file": FILE, "prompts": len(listed) - 1, "shape": list(states.shape), "bytes": path.stat().st_size}


class PromptTable:
    """The UNet's text conditions looked up by prompt, for an export that ships no text encoder."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            self.prompts = json.loads(handle.metadata()["prompts"])
            self.states = handle.get_tensor("encoder_hidden_states")
        self.index = {prompt: i for i, prompt in enumerate(self.prompts)}

    def conditions(self, prompt: str) -> dict[str, np.ndarray]:
        if prompt not in self.index:
            listed = ", ".join(repr(p) for p in self.prompts[1:6]) + (", ..." if len(self.prompts) > 6 else "")
            raise UserError(f"prompt {prompt!r} is not in this export's prompt set ({listed}); it ships no text encoder")
        i = self.index[prompt]
        return {"encoder_hidden_states": self.states[i:i + 1]}
