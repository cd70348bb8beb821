"""`PagedCache`: keys and values in a shared pool of fixed-size pages, one page table per row.

The pool holds `pages` pages of `page_size` token slots for every layer; row `b`'s
logical slot `s` lives in page `table[b, s // page_size]` at offset
`s % page_size`. A row therefore holds memory only for the pages its table
names: `max_len` (the table's width times `page_size`) is a per-row bound, not
an allocation, and two rows may name the same page (a prompt prefix shared by
several rows, `jaxdecode.serving.pages`). Unassigned table entries hold
`pages` (one past the pool): writes there are dropped and reads are masked out.

Inside one compiled program (`generate(cache_implementation="paged")`) the
tables are static layouts: each row owning `max_len` worth of pages
(`init_paged(pages=None)`), or, for the `copies` continuations of each prompt
(`num_return_sequences`), the prompt's full pages named by all its copies and
only the partial last page and the completion held per copy
(`share_prefix`, then `fork` after the prompt is written).

Attention reads a row's pages block by block (`layers.attend_blocks` with
`reader`): a key block of `size` slots is the `size // page_size` pages the
table names for it, gathered from the pool, and blocks past every row's last
live slot are skipped, so a step costs what the live tokens cost, not what
`max_len` would.

The per-row `mask [batch, max_len]` and `index [batch]` mean what they mean in a
`KVCache` (the model's masks are built from them unchanged). The protocol
methods (`take_rows`, `put_rows`, `gather_rows`, `rewind`, `partition_specs`,
`nbytes`) make it a `cache.Cache`; rows share the pool, so `take_rows` keeps
the whole pool and `put_rows` takes the pool of `new` (written through a view
of this cache: `with_rows`).

The pool is a plain array of keys and values; a quantized pool
(`QuantizedKVCache` over a `PagedCache` of codes) keeps its code pages and scale
pages beside each other, indexed by the same tables.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdecode import pytree
from jaxdecode.cache import cache_nbytes
from jaxdecode.sharding import DATA, MODEL, fit_spec

Array = jax.Array

__all__ = ["PagedCache", "init_paged"]


@pytree.dataclass
class PagedCache:
    """Keys and values of every layer in a pool of pages, addressed per row.

    Attributes:
        k: `[layers, pages, heads, page_size, head_dim]`, the pool.
        v: `[layers, pages, heads, page_size, head_dim]`.
        table: `[batch, max_pages]` int32, the page holding each row's slots
            `j * page_size .. (j + 1) * page_size - 1` (`pages`: none).
        mask: `[batch, max_pages * page_size]` bool, True where a slot holds a real token.
        index: `[batch]` int32, the next slot each row writes.
    """

    k: Array
    v: Array
    table: Array
    mask: Array
    index: Array

    @property
    def pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    @property
    def batch(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the pool, the tables, `mask` and `index`."""
        return cache_nbytes((self.k, self.v, self.table, self.mask, self.index))

    def page_bytes(self) -> int:
        """Bytes of one page of keys and values over every layer."""
        per = self.k.size // self.pages * self.k.dtype.itemsize
        return int(2 * per)

    def _locate(self, slots: Array) -> tuple[Array, Array]:
        """`(page, offset)` of each row's `slots: [batch, n]`; the page is `pages`
        (dropped by a scatter) outside `0 .. max_len - 1` or where unassigned."""
        ps, width = self.page_size, self.table.shape[1]
        j = jnp.clip(slots // ps, 0, width - 1)
        page = jnp.take_along_axis(self.table, j, axis=1)
        inside = (slots >= 0) & (slots < self.max_len)
        return jnp.where(inside, page, self.pages), slots % ps

    def write(self, layer: int, k_new: Array, v_new: Array) -> PagedCache:
        """Writes `k_new, v_new: [batch, T, heads, head_dim]` of one layer at each
        row's `index` into its pages (slots without a page are dropped). Does not
        advance `index`; call `advance` once after all layers."""
        t = k_new.shape[1]
        slots = self.index[:, None] + jnp.arange(t)[None, :]
        page, off = self._locate(slots)

        def put(buf: Array, new: Array) -> Array:
            return buf.at[layer, page, :, off, :].set(new.astype(buf.dtype), mode="drop")

        return self.replace(k=put(self.k, k_new), v=put(self.v, v_new))

    def advance(self, new_mask: Array) -> PagedCache:
        """Marks `new_mask: [batch, T]` at each row's `index` and moves `index` by T."""
        t = new_mask.shape[1]
        slots = self.index[:, None] + jnp.arange(t)[None, :]
        rows = jnp.arange(self.batch)[:, None]
        slots = jnp.where(slots < self.max_len, slots, self.max_len)
        mask = self.mask.at[rows, slots].set(new_mask.astype(bool), mode="drop")
        return self.replace(mask=mask, index=self.index + t)

    def reader(self, layer: int) -> Any:
        """`read(start, size) -> (keys, values)`, each `[batch, heads, size,
        head_dim]`: slots `start .. start + size - 1` of every row at `layer`
        (`start` and `size` multiples of `page_size`; `start` may be traced).
        Unassigned pages read page 0 (their slots are masked out)."""
        ps = self.page_size

        def read(start: Array, size: int) -> tuple[Array, Array]:
            n = size // ps
            pages = jax.lax.dynamic_slice_in_dim(self.table, start // ps, n, axis=1)
            pages = jnp.where(pages < self.pages, pages, 0)

            def one(buf: Array) -> Array:
                got = buf[layer, pages]  # [B, n, H, ps, D]
                b, _, h, _, d = got.shape
                return got.transpose(0, 2, 1, 3, 4).reshape(b, h, n * ps, d)

            return one(self.k), one(self.v)

        return read

    def with_rows(self, table: Array, start: Array) -> PagedCache:
        """A view of `n` rows with page tables `table: [n, max_pages]` and
        `start: [n]` slots already written (slots before `start` real, the
        rest empty), over this pool: what a prefill of the next tokens writes
        through before `put_rows` puts it back."""
        slot = jnp.arange(self.max_len)[None, :]
        return self.replace(
            table=jnp.asarray(table, jnp.int32),
            mask=slot < start[:, None],
            index=jnp.asarray(start, jnp.int32),
        )

    def assign(self, table: Array, index: Array) -> PagedCache:
        """These rows with page tables `table: [batch, max_pages]` and next slots
        `index: [batch]` (masks kept): how the host's tables reach a program."""
        return self.replace(table=table, index=index)

    def rewind(self, n: Array, *, width: int | None = None) -> PagedCache:
        """Forgets each row's last `n: [batch]` written slots (keys and values
        zeroed, mask False, `index` back by `n`; `width` bounds `n`, default
        `max_len`)."""
        n = jnp.asarray(n, jnp.int32)
        start = self.index - n
        width = self.max_len if width is None else width
        offs = jnp.arange(width)[None, :]
        slots = jnp.where(offs < n[:, None], start[:, None] + offs, self.max_len)
        page, off = self._locate(slots)
        clear = lambda buf: buf.at[:, page, :, off, :].set(0, mode="drop")
        rows = jnp.arange(self.batch)[:, None]
        mask = self.mask.at[rows, slots].set(False, mode="drop")
        return self.replace(k=clear(self.k), v=clear(self.v), mask=mask, index=start)

    def take_rows(self, rows: Array) -> PagedCache:
        """Rows `rows: [n]` only (their tables, masks and indices; the whole pool)."""
        return self.replace(table=self.table[rows], mask=self.mask[rows], index=self.index[rows])

    def put_rows(self, rows: Array, new: PagedCache) -> PagedCache:
        """This cache with rows `rows: [n]` set from the `n` rows of `new`, whose
        pool replaces this one (`new` was written through a view of this cache,
        `with_rows` or `take_rows`). `new` may be narrower (fewer table
        columns); rows past the end are dropped.

        Raises:
            ValueError: when `new`'s pool has another shape (a cache of another pool).
        """
        if not isinstance(new, PagedCache) or new.k.shape != self.k.shape:
            got = getattr(new, "k", None)
            raise ValueError(
                "put_rows: a paged cache takes rows written through a view of its own pool "
                f"(pool {self.k.shape}), got {type(new).__name__} with "
                f"{None if got is None else got.shape}"
            )
        rows = jnp.asarray(rows, jnp.int32)
        cols = self.table.shape[1] - new.table.shape[1]
        if cols < 0:
            raise ValueError(
                f"put_rows: the new rows have max_len={new.max_len}, more than this "
                f"cache's {self.max_len}"
            )
        table = jnp.pad(new.table, ((0, 0), (0, cols)), constant_values=self.pages)
        mask = jnp.pad(new.mask, ((0, 0), (0, self.max_len - new.max_len)))
        return self.replace(
            k=new.k,
            v=new.v,
            table=self.table.at[rows].set(table, mode="drop"),
            mask=self.mask.at[rows].set(mask, mode="drop"),
            index=self.index.at[rows].set(new.index, mode="drop"),
        )

    def gather_rows(self, parent: Array) -> PagedCache:
        """Row `i` becomes row `parent[i]` (`[batch]`, in range): its pages'
        contents are copied into row `i`'s own pages (rows must not share the
        pages they write: beam search over its own pages, or over `fork`'s
        layout, whose shared prompt pages are the parent's own and are kept)."""
        src = self.table.at[parent].get(mode="promise_in_bounds")
        src = jnp.where(src < self.pages, src, 0)
        # A page a row shares with its parent (a prompt page of `fork`) stays.
        dst = jnp.where(src == self.table, self.pages, self.table)
        copy = lambda buf: buf.at[:, dst].set(buf[:, src], mode="drop")
        rows = lambda x: x.at[parent].get(mode="promise_in_bounds")
        return self.replace(
            k=copy(self.k), v=copy(self.v), mask=rows(self.mask), index=rows(self.index)
        )

    def share_prefix(self, copies: int, prefix: int) -> PagedCache:
        """These (empty) rows over a new pool laid out for `copies` continuations
        of each row that share its first `prefix` slots (static both).

        Each row's table names `prefix // page_size` pages of its own prefix
        (shared by its copies later), then the pages of its first copy; the
        pool holds `batch * full + batch * copies * (max_pages - full)` pages,
        not `batch * copies * max_pages`. Write the prefix through the result,
        then `fork(copies, prefix)`.
        """
        prompt, _, pages = _shared_layout(self.batch, copies, prefix, self.page_size, self.width)
        shape = (self.k.shape[0], pages, *self.k.shape[2:])
        return self.replace(
            k=jnp.zeros(shape, self.k.dtype),
            v=jnp.zeros(shape, self.v.dtype),
            table=jnp.asarray(prompt),
        )

    def fork(self, copies: int, prefix: int) -> PagedCache:
        """`batch * copies` rows (row `b * copies + r`: copy r of row b) of a
        cache laid out by `share_prefix(copies, prefix)` whose rows hold their
        prefix: every copy's table names the row's full prefix pages (shared,
        never written again: later slots lie in the copy's own pages) and its
        own pages after them; the prefix's partial last page is copied into
        each copy's own page. Masks and indices are the row's."""
        _, rows, _ = _shared_layout(self.batch, copies, prefix, self.page_size, self.width)
        full = prefix // self.page_size
        k, v = self.k, self.v
        if prefix % self.page_size and full < self.width:
            src = jnp.repeat(self.table[:, full], copies)
            dst = jnp.asarray(rows[:, full])
            k = k.at[:, dst].set(k[:, src])
            v = v.at[:, dst].set(v[:, src])
        return self.replace(
            k=k,
            v=v,
            table=jnp.asarray(rows),
            mask=jnp.repeat(self.mask, copies, axis=0),
            index=jnp.repeat(self.index, copies, axis=0),
        )

    @property
    def width(self) -> int:
        """Columns of the page table (pages a row may name)."""
        return self.table.shape[1]

    def partition_specs(self, mesh: Mesh) -> PagedCache:
        """The pool's heads over `model` (pages are shared by rows: not split),
        tables and masks by rows over `data`."""
        kv = fit_spec(P(None, None, MODEL, None, None), self.k.shape, mesh)
        rows = fit_spec(P(DATA, None), self.mask.shape, mesh)
        table = fit_spec(P(DATA, None), self.table.shape, mesh)
        return PagedCache(k=kv, v=kv, table=table, mask=rows, index=P(*rows[:1]))


def _shared_layout(
    batch: int, copies: int, prefix: int, page_size: int, width: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """`share_prefix` / `fork`'s static layout: `(table of the batch rows [batch,
    width], table of the batch * copies rows [batch * copies, width], pages)`.
    Row b's full prefix pages are `b * full + j`; copy i's own pages (column
    `full` on) follow all prefix pages, `own` per copy."""
    full = min(prefix // page_size, width)
    own = width - full
    j = np.arange(width)[None, :]
    copy = np.arange(batch * copies)[:, None]
    rows = np.where(
        j < full, copy // copies * full + j, batch * full + copy * own + (j - full)
    ).astype(np.int32)
    return rows[::copies], rows, batch * (full + copies * own)


def init_paged(
    *,
    layers: int,
    batch: int,
    max_len: int,
    pages: int | None,
    page_size: int,
    heads: int,
    head_dim: int,
    dtype: Any = jnp.float32,
) -> PagedCache:
    """An empty paged cache of rows of `ceil(max_len / page_size)` pages: a zero
    pool of `pages` pages, every table entry unassigned (`pages`); with `pages`
    None, a pool of exactly the rows' pages, row b owning pages `b * width ..`
    in order (a static layout, for a compiled program without a host)."""
    width = -(-max_len // page_size)
    table = None
    if pages is None:
        pages = batch * width
        table = jnp.arange(pages, dtype=jnp.int32).reshape(batch, width)
    shape = (layers, pages, heads, page_size, head_dim)
    return PagedCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        table=jnp.full((batch, width), pages, jnp.int32) if table is None else table,
        mask=jnp.zeros((batch, width * page_size), bool),
        index=jnp.zeros((batch,), jnp.int32),
    )
