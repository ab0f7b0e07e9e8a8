"""A command's flags made from its config's pydantic fields, so that a flag has the field's name, default, choices
and help, and a value the config refuses reads as an error at that flag. Torch-free: checked before torch loads."""

from __future__ import annotations

import argparse
import types
import typing

from pydantic import ValidationError
from pydantic.fields import FieldInfo


def add_field_flag(parser: argparse.ArgumentParser, name: str, field: FieldInfo, **options) -> None:
    """``--name`` for ``field``; ``options`` (argparse's) add to or replace what the field gives."""
    kind = field.annotation
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))  # an optional value: None is the default
    flag: dict = {"default": field.get_default(call_default_factory=True), "help": field.description or " "}
    if typing.get_origin(kind) is list:  # several values after one flag: --freeze backbone matcher
        flag["nargs"] = "*"
        kind = typing.get_args(kind)[0]
    if kind is bool:
        flag["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        flag["choices"] = choices
        if all(isinstance(choice, int) for choice in choices):
            flag["type"] = int  # argparse compares the choices with the converted value
    else:
        flag["type"] = kind
    parser.add_argument(f"--{name}", **(flag | options))


def validation_message(exc: ValidationError, prefix: tuple[str, ...] = (), flag_prefix: str = "") -> str:
    """One line: each error at its flag (``prefix`` names the flag of a nested config, ``flag_prefix`` starts the flags
    of a config whose fields are flags of their own: ``--lr_range_steps``), a whole-config one as is."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in (*prefix, *err["loc"])) or "config"
        parts.append(
            f"--{flag_prefix}{where}: {err['msg']}" if err["loc"] else err["msg"].removeprefix("Value error, ")
        )
    return "; ".join(parts)
