"""The option table of `GenerationConfig`: one entry per field, from which the
rest is derived.

Each field of `GenerationConfig` is declared with `option(default, doc=...,
check=..., ...)`, which stores a `Spec` in the dataclass field's metadata. Small
generic functions read the table:

- validation: `Spec.check` (a rule from `jaxdecode.validation`: `Int`, `Real`,
  `Flag`, `OneOf`, token-id rules, ...) is run by `GenerationConfig.validate()` on
  every field; `validate()` adds only the checks between fields;
- the static part: `Spec.static` says how `StaticConfig` (the hashable part a
  compiled program reads) reads the field; `static_class` builds `StaticConfig`
  from those entries;
- which prompts may share a program: `Spec.varies` ("batch": equal for all
  prompts of a program; "row": a traced per-row value, packed as a `[rows]` array;
  "prompt": set per prompt on the host (the seed, the output constraint);
  "slot": the lengths, per engine slot, one per static batch);
- the CLI: every field is a flag unless `cli=False`; the flag's kind follows the
  field's type (`jaxdecode.cli.flags`);
- the docs' field table (`docs/hooks/config_fields.py`): `doc`, `hf`, `varies`,
  `static`.

Adding a field is one `option(...)` line in `GenerationConfig` (and, for a field
that keys a compiled program, `static=Static(type)` in it); the completeness test
(tests/unit/test_fields.py) fails when an entry lacks a part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

import numpy as np

__all__ = [
    "VARIES",
    "Spec",
    "Static",
    "choices",
    "nullable",
    "option",
    "row_dtype",
    "spec",
    "specs",
    "static_class",
]

# How a field may differ between prompts that share one compiled program.
VARIES = ("batch", "row", "prompt", "slot")


@dataclasses.dataclass(frozen=True)
class Static:
    """How `StaticConfig` reads a field.

    Attributes:
        type: the `StaticConfig` field's type (the value is cast to it unless
            `read` is given).
        read: `(config) -> value`, for a value resolved from several fields (the
            pad id falls back to the first EOS id); None: the field's own value.
        doc: what the static value means, when it differs from the field's doc.
    """

    type: type
    read: Callable[[Any], Any] | None = None
    doc: str = ""

    def value(self, config: Any, name: str) -> Any:
        if self.read is not None:
            return self.read(config)
        return self.type(getattr(config, name))


@dataclasses.dataclass(frozen=True)
class Spec:
    """One entry of the option table (a `GenerationConfig` field's metadata).

    Attributes:
        doc: what the field does, in one sentence (the docs' field table).
        check: the field's own validation, `check(name, value, vocab_size)`
            raising `ConfigError` (a rule from `jaxdecode.validation`); `None`
            values of an optional field are not checked.
        hf: transformers' `GenerationConfig` has a field of that name and meaning.
        varies: "batch", "row", "prompt" or "slot" (see `VARIES`).
        static: how `StaticConfig` reads it; None: no compiled program reads the
            field as such (a traced value, or one read to build the processors).
        cli: a command-line flag of the same name.
    """

    doc: str
    check: Callable[[str, Any, int | None], None]
    hf: bool = True
    varies: str = "batch"
    static: Static | None = None
    cli: bool = True

    def __post_init__(self) -> None:
        if self.varies not in VARIES:
            raise ValueError(f"varies must be one of {VARIES}, got {self.varies!r}")
        if not self.doc:
            raise ValueError("every option needs a doc")

    @property
    def per_row(self) -> bool:
        """A traced value that may be one value per row `[batch]`."""
        return self.varies == "row"


def option(
    default: Any,
    *,
    doc: str,
    check: Callable[[str, Any, int | None], None],
    hf: bool = True,
    varies: str = "batch",
    static: Static | None = None,
    cli: bool = True,
) -> Any:
    """A `GenerationConfig` field with its table entry (see `Spec`)."""
    entry = Spec(doc=doc, check=check, hf=hf, varies=varies, static=static, cli=cli)
    return dataclasses.field(default=default, metadata={"spec": entry})


def spec(field: dataclasses.Field) -> Spec:
    """The table entry of a dataclass field."""
    return field.metadata["spec"]


def specs(cls: type) -> dict[str, Spec]:
    """`{name: Spec}` of every field of `cls`, in declaration order."""
    return {f.name: spec(f) for f in dataclasses.fields(cls)}


def nullable(tp: Any) -> bool:
    """Whether a field's type admits None."""
    return type(None) in get_args(tp)


def choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` type, else None."""
    return get_args(tp) if get_origin(tp) is Literal else None


def row_dtype(tp: Any) -> type:
    """How a per-row field is packed as a `[rows]` array: int32 for integer values
    (`PerRowInt`), float64 for the rest (a top-p cutoff `1 - p` is then rounded
    from the same float64 as for a scalar `p`; the processors store float32)."""
    members = set(get_args(tp)) or {tp}
    return np.int32 if int in members and float not in members else np.float64


def static_class(cls: type, *, name: str, module: str, doc: str) -> type:
    """A frozen, hashable dataclass with one field per entry of `cls` that has a
    `static` reading, in declaration order, typed by it."""
    entries = [(n, s.static) for n, s in specs(cls).items() if s.static is not None]
    attrs = "\n".join(
        f"        {n}: {st.doc or specs(cls)[n].doc}" for n, st in entries if st is not None
    )
    made = dataclasses.make_dataclass(
        name,
        [(n, st.type) for n, st in entries if st is not None],
        frozen=True,
        namespace={"__doc__": f"{doc}\n\n    Attributes:\n{attrs}\n    "},
    )
    made.__module__ = module
    made.__qualname__ = name
    return made
