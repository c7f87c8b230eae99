"""optimum's diffusion folder around exported components: what ONNX and ExecuTorch exports share."""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import modelio
from ..stockformat import write_vocab_and_merges


def write_optimum_layout(ref: modelio.ModelRef, out: Path, names: list[str], _config=None) -> None:
    """model_index.json, tokenizer/, scheduler/ as they are, and each component's config.json."""
    out.mkdir(parents=True, exist_ok=True)
    if ref.kind == "unet":
        shutil.copy2(ref.path / "config.json", out / "unet" / "config.json")
        return
    for item in ("model_index.json", "tokenizer", "tokenizer_2", "scheduler", "feature_extractor"):
        source = ref.path / item
        if source.is_dir():
            shutil.copytree(source, out / item, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy2(source, out / item)
    for tokenizer in (out / "tokenizer", out / "tokenizer_2"):
        if tokenizer.is_dir() and not (tokenizer / "vocab.json").exists():
            write_vocab_and_merges(tokenizer, tokenizer)  # apps' BPE readers want CLIP's two files
    for name in names:  # a one-step program carries its UNet's config: latent shape, guidance embedding
        source = ref.path / ("vae" if name.startswith("vae") else "unet" if name == "one_step" else name) / "config.json"
        shutil.copy2(source, out / name / "config.json")
