"""Adapters for users' own Flax decoders: `from_linen` and `from_nnx`.

Each test decoder below is a small causal transformer written here that follows
jaxdecode's calling convention (`(ids, positions, cache, attention_mask) ->
(logits, cache)`, layers written with `KVCache.write`, the attention pattern from
`jaxdecode.visible_slots`). Called with `cache=None` it runs a plain full pass
with its own causal + padding mask and no cache at all: the self-consistency
reference for prefill + one-token steps through the cache.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import count_compiles

import jaxdecode as jd

VOCAB, DIM, HEADS, LAYERS, MAX_POS = 40, 16, 2, 2, 32
HEAD_DIM = DIM // HEADS
ATOL = 1e-5


def init_cache(batch: int, max_len: int, dtype=None) -> jd.KVCache:
    return jd.init_cache(
        layers=LAYERS,
        batch=batch,
        max_len=max_len,
        heads=HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype or jnp.float32,
    )


def _full_pass_visible(attention_mask):
    """No cache: token t sees the real tokens at or before t."""
    t = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def _attend(q, keys, values, visible):
    """q: [B, T, H, D], keys/values: [B, H, S, D] (the cache layout), visible: [B, T, S]."""
    scores = jnp.einsum("bthd,bhsd->bhts", q, keys) / np.sqrt(HEAD_DIM)
    scores = jnp.where(visible[:, None], scores, -1e30)
    weights = jax.nn.softmax(scores, axis=-1)
    b, t = q.shape[:2]
    return jnp.einsum("bhts,bhsd->bthd", weights, values).reshape(b, t, DIM)


def _heads_first(x):
    """[B, T, H, D] -> [B, H, T, D], the cache's layout (for the no-cache pass)."""
    return jnp.swapaxes(x, 1, 2)


def _split_heads(qkv):
    b, t, _ = qkv.shape
    q, k, v = jnp.split(qkv, 3, axis=-1)
    return (x.reshape(b, t, HEADS, HEAD_DIM) for x in (q, k, v))


# --------------------------------------------------------------------------- #
class LinenDecoder(nn.Module):
    """A 2-layer pre-LayerNorm decoder in flax.linen."""

    @nn.compact
    def __call__(self, ids, positions, cache, attention_mask):
        x = nn.Embed(VOCAB, DIM, name="wte")(ids) + nn.Embed(MAX_POS, DIM, name="wpe")(positions)
        if cache is None:
            visible = _full_pass_visible(attention_mask)
        else:
            visible, after = jd.visible_slots(cache, attention_mask)
        for i in range(LAYERS):
            q, k, v = _split_heads(nn.Dense(3 * DIM, name=f"qkv_{i}")(nn.LayerNorm()(x)))
            if cache is None:
                keys, values = _heads_first(k), _heads_first(v)
            else:
                cache = cache.write(i, k, v)
                keys, values = cache.k[i], cache.v[i]  # [B, H, S, D]
            x = x + nn.Dense(DIM, name=f"out_{i}")(_attend(q, keys, values, visible))
            h = nn.gelu(nn.Dense(2 * DIM, name=f"up_{i}")(nn.LayerNorm()(x)))
            x = x + nn.Dense(DIM, name=f"down_{i}")(h)
        logits = nn.Dense(VOCAB, name="head")(nn.LayerNorm()(x))
        if cache is not None:
            cache = cache.replace(mask=after.mask, index=after.index)
        return logits, cache

    def forward(self, ids, positions, cache, attention_mask):
        """The same, reached through `from_linen(..., method="forward")`."""
        return self(ids, positions, cache, attention_mask)


class _NNXLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.ln_1 = nnx.LayerNorm(DIM, rngs=rngs)
        self.qkv = nnx.Linear(DIM, 3 * DIM, rngs=rngs)
        self.out = nnx.Linear(DIM, DIM, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(DIM, rngs=rngs)
        self.up = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
        self.down = nnx.Linear(2 * DIM, DIM, rngs=rngs)


class NNXDecoder(nnx.Module):
    """The same architecture in flax.nnx."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.wte = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.wpe = nnx.Embed(MAX_POS, DIM, rngs=rngs)
        self.layers = nnx.List([_NNXLayer(rngs) for _ in range(LAYERS)])
        self.ln_f = nnx.LayerNorm(DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

    def __call__(self, ids, positions, cache, attention_mask):
        x = self.wte(ids) + self.wpe(positions)
        if cache is None:
            visible = _full_pass_visible(attention_mask)
        else:
            visible, after = jd.visible_slots(cache, attention_mask)
        for i, layer in enumerate(self.layers):
            q, k, v = _split_heads(layer.qkv(layer.ln_1(x)))
            if cache is None:
                keys, values = _heads_first(k), _heads_first(v)
            else:
                cache = cache.write(i, k, v)
                keys, values = cache.k[i], cache.v[i]  # [B, H, S, D]
            x = x + layer.out(_attend(q, keys, values, visible))
            x = x + layer.down(nnx.gelu(layer.up(layer.ln_2(x))))
        logits = self.head(self.ln_f(x))
        if cache is not None:
            cache = cache.replace(mask=after.mask, index=after.index)
        return logits, cache


@functools.cache  # one init and one compiled reference for the fixture and the tests
def _linen():
    module = LinenDecoder()
    ids = jnp.zeros((1, 2), jnp.int32)
    params = module.init(jax.random.key(0), ids, ids, None, jnp.ones_like(ids))["params"]
    decoder = jd.from_linen(module, init_cache=init_cache, vocab_size=VOCAB, max_positions=MAX_POS)
    reference = jax.jit(
        lambda p, ids, pos, mask: module.apply({"params": p}, ids, pos, None, mask)[0]
    )
    return decoder, params, reference


def _nnx():
    model = NNXDecoder(nnx.Rngs(0))
    decoder, params = jd.from_nnx(
        model, init_cache=init_cache, vocab_size=VOCAB, max_positions=MAX_POS
    )
    graphdef, _ = nnx.split(model)
    reference = jax.jit(lambda p, ids, pos, mask: nnx.merge(graphdef, p)(ids, pos, None, mask)[0])
    return decoder, params, reference


BUILDERS = {"linen": _linen, "nnx": _nnx}


@pytest.fixture(scope="module", params=list(BUILDERS))
def adapted(request):
    """(kind, decoder, params, reference(params, ids, positions, mask) -> logits):
    the reference is the module's own full pass without a cache (jitted)."""
    return (request.param, *BUILDERS[request.param]())


def _batch(seed=0, length=7, pads=(0, 2, 4)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(len(pads), length)).astype(np.int32)
    mask = np.ones_like(ids)
    for b, p in enumerate(pads):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


_JITTED: dict = {}


def _prefill_then_steps(decoder, params, ids, mask, prefill, max_len, jit):
    apply = _JITTED.setdefault(decoder, jax.jit(decoder.apply)) if jit else decoder.apply
    cache = decoder.init_cache(ids.shape[0], max_len, None)
    logits, cache = apply(
        params,
        ids[:, :prefill],
        jd.positions_from_mask(mask[:, :prefill]),
        cache,
        mask[:, :prefill],
    )
    out = [logits]
    for i in range(prefill, ids.shape[1]):
        positions = jd.positions_from_mask(mask[:, i : i + 1], offset=mask[:, :i].sum(axis=1))
        logits, cache = apply(params, ids[:, i : i + 1], positions, cache, mask[:, i : i + 1])
        out.append(logits)
    np.testing.assert_array_equal(np.asarray(cache.index), ids.shape[1])
    np.testing.assert_array_equal(np.asarray(cache.mask[:, : ids.shape[1]]), np.asarray(mask) == 1)
    assert not np.asarray(cache.mask[:, ids.shape[1] :]).any()
    return np.asarray(jnp.concatenate(out, axis=1))


def _assert_close_on_real(ours, ref, mask, atol=ATOL):
    real = np.asarray(mask) == 1
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(ref)[real], rtol=0, atol=atol)


# --------------------------------------------------------------------------- #
def test_decoder_fields(adapted):
    kind, decoder, _, _ = adapted
    assert isinstance(decoder, jd.Decoder)
    assert decoder.vocab_size == VOCAB
    assert decoder.init_cache is init_cache
    assert decoder.max_positions == MAX_POS
    decoder.check_length(MAX_POS)
    with pytest.raises(ValueError, match=str(MAX_POS)):
        decoder.check_length(MAX_POS + 1)
    assert decoder.name in ("LinenDecoder", "NNXDecoder")


@pytest.mark.parametrize(
    ("jit", "prefill"),
    [(False, 3), (True, 1), (True, 3), (True, 6)],
    ids=["eager-prefill3", "jit-prefill1", "jit-prefill3", "jit-prefill6"],
)
def test_prefill_then_steps_equal_a_full_pass(adapted, jit, prefill):
    _, decoder, params, reference = adapted
    ids, mask = _batch()
    ref = reference(params, ids, jd.positions_from_mask(mask), mask)
    assert np.abs(np.asarray(ref)).max() > 0.1  # not trivially zero
    ours = _prefill_then_steps(decoder, params, ids, mask, prefill, max_len=9, jit=jit)
    assert ours.shape == (3, 7, VOCAB)
    _assert_close_on_real(ours, ref, mask)


def test_linen_method_argument():
    """`from_linen(..., method="forward")` calls that method instead of `__call__`."""
    _, params, reference = _linen()
    decoder = jd.from_linen(
        LinenDecoder(), init_cache=init_cache, vocab_size=VOCAB, method="forward"
    )
    assert decoder.max_positions is None
    ids, mask = _batch()
    ref = reference(params, ids, jd.positions_from_mask(mask), mask)
    _assert_close_on_real(
        _prefill_then_steps(decoder, params, ids, mask, 3, max_len=9, jit=True), ref, mask
    )


def test_single_unpadded_row(adapted):
    _, decoder, params, reference = adapted
    ids, mask = _batch(seed=1, length=5, pads=(0,))
    ref = reference(params, ids, jd.positions_from_mask(mask), mask)
    ours = _prefill_then_steps(decoder, params, ids, mask, 4, max_len=5, jit=True)
    _assert_close_on_real(ours, ref, mask)


def test_causal_lm_logits(adapted):
    _, decoder, params, reference = adapted
    lm = jd.CausalLM(params=params, decoder=decoder)
    ids, mask = _batch(seed=2)
    ref = reference(params, ids, jd.positions_from_mask(mask), mask)
    _assert_close_on_real(lm.logits(ids, mask), ref, mask)
    assert lm.vocab_size == VOCAB


def test_causal_lm_through_jit_traces_params(adapted):
    """Params are pytree leaves: new values reuse the compiled function."""
    _, decoder, params, reference = adapted
    ids, mask = _batch(seed=3)

    @jax.jit
    def run(lm, ids, mask):
        cache = lm.decoder.init_cache(ids.shape[0], ids.shape[1], None)
        logits, _ = lm.decoder.apply(lm.params, ids, jd.positions_from_mask(mask), cache, mask)
        return logits

    lm = jd.CausalLM(params=params, decoder=decoder)
    first = run(lm, ids, mask)
    scaled = jax.tree_util.tree_map(lambda x: x * 1.5, params)
    lm2 = lm.replace(params=scaled)
    assert isinstance(lm2, jd.CausalLM) and lm2.decoder is decoder
    with count_compiles() as compiles:
        second = run(lm2, ids, mask)
        third = run(jd.CausalLM(params=params, decoder=decoder), ids, mask)
    assert compiles.count == 0
    positions = jd.positions_from_mask(mask)
    _assert_close_on_real(first, reference(params, ids, positions, mask), mask)
    _assert_close_on_real(second, reference(scaled, ids, positions, mask), mask)
    np.testing.assert_array_equal(np.asarray(third), np.asarray(first))
    assert np.abs(np.asarray(second) - np.asarray(first)).max() > 1e-2  # not baked in
    # Only the params are leaves.
    assert len(jax.tree_util.tree_leaves(lm)) == len(jax.tree_util.tree_leaves(params))


def test_nnx_params_are_the_model_state():
    model = NNXDecoder(nnx.Rngs(1))
    _, params = jd.from_nnx(model, init_cache=init_cache, vocab_size=VOCAB)
    assert isinstance(params, nnx.State)
    ours = {str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    theirs = {
        str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))
    }
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key])


# --------------------------------------------------------------------------- #
class _NotAModule:
    def __call__(self, *args):
        raise AssertionError("never called")


@pytest.mark.parametrize(
    "bad",
    [_NotAModule(), lambda *a: a, "LinenDecoder", NNXDecoder(nnx.Rngs(0))],
    ids=["callable_object", "function", "string", "nnx_module"],
)
def test_from_linen_rejects_non_linen(bad):
    with pytest.raises(ValueError, match="flax.linen.Module"):
        jd.from_linen(bad, init_cache=init_cache, vocab_size=VOCAB)


@pytest.mark.parametrize(
    "bad", [_NotAModule(), LinenDecoder(), None], ids=["callable_object", "linen_module", "none"]
)
def test_from_nnx_rejects_non_nnx(bad):
    with pytest.raises(ValueError, match="flax.nnx.Module"):
        jd.from_nnx(bad, init_cache=init_cache, vocab_size=VOCAB)


BAD_VOCAB = [0, -3, 3.5, True, "40", None]


@pytest.mark.parametrize("vocab_size", BAD_VOCAB, ids=[repr(v) for v in BAD_VOCAB])
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_bad_vocab_size(kind, vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        if kind == "linen":
            jd.from_linen(LinenDecoder(), init_cache=init_cache, vocab_size=vocab_size)
        else:
            jd.from_nnx(NNXDecoder(nnx.Rngs(0)), init_cache=init_cache, vocab_size=vocab_size)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_bad_init_cache(kind):
    with pytest.raises(ValueError, match="init_cache"):
        if kind == "linen":
            jd.from_linen(LinenDecoder(), init_cache=None, vocab_size=VOCAB)
        else:
            jd.from_nnx(NNXDecoder(nnx.Rngs(0)), init_cache=42, vocab_size=VOCAB)
