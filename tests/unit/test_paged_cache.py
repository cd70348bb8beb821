"""`PagedCache`: the skeleton over pages gives the logits it gives over a `KVCache`.

The same for GPT-2 (its own model code) and Gemma 2 (sliding layers on pages,
through the window mask, against its window rings). Rows' pages are scattered
over the pool in a shuffled order (so a reader that ignored the table would
read another row's keys), the prompts are left-padded and ragged, and the key blocks are narrow (`attention_block=16`, pages of 4) so
the block walk crosses many pages and skips those past the live slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode.models.base import positions_from_mask
from jaxdecode.models.llama import LlamaConfig, init_params, llama_decoder

V = 48
MAX_LEN = 64
PAGE = 4


@functools.cache
def _model(family: str = "llama"):
    """A tiny decoder and params: Llama; GPT-2 (its own model code); Gemma 2
    with a window of 6, shorter than the prompts (its sliding layers read the
    pages through the window mask)."""
    if family == "gpt2":
        from jaxdecode.models import gpt2

        config = gpt2.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=V, n_positions=128)
        decoder = gpt2.gpt2_decoder(config, attention_block=16)
        params = gpt2.init_params(config, jax.random.key(0))
    elif family == "gemma2":
        from jaxdecode.models.gemma2 import Gemma2Config
        from jaxdecode.models.transformer import transformer_decoder

        config = Gemma2Config(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
            query_pre_attn_scalar=8,
        )  # fmt: skip
        decoder = transformer_decoder(config.transformer(), attention_block=16)
        params = jd.models.registry.lookup("gemma2").init_params(config, jax.random.key(0))
    else:
        config = LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )  # fmt: skip
        decoder = llama_decoder(config, attention_block=16)
        params = init_params(config, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: x * 3.0, params)
    return decoder, params


def _paged(decoder, batch, pages, seed=0):
    """A paged cache whose rows own shuffled pages of a pool with spare pages."""
    cache = decoder.init_paged(batch, MAX_LEN, pages, PAGE, None)
    width = cache.table.shape[1]
    order = np.random.default_rng(seed).permutation(pages)[: batch * width]
    return cache.assign(jnp.asarray(order.reshape(batch, width), jnp.int32), cache.index)


def _run(decoder, params, cache, ids, mask, steps):
    """Prefill then `steps` one-token steps; every call's logits."""
    apply = jax.jit(decoder.apply)
    positions = positions_from_mask(mask)
    logits, cache = apply(params, ids, positions, cache, mask)
    out = [logits[:, -1]]
    pos = positions[:, -1]
    rng = np.random.default_rng(1)
    for _ in range(steps):
        tok = jnp.asarray(rng.integers(0, V, (ids.shape[0], 1)), jnp.int32)
        pos = pos + 1
        logits, cache = apply(params, tok, pos[:, None], cache, jnp.ones_like(tok))
        out.append(logits[:, -1])
    return jnp.stack(out, 1), cache


@functools.partial(jax.jit, static_argnames="width")
def _moved(cache, rows, parents, n, start, *, width):
    """The row-moving protocol methods and a read of layer 1 in one program (eagerly
    each of their operations compiles alone): `take_rows(rows)` put back with
    `put_rows`, `gather_rows(parents)`, `rewind(n, width=width)`, and the
    gathered cache's slots `start .. start + 7` of layer 1."""
    back = cache.put_rows(rows, cache.take_rows(rows))
    both = cache.gather_rows(parents)
    return back, both, cache.rewind(n, width=width), both.reader(1)(start, 8)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _read(cache, layer, start, size):
    """`cache.reader(layer)(start, size)` as one program."""
    return cache.reader(layer)(start, size)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_paged_logits_equal_dense_left_padded(family):
    decoder, params = _model(family)
    rng = np.random.default_rng(0)
    lens = [3, 35, 17]  # 35 new tokens: three query blocks of 16
    t = max(lens)
    ids = np.zeros((3, t), np.int32)
    mask = np.zeros((3, t), np.int32)
    for r, n in enumerate(lens):
        ids[r, t - n :] = rng.integers(1, V, n)
        mask[r, t - n :] = 1
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    dense, kv = _run(decoder, params, decoder.init_cache(3, MAX_LEN, None), ids, mask, 20)
    paged, pc = _run(decoder, params, _paged(decoder, 3, 60), ids, mask, 20)
    assert isinstance(pc, jd.PagedCache)
    np.testing.assert_allclose(paged, dense, rtol=0, atol=2e-5)
    full = kv[0] if isinstance(kv, tuple) else kv  # Gemma 2: the full layers' cache
    np.testing.assert_array_equal(pc.mask, full.mask)
    np.testing.assert_array_equal(pc.index, full.index)


def test_right_padded_chunks_continue_a_row():
    """A prompt written in two right-padded chunks through `with_rows` (the
    engine's chunked prefill) ends with the logits of one dense prefill."""
    decoder, params = _model()
    prompt = np.random.default_rng(2).integers(1, V, 13)
    ids = jnp.asarray(prompt[None], jnp.int32)
    dense, _ = jax.jit(decoder.apply)(
        params, ids, positions_from_mask(jnp.ones_like(ids)), decoder.init_cache(1, MAX_LEN, None),
        jnp.ones_like(ids),
    )  # fmt: skip
    cache = _paged(decoder, 1, 20)
    table, last = cache.table, None

    @jax.jit  # one program for both chunks (eagerly, every operation compiled alone)
    def chunk_call(cache, pad, pos, m, start):
        view = cache.with_rows(table, start)
        last, view = decoder.prefill_last(params, pad, pos, view, m)
        return last, cache.put_rows(jnp.arange(1), view)

    for start, chunk in ((0, prompt[:8]), (8, prompt[8:])):
        pad = np.zeros(8, np.int32)
        pad[: len(chunk)] = chunk
        m = (np.arange(8) < len(chunk)).astype(np.int32)
        pos = jnp.asarray(start + np.arange(8)[None], jnp.int32)
        start = jnp.asarray([start], jnp.int32)
        last, cache = chunk_call(cache, jnp.asarray(pad[None]), pos, jnp.asarray(m[None]), start)
    np.testing.assert_allclose(last, dense[:, -1], rtol=0, atol=2e-5)


def test_protocol_rows_rewind_and_bytes():
    decoder, params = _model()
    ids = jnp.asarray(np.random.default_rng(3).integers(1, V, (2, 6)), jnp.int32)
    mask = jnp.ones_like(ids)
    cache = _paged(decoder, 2, 40)
    _, cache = jax.jit(decoder.apply)(params, ids, positions_from_mask(mask), cache, mask)
    assert isinstance(cache, jd.Cache)
    back, both, gone, read = _moved(
        cache, jnp.asarray([1]), jnp.asarray([0, 0]), jnp.asarray([2, 0]), jnp.int32(0), width=4
    )
    # take_rows then put_rows back is the identity on rows.
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, cache)
    # gather_rows copies row 0's pages into row 1's: row 1 then reads as row 0.
    np.testing.assert_array_equal(read[0][0], read[0][1])
    np.testing.assert_array_equal(both.table, cache.table)  # own pages kept
    # rewind clears the last n slots and moves index back.
    np.testing.assert_array_equal(gone.index, [4, 6])
    assert not bool(gone.mask[0, 4]) and bool(gone.mask[1, 5])
    k0 = _read(gone, 0, jnp.int32(4), 4)[0]
    assert float(jnp.abs(k0[0, :, :2]).max()) == 0.0  # slots 4, 5 of row 0
    assert float(jnp.abs(k0[1, :, :2]).max()) > 0.0
    assert cache.nbytes == jd.cache_nbytes(cache)
    assert cache.page_bytes() * cache.pages == cache.k.nbytes + cache.v.nbytes
    with pytest.raises(ValueError, match="own pool"):
        cache.put_rows(jnp.asarray([0]), decoder.init_cache(1, MAX_LEN, None))


@pytest.mark.parametrize("nbits", [4])  # packed codes: the general case
def test_quantized_pages_give_the_quantized_dense_logits(nbits):
    """`cache_implementation="quantized"` on pages: a pool of code pages and
    scale pages under the same shuffled tables reads back what the dense
    quantized cache does (the same rule, page block by page block); the
    protocol (rows, rewind, bytes) holds on it."""
    decoder, params = _model()
    decoder = decoder.with_cache(jd.QuantizedCacheConfig(nbits=nbits))
    rng = np.random.default_rng(4)
    lens = [5, 35, 18]
    t = max(lens)
    ids = np.zeros((3, t), np.int32)
    mask = np.zeros((3, t), np.int32)
    for r, n in enumerate(lens):
        ids[r, t - n :] = rng.integers(1, V, n)
        mask[r, t - n :] = 1
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    dense, kv = _run(decoder, params, decoder.init_cache(3, MAX_LEN, None), ids, mask, 12)
    cache = _paged(decoder, 3, 60)
    assert isinstance(cache, jd.QuantizedKVCache) and cache.paged
    assert cache.codes.k.dtype == jnp.uint8 and cache.k_scales.shape == (2, 60, 2, PAGE, 2)
    paged, pc = _run(decoder, params, cache, ids, mask, 12)
    np.testing.assert_allclose(paged, dense, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(pc.mask, kv.mask)
    np.testing.assert_array_equal(pc.index, kv.index)
    # Pages: codes and scales of every layer; the tables, mask and index once.
    packed = 8 * nbits // 8  # head_dim 8
    assert pc.page_bytes() == 2 * 2 * 2 * PAGE * (packed + 2 * 4)
    assert (
        pc.nbytes
        == jd.cache_nbytes(pc)
        == 60 * pc.page_bytes() + jd.cache_nbytes((pc.table, pc.mask, pc.index))
    )
    # rewind forgets codes and scales: the last step again gives its logits bitwise.
    apply = jax.jit(decoder.apply)
    tok = jnp.asarray([[3], [4], [5]], jnp.int32)
    pos = positions_from_mask(mask)[:, -1:] + 13
    one, after = apply(params, tok, pos, pc, jnp.ones_like(tok))
    moves = (jnp.asarray([1]), jnp.asarray([0, 0, 2]), jnp.ones(3, jnp.int32), jnp.int32(32))
    rewound = _moved(after, *moves, width=1)[2]
    again, _ = apply(params, tok, pos, rewound, tok > 0)
    np.testing.assert_array_equal(one, again)
    back, _, _, read = _moved(pc, *moves, width=1)  # the same program on `pc`
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, pc)
    np.testing.assert_array_equal(read[0][0], read[0][1])
    with pytest.raises(ValueError, match="same kind"):
        pc.put_rows(jnp.asarray([0]), kv.take_rows(jnp.asarray([0])))


@pytest.mark.parametrize("nbits", [None, 8])  # float pages, quantized pages
def test_exports_for_tpu_and_cuda(nbits):
    decoder, params = _model()
    if nbits is not None:
        decoder = decoder.with_cache(jd.QuantizedCacheConfig(nbits=nbits))
    cache = _paged(decoder, 2, 40)
    ids = jnp.ones((2, 1), jnp.int32)
    jax.export.export(jax.jit(decoder.apply), platforms=("tpu", "cuda"))(
        params, ids, ids, cache, ids
    )


def test_copies_share_the_full_prefix_pages():
    """`share_prefix` then `fork`: the 3 copies of each of 2 rows name the row's
    full prefix page, own the rest (its partial page copied), and read the
    prefix as the row wrote it; the pool holds each prefix once."""
    decoder, params = _model()
    ids = jnp.asarray(np.random.default_rng(4).integers(1, V, (2, 6)), jnp.int32)
    mask = jnp.ones_like(ids)
    empty = decoder.init_paged(2, MAX_LEN, None, PAGE, None)  # rows own their pages
    np.testing.assert_array_equal(empty.table.reshape(-1), np.arange(2 * 16))
    cache = empty.share_prefix(3, 6)
    assert cache.pages == 2 * 1 + 2 * 3 * 15  # one full prefix page per row; 15 own per copy
    _, cache = jax.jit(decoder.apply)(params, ids, positions_from_mask(mask), cache, mask)
    forked = cache.fork(3, 6)
    assert forked.batch == 6
    table = np.asarray(forked.table)
    assert (table[:3, 0] == table[0, 0]).all() and (table[3:, 0] == table[3, 0]).all()
    assert len(set(table[:, 1:].reshape(-1).tolist())) == 6 * 15  # the rest: own pages
    parent = _read(cache, 1, jnp.int32(0), 8)
    copies = _read(forked, 1, jnp.int32(0), 8)
    for i in range(6):
        np.testing.assert_array_equal(copies[0][i, :, :6], parent[0][i // 3, :, :6])
        np.testing.assert_array_equal(copies[1][i, :, :6], parent[1][i // 3, :, :6])
    np.testing.assert_array_equal(forked.index, [6] * 6)
    np.testing.assert_array_equal(forked.mask, np.repeat(np.asarray(cache.mask), 3, axis=0))
