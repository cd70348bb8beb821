"""The quantized KV cache (`cache_implementation="quantized"`, issue 27).

transformers' own quantized cache needs the quanto or HQQ backend (not installed),
so the references are a NumPy implementation of the quantize / dequantize rule,
the dense cache holding the dequantized values (every protocol method), and the
float cache (logits and greedy tokens, within what 8 bits allow).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import count_compiles

import jaxdecode as jd
from jaxdecode.cache import SlotMask
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder
from jaxdecode.models.gpt2 import init_params as gpt2_params
from jaxdecode.models.layers import attend
from jaxdecode.models.llama import LlamaConfig, init_params, llama_decoder
from jaxdecode.quantized_cache import dequantize, quantize
from jaxdecode.serving import Engine, slot_memory

# score and generate must pick the same int8 codes: a last-bit difference between
# the two programs' code at LLVM -O0 (tests/unit/conftest.py) moves a code. Only the
# test comparing them compiles with the full optimizations (the rest of the file at
# -O0, as the tier).

V = 64
EOS = 11
Q8 = dict(cache_implementation="quantized", cache_config={"nbits": 8})
# One greedy program for every test that needs one.
GREEDY = dict(do_sample=False, output_logits=True, output_raw_logprobs=True, max_new_tokens=10)


def numpy_quantize(x: np.ndarray, nbits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule, written out: per group of `group` features, asymmetric min/max.
    Returns unpacked codes `[..., D]` and the dequantized values `[..., D]`."""
    *lead, d = x.shape
    xg = x.astype(np.float32).reshape(*lead, d // group, group)
    lo = xg.min(-1, keepdims=True)
    step = (xg.max(-1, keepdims=True) - lo) / np.float32(2**nbits - 1)
    codes = np.clip(np.round((xg - lo) / np.where(step > 0, step, 1)), 0, 2**nbits - 1)
    back = codes.astype(np.float32) * step + lo
    return codes.reshape(*lead, d).astype(np.uint8), back.reshape(*lead, d)


def numpy_unpack(packed: np.ndarray, nbits: int) -> np.ndarray:
    per = 8 // nbits
    parts = [(packed >> (nbits * i)) & (2**nbits - 1) for i in range(per)]
    return np.stack(parts, -1).reshape(*packed.shape[:-1], -1)


@pytest.mark.parametrize("nbits,group", [(8, 16), (8, 4), (4, 16), (2, 8)])
def test_quantize_matches_the_numpy_rule(nbits, group):
    x = np.random.default_rng(nbits + group).normal(size=(3, 5, 2, 16)).astype(np.float32) * 3
    x[0, 0, 0] = 1.5  # a constant group: step 0, read back exactly
    codes, scales = quantize(jnp.asarray(x), nbits, group)
    want_codes, want = numpy_quantize(x, nbits, group)
    assert codes.dtype == jnp.uint8 and codes.shape == (3, 5, 2, 16 * nbits // 8)
    assert scales.shape == (3, 5, 2, 2 * 16 // group)
    np.testing.assert_array_equal(numpy_unpack(np.asarray(codes), nbits), want_codes)
    back = np.asarray(dequantize(codes, scales, nbits))
    np.testing.assert_allclose(back, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(back[0, 0, 0], 1.5)
    # The error bound of the rule: half a step of each group.
    xg = x.reshape(3, 5, 2, -1, group)
    step = np.ptp(xg, axis=-1, keepdims=True) / (2**nbits - 1)
    assert np.all(np.abs(back.reshape(xg.shape) - xg) <= step / 2 + 1e-5)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _caches(nbits: int = 8, batch: int = 3, max_len: int = 6):
    """A quantized cache with random tokens written, and the dense cache holding
    its dequantized keys and values (the reference of every protocol method)."""
    q = jd.init_quantized(layers=2, batch=batch, max_len=max_len, heads=2, head_dim=8, nbits=nbits)
    keys = jax.random.split(jax.random.key(0), 4)
    for layer in range(2):
        k, v = (jax.random.normal(keys[2 * layer + i], (batch, 4, 2, 8)) for i in (0, 1))
        q = q.write(layer, k, v)
    return q.advance(jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])[:batch])


@jax.jit
def _dense(q) -> jd.KVCache:
    """The dense cache of `q`'s dequantized keys and values."""
    k = jnp.stack([q.k.layer(i) for i in range(q.k.shape[0])])
    v = jnp.stack([q.v.layer(i) for i in range(q.v.shape[0])])
    return jd.KVCache(k=k, v=v, mask=q.mask, index=q.index)


@jax.jit
def _methods(cache, small):
    """Every row-moving protocol method, on any cache (one program, not one per op)."""
    rows, n = jnp.array([2, 0]), jnp.array([1, 0, 2])
    return (
        cache.take_rows(rows),
        cache.gather_rows(jnp.array([1, 1, 0])),
        cache.put_rows(rows, small),
        cache.rewind(n, width=2),
        cache.rewind(n),
        jd.take_rows((cache,), rows)[0],
    )


@pytest.mark.parametrize("nbits", [4])  # packed codes: the general case
def test_protocol_methods_equal_the_dense_cache_of_the_dequantized_values(nbits):
    q, small = _caches(nbits, 3, 6), _caches(nbits, 2, 4)
    want = _methods(_dense(q), _dense(small))
    for got, ref in zip(_methods(q, small), want, strict=True):
        got = _dense(got)
        for name in ("k", "v", "mask", "index"):
            np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    assert isinstance(q, jd.Cache)
    specs = jd.cache_specs(q, jd.make_mesh(1, 1))
    assert isinstance(specs, jd.QuantizedKVCache)
    # Bytes: codes + float32 scales + mask and index (once).
    per_token = 2 * 2 * 2 * (8 * nbits // 8 + 2 * 4)  # layers, k/v, heads, codes + step/min
    assert q.nbytes == 3 * 6 * per_token + 3 * 6 + 3 * 4
    assert q.nbytes == jd.cache_nbytes(q)  # what the device holds: each array once
    with pytest.raises(ValueError, match="same kind"):
        q.put_rows(jnp.array([2, 0]), _caches(2, 2, 4))


@jax.jit
def _write_rewind_write(q):
    k = jnp.ones((3, 1, 2, 8)) * jnp.arange(8.0)
    write = lambda c: c.write(0, k, k).write(1, k, k).advance(jnp.ones((3, 1)))
    once = write(q)
    rewound = once.rewind(jnp.ones(3, jnp.int32), width=1)
    return rewound, once, write(rewound)


def test_rewind_forgets_codes_and_scales_and_rewriting_is_bitwise_the_same():
    q = _caches(8, 3, 6)
    rewound, once, again = _write_rewind_write(q)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(rewound), leaves(q), strict=True):  # as never written
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(once), leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("t,s", [(3, 40), (1, 200), (70, 200)], ids=["direct", "step", "long"])
def test_attend_reads_the_quantized_cache_as_its_dequantized_values(t, s):
    """Direct path (whole layer dequantized) and blocked path (one key block at a
    time): the attention of the dense cache holding the same values."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, s, 2, 8)), jnp.float32)
    q = jd.init_quantized(layers=2, batch=2, max_len=s, heads=2, head_dim=8, nbits=4)
    q = q.write(1, x, -x).advance(jnp.ones((2, s), jnp.int32))
    d = _dense(q)
    queries = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    q_slot = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (2, t))
    mask = SlotMask(q_slot=q_slot, kv_mask=q.mask)
    got = attend(queries, q.k, q.v, mask, 0.35, block=64, layer=1)
    want = attend(queries, d.k, d.v, mask, 0.35, block=64, layer=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@functools.cache
def llama(scale: float = 3.0) -> jd.CausalLM:
    # head_dim 64 (SmolLM2's): the memory ratio below is the real model's.
    config = LlamaConfig(
        vocab_size=V, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip
    params = jax.tree_util.tree_map(lambda p: p * scale, init_params(config, jax.random.key(0)))
    defaults = jd.GenerationConfig(eos_token_id=EOS, pad_token_id=0, max_new_tokens=10)
    return jd.CausalLM(params=params, decoder=llama_decoder(config), generation_config=defaults)


@functools.cache
def gpt2() -> jd.CausalLM:
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=V, n_positions=128)
    params = jax.tree_util.tree_map(lambda x: x * 4.0, gpt2_params(config, jax.random.key(3)))
    defaults = jd.GenerationConfig(eos_token_id=EOS, pad_token_id=0, max_new_tokens=8)
    return jd.CausalLM(params=params, decoder=gpt2_decoder(config), generation_config=defaults)


PROMPTS = np.array([[0, 0, 5, 9, 12, 5, 9], [3, 4, 5, 6, 3, 4, 5], [7, 1, 2, 8, 9, 10, 13]])
MASK = (PROMPTS != 0).astype(np.int32)


def _prefill_logits(lm: jd.CausalLM, nbits: int | None) -> np.ndarray:
    """Every prompt position's logits through a float (None) or quantized cache."""
    quantized = None if nbits is None else jd.QuantizedCacheConfig(nbits=nbits)
    decoder = lm.decoder.with_cache(quantized)
    cache = decoder.init_cache(PROMPTS.shape[0], PROMPTS.shape[1], None)
    pos = jd.positions_from_mask(MASK)
    logits, _ = jax.jit(decoder.apply)(lm.params, PROMPTS, pos, cache, MASK)
    return np.asarray(logits)[MASK.astype(bool)]


def test_logits_close_to_the_float_cache_and_greedy_tokens_mostly_equal():
    """Each key and value is within half a step of the float one, and the step is
    17x finer at 8 bits (range / 255) than at 4 (range / 15): the logits' error
    follows it (at least 8x smaller; measured 19x), and at 8 bits stays under 5%
    of the logits' spread (their std; measured 1.5%). Greedy tokens: on weights
    scaled up 3x (sharp attention, which amplifies a key's error, and tokens
    that differ from step to step) at least 80% are the float cache's (measured
    88%; the real-model check is `benchmarks/kv_quant.py`)."""
    lm = llama(1.0)
    ref = _prefill_logits(lm, None)
    err8 = np.abs(_prefill_logits(lm, 8) - ref).max()
    err4 = np.abs(_prefill_logits(lm, 4) - ref).max()
    assert 0 < err8 < 0.05 * ref.std() and err8 < err4 / 8, (err8, err4, ref.std())
    lm = llama()
    ref = jd.generate(lm, PROMPTS, MASK, **GREEDY)
    q8 = jd.generate(lm, PROMPTS, MASK, **GREEDY, **Q8)
    same = np.asarray(q8.sequences)[:, 7:] == np.asarray(ref.sequences)[:, 7:]
    assert same.mean() >= 0.8, same


@pytest.mark.usefixtures("full_optimizations")
def test_speculative_beam_and_score_agree_with_the_quantized_greedy_program():
    """Every token is read back quantized, so several tokens per call (prompt-lookup
    verification, `score`'s one pass) equal one per call exactly.

    Exact only while no key or value lies on a rounding boundary of its code: the
    model is built here, under this test's optimizations, not taken from `llama`'s
    cache (weights initialised at -O0 by an earlier test differ in last bits, and
    with them three codes flipped: 1e-3 apart)."""
    lm = llama.__wrapped__()
    greedy = jd.generate(lm, PROMPTS, MASK, **GREEDY, **Q8)
    spec = jd.generate(lm, PROMPTS, MASK, do_sample=False, prompt_lookup_num_tokens=3, **Q8)
    np.testing.assert_array_equal(spec.sequences, greedy.sequences)
    seqs = np.asarray(greedy.sequences)
    full = np.concatenate([MASK, np.ones_like(seqs[:, 7:])], 1)
    scored = jd.score(lm, seqs, prompt_length=7, attention_mask=full, **Q8)
    counted = np.asarray(scored.mask)
    np.testing.assert_allclose(
        np.asarray(scored.raw_logprobs)[counted],
        np.asarray(greedy.raw_token_logprobs)[counted],
        atol=2e-5,
    )
    # Beam search gathers the cache every step: a row that read another row's
    # (or another prompt's) cache would change with the order of the batch.
    beam = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, **Q8)
    ahead = np.asarray(jd.generate(lm, PROMPTS, MASK, **beam).sequences)
    behind = np.asarray(jd.generate(lm, PROMPTS[::-1], MASK[::-1], **beam).sequences)
    np.testing.assert_array_equal(ahead.reshape(3, 2, -1)[::-1].reshape(6, -1), behind)
    assert len({tuple(r) for r in ahead}) > 3  # the beams differ


def test_gpt2_reads_the_quantized_cache():
    lm = gpt2()
    quantized = lm.decoder.with_cache(jd.QuantizedCacheConfig(nbits=8))
    pos = jd.positions_from_mask(MASK)
    logits = {}
    for name, decoder in (("float", lm.decoder), ("q8", quantized)):
        cache = decoder.init_cache(3, 8, None)
        logits[name], cache = jax.jit(decoder.apply)(lm.params, PROMPTS, pos, cache, MASK)
    assert isinstance(cache, jd.QuantizedKVCache)
    err = np.abs(logits["q8"] - logits["float"]).max()
    assert 0 < err < 0.05 * logits["float"].std(), err


def test_engine_equals_generate_and_holds_the_quantized_bytes():
    """The engine's contract with the quantized cache: each prompt's tokens are
    `generate`'s on it (rows moved by prefill, insert, compaction)."""
    lm = llama()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, V, int(rng.integers(2, 20))).tolist() for _ in range(5)]
    config = lm.generation_config.replace(**Q8)
    engine = Engine(  # the dense slots (a quantized pool: test_engine_pages.py)
        lm, slots=3, max_len=48, steps_per_call=2, prompt_buckets=[8, 24], prefill_rows=2,
        compact_tail=True, config=config, page_size=None,
    )  # fmt: skip
    engine.submit(prompts, [{"do_sample": False, "max_new_tokens": 3 + i} for i in range(5)])
    got = {r.index: r.tokens.tolist() for r in engine}
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    want = jd.generate(lm, ids, (ids != 0).astype(np.int32), do_sample=False, max_new_tokens=7,
                       **Q8).sequences  # fmt: skip
    for i in range(5):
        assert got[i] == np.asarray(want)[i, width:].tolist()[: len(got[i])], i
    float_bytes = slot_memory(lm.decoder, lm.generation_config, 3, 48)[0]
    assert engine.cache_bytes == slot_memory(lm.decoder, config, 3, 48)[0]
    assert engine.cache_bytes / float_bytes <= 0.3, engine.cache_bytes / float_bytes
    with pytest.raises(ValueError, match="cache_implementation"):
        engine.submit([prompts[0]], {"cache_implementation": None})


def test_switching_values_compiles_nothing_and_nbits_is_static():
    lm = llama()
    opts = dict(do_sample=True, max_new_tokens=4, **Q8)
    jd.generate(lm, PROMPTS, MASK, temperature=0.7, seed=1, **opts)
    with count_compiles() as c:
        jd.generate(lm, PROMPTS, MASK, temperature=1.3, seed=2, **opts)
        jd.generate(lm, PROMPTS[::-1], MASK[::-1], temperature=0.5, seed=3, **opts)
    assert c.count == 0
    # The bits set the cache's shapes (static): equal settings are one program
    # (decoders equal and hashing alike), another width is another.
    q = lambda n: lm.decoder.with_cache(jd.QuantizedCacheConfig(nbits=n))
    assert q(8) == q(8) and hash(q(8)) == hash(q(8)) and q(8) != q(4) != lm.decoder


def test_program_lowers_for_tpu_and_cuda():
    lm = llama()

    def run(params):
        out = jd.generate(lm.replace(params=params), PROMPTS, MASK, max_new_tokens=3, **Q8)
        return out.sequences

    exported = jax.export.export(jax.jit(run), platforms=("tpu", "cuda"))(lm.params)
    assert exported.platforms == ("tpu", "cuda")


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(cache_implementation="offloaded"), "cache_implementation must be None or one of"),
        (dict(cache_config={"nbits": 8}), "cache_config configures"),
        (dict(cache_config={"nbits": 3}, cache_implementation="quantized"), "nbits must be"),
        (dict(cache_config={"bits": 8}, cache_implementation="quantized"), "unknown key.*bits"),
        (dict(cache_config={"residual_length": 128}, cache_implementation="quantized"),
         "residual_length must be 0"),
        (dict(cache_config={"axis_key": 1}, cache_implementation="quantized"), "axis_key"),
        (dict(cache_config={"backend": "hqq"}, cache_implementation="quantized"), "backend"),
        (dict(cache_config=[1, 2], cache_implementation="quantized"), "must be a dict"),
        (dict(cache_config={"q_group_size": 24}, cache_implementation="quantized"),
         "q_group_size=24 must divide the model's head_dim=64"),
    ],
)  # fmt: skip
def test_bad_cache_options_are_refused_by_name_before_tracing(options, match):
    with count_compiles() as c, pytest.raises(jd.ConfigError, match=match):
        jd.generate(llama(), PROMPTS, MASK, **options)
    assert c.count == 0


def test_transformers_names_read_and_write():
    data = {"cache_implementation": "quantized", "cache_config": {"nbits": 8, "backend": "quanto",
            "axis_key": 0, "axis_value": 0, "q_group_size": 64, "residual_length": 0}}  # fmt: skip
    config = jd.GenerationConfig.from_hf(data)
    assert config.quantized_cache() == jd.QuantizedCacheConfig(nbits=8, q_group_size=64)
    assert config.to_hf() == data
    assert jd.GenerationConfig.from_hf({"cache_implementation": "hybrid"}).quantized_cache() is None
    assert jd.GenerationConfig(cache_implementation="quantized").quantized_cache().nbits == 4


def test_a_decoder_without_a_quantized_cache_is_refused():
    lm = llama()
    bare = lm.decoder.__class__(
        init_cache=lm.decoder.init_cache, apply=lm.decoder.apply, vocab_size=V, name="bare"
    )
    with pytest.raises(jd.ConfigError, match="the bare decoder has none"):
        jd.generate(lm.replace(decoder=bare), PROMPTS, MASK, **Q8)
