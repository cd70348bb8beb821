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

Storage: `codes`, a `KVCache` of `uint8 [layers, batch, heads, max_len,
head_dim * nbits / 8]` with the rows' mask and index, and the scales beside it,
`float32 [layers, batch, heads, max_len, 2 * groups]` (each group's step, then
each group's minimum), read and written as a `KVCache` view of the same rows
(`scales`), so the mask and index are stored once. Every protocol method
(`take_rows`, `put_rows`, `gather_rows`, `rewind`, `partition_specs`, `nbytes`)
is the dense cache's, applied to both, so beam search, speculation, the engine
and sharding treat it like any cache. A paged engine's quantized pool is the
same class over a `PagedCache` of codes (`init_quantized(pages=, page_size=)`):
pools of code pages and scale pages addressed by the same page tables, read
page block by page block (`reader`) and dequantized as they are read.
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
from jaxdecode.cache import KVCache, cache_nbytes, init_cache
from jaxdecode.paged_cache import PagedCache, init_paged

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

    The rows' bookkeeping (`mask`, `index`, and a paged pool's tables) lives
    once, in `codes`; the scales are bare arrays of the same slots, read and
    written through `scales`, a view of `codes` holding them.

    Attributes:
        codes: a `KVCache` whose `k, v` are `uint8 [layers, batch, heads, max_len,
            head_dim * nbits / 8]`, with the rows' `mask [batch, max_len]` and
            `index [batch]`; or a `PagedCache` whose pools are `uint8 [layers,
            pages, heads, page_size, head_dim * nbits / 8]`, with its page tables
            (a paged engine's pool: `init_quantized(pages=, page_size=)`).
        k_scales: `float32 [layers, batch, heads, max_len, 2 * head_dim / group]`
            (paged: `[layers, pages, heads, page_size, 2 * head_dim / group]`).
        v_scales: as `k_scales`.
        nbits: bits per code, 2, 4 or 8 (static: a new width is a new program).
        group: features per scale (static; `head_dim`: one per token and head).
        out_dtype: the dtype keys and values are read back in (static).
    """

    codes: KVCache | PagedCache
    k_scales: Array
    v_scales: Array
    nbits: int = pytree.field(pytree_node=False, default=8)
    group: int = pytree.field(pytree_node=False, default=64)
    out_dtype: Any = pytree.field(pytree_node=False, default=jnp.float32)

    @property
    def scales(self) -> KVCache | PagedCache:
        """The scales as a cache of the same rows (`codes` with the scales in
        place of the codes): what every protocol method applies to them."""
        return self.codes.replace(k=self.k_scales, v=self.v_scales)

    def _both(self, fn: Any) -> QuantizedKVCache:
        """`fn` applied to the codes and to the scales; the rows' bookkeeping
        (the same in both) is kept once, from the codes'."""
        scales = fn(self.scales)
        return self.replace(codes=fn(self.codes), k_scales=scales.k, v_scales=scales.v)

    @property
    def paged(self) -> bool:
        """Whether the codes and scales are pools of pages (`PagedCache` codes)."""
        return isinstance(self.codes, PagedCache)

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
        """Every layer's keys, as `layers.attend` reads them (dense codes)."""
        return QuantizedKV(self.codes.k, self.k_scales, self.nbits, self.out_dtype)

    @property
    def v(self) -> QuantizedKV:
        """Every layer's values, as `layers.attend` reads them (dense codes)."""
        return QuantizedKV(self.codes.v, self.v_scales, self.nbits, self.out_dtype)

    @property
    def dtype(self) -> Any:
        """The dtype keys and values are read back in."""
        return self.out_dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the codes, the scales, `mask` and `index` (and page tables)."""
        return self.codes.nbytes + cache_nbytes((self.k_scales, self.v_scales))

    def write(self, layer: int, k_new: Array, v_new: Array) -> QuantizedKVCache:
        """Quantizes and writes `k_new, v_new: [batch, T, heads, head_dim]` of one
        layer at each row's `index` (`KVCache.write`, `PagedCache.write`); call
        `advance` once after all layers."""
        kc, ks = quantize(k_new, self.nbits, self.group)
        vc, vs = quantize(v_new, self.nbits, self.group)
        scales = self.scales.write(layer, ks, vs)
        return self.replace(
            codes=self.codes.write(layer, kc, vc), k_scales=scales.k, v_scales=scales.v
        )

    def advance(self, new_mask: Array) -> QuantizedKVCache:
        """Marks `new_mask: [batch, T]` and moves `index` by T (`KVCache.advance`)."""
        return self.replace(codes=self.codes.advance(new_mask))

    def rewind(self, n: Array, *, width: int | None = None) -> QuantizedKVCache:
        """Forgets each row's last `n: [batch]` tokens (`KVCache.rewind`): codes and
        scales cleared, so writing them again gives the same cache."""
        return self._both(lambda c: c.rewind(n, width=width))

    def take_rows(self, rows: Array) -> QuantizedKVCache:
        """The cache of rows `rows: [n]` only (paged: their tables, the whole pool)."""
        return self._both(lambda c: c.take_rows(rows))

    def put_rows(self, rows: Array, new: QuantizedKVCache) -> QuantizedKVCache:
        """Rows `rows: [n]` set from `new`'s (`KVCache.put_rows`: a narrower `new`
        lands at the start of each row; `PagedCache.put_rows`: `new`'s pools).

        Raises:
            ValueError: when `new` is quantized otherwise (bits or group), or is
                not paged when this cache is (or the other way round).
        """
        if not isinstance(new, QuantizedKVCache) or (new.nbits, new.group, new.paged) != (
            self.nbits,
            self.group,
            self.paged,
        ):
            raise ValueError(
                f"put_rows: a {self.nbits}-bit {'paged ' if self.paged else ''}cache (group "
                f"{self.group}) takes rows of the same kind, got {type(new).__name__}"
            )
        scales = self.scales.put_rows(rows, new.scales)
        return self.replace(
            codes=self.codes.put_rows(rows, new.codes), k_scales=scales.k, v_scales=scales.v
        )

    def gather_rows(self, parent: Array) -> QuantizedKVCache:
        """Row `i` becomes row `parent[i]` (`[batch]`, in range)."""
        return self._both(lambda c: c.gather_rows(parent))

    def partition_specs(self, mesh: Mesh) -> QuantizedKVCache:
        """As the codes' cache: rows over `data`, heads over `model`."""
        scales = self.scales.partition_specs(mesh)
        return self.replace(
            codes=self.codes.partition_specs(mesh), k_scales=scales.k, v_scales=scales.v
        )

    # A paged pool (`paged`): what `PagedCache` offers the paged engine.
    @property
    def pages(self) -> int:
        """Pages in the pool (paged)."""
        return self.codes.pages

    @property
    def page_size(self) -> int:
        """Token slots per page (paged)."""
        return self.codes.page_size

    @property
    def table(self) -> Array:
        """`[batch, max_pages]` int32, each row's pages (paged)."""
        return self.codes.table

    def page_bytes(self) -> int:
        """Bytes of one page of codes and scales over every layer (paged)."""
        return self.codes.page_bytes() + self.scales.page_bytes()

    def with_rows(self, table: Array, start: Array) -> QuantizedKVCache:
        """A view of rows with page tables `table` over this pool (`PagedCache.with_rows`)."""
        return self.replace(codes=self.codes.with_rows(table, start))

    def assign(self, table: Array, index: Array) -> QuantizedKVCache:
        """These rows with page tables `table` and next slots `index` (`PagedCache.assign`)."""
        return self.replace(codes=self.codes.assign(table, index))

    def reader(self, layer: int) -> Any:
        """`read(start, size) -> (keys, values)`, each `[batch, heads, size,
        head_dim]` in `out_dtype`: the pages of slots `start .. start + size - 1`
        of one layer, gathered (`PagedCache.reader`) and dequantized (paged)."""
        codes, scales = self.codes.reader(layer), self.scales.reader(layer)

        def read(start: Array, size: int) -> tuple[Array, Array]:
            (kc, vc), (ks, vs) = codes(start, size), scales(start, size)
            back = lambda c, s: dequantize(c, s, self.nbits, self.out_dtype)
            return back(kc, ks), back(vc, vs)

        return read


def is_paged(cache: object) -> bool:
    """Whether a cache is a pool of pages: a `PagedCache`, or a
    `QuantizedKVCache` whose codes are one (read through `reader`)."""
    return isinstance(cache, PagedCache) or (isinstance(cache, QuantizedKVCache) and cache.paged)


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
    pages: int | None = None,
    page_size: int | None = None,
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
        pages: with `page_size`, a pool of `pages` pages addressed by page
            tables (`init_paged`: a paged engine's quantized cache); None:
            `max_len` slots per row.
        page_size: token slots per page (with `pages`).

    Raises:
        ValueError: for bits or a group the cache cannot hold, naming them.
    """
    group = head_dim if group is None else group
    _check(nbits, head_dim, group)
    width = 2 * (head_dim // group)  # steps, then minimums
    shape = dict(layers=layers, batch=batch, max_len=max_len, heads=heads)
    if pages is None:
        codes = init_cache(**shape, head_dim=head_dim * nbits // 8, dtype=jnp.uint8)
        scales = (layers, batch, heads, max_len, width)
    else:
        codes = init_paged(
            **shape, pages=pages, page_size=page_size, head_dim=head_dim * nbits // 8,
            dtype=jnp.uint8,
        )  # fmt: skip
        scales = (layers, pages, heads, page_size, width)
    return QuantizedKVCache(
        codes=codes,
        k_scales=jnp.zeros(scales, jnp.float32),
        v_scales=jnp.zeros(scales, jnp.float32),
        nbits=nbits,
        group=group,
        out_dtype=jnp.dtype(dtype),
    )
