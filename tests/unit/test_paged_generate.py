"""`generate(cache_implementation="paged")`: a `PagedCache` in the one compiled
program, the `num_return_sequences` rows of a prompt sharing its pages.

Tokens equal the dense cache's with the same seed (sampling with R=4, beam
search, greedy) on a left-padded batch of two ragged prompts whose bucket ends
mid-page (so each row's copy of the prompt's partial last page is read); the
decode cache holds each prompt once; traced values compile nothing new; the
program lowers for TPU and CUDA; bad settings are refused by name.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from support import count_compiles

import jaxdecode as jd
from jaxdecode.models.llama import LlamaConfig, init_params, llama_decoder
from jaxdecode.search.loop import Plan, expand_cache, prompt_cache

V = 64
PAGED = dict(cache_implementation="paged", cache_config={"page_size": 4})
BUCKETS = [11]  # 11 prompt slots: two full pages of 4 and a partial one


@functools.cache
def _lm() -> jd.CausalLM:
    config = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    params = jax.tree_util.tree_map(lambda x: x * 3.0, init_params(config, jax.random.key(0)))
    defaults = jd.GenerationConfig(pad_token_id=0, eos_token_id=None, max_new_tokens=8)
    return jd.CausalLM(params=params, decoder=llama_decoder(config), generation_config=defaults)


def _prompts():
    """Two left-padded prompts of 11 and 6 tokens."""
    rng = np.random.default_rng(0)
    ids, mask = np.zeros((2, 11), np.int32), np.zeros((2, 11), np.int32)
    for row, n in enumerate((11, 6)):
        ids[row, 11 - n :] = rng.integers(1, V, n)
        mask[row, 11 - n :] = 1
    return ids, mask


# test_traced_values_compile_nothing reruns this program with other values.
SAMPLED = dict(do_sample=True, top_k=0, temperature=1.3, top_p=0.9, num_return_sequences=4, seed=3)


@pytest.mark.parametrize(
    "options",
    [
        SAMPLED,
        dict(num_beams=4, num_return_sequences=4, do_sample=False),
        dict(do_sample=False),
    ],
    ids=["sample-R4", "beams-R4", "greedy"],
)
def test_tokens_equal_the_dense_cache(options):
    lm, (ids, mask) = _lm(), _prompts()
    kw = dict(prompt_buckets=BUCKETS, **options)
    dense = jd.generate(lm, ids, mask, **kw)
    paged = jd.generate(lm, ids, mask, **PAGED, **kw)
    np.testing.assert_array_equal(paged.sequences, dense.sequences)
    np.testing.assert_allclose(paged.token_logprobs, dense.token_logprobs, rtol=0, atol=1e-5)
    if options.get("num_beams"):
        np.testing.assert_allclose(paged.sequences_scores, dense.sequences_scores, atol=1e-5)
    if options.get("do_sample"):  # the four samples of a prompt differ
        assert len({tuple(r) for r in np.asarray(paged.sequences)[:4, 11:]}) > 1


def _decode_cache(lm, config, batch, bucket, new_tokens):
    """The shape of the cache `generate`'s loop decodes with (`prefill`'s)."""
    decoder = lm.decoder.with_cache(config.kv_cache())
    plan = Plan(decoder, config.static(), batch, bucket, new_tokens, "scan")
    return jax.eval_shape(lambda: expand_cache(plan, prompt_cache(plan, bucket), bucket))


def test_the_prompt_is_stored_once():
    """R=16 samples of a 1,000-token prompt: the pool holds the prompt's 62 full
    pages once and per row its partial page and 100 new tokens' pages."""
    lm = _lm()
    config = lm.generation_config.replace(do_sample=True, num_return_sequences=16)
    dense = _decode_cache(lm, config, 1, 1000, 100)
    paged = _decode_cache(lm, config.replace(**PAGED), 1, 1000, 100)
    assert isinstance(paged, jd.PagedCache) and paged.batch == 16
    own = -(-1100 // 4) - 1000 // 4  # pages per row past the full prompt pages
    assert paged.pages == 1000 // 4 + 16 * own
    per_token = 2 * 2 * 2 * 8 * 4  # k and v, 2 layers, 2 KV heads, head_dim 8, float32
    # Keys and values: exactly one prompt plus 16 completions (both fill whole pages).
    assert paged.k.size * 4 * 2 == (1000 + 16 * 100) * per_token
    # With the tables and masks: 0.155x the dense rows' 16 prompts (ideal 2600 / 17600).
    assert jd.cache_nbytes(paged) < 0.16 * jd.cache_nbytes(dense)
    # One sequence per prompt: each row owns its pages (no pages to share).
    alone = _decode_cache(lm, config.replace(num_return_sequences=1, **PAGED), 2, 1000, 100)
    assert alone.pages == 2 * -(-1100 // 4)


def test_traced_values_compile_nothing():
    lm, (ids, mask) = _lm(), _prompts()
    kw = dict(prompt_buckets=BUCKETS, **PAGED)
    # The paged sample-R4 program of test_tokens_equal_the_dense_cache (compiled
    # there already when the file runs whole), then other prompts and values.
    jd.generate(lm, ids, mask, **SAMPLED, **kw)
    other = dict(SAMPLED, temperature=0.7, top_p=0.8, seed=2)
    with count_compiles() as c:
        jd.generate(lm, ids[::-1], mask[::-1], **other, **kw)
    assert c.count == 0


def test_program_lowers_for_tpu_and_cuda():
    lm, (ids, mask) = _lm(), _prompts()

    def run(params):
        out = jd.generate(
            lm.replace(params=params), ids, mask, do_sample=True, num_return_sequences=4,
            seed=0, **PAGED,
        )  # fmt: skip
        return out.sequences

    exported = jax.export.export(jax.jit(run), platforms=("tpu", "cuda"))(lm.params)
    assert exported.platforms == ("tpu", "cuda")


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(cache_config={"page_size": 0}), "cache_config page_size must be"),
        (dict(cache_config={"page_size": 16, "num_blocks": 4}), r"unknown key\(s\) num_blocks"),
        (dict(cache_config={"nbits": 8}), r"unknown key\(s\) nbits; the paged cache takes"),
    ],
)
def test_bad_settings_are_refused_by_name(options, match):
    lm, (ids, mask) = _lm(), _prompts()
    with pytest.raises(jd.ConfigError, match=match):
        jd.generate(lm, ids, mask, cache_implementation="paged", **options)


def test_a_model_without_pages_and_the_engine_refuse():
    lm, (ids, mask) = _lm(), _prompts()
    bare = lm.replace(decoder=dataclasses.replace(lm.decoder, init_paged=None))
    with pytest.raises(jd.ConfigError, match="cache_implementation='paged' needs a model"):
        jd.generate(bare, ids, mask, **PAGED)
    with pytest.raises(ValueError, match=r"Engine\(\.\.\., page_size=4\)"):
        jd.Engine(lm, slots=2, max_len=32, config=lm.generation_config.replace(**PAGED))
