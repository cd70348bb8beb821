"""The functional KV cache: static-shape arrays, written by returning new ones.

Layout: `k, v: [layers, batch, heads, max_len, head_dim]` (head-major, so
attention reads each layer as a batched matrix without a transpose), plus `mask [batch,
max_len]` (which slots hold a real token: left padding and unwritten slots are
False) and `index [batch]` (next slot to write, per row). Nothing is mutated:
`write` returns a new cache built with `lax.dynamic_update_slice`; when the cache
is donated to `jax.jit` XLA performs those updates in place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdecode import pytree

Array = jax.Array

__all__ = ["KVCache", "SlotMask", "init_cache", "gather_beams", "slot_mask", "visible_slots"]


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

    def write(self, layer: int, k_new: Array, v_new: Array) -> KVCache:
        """Writes `k_new, v_new: [batch, T, heads, head_dim]` of one layer at each
        row's `index` (rows may differ). Does not advance `index`; call `advance`
        once after all layers.

        One scatter into the stacked array per tensor: inside a loop whose carry
        is the cache (or with the cache donated) XLA updates it in place instead of
        copying a layer out and back.
        """
        b, t = k_new.shape[:2]
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

    def insert_rows(self, slots: Array, rows: KVCache) -> KVCache:
        """Places the rows of another cache into rows `slots` of this one.

        A continuous-batching engine prefills new prompts into a small cache and
        inserts them into free slots of the live cache; the inserted rows then
        decode exactly as they would alone.

        Args:
            slots: `[n]` int32 row indices of this cache (distinct).
            rows: a cache of `n` rows with the same layers, heads and head_dim
                and `max_len <= self.max_len`; its slots land at the start of each
                target row, the rest of the target row is cleared.
        """
        slots = jnp.asarray(slots, jnp.int32)
        width = rows.max_len
        if width > self.max_len:
            raise ValueError(
                f"insert_rows: the inserted cache has max_len={width}, more than this "
                f"cache's {self.max_len}"
            )
        pad = self.max_len - width

        def put(buf: Array, new: Array) -> Array:
            new = jnp.pad(new.astype(buf.dtype), ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
            return buf.at[:, slots].set(new)

        mask = jnp.pad(rows.mask, ((0, 0), (0, pad)))
        return self.replace(
            k=put(self.k, rows.k),
            v=put(self.v, rows.v),
            mask=self.mask.at[slots].set(mask),
            index=self.index.at[slots].set(rows.index),
        )


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


def gather_beams(cache: Any, parent: Array) -> Any:
    """Reorders every array of a cache (or any pytree whose leaves have the batch
    on axis 1 for `k`/`v` and axis 0 otherwise) by `parent: [batch]` row indices.

    Beam search calls this once per step with the parent beam of each new beam.
    The indices are in range by construction, so the gather skips bounds handling.
    """
    rows = lambda x: x.at[parent].get(mode="promise_in_bounds")
    if isinstance(cache, KVCache):
        kv = lambda x: x.at[:, parent].get(mode="promise_in_bounds")
        return cache.replace(
            k=kv(cache.k), v=kv(cache.v), mask=rows(cache.mask), index=rows(cache.index)
        )
    return jax.tree_util.tree_map(rows, cache)


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
