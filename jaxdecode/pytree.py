"""Frozen dataclass pytrees whose structure includes their type.

Every processor, context, cache and loop state in jaxdecode is a frozen dataclass
registered as a pytree: array fields are leaves, the others (`field(pytree_node=
False)`) are static and part of the tree structure, as with `flax.struct`.

Why not `flax.struct.dataclass` (issue 12): it registers classes with
`jax.tree_util.register_dataclass`, and in jaxlib 0.10.2 two tree structures
made that way compare *equal* when their classes differ but their fields and
static values match (`PyTreeDef(TypicalP[(1,)]) == PyTreeDef(MinP[(1,)])`),
while their hashes differ. `jax.jit`'s caches look a call up by hash and then
`==`, so when the two hashes happen to meet in a cache's table, a jitted function
called with a `TypicalP` runs the program compiled for a `MinP`: a wrong mask
that depends on what the process compiled before (it showed up in long, loaded
test processes, 1 run in 8). Nodes registered with
`register_pytree_with_keys` compare their types, so `dataclass` below uses it.
`tests/unit/test_pytree.py` shows both: the jaxlib behaviour and that ours is immune.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

__all__ = ["dataclass", "field"]

T = TypeVar("T")


def field(*, pytree_node: bool = True, **kwargs: Any) -> Any:
    """A dataclass field; `pytree_node=False` makes it static (part of the tree
    structure: hashable, compared with `==`, a new value compiles anew)."""
    metadata = {**kwargs.pop("metadata", {}), "pytree_node": pytree_node}
    return dataclasses.field(metadata=metadata, **kwargs)


def dataclass(cls: type[T]) -> type[T]:
    """Makes `cls` a frozen dataclass and registers it as a pytree node.

    Leaves are the fields without `pytree_node=False`, in declaration order; the
    static fields' values are the node's auxiliary data. The class gets a
    `replace(**changes)` method (a new instance, as `dataclasses.replace`).
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if f.metadata.get("pytree_node", True))
    meta = tuple(f.name for f in fields if not f.metadata.get("pytree_node", True))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in data)

    def flatten_with_keys(obj: Any) -> tuple[tuple, tuple]:
        children = tuple((k, getattr(obj, n)) for k, n in zip(keys, data, strict=True))
        return children, tuple(getattr(obj, n) for n in meta)

    def flatten(obj: Any) -> tuple[tuple, tuple]:
        return tuple(getattr(obj, n) for n in data), tuple(getattr(obj, n) for n in meta)

    def unflatten(aux: tuple, children: Any) -> Any:
        # Without __init__: leaves may be tracers or placeholders (as flax.struct).
        obj = object.__new__(cls)
        for name, value in zip(data, children, strict=True):
            object.__setattr__(obj, name, value)
        for name, value in zip(meta, aux, strict=True):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    if "replace" not in cls.__dict__:
        cls.replace = lambda self, **changes: dataclasses.replace(self, **changes)
    return cls
