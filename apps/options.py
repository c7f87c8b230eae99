"""CLI options made from a stage's pydantic config: one option per field, with the field's own help text and default.

The config is the single source of a stage's settings: the recipe stage validates YAML against it,
and `with_config` turns its fields into the command's options, so a field, its default and its
help are written once. An option not given leaves the config's default. Lists take a repeated
option or comma-separated values (free-text fields, whose `json_schema_extra` says "free_text",
take only repeats; "also" names further spellings of the option); a nested config's fields become
options of their own names.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import typer
from pydantic import BaseModel, ValidationError

from ..errors import UserError


def first_error(err: ValidationError) -> str:
    """The first error as one line: the field's path, then pydantic's message (a whole-config check: its message)."""
    first = err.errors()[0]
    where, message = ".".join(str(p) for p in first["loc"]), first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _unwrap(annotation):
    """The annotation without `| None` and `Annotated` constraints."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return _unwrap(next(a for a in typing.get_args(annotation) if a is not type(None)))
    return annotation


def _kind(annotation) -> tuple[type, str, bool]:
    """(the option's click type, a note of the choices, whether it is a list)."""
    base = _unwrap(annotation)
    if typing.get_origin(base) is list:
        click_type, note, _ = _kind(_unwrap(typing.get_args(base)[0]))
        return click_type, note, True
    if typing.get_origin(base) is Literal:
        return str, " (" + ", ".join(str(a) for a in typing.get_args(base)) + ")", False
    if base in (bool, int, float, str, Path):
        return base, "", False
    raise TypeError(f"no command-line option for a {base} field")


def _shown(field) -> str:
    if field.is_required():
        return " (required)"
    default = field.get_default(call_default_factory=True)
    if default is None:
        return ""
    shown = ",".join(str(v) for v in default) if isinstance(default, list) else str(default)
    return f" (default: {shown})"


def _fields(config: type[BaseModel]) -> dict[str, tuple[str | None, object]]:
    """Option name → (the nested config field it belongs to, or None; the pydantic field)."""
    found = {}
    for name, field in config.model_fields.items():
        base = _unwrap(field.annotation)
        if inspect.isclass(base) and issubclass(base, BaseModel):
            found.update({sub: (name, subfield) for sub, subfield in base.model_fields.items()})
        else:
            found[name] = (None, field)
    return found


def _parameter(name: str, field) -> inspect.Parameter:
    click_type, note, is_list = _kind(field.annotation)
    help_text = (field.description or "") + note + _shown(field)
    flag, extra = f"--{name.replace('_', '-')}", field.json_schema_extra or {}
    if click_type is bool:
        option = typer.Option(f"{flag}/--no-{name.replace('_', '-')}", help=help_text)
    else:
        repeat = " Repeat for several." if extra.get("free_text") else " Repeat, or separate by commas."
        option = typer.Option(flag, *extra.get("also", ()), help=help_text + (repeat if is_list else ""))
    kind = Optional[list[str]] if is_list else Optional[click_type]  # list items: split on commas, then validated
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind, option])


def _value(field, given):
    if isinstance(given, list) and not (field.json_schema_extra or {}).get("free_text"):
        return [part.strip() for value in given for part in str(value).split(",") if part.strip()]
    return str(given) if isinstance(given, Path) else given


def with_config(config: type[BaseModel], label: str):
    """A command whose last parameter is `config: <config>`, given options for every field of `config`; `label`
    names the command in its one-line errors."""
    fields = _fields(config)

    def decorate(command):
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command).parameters.values() if p.name != "config"]
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints[p.name]) for p in own]
        assert not {p.name for p in own} & set(fields), "a command's own option shadows a config field"

        @functools.wraps(command)
        def run(**values):
            chosen: dict = {}
            for name, (parent, field) in fields.items():
                given = values.pop(name)
                if given is not None:
                    (chosen.setdefault(parent, {}) if parent else chosen)[name] = _value(field, given)
            try:
                built = config(**chosen)
            except ValidationError as err:
                raise UserError(f"{label}: {first_error(err)}") from None
            return command(**values, config=built)

        parameters = own + [_parameter(name, field) for name, (_, field) in fields.items()]
        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # typer reads the signature above, not the command's own
        return run

    return decorate
