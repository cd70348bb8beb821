"""The engine's pages, host side: which pages are free, who holds each, and the prefix cache.

A `PagePool` hands out page numbers of the device pool (`PagedCache`), counts
references (a page held by several rows: a prompt prefix they share) and keeps
the **prefix cache**: a full page of prompt tokens is keyed by a chain hash of
its tokens and every token before them (`chain_hashes`), so a later prompt that
starts with the same tokens finds the same pages and skips their prefill. A
cached page that no row holds stays cached until the pool needs it: free pages
are used first, then cached ones, least recently used first.

Nothing here touches the device: the engine turns a row's page list into its
row of the page table (`table_row`) and passes the table to its programs.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

__all__ = ["PagePool", "chain_hashes", "pages_for", "table_row"]


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` slots."""
    return -(-tokens // page_size)


def chain_hashes(tokens: Sequence[int], page_size: int) -> list[bytes]:
    """One key per full page of `tokens`: page j's key hashes page j - 1's key
    and page j's tokens, so equal keys mean equal tokens from the start."""
    out, prev = [], b""
    arr = np.asarray(tokens, np.int64)
    for j in range(len(tokens) // page_size):
        h = hashlib.sha256(prev)
        h.update(arr[j * page_size : (j + 1) * page_size].tobytes())
        prev = h.digest()
        out.append(prev)
    return out


def table_row(pages: Sequence[int], width: int, unassigned: int) -> np.ndarray:
    """`[width]` int32: a row's pages in order, then `unassigned`."""
    row = np.full((width,), unassigned, np.int32)
    row[: len(pages)] = pages
    return row


class PagePool:
    """Free pages, reference counts and the prefix cache of one pool.

    Args:
        pages: pages in the pool.
        page_size: token slots per page.
        prefix_cache: keep full prompt pages for reuse (`register`, `lookup`).

    Attributes:
        peak: most pages held at once (by rows; cached pages no row holds are
            not counted).
    """

    def __init__(self, pages: int, page_size: int, prefix_cache: bool = True) -> None:
        self.pages, self.page_size, self.prefix_cache = pages, page_size, prefix_cache
        self._free = collections.deque(range(pages))
        self._refs = np.zeros((pages,), np.int64)
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        # Cached pages no row holds, least recently used first.
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.peak = 0

    @property
    def held(self) -> int:
        """Pages some row holds."""
        return self.pages - len(self._free) - len(self._idle)

    @property
    def available(self) -> int:
        """Pages `allocate` can hand out (free, then cached ones no row holds)."""
        return len(self._free) + len(self._idle)

    def allocate(self, n: int) -> list[int]:
        """`n` pages for one row (each held once).

        Raises:
            RuntimeError: fewer than `n` are available (callers check `available`).
        """
        if n > self.available:
            raise RuntimeError(f"allocate({n}) with {self.available} pages available")
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:  # evict the least recently used cached page
                page, _ = self._idle.popitem(last=False)
                del self._by_key[self._key_of.pop(page)]
            self._refs[page] = 1
            out.append(page)
        self.peak = max(self.peak, self.held)
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Drops one hold of each page; a page no row holds becomes free, or
        idle in the prefix cache when it is cached."""
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    def lookup(self, keys: Sequence[bytes], limit: int) -> list[int]:
        """The cached pages of the leading `keys` (at most `limit`), each now
        held once more by the caller."""
        if not self.prefix_cache:
            return []
        out = []
        for key in keys[:limit]:
            page = self._by_key.get(key)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._idle[page]
            self._refs[page] += 1
            out.append(page)
        self.peak = max(self.peak, self.held)
        return out

    def cached(self, key: bytes) -> bool:
        """Is a page with this key in the prefix cache?"""
        return key in self._by_key

    def register(self, keys: Sequence[bytes], pages: Sequence[int]) -> None:
        """Caches `pages[j]` under `keys[j]` (full prompt pages whose keys and
        values are written); a key already cached keeps its page."""
        if not self.prefix_cache:
            return
        for key, page in zip(keys, pages, strict=False):
            if key in self._by_key or page in self._key_of:
                continue
            self._by_key[key] = page
            self._key_of[page] = key
