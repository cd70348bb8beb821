"""The functional KV cache: static-shape arrays, written by returning new ones.

Layout: `k, v: [layers, batch, heads, max_len, head_dim]` (head-major, so
attention reads each layer as a batched matrix without a transpose), plus `mask [batch,
max_len]` (which slots hold a real token: left padding and unwritten slots are
False) and `index [batch]` (next slot to write, per row). Nothing is mutated:
`write` returns a new cache built with `lax.dynamic_update_slice`; when the cache
is donated to `jax.jit` XLA performs those updates in place.

**The cache protocol.** Beam search, speculative decoding, the engine and sharding
never index a cache's arrays: they call the `Cache` methods (`take_rows`,
`put_rows`, `gather_rows`, `rewind`, `partition_specs`, `nbytes`) through the
tree functions below (`take_rows(tree, rows)`, ...), which apply them to every
cache in a pytree and treat any other array leaf as rows on axis 0. So a
decoder may keep a tuple of per-layer caches of different kinds (a full-length
layer beside a window-sized ring, pages from a pool, int8 with scales): each
kind implements the protocol once and every caller works with it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdecode import pytree
from jaxdecode.sharding import DATA, MODEL, fit_spec

Array = jax.Array

__all__ = [
    "Cache",
    "KVCache",
    "init_cache",
    "take_rows",
    "put_rows",
    "gather_rows",
    "gather_beams",
    "rewind_rows",
    "cache_specs",
    "cache_nbytes",
    "visible_slots",
    "SlotMask",
    "slot_mask",
]


@runtime_checkable
class Cache(Protocol):
    """What callers may ask of a decoder's cache (rows are the batch).

    Every method returns a new cache; none mutates. Implemented by `KVCache`;
    a decoder with another layout implements these six and works with beam
    search, speculative decoding, the engine and sharding unchanged.
    """

    def take_rows(self, rows: Array) -> Cache:
        """The cache of rows `rows: [n]` int32 only (in that order)."""
        ...

    def put_rows(self, rows: Array, new: Cache) -> Cache:
        """This cache with rows `rows: [n]` replaced by the `n` rows of `new`
        (rows past the end are dropped)."""
        ...

    def gather_rows(self, parent: Array) -> Cache:
        """Row `i` of the result is row `parent[i]` (`[batch]`, in range)."""
        ...

    def rewind(self, n: Array, *, width: int | None = None) -> Cache:
        """Forgets each row's last `n: [batch]` written tokens."""
        ...

    def partition_specs(self, mesh: Mesh) -> Any:
        """The same structure with a `PartitionSpec` for every array."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of every array the cache holds."""
        ...


@pytree.dataclass
class KVCache:
    """Keys and values of every layer for `batch` rows and `max_len` slots.

    Attributes:
        k: `[layers, batch, heads, max_len, head_dim]`.
        v: `[layers, batch, heads, max_len, head_dim]`.
        mask: `[batch, max_len]` bool, True where a slot holds a real token.
        index: `[batch]` int32, the next slot each row writes.
    """

    k: Array
    v: Array
    mask: Array
    index: Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def nbytes_kv(self) -> int:
        """Bytes of `k` and `v`: `2 * layers * batch * max_len * heads * head_dim * itemsize`."""
        return int(self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize)

    @property
    def nbytes(self) -> int:
        """Bytes of `k`, `v`, `mask` and `index`."""
        return cache_nbytes((self.k, self.v, self.mask, self.index))

    def write(self, layer: int, k_new: Array, v_new: Array) -> KVCache:
        """Writes `k_new, v_new: [batch, T, heads, head_dim]` of one layer at each
        row's `index` (rows may differ). Does not advance `index`; call `advance`
        once after all layers.

        One scatter into the stacked array per tensor: inside a loop whose carry
        is the cache (or with the cache donated) XLA updates it in place instead of
        copying a layer out and back. A slot past `max_len` is not written.

        One row and one token (a batch-1 decode step) is a `dynamic_update_slice`
        at scalar starts instead: XLA:CPU lowered the scatter to the same in-place
        update plus three small kernels per layer building and bounds-checking its
        index vector (90 of a SmolLM2 step's ~1,000); here the bounds check is one
        scalar shared by every layer.
        """
        b, t = k_new.shape[:2]
        if b == 1 and t == 1:
            slot = self.index[0]
            inside = slot < self.max_len

            def put_one(buf: Array, new: Array) -> Array:
                # [1, 1, H, D] -> buf[layer, 0, :, slot, :] as [1, 1, H, 1, D]
                new = new.astype(buf.dtype).transpose(0, 2, 1, 3)[None]
                start = (layer, 0, 0, slot, 0)
                # Out of range the start clamps: keep what is there (scatter's "drop").
                old = jax.lax.dynamic_slice(buf, start, new.shape)
                return jax.lax.dynamic_update_slice(buf, jnp.where(inside, new, old), start)

            return self.replace(k=put_one(self.k, k_new), v=put_one(self.v, v_new))
        rows = jnp.arange(b)[:, None]
        slots = self.index[:, None] + jnp.arange(t)[None, :]  # [B, T]

        def put(buf: Array, new: Array) -> Array:
            # buf[layer, row, :, slot, :] = new[row, t]  (new: [B, T, H, D])
            return buf.at[layer, rows, :, slots, :].set(new.astype(buf.dtype), mode="drop")

        return self.replace(k=put(self.k, k_new), v=put(self.v, v_new))

    def advance(self, new_mask: Array) -> KVCache:
        """Marks `new_mask: [batch, T]` at each row's `index` and moves `index` by T."""
        t = new_mask.shape[1]

        def one_row(buf: Array, new: Array, start: Array) -> Array:
            return jax.lax.dynamic_update_slice(buf, new.astype(bool), (start,))

        mask = jax.vmap(one_row)(self.mask, new_mask, self.index)
        return self.replace(mask=mask, index=self.index + t)

    def rewind(self, n: Array, *, width: int | None = None) -> KVCache:
        """Forgets each row's last `n: [batch]` written slots.

        The slots are cleared (keys and values zeroed, mask False) and `index`
        moves back by `n`, so writing the same tokens again gives bitwise the cache
        of never having written them (speculative decoding rewinds a row past
        its rejected draft tokens).

        Args:
            n: `[batch]` int32 slots to forget per row, `0 <= n <= index`.
            width: static upper bound on `n` (e.g. the draft length + 1): clears a
                window of `width` slots per row with one scatter instead of
                rewriting the whole cache. Default: the whole `max_len`.
        """
        n = jnp.asarray(n, jnp.int32)
        start = self.index - n  # [B]
        if width is None:
            slot = jnp.arange(self.max_len)[None, :]
            gone = (slot >= start[:, None]) & (slot < self.index[:, None])  # [B, S]
            keep = ~gone[None, :, None, :, None]
            return self.replace(
                k=jnp.where(keep, self.k, 0),
                v=jnp.where(keep, self.v, 0),
                mask=self.mask & ~gone,
                index=start,
            )
        offs = jnp.arange(width)[None, :]
        # Slots start..index-1 of each row; the rest of the window points past
        # the cache and is dropped by the scatter.
        slots = jnp.where(offs < n[:, None], start[:, None] + offs, self.max_len)  # [B, W]
        rows = jnp.arange(self.batch)[:, None]

        def clear(buf: Array) -> Array:
            return buf.at[:, rows, :, slots, :].set(0, mode="drop")

        mask = self.mask.at[rows, slots].set(False, mode="drop")
        return self.replace(k=clear(self.k), v=clear(self.v), mask=mask, index=start)

    def take_rows(self, rows: Array) -> KVCache:
        """The cache of rows `rows: [n]` int32 only."""
        return self.replace(
            k=self.k[:, rows], v=self.v[:, rows], mask=self.mask[rows], index=self.index[rows]
        )

    def put_rows(self, rows: Array, new: KVCache) -> KVCache:
        """This cache with rows `rows: [n]` set from the `n` rows of `new`.

        A continuous-batching engine prefills new prompts into a small cache and
        puts them into free rows of the live cache; the rows then decode exactly
        as they would alone. `new` may be narrower (`max_len <= self.max_len`):
        its slots land at the start of each target row and the rest of the row
        is cleared. Rows past the end (an engine's unused prefill rows) are
        dropped.
        """
        rows = jnp.asarray(rows, jnp.int32)
        width = new.max_len
        if width > self.max_len:
            raise ValueError(
                f"put_rows: the new rows have max_len={width}, more than this "
                f"cache's {self.max_len}"
            )
        pad = self.max_len - width

        def put(buf: Array, x: Array) -> Array:
            x = jnp.pad(x.astype(buf.dtype), ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
            return buf.at[:, rows].set(x, mode="drop")

        return self.replace(
            k=put(self.k, new.k),
            v=put(self.v, new.v),
            mask=self.mask.at[rows].set(jnp.pad(new.mask, ((0, 0), (0, pad))), mode="drop"),
            index=self.index.at[rows].set(new.index, mode="drop"),
        )

    def gather_rows(self, parent: Array) -> KVCache:
        """Row `i` becomes row `parent[i]` (`[batch]`; in range by construction,
        so the gather skips bounds handling). Beam search calls it once a step."""
        kv = lambda x: x.at[:, parent].get(mode="promise_in_bounds")
        rows = lambda x: x.at[parent].get(mode="promise_in_bounds")
        return self.replace(
            k=kv(self.k), v=kv(self.v), mask=rows(self.mask), index=rows(self.index)
        )

    def partition_specs(self, mesh: Mesh) -> KVCache:
        """Rows over `data`, heads over `model` (`fit_spec` where they do not divide)."""
        kv = fit_spec(P(None, DATA, MODEL, None, None), self.k.shape, mesh)
        rows = fit_spec(P(DATA, None), self.mask.shape, mesh)
        return KVCache(k=kv, v=kv, mask=rows, index=P(*rows[:1]))


def init_cache(
    *,
    layers: int,
    batch: int,
    max_len: int,
    heads: int,
    head_dim: int,
    dtype: Any = jnp.float32,
) -> KVCache:
    """An empty cache (all slots masked out, every row writing at slot 0)."""
    shape = (layers, batch, heads, max_len, head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((batch,), jnp.int32),
    )


def _is_cache(x: Any) -> bool:
    return isinstance(x, Cache)


def _map_rows(tree: Any, on_cache: Any, on_array: Any, *rest: Any) -> Any:
    """`tree` with `on_cache(cache, *rest_leaves)` applied to every `Cache` and
    `on_array(x, *rest_leaves)` to every array with a row axis (scalars, such as a
    loop's step counter, are kept)."""

    def one(x: Any, *ys: Any) -> Any:
        if _is_cache(x):
            return on_cache(x, *ys)
        return x if jnp.ndim(x) == 0 else on_array(x, *ys)

    return jax.tree_util.tree_map(one, tree, *rest, is_leaf=_is_cache)


def take_rows(tree: Any, rows: Array) -> Any:
    """Rows `rows: [n]` of every cache in `tree` and of every other array (rows on
    axis 0)."""
    return _map_rows(tree, lambda c: c.take_rows(rows), lambda x: x[rows])


def put_rows(tree: Any, rows: Array, new: Any) -> Any:
    """`tree` with rows `rows: [n]` set from `new` (same structure, `n` rows), in
    every cache and every other array; rows past the end are dropped."""
    return _map_rows(
        tree,
        lambda c, y: c.put_rows(rows, y),
        lambda x, y: x.at[rows].set(y, mode="drop"),
        new,
    )


def gather_rows(tree: Any, parent: Array) -> Any:
    """Every cache and array of `tree` reordered by `parent: [batch]` row indices
    (in range: the gather skips bounds handling). Beam search calls this once per
    step with the parent beam of each new beam."""
    return _map_rows(
        tree,
        lambda c: c.gather_rows(parent),
        lambda x: x.at[parent].get(mode="promise_in_bounds"),
    )


# The name beam search has always used for `gather_rows`.
gather_beams = gather_rows


def rewind_rows(tree: Any, n: Array, *, width: int | None = None) -> Any:
    """Every cache in `tree` with each row's last `n: [batch]` tokens forgotten
    (`Cache.rewind`); other leaves unchanged."""
    return _map_rows(tree, lambda c: c.rewind(n, width=width), lambda x: x)


def cache_specs(tree: Any, mesh: Mesh) -> Any:
    """PartitionSpecs of a decoder cache: each `Cache`'s own
    (`partition_specs`), the leading (row) axis of any other array over `data`,
    and `P()` for scalars."""

    def one(x: Any) -> Any:
        if _is_cache(x):
            return x.partition_specs(mesh)
        return fit_spec(P(DATA), np.shape(x), mesh) if np.ndim(x) else P()

    return jax.tree_util.tree_map(one, tree, is_leaf=_is_cache)


def cache_nbytes(tree: Any) -> int:
    """Bytes of every array of a cache pytree (works on `jax.eval_shape` output)."""
    return sum(
        int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
        for x in jax.tree_util.tree_leaves(tree)
    )


@pytree.dataclass
class SlotMask:
    """Which cache slots each of T new queries may read, without the `[B, T, S]` array.

    Query `t` of row `b` (at cache slot `q_slot[b, t]`) reads key slot `s` when
    `s <= q_slot[b, t]` (causal), `kv_mask[b, s]` (a real token) and, with a
    window, `s > q_slot[b, t] - window` (transformers' sliding-window overlay on
    cache positions). Blocked attention (`layers.attend`) builds the mask of one
    key block at a time from this, so a long prefill never holds T x S of it.

    Attributes:
        q_slot: `[batch, T]` int32, the cache slot of each new token.
        kv_mask: `[batch, S]` bool, True where a slot holds a real token (after this write).
        window: sliding window (static), or None for full causal attention.
    """

    q_slot: Array
    kv_mask: Array
    window: int | None = pytree.field(pytree_node=False, default=None)

    def with_window(self, window: int | None) -> SlotMask:
        """The same mask restricted to the last `window` slots (None: unchanged)."""
        return self if window is None else self.replace(window=window)

    def columns(self, start: Array | int, size: int) -> Array:
        """`[batch, T, size]` bool: may each query read key slots `start ..
        start + size - 1`? (`start + size <= S`; `start` may be traced.)"""
        q = self.q_slot[:, :, None]
        k = (start + jnp.arange(size, dtype=jnp.int32))[None, None, :]
        real = jax.lax.dynamic_slice_in_dim(self.kv_mask, start, size, axis=1)
        out = (k <= q) & real[:, None, :]
        if self.window is not None:
            out = out & (k > q - self.window)
        return out

    def dense(self) -> Array:
        """`[batch, T, S]` bool, the whole pattern (what `visible_slots` returns)."""
        return self.columns(0, self.kv_mask.shape[1])


def slot_mask(cache: KVCache, attention_mask: Array) -> tuple[SlotMask, KVCache]:
    """`visible_slots` as a `SlotMask` (no `[B, T, S]` array), and the advanced cache.

    Args:
        cache: the cache before this call.
        attention_mask: `[batch, T]`, 1 for real new tokens, 0 for left padding.
    """
    t = attention_mask.shape[1]
    after = cache.advance(attention_mask)
    q_slot = cache.index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return SlotMask(q_slot=q_slot.astype(jnp.int32), kv_mask=after.mask), after


def visible_slots(cache: KVCache, attention_mask: Array) -> tuple[Array, KVCache]:
    """Which cache slots each of T new tokens may attend to, and the cache with
    their mask recorded and `index` advanced.

    A new token at slot `index[b] + t` sees every real token (mask after this
    write) at or before its own slot. Write the layers' keys and values with the
    *input* cache's `write` (at the old index), then keep the returned cache's
    `mask` and `index`.

    Args:
        cache: the cache before this call.
        attention_mask: `[batch, T]`, 1 for real new tokens, 0 for left padding.

    Returns:
        `visible [batch, T, max_len]` bool, and the advanced cache.
    """
    mask, after = slot_mask(cache, attention_mask)
    return mask.dense(), after
