"""`GenerationConfig` fields as command-line flags, derived from the option table
(`jaxdecode.fields`): every field whose entry has `cli=True`, under its name
(dashes work too), of a kind that follows the field's type."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

from jaxdecode.fields import spec


def _bool_or(choices: tuple[str, ...]):
    """An argparse type for `bool | Literal[...]` (early_stopping: true/false/never)."""

    def parse(text: str) -> bool | str:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        if low in choices:
            return low
        raise argparse.ArgumentTypeError(
            f"must be true, false or {' or '.join(choices)}, got {text!r}"
        )

    return parse


def json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"must be JSON ({e})") from None


def _union_args(tp: Any) -> tuple[Any, ...]:
    """The members of a union type (None dropped); a non-union is its own member."""
    args = (
        typing.get_args(tp)
        if isinstance(tp, types.UnionType) or (typing.get_origin(tp) is typing.Union)
        else (tp,)
    )
    return tuple(a for a in args if a is not type(None))


def _flag_kind(field: dataclasses.Field, tp: Any) -> str:
    """How a `GenerationConfig` field is given on the command line, from its type:
    "bool" (--x/--no-x), "bool_or_choice", "choice" (Literal), "scalar" (int,
    float, or a per-row number: one value for every row), "tuple" (that many
    values), "ids" (int | Sequence[int]: one or more ints), "strings" (str |
    Sequence[str]: one or more strings), else "json"."""
    args = _union_args(tp)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if args == (bool,):
        return "bool"
    if bool in args and literals:
        return "bool_or_choice"
    if literals and len(args) == 1:
        return "choice"
    if spec(field).per_row or args in ((int,), (float,)):
        return "scalar"
    if set(args) == {str, Sequence[str]}:
        return "strings"
    if str in args:
        return "text"  # one string (a regex); per-row lists come from eval lines
    if Sequence[str] in args:
        return "texts"
    if len(args) == 1 and typing.get_origin(args[0]) is tuple:
        return "tuple"
    if set(args) == {int, Sequence[int]}:
        return "ids"
    return "json"


def _flag_kwargs(field: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """argparse keywords for one `GenerationConfig` field (see `_flag_kind`)."""
    kind, args = _flag_kind(field, tp), _union_args(tp)
    literal = next((a for a in args if typing.get_origin(a) is typing.Literal), None)
    if kind == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if kind == "bool_or_choice":
        choices = tuple(typing.get_args(literal))
        return {"type": _bool_or(choices), "metavar": "{true,false," + ",".join(choices) + "}"}
    if kind == "choice":
        return {"choices": typing.get_args(literal)}
    if kind == "scalar":
        return {"type": args[0]}
    if kind == "tuple":
        members = typing.get_args(args[0])
        return {
            "type": float if float in members else int,
            "nargs": len(members),
            "metavar": tuple(t.__name__.upper() for t in members),
        }
    if kind == "ids":
        return {"type": int, "nargs": "+"}
    if kind == "strings":
        return {"type": str, "nargs": "+", "metavar": "TEXT"}
    if kind == "text":
        return {"type": str}
    if kind == "texts":
        return {"type": str, "nargs": "+"}
    return {"type": json_value, "metavar": "JSON"}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    from jaxdecode.config import FIELD_TYPES, GenerationConfig

    group = parser.add_argument_group("generation options (transformers names)")
    for f in dataclasses.fields(GenerationConfig):
        if not spec(f).cli:
            continue
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        group.add_argument(
            *flags, dest=f.name, default=None, **_flag_kwargs(f, FIELD_TYPES[f.name])
        )


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The fields given on the command line, in `GenerationConfig`'s types."""
    from jaxdecode.config import FIELD_TYPES, GenerationConfig

    out: dict[str, Any] = {}
    for f in dataclasses.fields(GenerationConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        kind = _flag_kind(f, FIELD_TYPES[f.name])
        if kind == "tuple":
            members = typing.get_args(_union_args(FIELD_TYPES[f.name])[0])
            value = tuple(t(v) for t, v in zip(members, value, strict=True))
        elif kind == "ids" and len(value) == 1:
            value = value[0]  # `--eos_token_id 5`: one id
        out[f.name] = value
    return out
