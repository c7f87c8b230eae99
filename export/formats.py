"""The export formats by name: the registry `pocketdiff export --to` reads."""

from __future__ import annotations

from . import coreml, executorch, onnx
from .protocol import ExportFormat

FORMATS: dict[str, ExportFormat] = {f.name: f for f in (onnx.FORMAT, executorch.FORMAT, coreml.FORMAT)}
