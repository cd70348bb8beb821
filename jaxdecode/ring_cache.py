"""`RingCache`: the keys and values of sliding-window layers in a window-sized ring.

A sliding layer's query at cache slot `q` reads only slots `q - window + 1 .. q`,
so its keys need `window` slots, not `max_len`: slot `s` lives at ring position
`s % size` with `size = min(max_len, window + slack)`, and `slot [batch, size]`
records which absolute slot each position holds (-1: none, or left padding).
Memory is proportional to the window.

Attention reads the ring through `linear(layer)`: the last `size` slots before
each row's `index` in slot order (a per-row rotation of the ring), beside the
call's new keys, so `layers.attend` sees a contiguous block of slots and its
masks (causal, window, padding) apply unchanged, blocked prefill included. A
position whose recorded slot is not the one the rotation expects (never written,
overwritten, or rewound) is masked out.

`slack` positions beyond the window let speculative decoding rewind up to
`slack` tokens: what a rewind cannot restore (keys overwritten by the rejected
tokens) lies outside every later query's window. The protocol methods
(`take_rows`, `put_rows`, `gather_rows`, `rewind`, `partition_specs`,
`nbytes`) make it a `cache.Cache`, so beam search, speculation, the engine and
sharding use it as they use a `KVCache`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdecode import pytree
from jaxdecode.cache import cache_nbytes
from jaxdecode.sharding import DATA, MODEL, fit_spec

Array = jax.Array

__all__ = ["RING_SLACK", "RingCache", "init_ring"]

# Ring positions beyond the window: the longest rewind (speculative decoding's
# draft length + 1) a ring can undo.
RING_SLACK = 64


@pytree.dataclass
class RingCache:
    """Keys and values of the sliding-window layers, `size` positions per row.

    Attributes:
        k: `[layers, batch, heads, size, head_dim]`.
        v: `[layers, batch, heads, size, head_dim]`.
        slot: `[batch, size]` int32, the absolute cache slot each position holds
            (-1: none or a padding token).
        index: `[batch]` int32, the next absolute slot each row writes.
        window: the layers' sliding window (static).
        slack: the longest rewind it can undo (static).
    """

    k: Array
    v: Array
    slot: Array
    index: Array
    window: int = pytree.field(pytree_node=False, default=1)
    slack: int = pytree.field(pytree_node=False, default=RING_SLACK)

    @property
    def size(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of `k`, `v`, `slot` and `index`."""
        return cache_nbytes((self.k, self.v, self.slot, self.index))

    def _positions(self) -> Array:
        """`[batch, size]`: the ring position of slots `index - size .. index - 1`."""
        return (self.index[:, None] + jnp.arange(self.size)[None, :]) % self.size

    def linear(self, layer: int) -> tuple[Array, Array]:
        """Keys and values `[batch, heads, size, head_dim]` of slots `index - size ..
        index - 1` in slot order (position p holds slot `index - size + p`)."""
        at = self._positions()[:, None, :, None]
        return (
            jnp.take_along_axis(self.k[layer], at, axis=2),
            jnp.take_along_axis(self.v[layer], at, axis=2),
        )

    def valid(self) -> Array:
        """`[batch, size]` bool: does linear position p hold slot `index - size + p`?"""
        held = jnp.take_along_axis(self.slot, self._positions(), axis=1)
        expected = self.index[:, None] - self.size + jnp.arange(self.size)[None, :]
        return (held == expected) & (expected >= 0)

    def _tail(self, t: int) -> tuple[int, Array]:
        """The first new token kept (the last `size` of `t` win) and their positions."""
        first = max(0, t - self.size)
        offsets = jnp.arange(first, t)[None, :]
        return first, (self.index[:, None] + offsets) % self.size

    def write(self, layer: int, k_new: Array, v_new: Array) -> RingCache:
        """Writes `k_new, v_new: [batch, T, heads, head_dim]` of one layer at each
        row's next slots (only the last `size` when T is longer). Does not advance
        `index`; call `advance` once after all layers."""
        first, pos = self._tail(k_new.shape[1])
        rows = jnp.arange(self.batch)[:, None]

        def put(buf: Array, new: Array) -> Array:
            return buf.at[layer, rows, :, pos, :].set(new[:, first:].astype(buf.dtype))

        return self.replace(k=put(self.k, k_new), v=put(self.v, v_new))

    def advance(self, new_mask: Array) -> RingCache:
        """Records the slots of `new_mask: [batch, T]`'s real tokens and moves
        `index` by T."""
        t = new_mask.shape[1]
        first, pos = self._tail(t)
        slots = self.index[:, None] + jnp.arange(first, t)[None, :]
        held = jnp.where(new_mask[:, first:].astype(bool), slots, -1).astype(jnp.int32)
        rows = jnp.arange(self.batch)[:, None]
        return self.replace(slot=self.slot.at[rows, pos].set(held), index=self.index + t)

    def rewind(self, n: Array, *, width: int | None = None) -> RingCache:
        """Forgets each row's last `n: [batch]` written tokens (`n <= width <= slack`).

        Their positions are cleared; keys they overwrote are not restored, but
        those slots lie outside the window of every later query.

        Raises:
            ValueError: without `width`, or with `width > slack`.
        """
        if width is None or width > self.slack:
            raise ValueError(
                f"a sliding-window ring cache rewinds at most slack={self.slack} tokens per "
                f"call and needs that bound as width, got width={width!r}"
            )
        n = jnp.asarray(n, jnp.int32)
        start = self.index - n
        offs = jnp.arange(width)[None, :]
        slots = start[:, None] + offs  # [B, W]
        pos = jnp.where(offs < n[:, None], slots % self.size, self.size)  # past the end: dropped
        rows = jnp.arange(self.batch)[:, None]
        clear = lambda buf: buf.at[:, rows, :, pos, :].set(0, mode="drop")
        return self.replace(
            k=clear(self.k),
            v=clear(self.v),
            slot=self.slot.at[rows, pos].set(-1, mode="drop"),
            index=start,
        )

    def take_rows(self, rows: Array) -> RingCache:
        """The cache of rows `rows: [n]` only."""
        return self.replace(
            k=self.k[:, rows], v=self.v[:, rows], slot=self.slot[rows], index=self.index[rows]
        )

    def put_rows(self, rows: Array, new: RingCache) -> RingCache:
        """This cache with rows `rows: [n]` set from the `n` rows of `new`. A
        smaller ring (a narrower prefill cache: fewer than `window + slack`
        slots, so it never wrapped) holds slot `s` at position `s`, which is
        where this one holds it too: its positions land at the start of each
        target row and the rest is cleared. Rows past the end are dropped."""
        rows = jnp.asarray(rows, jnp.int32)
        if new.size > self.size:
            raise ValueError(
                f"put_rows: the new rows' ring has {new.size} positions, more than this "
                f"cache's {self.size}"
            )
        pad = self.size - new.size

        def put(buf: Array, x: Array) -> Array:
            x = jnp.pad(x.astype(buf.dtype), ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
            return buf.at[:, rows].set(x, mode="drop")

        return self.replace(
            k=put(self.k, new.k),
            v=put(self.v, new.v),
            slot=self.slot.at[rows].set(
                jnp.pad(new.slot, ((0, 0), (0, pad)), constant_values=-1), mode="drop"
            ),
            index=self.index.at[rows].set(new.index, mode="drop"),
        )

    def gather_rows(self, parent: Array) -> RingCache:
        """Row `i` becomes row `parent[i]` (`[batch]`, in range)."""
        kv = lambda x: x.at[:, parent].get(mode="promise_in_bounds")
        rows = lambda x: x.at[parent].get(mode="promise_in_bounds")
        return self.replace(
            k=kv(self.k), v=kv(self.v), slot=rows(self.slot), index=rows(self.index)
        )

    def partition_specs(self, mesh: Mesh) -> RingCache:
        """Rows over `data`, heads over `model` (`fit_spec` where they do not divide)."""
        kv = fit_spec(P(None, DATA, MODEL, None, None), self.k.shape, mesh)
        rows = fit_spec(P(DATA, None), self.slot.shape, mesh)
        return self.replace(k=kv, v=kv, slot=rows, index=P(*rows[:1]))


def init_ring(
    *,
    layers: int,
    batch: int,
    max_len: int,
    heads: int,
    head_dim: int,
    window: int,
    slack: int = RING_SLACK,
    dtype: Any = jnp.float32,
) -> RingCache:
    """An empty ring of `min(max_len, window + slack)` positions per row."""
    size = min(max_len, window + slack)
    shape = (layers, batch, heads, size, head_dim)
    return RingCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        slot=jnp.full((batch, size), -1, jnp.int32),
        index=jnp.zeros((batch,), jnp.int32),
        window=window,
        slack=slack,
    )
