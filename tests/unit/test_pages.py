"""`serving.pages.PagePool`: reference counts, the chain-hash prefix cache and
least-recently-used eviction (host side, no device)."""

from __future__ import annotations

import pytest

from jaxdecode.serving.pages import PagePool, chain_hashes, pages_for, table_row


def test_chain_hashes_key_a_page_by_everything_before_it():
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    c = chain_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a == b  # full pages only
    assert c[1] != a[1], "page 1 has the same tokens but another page 0"
    assert pages_for(9, 4) == 3 and pages_for(8, 4) == 2
    assert table_row([5, 2], 4, 99).tolist() == [5, 2, 99, 99]


def test_shared_pages_are_counted_and_cached_pages_evicted_lru():
    pool = PagePool(4, 2)
    keys = chain_hashes([1, 2, 3, 4], 2)
    first = pool.allocate(2)
    pool.register(keys, first)
    assert pool.lookup(keys, 2) == first  # a second row holds them too
    assert pool.held == 2 and pool.available == 2
    pool.release(first)  # the first row ends: still held by the second
    assert pool.held == 2
    pool.release(first)  # no row holds them: cached, idle, still available
    assert pool.held == 0 and pool.available == 4 and pool.cached(keys[0])
    assert pool.peak == 2
    # Free pages go first, then the least recently used cached page.
    other = pool.allocate(2)
    assert set(other).isdisjoint(first) and pool.cached(keys[1])
    assert pool.lookup(keys[1:], 1) == [first[1]]  # page 1 used again: now the newest
    pool.release([first[1]])
    got = pool.allocate(1)
    assert got == [first[0]] and not pool.cached(keys[0]) and pool.cached(keys[1])
    assert pool.lookup(keys, 2) == []  # page 0 is gone: nothing after it matches
    with pytest.raises(RuntimeError, match="available"):
        pool.allocate(2)


def test_without_prefix_cache_nothing_is_kept():
    pool = PagePool(2, 2, prefix_cache=False)
    keys = chain_hashes([1, 2], 2)
    pages = pool.allocate(1)
    pool.register(keys, pages)
    assert pool.lookup(keys, 1) == [] and not pool.cached(keys[0])
    pool.release(pages)
    assert pool.available == 2
