"""Taking arrays from callers: jaxdecode owns what it keeps.

On CPU, JAX may wrap a suitably aligned NumPy array without copying it, so a
caller that reuses its buffer after handing it to jaxdecode (`eps[:] = 0.5`,
refilling a scores array before the result is read) would change jaxdecode's
results. Every public entry point takes host inputs through `owned`, which copies
them; JAX arrays and tracers pass through untouched (they are immutable).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["owned", "is_traced"]


def is_traced(*xs: Any) -> bool:
    """True when any leaf of `xs` is a tracer (we are inside a user's jit)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def owned(value: Any, dtype: Any = None) -> Array:
    """`value` as a JAX array that no caller can modify afterwards.

    Args:
        value: a JAX array or tracer (kept as is), or anything NumPy accepts
            (copied).
        dtype: optional dtype to convert to.
    """
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        return value if dtype is None else jnp.asarray(value, dtype)
    host = np.array(value, dtype=None if dtype is None else np.dtype(dtype), copy=True)
    return jnp.asarray(host)
