"""`QuantizedKVCache`: keys and values stored in 8, 4 or 2 bits with per-group scales.

`GenerationConfig(cache_implementation="quantized", cache_config={"nbits": 8})`
makes the full-attention layers of a model keep their keys and values as integer
codes. Each group of `group` consecutive features of one token's head vector
(`group = head_dim` by default: one group per token and head) is quantized
asymmetrically by its own minimum and maximum (transformers' quanto and HQQ
backends, and KIVI, use the same min/max zero-point form; at 4 and 2 bits it keeps
a whole level that a symmetric range spends on the side a group does not reach):

    step = (max - min) / (2**nbits - 1)        (1 where max == min)
    code = clip(round((x - min) / step), 0, 2**nbits - 1)
    x'   = code * step + min

Codes are `uint8`, packed `8 // nbits` to a byte along `head_dim` (low bits first);
`step` and `min` are float32 whatever the model's dtype. Per token and head of
`head_dim = 64` that is 64 + 8 bytes at 8 bits against 256 in float32 (0.28x), 32 +
8 at 4 bits (0.16x).

Every token is read back quantized, the tokens of the current call included: a
token's logits depend only on the codes of the tokens before it, never on how the
prompt was split into calls, so speculative verification (several tokens per
call), chunked or row-by-row prefill and the engine give the tokens of
one-at-a-time decoding. (transformers returns the current call's own float keys
and keeps a float residual of recent tokens: see `docs/guides/generation.md`.)

Storage: two `KVCache`s of the same rows and slots, `codes` (`uint8 [layers,
batch, heads, max_len, head_dim * nbits / 8]`) and `scales` (`float32 [layers,
batch, heads, max_len, 2 * groups]`: each group's step, then each group's
minimum). Every protocol method (`take_rows`, `put_rows`, `gather_rows`,
`rewind`, `partition_specs`, `nbytes`) is the dense cache's, applied to both, so
beam search, speculation, the engine and sharding treat it like any cache.
Attention reads `k` / `v` (`QuantizedKV` views): `layers.attend` dequantizes
one key block at a time on its blocked path (a decode step over a wide cache, a
long prefill), the whole layer only on its direct path (short calls over short
caches).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxdecode import pytree
from jaxdecode.cache import KVCache, init_cache

Array = jax.Array

__all__ = [
    "QUANTIZED_BITS",
    "QuantizedKV",
    "QuantizedKVCache",
    "dequantize",
    "init_quantized",
    "quantize",
]

# The bit widths a cache can hold (codes packed whole into bytes).
QUANTIZED_BITS = (2, 4, 8)


def _check(nbits: int, head_dim: int, group: int) -> None:
    if nbits not in QUANTIZED_BITS:
        raise ValueError(f"cache_config nbits must be one of {QUANTIZED_BITS}, got {nbits!r}")
    if head_dim % group or group < 1:
        raise ValueError(
            f"cache_config q_group_size={group} must divide the model's head_dim={head_dim}"
        )
    if head_dim % (8 // nbits):
        raise ValueError(f"head_dim={head_dim} must be a multiple of {8 // nbits} at {nbits} bits")


def quantize(x: Array, nbits: int, group: int) -> tuple[Array, Array]:
    """Codes and scales of `x: [..., head_dim]` (the module docstring's rule).

    Args:
        x: vectors to quantize, any float dtype.
        nbits: 2, 4 or 8.
        group: features per scale; divides `head_dim`.

    Returns:
        `codes: uint8 [..., head_dim * nbits / 8]` (packed, low bits first) and
        `scales: float32 [..., 2 * head_dim / group]` (steps, then minimums).
    """
    *lead, d = x.shape
    _check(nbits, d, group)
    g = d // group
    xg = x.astype(jnp.float32).reshape(*lead, g, group)
    lo, hi = jnp.min(xg, axis=-1), jnp.max(xg, axis=-1)
    levels = 2**nbits - 1
    step = (hi - lo) / levels
    safe = jnp.where(step > 0, step, 1.0)
    codes = jnp.clip(jnp.round((xg - lo[..., None]) / safe[..., None]), 0, levels)
    codes = codes.astype(jnp.uint8).reshape(*lead, d)
    per = 8 // nbits
    if per > 1:  # `per` codes to a byte, the first in the low bits
        parts = codes.reshape(*lead, d // per, per)
        packed = parts[..., 0]
        for i in range(1, per):
            packed = packed | (parts[..., i] << jnp.uint8(nbits * i))
        codes = packed
    return codes, jnp.concatenate([step, lo], axis=-1)


def dequantize(codes: Array, scales: Array, nbits: int, dtype: Any = jnp.float32) -> Array:
    """`[..., head_dim]` in `dtype` from `quantize`'s codes and scales."""
    per = 8 // nbits
    *lead, packed = codes.shape
    if per > 1:
        shifts = (jnp.arange(per, dtype=jnp.uint8) * nbits).astype(jnp.uint8)
        codes = (codes[..., None] >> shifts) & jnp.uint8(2**nbits - 1)
    d = packed * per
    g = scales.shape[-1] // 2
    step, lo = scales[..., :g, None], scales[..., g:, None]
    x = codes.reshape(*lead, g, d // g).astype(jnp.float32) * step + lo
    return x.reshape(*lead, d).astype(dtype)


@pytree.dataclass
class QuantizedKV:
    """The keys (or values) of every layer as codes and scales: what
    `layers.attend` reads in place of a `[layers, batch, heads, S, head_dim]` array.

    Attributes:
        codes: `uint8 [layers, batch, heads, S, head_dim * nbits / 8]`.
        scales: `float32 [layers, batch, heads, S, 2 * groups]`.
        nbits: bits per code (static).
        out_dtype: the dtype attention reads (the model's; static).
    """

    codes: Array
    scales: Array
    nbits: int = pytree.field(pytree_node=False, default=8)
    out_dtype: Any = pytree.field(pytree_node=False, default=jnp.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantized shape `[layers, batch, heads, S, head_dim]`."""
        *lead, packed = self.codes.shape
        return (*lead, packed * (8 // self.nbits))

    @property
    def dtype(self) -> Any:
        return self.out_dtype

    def layer(self, layer: int) -> Array:
        """`[batch, heads, S, head_dim]` of one layer, dequantized."""
        return dequantize(self.codes[layer], self.scales[layer], self.nbits, self.out_dtype)

    def block(self, layer: int, start: Array | int, size: int) -> Array:
        """`[batch, heads, size, head_dim]`: slots `start .. start + size - 1` of one
        layer, dequantized (only those slots are read)."""

        def cut(x: Array) -> Array:
            at = (layer, 0, 0, start, 0)
            return jax.lax.dynamic_slice(x, at, (1, *x.shape[1:3], size, x.shape[4]))[0]

        return dequantize(cut(self.codes), cut(self.scales), self.nbits, self.out_dtype)


@pytree.dataclass
class QuantizedKVCache:
    """Keys and values of every full-attention layer, quantized (module docstring).

    Attributes:
        codes: a `KVCache` whose `k, v` are `uint8 [layers, batch, heads, max_len,
            head_dim * nbits / 8]`, with the rows' `mask [batch, max_len]` and
            `index [batch]`.
        scales: a `KVCache` whose `k, v` are `float32 [layers, batch, heads,
            max_len, 2 * head_dim / group]` (same mask and index).
        nbits: bits per code, 2, 4 or 8 (static: a new width is a new program).
        group: features per scale (static; `head_dim`: one per token and head).
        out_dtype: the dtype keys and values are read back in (static).
    """

    codes: KVCache
    scales: KVCache
    nbits: int = pytree.field(pytree_node=False, default=8)
    group: int = pytree.field(pytree_node=False, default=64)
    out_dtype: Any = pytree.field(pytree_node=False, default=jnp.float32)

    def _both(self, fn: Any) -> QuantizedKVCache:
        return self.replace(codes=fn(self.codes), scales=fn(self.scales))

    @property
    def mask(self) -> Array:
        """`[batch, max_len]` bool, True where a slot holds a real token."""
        return self.codes.mask

    @property
    def index(self) -> Array:
        """`[batch]` int32, the next slot each row writes."""
        return self.codes.index

    @property
    def max_len(self) -> int:
        return self.codes.max_len

    @property
    def batch(self) -> int:
        return self.codes.batch

    @property
    def k(self) -> QuantizedKV:
        """Every layer's keys, as `layers.attend` reads them."""
        return QuantizedKV(self.codes.k, self.scales.k, self.nbits, self.out_dtype)

    @property
    def v(self) -> QuantizedKV:
        """Every layer's values, as `layers.attend` reads them."""
        return QuantizedKV(self.codes.v, self.scales.v, self.nbits, self.out_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes, the scales and both copies of mask and index."""
        return self.codes.nbytes + self.scales.nbytes

    def write(self, layer: int, k_new: Array, v_new: Array) -> QuantizedKVCache:
        """Quantizes and writes `k_new, v_new: [batch, T, heads, head_dim]` of one
        layer at each row's `index` (`KVCache.write`); call `advance` once after
        all layers."""
        kc, ks = quantize(k_new, self.nbits, self.group)
        vc, vs = quantize(v_new, self.nbits, self.group)
        return self.replace(
            codes=self.codes.write(layer, kc, vc), scales=self.scales.write(layer, ks, vs)
        )

    def advance(self, new_mask: Array) -> QuantizedKVCache:
        """Marks `new_mask: [batch, T]` and moves `index` by T (`KVCache.advance`)."""
        return self._both(lambda c: c.advance(new_mask))

    def rewind(self, n: Array, *, width: int | None = None) -> QuantizedKVCache:
        """Forgets each row's last `n: [batch]` tokens (`KVCache.rewind`): codes and
        scales cleared, so writing them again gives the same cache."""
        return self._both(lambda c: c.rewind(n, width=width))

    def take_rows(self, rows: Array) -> QuantizedKVCache:
        """The cache of rows `rows: [n]` only."""
        return self._both(lambda c: c.take_rows(rows))

    def put_rows(self, rows: Array, new: QuantizedKVCache) -> QuantizedKVCache:
        """Rows `rows: [n]` set from `new`'s (`KVCache.put_rows`: a narrower `new`
        lands at the start of each row).

        Raises:
            ValueError: when `new` is quantized otherwise (bits or group).
        """
        if not isinstance(new, QuantizedKVCache) or (new.nbits, new.group) != (
            self.nbits,
            self.group,
        ):
            raise ValueError(
                f"put_rows: a {self.nbits}-bit cache (group {self.group}) takes rows of the "
                f"same kind, got {type(new).__name__}"
            )
        return self.replace(
            codes=self.codes.put_rows(rows, new.codes),
            scales=self.scales.put_rows(rows, new.scales),
        )

    def gather_rows(self, parent: Array) -> QuantizedKVCache:
        """Row `i` becomes row `parent[i]` (`[batch]`, in range)."""
        return self._both(lambda c: c.gather_rows(parent))

    def partition_specs(self, mesh: Mesh) -> QuantizedKVCache:
        """Rows over `data`, heads over `model`, as the dense cache."""
        return self._both(lambda c: c.partition_specs(mesh))


def init_quantized(
    *,
    layers: int,
    batch: int,
    max_len: int,
    heads: int,
    head_dim: int,
    nbits: int = 8,
    group: int | None = None,
    dtype: Any = jnp.float32,
) -> QuantizedKVCache:
    """An empty quantized cache (all slots masked out, every row writing at slot 0).

    Args:
        layers: full-attention layers.
        batch: rows.
        max_len: slots per row.
        heads: KV heads.
        head_dim: features per head (the dequantized width).
        nbits: 2, 4 or 8 bits per code.
        group: features per scale, dividing `head_dim` (None: `head_dim`).
        dtype: the dtype keys and values are read back in.

    Raises:
        ValueError: for bits or a group the cache cannot hold, naming them.
    """
    group = head_dim if group is None else group
    _check(nbits, head_dim, group)
    shape = dict(layers=layers, batch=batch, max_len=max_len, heads=heads)
    codes = init_cache(**shape, head_dim=head_dim * nbits // 8, dtype=jnp.uint8)
    scales = init_cache(**shape, head_dim=2 * (head_dim // group), dtype=jnp.float32)
    return QuantizedKVCache(
        codes=codes, scales=scales, nbits=nbits, group=group, out_dtype=jnp.dtype(dtype)
    )
