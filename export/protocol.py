"""What an export format is: one object per format, which the exporter's single loop drives.

A format module builds its `FORMAT` from its own functions; `formats.py` lists them. Adding a
format is one module and one line there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .components import Component


def same_component(component: Component, _pipe, _ref, _config) -> Component:
    """A format that takes the shared wrappers' names and layouts as they are."""
    return component


@dataclass(frozen=True)
class ExportFormat:
    name: str  # as `--to` names it
    title: str  # as messages name it
    precisions: tuple[str, ...]
    default_precision: str
    int8_backends: tuple[str, ...]  # the `pocketdiff quantize` backends whose saved UNet ships as int8 here
    palettizes: bool  # a palettized UNet ships as look-up tables (else its table values as plain weights)
    dynamic_shapes: bool  # one file for any batch and resolution
    runs_pipeline: bool  # its runtime runs here, so the exporter compares whole images
    check_int8: Callable[[str | None], None]  # refuses int8 of a UNet quantized for another runtime
    export_component: Callable[..., Path]  # (component, folder, precision, **options) → the written file
    load: Callable[[Path], Callable | None]  # a runner of the file (dict in, dict out), or None where it cannot run
    write_layout: Callable[..., None]  # (ref, out, names, config): the app layout around the components
    file_bytes: Callable[[Path], int]
    adapt: Callable[..., Component] = same_component  # (component, pipe, ref, config): the runtime's own I/O
    structural_check: Callable[[Path, Component], dict] | None = None  # where `load` gives None
    no_runtime_reason: str = ""

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            listed = ", ".join(self.precisions[:-1]) + f" or {self.precisions[-1]}"
            raise UserError(f"{self.title} export takes precision {listed}, not {precision}")
