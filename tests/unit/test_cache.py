"""The functional KV cache: shapes, exact memory, per-row writes, the visibility
pattern, beam reordering and donation to `jax.jit`. NumPy references throughout;
each function is run both eagerly and under `jax.jit`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd

L, B, S, H, D = 3, 4, 10, 2, 8  # layers, batch, max_len, heads, head_dim
KV_SHAPE = (L, B, H, S, D)  # the cache layout: head-major
DTYPES = [jnp.float32, jnp.bfloat16]


def _maybe_jit(fn, jit: bool, **kw):
    return jax.jit(fn, **kw) if jit else fn


jit_param = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])


def _cache(dtype=jnp.float32, index=None, layers=L, batch=B, max_len=S):
    cache = jd.init_cache(
        layers=layers, batch=batch, max_len=max_len, heads=H, head_dim=D, dtype=dtype
    )
    if index is not None:
        cache = cache.replace(index=jnp.asarray(index, jnp.int32))
    return cache


def _random_cache(rng, dtype=jnp.float32):
    """A cache full of distinct values, random mask and per-row indices."""
    shape = KV_SHAPE
    return jd.KVCache(
        k=jnp.asarray(rng.normal(size=shape), dtype),
        v=jnp.asarray(rng.normal(size=shape), dtype),
        mask=jnp.asarray(rng.random((B, S)) < 0.5),
        index=jnp.asarray(rng.integers(0, S, size=B), jnp.int32),
    )


# --------------------------------------------------------------------------- #
@dtype_param
@jit_param
def test_init_cache_shapes_and_dtypes(dtype, jit):
    init = _maybe_jit(
        lambda: jd.init_cache(layers=L, batch=B, max_len=S, heads=H, head_dim=D, dtype=dtype),
        jit,
    )
    cache = init()
    assert isinstance(cache, jd.KVCache)
    assert cache.k.shape == cache.v.shape == (L, B, H, S, D)
    assert cache.k.dtype == cache.v.dtype == jnp.dtype(dtype)
    assert cache.mask.shape == (B, S) and cache.mask.dtype == jnp.bool_
    assert cache.index.shape == (B,) and cache.index.dtype == jnp.int32
    assert cache.batch == B and cache.max_len == S
    assert not np.asarray(cache.mask).any()
    np.testing.assert_array_equal(np.asarray(cache.index), 0)
    assert not np.asarray(cache.k, np.float32).any() and not np.asarray(cache.v, np.float32).any()


def test_init_cache_default_dtype_is_float32():
    cache = jd.init_cache(layers=1, batch=1, max_len=2, heads=1, head_dim=1)
    assert cache.k.dtype == jnp.float32


@dtype_param
@pytest.mark.parametrize("shape", [(L, B, S, H, D), (12, 2, 1024, 12, 64), (1, 1, 1, 1, 1)])
def test_memory_is_exactly_the_formula(dtype, shape):
    layers, batch, max_len, heads, head_dim = shape
    # Abstract evaluation: the GPT-2-small-sized cache is never allocated.
    cache = jax.eval_shape(
        lambda: jd.init_cache(
            layers=layers,
            batch=batch,
            max_len=max_len,
            heads=heads,
            head_dim=head_dim,
            dtype=dtype,
        )
    )
    itemsize = jnp.dtype(dtype).itemsize
    formula = 2 * layers * batch * max_len * heads * head_dim * itemsize
    nbytes = {
        name: int(np.prod(x.shape)) * x.dtype.itemsize
        for name, x in (
            ("k", cache.k),
            ("v", cache.v),
            ("mask", cache.mask),
            ("index", cache.index),
        )
    }
    assert nbytes["k"] + nbytes["v"] == formula
    # Everything else: per-row fields, at most one byte per slot plus 4 bytes per row.
    assert nbytes["mask"] + nbytes["index"] <= batch * max_len + 4 * batch
    assert sum(nbytes.values()) == formula + batch * max_len + 4 * batch
    assert len(jax.tree_util.tree_leaves(cache)) == 4  # nothing hidden in the pytree


@dtype_param
def test_nbytes_kv_and_real_buffers(dtype):
    cache = _cache(dtype)
    itemsize = jnp.dtype(dtype).itemsize
    formula = 2 * L * B * S * H * D * itemsize
    assert cache.nbytes_kv() == formula
    assert isinstance(cache.nbytes_kv(), int)
    assert cache.k.nbytes + cache.v.nbytes == formula
    rest = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache)) - formula
    assert rest == cache.mask.nbytes + cache.index.nbytes <= B * S + 4 * B


# --------------------------------------------------------------------------- #
@dtype_param
@jit_param
@pytest.mark.parametrize("t", [1, 3])
def test_write_at_per_row_indices(rng, dtype, jit, t):
    index = np.array([0, 5, 2, S - t])  # every row writes somewhere else
    before = _random_cache(rng, dtype).replace(index=jnp.asarray(index, jnp.int32))
    k_new = rng.normal(size=(B, t, H, D)).astype(np.float32)
    v_new = rng.normal(size=(B, t, H, D)).astype(np.float32)
    layer = 1
    write = _maybe_jit(lambda c, k, v: c.write(layer, k, v), jit)
    after = write(before, jnp.asarray(k_new), jnp.asarray(v_new))

    ref_k = np.asarray(before.k, np.float32).copy()
    ref_v = np.asarray(before.v, np.float32).copy()
    for b in range(B):  # new[b]: [T, H, D] -> buf[layer, b]: [H, S, D]
        ref_k[layer, b, :, index[b] : index[b] + t] = np.asarray(
            jnp.asarray(k_new[b], dtype), np.float32
        ).transpose(1, 0, 2)
        ref_v[layer, b, :, index[b] : index[b] + t] = np.asarray(
            jnp.asarray(v_new[b], dtype), np.float32
        ).transpose(1, 0, 2)
    assert after.k.dtype == after.v.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(after.k, np.float32), ref_k)
    np.testing.assert_array_equal(np.asarray(after.v, np.float32), ref_v)
    # write neither moves the index nor touches the mask.
    np.testing.assert_array_equal(np.asarray(after.index), index)
    np.testing.assert_array_equal(np.asarray(after.mask), np.asarray(before.mask))


@pytest.mark.parametrize("slot", [0, 4, S - 1, S])
def test_one_row_one_token_write_matches_the_scatter(rng, slot):
    """A batch-1 decode step writes through `dynamic_update_slice`: the same
    cache as row `slot`'s of a multi-row write, and past `max_len` (where the
    slice's start would clamp onto the last slot) nothing at all."""
    full = _random_cache(rng)
    one = full.take_rows(jnp.asarray([2])).replace(index=jnp.asarray([slot], jnp.int32))
    k_new = jnp.asarray(rng.normal(size=(1, 1, H, D)), jnp.float32)
    v_new = jnp.asarray(rng.normal(size=(1, 1, H, D)), jnp.float32)
    after = jax.jit(lambda c, k, v: c.write(1, k, v))(one, k_new, v_new)
    ref_k, ref_v = np.asarray(one.k).copy(), np.asarray(one.v).copy()
    if slot < S:
        ref_k[1, 0, :, slot] = np.asarray(k_new[0, 0])
        ref_v[1, 0, :, slot] = np.asarray(v_new[0, 0])
    np.testing.assert_array_equal(np.asarray(after.k), ref_k)
    np.testing.assert_array_equal(np.asarray(after.v), ref_v)


def test_write_every_layer_is_independent(rng):
    cache = _cache(index=[1, 0, 3, 2])
    for layer in range(L):
        cache = cache.write(
            layer, jnp.full((B, 1, H, D), layer + 1.0), jnp.full((B, 1, H, D), -1.0)
        )
    k = np.asarray(cache.k)
    for layer in range(L):
        for b, i in enumerate([1, 0, 3, 2]):
            np.testing.assert_array_equal(k[layer, b, :, i], layer + 1.0)
    assert np.count_nonzero(k) == L * B * H * D


@jit_param
def test_advance(rng, jit):
    index = np.array([0, 3, 6, 2])
    before = _random_cache(rng).replace(index=jnp.asarray(index, jnp.int32))
    new_mask = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]], np.int32)
    after = _maybe_jit(lambda c, m: c.advance(m), jit)(before, jnp.asarray(new_mask))
    ref = np.asarray(before.mask).copy()
    for b in range(B):
        ref[b, index[b] : index[b] + 3] = new_mask[b] == 1
    np.testing.assert_array_equal(np.asarray(after.mask), ref)
    np.testing.assert_array_equal(np.asarray(after.index), index + 3)
    assert after.index.dtype == jnp.int32 and after.mask.dtype == jnp.bool_
    # k and v are untouched.
    np.testing.assert_array_equal(np.asarray(after.k), np.asarray(before.k))
    np.testing.assert_array_equal(np.asarray(after.v), np.asarray(before.v))


def _visible_reference(mask_before, index, attention_mask):
    """NumPy: token t of row b (at slot index[b] + t) sees the real slots <= its own."""
    b, t = attention_mask.shape
    s = mask_before.shape[1]
    after = mask_before.copy()
    for r in range(b):
        after[r, index[r] : index[r] + t] = attention_mask[r] == 1
    visible = np.zeros((b, t, s), bool)
    for r in range(b):
        for j in range(t):
            visible[r, j, : index[r] + j + 1] = after[r, : index[r] + j + 1]
    return visible, after


@jit_param
@pytest.mark.parametrize("t", [1, 4])
def test_visible_slots(rng, jit, t):
    index = np.array([0, 2, 5, S - t])
    mask_before = np.zeros((B, S), bool)
    for b in range(B):  # earlier writes: some real, some left padding
        mask_before[b, : index[b]] = rng.random(index[b]) < 0.7
    cache = _cache().replace(mask=jnp.asarray(mask_before), index=jnp.asarray(index, jnp.int32))
    attention_mask = (rng.random((B, t)) < 0.7).astype(np.int32)
    visible, after = _maybe_jit(jd.visible_slots, jit)(cache, jnp.asarray(attention_mask))
    ref_visible, ref_mask = _visible_reference(mask_before, index, attention_mask)
    assert visible.shape == (B, t, S) and visible.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(visible), ref_visible)
    np.testing.assert_array_equal(np.asarray(after.mask), ref_mask)
    np.testing.assert_array_equal(np.asarray(after.index), index + t)


def test_visible_slots_left_padded_prefill():
    """Prefill of a left-padded batch: pads are never visible, causality holds."""
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int32)
    visible, after = jd.visible_slots(_cache(batch=2, max_len=6), jnp.asarray(mask))
    expected = np.zeros((2, 4, 6), bool)
    for b in range(2):
        for t in range(4):
            expected[b, t, : t + 1] = mask[b, : t + 1] == 1
    np.testing.assert_array_equal(np.asarray(visible), expected)
    np.testing.assert_array_equal(np.asarray(after.index), [4, 4])


# --------------------------------------------------------------------------- #
@dtype_param
@jit_param
def test_gather_beams_kv_cache(rng, dtype, jit):
    cache = _random_cache(rng, dtype)
    parent = np.array([2, 2, 0, 3])
    out = _maybe_jit(jd.gather_beams, jit)(cache, jnp.asarray(parent))
    assert isinstance(out, jd.KVCache)
    np.testing.assert_array_equal(np.asarray(out.k), np.asarray(cache.k)[:, parent])
    np.testing.assert_array_equal(np.asarray(out.v), np.asarray(cache.v)[:, parent])
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(cache.mask)[parent])
    np.testing.assert_array_equal(np.asarray(out.index), np.asarray(cache.index)[parent])
    assert out.k.dtype == jnp.dtype(dtype)


@jit_param
def test_gather_beams_plain_pytree(rng, jit):
    tree = {
        "k": jnp.asarray(rng.normal(size=(B, S, H))),
        "pos": jnp.arange(B, dtype=jnp.int32),
        "nested": (jnp.asarray(rng.random((B, 2)) < 0.5),),
    }
    parent = np.array([3, 1, 1, 0])
    out = _maybe_jit(jd.gather_beams, jit)(tree, jnp.asarray(parent))
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
    for got, want in zip(
        jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[parent])


def test_gather_beams_identity(rng):
    cache = _random_cache(rng)
    out = jd.gather_beams(cache, jnp.arange(B))
    for got, want in zip(
        jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(cache), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --------------------------------------------------------------------------- #
def _step(cache, k_new, v_new, attention_mask):
    """A decoder-like step: write every layer, then advance."""
    _, after = jd.visible_slots(cache, attention_mask)
    for layer in range(L):
        cache = cache.write(layer, k_new * (layer + 1), v_new - layer)
    return cache.replace(mask=after.mask, index=after.index)


@dtype_param
def test_donated_cache_is_updated_in_place(rng, dtype):
    step = jax.jit(_step, donate_argnums=0)
    k_new = jnp.asarray(rng.normal(size=(B, 1, H, D)), jnp.float32)
    v_new = jnp.asarray(rng.normal(size=(B, 1, H, D)), jnp.float32)
    ones = jnp.ones((B, 1), jnp.int32)

    # XLA aliases the donated cache's buffers to the output's.
    hlo = step.lower(_cache(dtype), k_new, v_new, ones).compile().as_text()
    assert "input_output_alias" in hlo

    reference = _step(_cache(dtype, index=[0, 1, 2, 3]), k_new, v_new, ones)
    cache = _cache(dtype, index=[0, 1, 2, 3])
    donated = cache
    out = step(cache, k_new, v_new, ones)
    assert donated.k.is_deleted() and donated.v.is_deleted()
    for got, want in zip(
        jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(reference), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Keep stepping with the returned cache (each step donates the previous one).
    for _ in range(3):
        reference = _step(reference, k_new, v_new, ones)
        out = step(out, k_new, v_new, ones)
    for got, want in zip(
        jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(reference), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(out.index), [4, 5, 6, 7])
    with pytest.raises(RuntimeError):
        np.asarray(donated.k)  # a donated buffer cannot be read again
