"""A model folder's identity: what caches and resumable runs key on, so a changed input is never mistaken for the old one."""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "manifest.json"  # a recipe stage's record, written beside the model it made
LOG = "log.txt"  # what a stage printed
_MODEL_SUFFIXES = {".json", ".safetensors", ".txt", ".bin"}


def hash_model_folder(path: Path) -> str:
    """sha256 over a model folder's configs and weights (not manifests, stage logs or checkpoints)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if file.name in (MANIFEST, LOG) or relative.parts[0] == "checkpoint" or file.suffix not in _MODEL_SUFFIXES:
            continue
        digest.update(str(relative).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
