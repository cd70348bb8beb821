"""Reusable pieces of decoder-only transformers, shared by the model families.

* `Dense`: `x @ weight.T (+ bias)` with `weight: [out, in]` (PyTorch `Linear`'s
  layout: XLA's CPU matrix-vector product streams it ~15% faster at small batch,
  and decoding one token per step is all matrix-vector products), plus a LoRA
  adapter's update when the `"lora"` collection holds one at its path
  (`models.lora`).
* `attend`: attention of T new queries over a layer of the `KVCache`, for
  multi-head, grouped-query and multi-query attention alike: K/V stay stored with
  the KV head count and are never repeated in memory; the queries are grouped
  per KV head instead. A long prefill is computed in blocks (an online softmax
  over key blocks, flash-attention style): memory O(T x block), not O(T x S).
  A quantized cache (`QuantizedKV` keys and values) is dequantized one key
  block at a time there.
* `RMSNorm` (Llama's, and Gemma's `(1 + w)` form), `rope_cos_sin` /
  `apply_rope` (rotary position embeddings, half-split as transformers rotates),
  `GatedMLP` (`down(act(gate(x)) * up(x))`), and `ACTIVATIONS` (transformers'
  `ACT2FN` names).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdecode.cache import SlotMask
from jaxdecode.models import lora
from jaxdecode.quantized_cache import QuantizedKV, is_paged

Array = jax.Array

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_BLOCK",
    "Dense",
    "GatedMLP",
    "RMSNorm",
    "apply_rope",
    "attend",
    "attend_blocks",
    "attend_cache",
    "attention_bytes",
    "check_attention_block",
    "rope_cos_sin",
    "split_products",
]


def _gelu_tanh(x: Array) -> Array:
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3.0))))


def _gelu_fast(x: Array) -> Array:
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


# Activation names as transformers' ACT2FN spells them.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


class Dense(nn.Module):
    """`x @ weight.T + bias` with `weight: [out, in]` (params `weight`, `bias`).

    With a LoRA adapter entry at this module's path (the `"lora"` collection,
    `models.lora.flax_variables`), adds its unmerged update
    `scale * (x @ a.T) @ b.T`.

    Attributes:
        features: output width.
        dtype: parameter and computation dtype.
        use_bias: whether a `bias: [out]` is added.
        init_std: standard deviation of the random initial weight.
        split: if set, widths (summing to `features`) of consecutive blocks of
            the weight's rows: each block is its own product and the call
            returns their outputs as a tuple, equal to slicing the whole
            product's output. For a product fused at load (`qkv_proj`,
            `gate_up_proj`) over many rows (`split_products`): slicing the
            weight copies a few MB whatever the rows, slicing a `[T, out]`
            output copies T rows.
    """

    features: int
    dtype: Any = jnp.float32
    use_bias: bool = True
    init_std: float = 0.02
    split: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x: Array) -> Array | tuple[Array, ...]:
        init = nn.initializers.normal(self.init_std)
        weight = self.param("weight", init, (self.features, x.shape[-1]), self.dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        x = x.astype(self.dtype)
        adapter = lora.entry(self)
        update = None if adapter is None else adapter(x)
        if not self.split:
            return _affine(x, weight, bias, update)
        if sum(self.split) != self.features:
            raise ValueError(f"split {self.split} must sum to features ({self.features})")
        bounds = [0]
        for width in self.split:
            bounds.append(bounds[-1] + width)
        return tuple(
            _affine(
                x,
                weight[lo:hi],
                None if bias is None else bias[lo:hi],
                None if update is None else update[..., lo:hi],
            )
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        )


def _affine(x: Array, weight: Array, bias: Array | None, update: Array | None) -> Array:
    """`x @ weight.T (+ bias) (+ update)` with `weight: [out, in]`."""
    y = jax.lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())))
    if bias is not None:
        y = y + bias
    if update is not None:
        y = y + update
    return y


# Products fused at load (`qkv_proj`, `gate_up_proj`) over at least this many
# rows (batch x new tokens) are computed one part at a time (`Dense.split`).
# The fused product saves per-operation overhead where it is small (decode
# steps, short prompts); over long prompts slicing its `[T, out]` output costs
# more (SmolLM2's shapes on the 2-core CPU, in one process: the split products
# cost 1.2x the fused one at 512 rows, about the same at 1,024-1,536, 0.84x at
# 2,048 and 0.62x at 6,000).
SPLIT_PRODUCT_ROWS = 2048


def split_products(x: Array) -> bool:
    """Compute the parts of a fused product of `x: [..., in]` separately?
    (`SPLIT_PRODUCT_ROWS`; shapes are static, so this is decided at trace time.)"""
    return math.prod(x.shape[:-1]) >= SPLIT_PRODUCT_ROWS


# Queries per block (and keys per block) of the blocked attention; calls with at
# most this many new tokens (decode steps, short prompts) take the direct path.
ATTENTION_BLOCK = 512


def check_attention_block(block: object) -> int:
    """`block` if it is a positive int (a decoder's `attention_block`), else a
    ValueError naming it."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"attention_block must be a positive int, got {block!r}")
    return block


# The narrowest key block of the blocked path (see `attend_blocks`).
KEY_BLOCK_MIN = 128


def block_sizes(t: int, s: int, block: int = ATTENTION_BLOCK) -> tuple[int, int]:
    """`(query block, key block)` of the blocked path for `t` queries over `s`
    slots: keys in blocks no wider than the queries need, so a decode step
    (`t = 1`) over a wide cache reads 128-slot blocks up to its last live slot,
    not 512 (measured on SmolLM2: a step over 2,100 slots then costs what one
    over 64 does)."""
    bq = min(block, t)
    return bq, min(block, s, max(bq, KEY_BLOCK_MIN))


def blocked(t: int, s: int, block: int = ATTENTION_BLOCK) -> bool:
    """Does `attend` walk blocks for `t` new tokens over `s` cache slots?

    A long prefill (`t > block`) never materialises `[heads, T, S]`. A wide
    cache (`s > block`, e.g. `max_new_tokens=2048` or an engine slot of 4,096)
    is read only up to its last live slot: key blocks past every query's slot
    are skipped, so a step costs what the tokens written so far cost, not what
    the allocation costs (XLA:CPU also copies each layer's keys to its product's
    layout, which the direct path did for every slot). Otherwise the direct
    product, and callers may pass the dense mask built once for all layers.
    """
    return t > block or s > block


def attend(
    q: Array,
    keys: Array,
    values: Array,
    visible: Array | SlotMask,
    scale: float,
    softcap: float | None = None,
    block: int = ATTENTION_BLOCK,
    layer: int | None = None,
) -> Array:
    """Scaled dot-product attention of new queries over one layer of the cache.

    With fewer KV heads than query heads (GQA; MQA with one), query head `h`
    reads KV head `h // (q_heads // kv_heads)`, as transformers' `repeat_kv`
    assigns them; the queries are reshaped to `[B, T, kv_heads, group, D]` and
    contracted against the cache as stored, so no repeated K/V copy exists.
    Scores and softmax are float32 whatever the cache dtype (accumulated by the
    matmul itself rather than by upcasting the cache).

    Given a `SlotMask` and more than `block` new tokens (a long prefill) or
    cache slots (a wide cache; see `blocked`), the scores are never
    materialised as `[heads, T, S]`: `attend_blocks` walks query blocks and,
    for each, the key blocks it can see. Otherwise (short calls over a short
    cache, or a dense mask) the direct product.

    Args:
        q: `[batch, T, q_heads, head_dim]` queries.
        keys: `[batch, kv_heads, max_len, head_dim]` (a `KVCache` layer), or
            with `layer` the stacked `[layers, batch, kv_heads, max_len,
            head_dim]` (`KVCache.k`), or with `layer` a `QuantizedKV`
            (`QuantizedKVCache.k`): the blocked path dequantizes the key blocks
            it reads, the direct path the layer.
        values: as `keys`.
        visible: `[batch, T, max_len]` bool, which slots each query may read,
            or the same as a `SlotMask` (`cache.slot_mask`).
        scale: multiplies the scores (usually `head_dim ** -0.5`).
        softcap: if set, scores become `softcap * tanh(scores / softcap)`.
        block: queries and keys per block of the blocked path (static).
        layer: which layer of stacked `keys` / `values` to read (static). The
            blocked path then slices each key block straight out of the stack:
            slicing the layer first made XLA copy the whole layer every call.

    Returns:
        `[batch, T, q_heads, head_dim]` in the values' dtype.

    Over ~80 lines with this docstring; the body (~40 lines) is the choice of
    path and the direct product's two head layouts.
    """
    b, t, hq, d = q.shape
    stacked = layer is not None
    hkv, s = keys.shape[1 + stacked], keys.shape[2 + stacked]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    group = hq // hkv
    q = q.astype(keys.dtype)
    if isinstance(visible, SlotMask):
        if blocked(t, s, block):
            keys, values = (keys, values) if stacked else (keys[None], values[None])
            at = layer or 0

            def read(start: Array, size: int) -> tuple[Array, Array]:
                # Each key block sliced straight out of the stack (dequantized
                # block by block when quantized).
                return _block_of(keys, at, start, size), _block_of(values, at, start, size)

            return attend_blocks(q, read, s, hkv, values.dtype, visible, scale, softcap, block)
        visible = visible.dense()
    if stacked:
        keys, values = _layer_of(keys, layer), _layer_of(values, layer)
    if group == 1:
        # Multi-head attention: no group axis (the layout GPT-2 was tuned with).
        scores = jnp.einsum("bthd,bhsd->bhts", q, keys, preferred_element_type=jnp.float32)
        mask = visible[:, None]
    else:
        q = q.reshape(b, t, hkv, group, d)
        scores = jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32)
        mask = visible[:, None, None]
    scores = scores * jnp.float32(scale)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    if group == 1:
        return jnp.einsum("bhts,bhsd->bthd", weights, values)
    out = jnp.einsum("bkgts,bksd->btkgd", weights, values)
    return out.reshape(b, t, hq, d)


def attend_cache(
    q: Array,
    k: Array,
    v: Array,
    cache: Any,
    layer: int,
    visible: Array | SlotMask,
    scale: float,
    softcap: float | None = None,
    block: int = ATTENTION_BLOCK,
) -> tuple[Array, Any]:
    """Writes one layer's new keys and values into a stacked cache, then attends
    the queries over that layer: what every family's attention does with the
    cache, whatever its kind.

    A `KVCache` or `QuantizedKVCache` is read by `attend` (its layer sliced out
    of the stack, dequantized block by block when quantized); a `PagedCache`, or
    a `QuantizedKVCache` over one, by `attend_blocks` over the pages each row's
    table names (`reader`: gathered, and dequantized when quantized; always the
    blocked path: `visible` must then be a `SlotMask`).

    Args:
        q: `[batch, T, q_heads, head_dim]` queries.
        k, v: `[batch, T, kv_heads, head_dim]` the new tokens' keys and values,
            written at each row's `cache.index`.
        cache: the stacked cache of this layer's kind.
        layer: this layer's index in the cache's stack (static).
        visible, scale, softcap, block: as `attend`.

    Returns:
        `([batch, T, q_heads, head_dim] in the values' dtype, the written cache)`.
    """
    cache = cache.write(layer, k, v)
    if is_paged(cache):
        out = attend_blocks(
            q.astype(cache.k.dtype),
            cache.reader(layer),
            cache.max_len,
            k.shape[2],
            cache.v.dtype,
            visible,
            scale,
            softcap,
            block,
            page=cache.page_size,
        )
        return out, cache
    return attend(q, cache.k, cache.v, visible, scale, softcap, block=block, layer=layer), cache


def attend_blocks(
    q: Array,
    read: Callable[[Array, int], tuple[Array, Array]],
    s: int,
    kv_heads: int,
    dtype: Any,
    mask: SlotMask,
    scale: float,
    softcap: float | None,
    block: int = ATTENTION_BLOCK,
    page: int = 1,
) -> Array:
    """`attend` in blocks: for each block of queries, an online softmax over the
    key blocks any of its queries can see (flash attention's recurrence).

    Key blocks wholly after the block's last query slot (causality), before
    every row's first real slot (left padding) or before the window are skipped
    (`lax.switch` inside a fixed-length loop, so the function stays
    reverse-differentiable). A key block that every query of the block sees
    whole (real slots, at or before every query, inside the window; no
    soft-cap) skips the mask: its scores are read by the max and the exponent
    straight from the product, with the scale folded into the exponent, the
    same float32 values as through the mask. A last block that would overrun `T` or `S` is
    moved back to end there: the queries it recomputes are written twice with
    equal values, the key columns it shares with the previous block are masked
    out. Masked scores are float32's lowest finite value, as in the direct path, so
    a query that sees nothing (left padding) averages finite values, never NaN.

    Args:
        q: `[batch, T, q_heads, head_dim]`, already in the keys' dtype.
        read: `(start, size) -> (keys, values)`, each `[batch, kv_heads, size,
            head_dim]`: key slots `start .. start + size - 1` (`start` traced).
            A `KVCache` layer slices them out of its stack; a `PagedCache`
            gathers the pages its tables name (`PagedCache.reader`).
        s: key slots in all (static).
        kv_heads: heads of the keys.
        dtype: the values' dtype (the output's).
        mask: which slots each query may read.
        scale, softcap, block: as `attend`.
        page: key blocks (and their starts) are multiples of this (a paged
            cache's `page_size`; `s` must be one too).

    Returns:
        As `attend`.

    A function over ~80 lines: the two nested block loops and the online softmax
    share their carried sums; split, each piece would need them all as arguments.
    """
    b, t, hq, d = q.shape
    hkv = kv_heads
    group = hq // hkv
    bq, bk = block_sizes(t, s, block)
    bk = max(page, bk // page * page)
    nq, nk = -(-t // bq), -(-s // bk)
    low = jnp.finfo(jnp.float32).min
    # No row reads a slot before its first real one.
    first_real = jnp.min(jnp.argmax(mask.kv_mask, axis=1)).astype(jnp.int32)

    def query_block(i: Array, out: Array) -> Array:
        start = jnp.minimum(i * bq, t - bq)  # the last block ends at T
        # [B, kv_heads, group, bq, D]: each block's product is one batched matmul.
        qb = jax.lax.dynamic_slice_in_dim(q, start, bq, axis=1).reshape(b, bq, hkv, group, d)
        qb = qb.transpose(0, 2, 3, 1, 4)
        slots = jax.lax.dynamic_slice_in_dim(mask.q_slot, start, bq, axis=1)
        sub = mask.replace(q_slot=slots)
        lo = first_real
        if mask.window is not None:
            lo = jnp.maximum(lo, jnp.min(slots) - mask.window + 1)
        first = jnp.clip(lo, 0, s - 1) // bk
        lo_slot, hi_slot = jnp.min(slots), jnp.max(slots)
        last = jnp.clip(hi_slot, 0, s - 1) // bk

        def key_block(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
            def update(
                carry: tuple[Array, Array, Array], masked: bool
            ) -> tuple[Array, Array, Array]:
                m, total, acc = carry
                kstart = jnp.minimum(j * bk, s - bk)
                kb, vb = read(kstart, bk)  # [B, K, bk, D]
                sc = jnp.einsum("bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=jnp.float32)
                if masked:
                    sc = sc * jnp.float32(scale)
                    if softcap is not None:
                        sc = jnp.tanh(sc / softcap) * softcap
                    fresh = kstart + jnp.arange(bk) >= j * bk  # not already seen by block j - 1
                    vis = sub.columns(kstart, bk) & fresh[None, None, :]  # [B, bq, bk]
                    sc = jnp.where(vis[:, None, None], sc, low)
                    m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
                    p = jnp.exp(sc - m_new[..., None])
                else:
                    # Every score visible: no mask pass, and the scale goes into
                    # the exponent (max(x) * scale is max(x * scale) exactly, as
                    # rounding is monotonic), so the raw product is read twice
                    # (max, exp) and never rewritten.
                    m_new = jnp.maximum(m, jnp.max(sc, axis=-1) * jnp.float32(scale))
                    p = jnp.exp(sc * jnp.float32(scale) - m_new[..., None])
                fix = jnp.exp(m - m_new)
                total = total * fix + jnp.sum(p, axis=-1)
                pv = jnp.einsum(
                    "bkgqs,bksd->bkgqd",
                    p.astype(dtype),
                    vb,
                    preferred_element_type=jnp.float32,
                )
                return m_new, total, acc * fix[..., None] + pv

            # 0: nothing visible (skipped); 1: some scores masked; 2 (without
            # soft-cap): every query of the block sees every slot of the key
            # block, as in most of a long prompt's causal triangle.
            live = (j >= first) & (j <= last)
            branches = [lambda c: c, lambda c: update(c, True)]
            if softcap is None:
                kstart = j * bk
                real = jax.lax.dynamic_slice_in_dim(
                    mask.kv_mask, jnp.minimum(kstart, s - bk), bk, 1
                )
                whole = (kstart + bk <= s) & (kstart + bk - 1 <= lo_slot) & jnp.all(real)
                if mask.window is not None:
                    whole = whole & (kstart > hi_slot - mask.window)
                live = jnp.where(live & whole, 2, live.astype(jnp.int32))
                branches.append(lambda c: update(c, False))
            return jax.lax.switch(live.astype(jnp.int32), branches, carry)

        init = (
            jnp.full((b, hkv, group, bq), low, jnp.float32),
            jnp.zeros((b, hkv, group, bq), jnp.float32),
            jnp.zeros((b, hkv, group, bq, d), jnp.float32),
        )
        _, total, acc = jax.lax.fori_loop(0, nk, key_block, init)
        ob = (acc / jnp.where(total == 0, 1.0, total)[..., None]).astype(out.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, ob, start, axis=3)

    # The output [B, kv_heads, group, T, D] is written block by block over a
    # buffer that starts as the queries: a zero-filled one depends on nothing,
    # and XLA:CPU then allocated every layer's at once (one [T, hidden] per layer).
    out = q.reshape(b, t, hkv, group, d).transpose(0, 2, 3, 1, 4).astype(dtype)
    out = jax.lax.fori_loop(0, nq, query_block, out)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)


def _layer_of(x: Array | QuantizedKV, layer: int) -> Array:
    """`[batch, heads, S, D]` of one layer of a stack (dequantized if quantized)."""
    return x.layer(layer) if isinstance(x, QuantizedKV) else x[layer]


def _block_of(x: Array | QuantizedKV, layer: int, start: Array, size: int) -> Array:
    """`[batch, heads, size, D]`: slots `start ..` of one layer of a stack, sliced
    straight out of it (slicing the layer first made XLA copy it every call)."""
    if isinstance(x, QuantizedKV):
        return x.block(layer, start, size)
    return jax.lax.dynamic_slice(x, (layer, 0, 0, start, 0), (1, *x.shape[1:3], size, x.shape[4]))[
        0
    ]


def attention_bytes(batch: int, heads: int, t: int, s: int, block: int = ATTENTION_BLOCK) -> int:
    """Float32 scratch of one `attend` call over `t` queries and `s` slots: the
    scores, their exponentials and the mask, `[heads, t, s]` on the direct path,
    one `[heads, block, block]` tile (and the running sums) when blocked."""
    if blocked(t, s, block):
        bq, bk = block_sizes(t, s, block)
        return 4 * batch * heads * (3 * bq * bk + 2 * bq)
    return 3 * 4 * batch * heads * t * s


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis (param `weight: [dim]`).

    Llama form (`offset=0`): normalized in float32, cast back to the input dtype,
    then times `weight`. Gemma form (`offset=1`): times `(1 + weight)` in float32,
    then cast back, as transformers computes each.
    """

    eps: float
    dtype: Any = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), self.dtype)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (h * (self.offset + weight.astype(jnp.float32))).astype(x.dtype)
        return weight * h.astype(x.dtype)


class GatedMLP(nn.Module):
    """`down_proj(act(gate_proj(x)) * up_proj(x))` (SwiGLU, GeGLU, ...).

    With `fused`, or params that hold a `gate_up_proj` (fused at load), gate
    and up are one `gate_up_proj: [2 * hidden, in]` (Phi-3's layout: the gate's
    rows first), one product instead of two.
    """

    hidden: int
    activation: str
    dtype: Any = jnp.float32
    use_bias: bool = False
    fused: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = lambda n, name: Dense(n, self.dtype, self.use_bias, name=name)
        if self.fused or "gate_up_proj" in self.variables.get("params", {}):
            if split_products(x):
                gate, up = Dense(
                    2 * self.hidden,
                    self.dtype,
                    self.use_bias,
                    split=(self.hidden, self.hidden),
                    name="gate_up_proj",
                )(x)
            else:
                gate, up = jnp.split(dense(2 * self.hidden, "gate_up_proj")(x), 2, axis=-1)
            gate, up = (  # adapters on the parts of a product fused at load
                y if (w := lora.part_entry(self, name)) is None else y + w(x.astype(self.dtype))
                for name, y in (("gate_proj", gate), ("up_proj", up))
            )
        else:
            gate, up = dense(self.hidden, "gate_proj")(x), dense(self.hidden, "up_proj")(x)
        h = ACTIVATIONS[self.activation](gate) * up
        return dense(x.shape[-1], "down_proj")(h)


def rope_cos_sin(
    positions: Array, inv_freq: Array, attention_scaling: Array | float = 1.0
) -> tuple[Array, Array]:
    """Rotary tables for `positions: [batch, T]` and `inv_freq: [head_dim // 2]`
    (or `[batch, head_dim // 2]` when the frequencies depend on the row).

    Returns `cos, sin: [batch, T, head_dim]` float32, each frequency twice
    (`cat(freqs, freqs)`), times `attention_scaling`.
    """
    inv = jnp.asarray(inv_freq, jnp.float32)
    inv = inv[None, None, :] if inv.ndim == 1 else inv[:, None, :]
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scaling = jnp.float32(attention_scaling)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates `x: [batch, T, heads, head_dim]` by `cos, sin: [batch, T, rotary_dim]`
    (the half-split rotation `x * cos + rotate_half(x) * sin`), in x's dtype.

    With `rotary_dim < head_dim` (partial rotary, e.g. Phi-3's
    `partial_rotary_factor`) only the first `rotary_dim` dimensions rotate; the
    rest pass through, as transformers' `apply_rotary_pos_emb` splits them."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
