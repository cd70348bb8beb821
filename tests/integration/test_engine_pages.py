"""The engine on pages (`Engine(page_size=...)`): the engine contract holds.

Each prompt's tokens and log-probability fields equal `generate` on that
prompt alone with its options and seed, with pages, with prefix-cache hits
(prompts sharing a system prompt, samples of one prompt), with chunked prefill,
and with a pool so small that rows wait and are preempted. A tiny Llama over
the byte tokenizer, so constraints and stop strings run too.
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
from jaxdecode.serving import Engine

EOS = 256
BUCKETS = [64]  # one prompt bucket: generate and the engine compile once per config


@functools.cache
def tiny_llama() -> jd.CausalLM:
    config = LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    params = init_params(config, jax.random.key(1))
    params = jax.tree_util.tree_map(lambda x: x * 4.0, params)  # sharper logits: fewer ties
    defaults = jd.GenerationConfig(eos_token_id=EOS, pad_token_id=0, max_new_tokens=12)
    return jd.CausalLM(
        params=params,
        decoder=llama_decoder(config),
        generation_config=defaults,
        tokenizer=jd.byte_tokenizer(),
    )


def _workload(seed: int, n: int = 8, system: int = 21):
    """`n` prompts, most starting with one `system`-token system prompt."""
    rng = np.random.default_rng(seed)
    head = rng.integers(1, 256, system).tolist()
    prompts = [head + rng.integers(1, 256, int(rng.integers(1, 14))).tolist() for _ in range(n)]
    prompts[-1] = rng.integers(1, 256, 9).tolist()  # one without it
    return prompts


FIELDS = ("raw_token_logprobs", "top_logprobs", "top_token_ids")
PROMPT_FIELDS = ("prompt_logprobs", "prompt_top_logprobs", "prompt_top_token_ids")


def _check_alone(lm, config, prompt, options, res):
    """`res` (an engine result) equals `generate` on `prompt` alone."""
    out = jd.generate(
        lm, np.asarray([prompt]), config=config.replace(**options), prompt_buckets=BUCKETS
    )
    n, p = int(out.lengths[0]), len(prompt)
    want = np.asarray(out.sequences)[0, p : p + n]
    np.testing.assert_array_equal(res.tokens, want, err_msg=f"{prompt} {options}")
    np.testing.assert_allclose(
        res.token_logprobs, np.asarray(out.token_logprobs)[0, :n], rtol=1e-5, atol=1e-5
    )
    for name, cols in [*((f, n) for f in FIELDS), *((f, p) for f in PROMPT_FIELDS)]:
        a, b = getattr(out, name), getattr(res, name)
        assert (a is None) == (b is None), name
        if a is not None:
            atol = 0 if name.endswith("ids") else 1e-5
            np.testing.assert_allclose(b, np.asarray(a)[0, :cols], rtol=1e-5, atol=atol)


SAMPLED = dict(do_sample=True, top_k=0, top_p=0.95, output_raw_logprobs=True, logprobs=2)


@pytest.mark.parametrize(
    "pages",
    [
        dict(page_size=4, prefix_cache=False),
        dict(page_size=4),  # prefix hits
        dict(page_size=4, prefill_chunk=8),  # hits and chunks
        dict(page_size=4, kv_pages=14, prefill_chunk=16),  # rows wait and are preempted
        # The tail's rows moved into smaller states and back (and preempted).
        dict(page_size=4, kv_pages=14, prefill_chunk=8, compact_tail=True),
    ],
    ids=["pages", "prefix", "chunks", "tiny-pool", "compact"],
)
def test_paged_engine_equals_generate_alone(pages):
    lm = tiny_llama()
    prompts = _workload(0)
    rng = np.random.default_rng(1)
    config = lm.generation_config.replace(**SAMPLED)
    options = [
        dict(seed=int(rng.integers(0, 2**31)), temperature=float(rng.uniform(0.6, 1.2)))
        for _ in prompts
    ]
    engine = Engine(
        lm, slots=3, max_len=80, config=config, steps_per_call=3, prompt_buckets=BUCKETS, **pages
    )
    engine.submit(prompts, options)
    results = sorted(engine, key=lambda r: r.index)
    for prompt, opt, res in zip(prompts, options, results, strict=True):
        _check_alone(lm, config, prompt, opt, res)
    stats = engine.stats
    if pages.get("prefix_cache", True):
        assert stats.prefix_tokens >= 5 * 20, "the shared system prompt was not reused"
    else:
        assert stats.prefix_tokens == 0
    # Every prompt token was computed or taken from the cache (more with preemptions).
    read = stats.prefill_tokens + stats.prefix_tokens
    assert read >= sum(map(len, prompts)) and (stats.preemptions or read == sum(map(len, prompts)))
    if "compact_tail" in pages:
        assert stats.row_steps < stats.steps * 3, "the tail never ran in a smaller state"
    if "kv_pages" in pages:
        assert stats.preemptions > 0, "the tiny pool never ran out"
        assert stats.peak_kv_bytes <= engine.cache_bytes
    assert 0 < stats.peak_kv_bytes <= engine.cache_bytes


@functools.cache
def tiny_family(family: str) -> jd.CausalLM:
    """Tiny GPT-2 (its own model code) or Gemma 2 with a window of 8 (shorter
    than the prompts: its sliding layers read their window of the pages)."""
    if family == "gpt2":
        from jaxdecode.models import gpt2

        config = gpt2.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=257, n_positions=128)
        decoder, params = gpt2.gpt2_decoder(config), gpt2.init_params(config, jax.random.key(2))
    else:
        from jaxdecode.models.gemma2 import Gemma2Config
        from jaxdecode.models.transformer import transformer_decoder

        config = Gemma2Config(
            vocab_size=257, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
            query_pre_attn_scalar=8, max_position_embeddings=256,
        )  # fmt: skip
        decoder = transformer_decoder(config.transformer())
        params = jd.models.registry.lookup("gemma2").init_params(config, jax.random.key(2))
    params = jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim == 2 else x, params)
    defaults = jd.GenerationConfig(eos_token_id=EOS, pad_token_id=0, max_new_tokens=10)
    return jd.CausalLM(params=params, decoder=decoder, generation_config=defaults)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_families_on_pages_equal_generate_alone(family):
    """GPT-2 and Gemma 2 (sliding layers) on pages, with prefix hits and chunks:
    each prompt's sampled tokens and log-probabilities equal `generate` alone."""
    lm = tiny_family(family)
    prompts = _workload(9, n=5)
    config = lm.generation_config.replace(**SAMPLED)
    options = [{"seed": s, "temperature": 0.8 + 0.1 * s} for s in range(len(prompts))]
    engine = Engine(
        lm, slots=2, max_len=80, config=config, steps_per_call=3, prompt_buckets=BUCKETS,
        page_size=4, prefill_chunk=8,
    )  # fmt: skip
    engine.submit(prompts, options)
    results = sorted(engine, key=lambda r: r.index)
    for prompt, opt, res in zip(prompts, options, results, strict=True):
        _check_alone(lm, config, prompt, opt, res)
    assert engine.stats.prefix_tokens > 0


def test_compacted_paged_rows_move_back_when_prompts_arrive():
    """`compact_tail` on pages: the tail runs in a state of one row, and a
    submit then moves it back to every slot (its pages with it); every prompt
    equals `generate` alone."""
    lm = tiny_llama()
    config = lm.generation_config.replace(**SAMPLED)
    engine = Engine(
        lm, slots=4, max_len=80, config=config, steps_per_call=2, prompt_buckets=BUCKETS,
        page_size=4, compact_tail=True,
    )  # fmt: skip
    first, later = _workload(10, n=2), _workload(11, n=4)
    options = [{"seed": 20 + i, "max_new_tokens": 3 if i == 1 else 12} for i in range(6)]
    engine.submit(first, options[:2])
    results = []
    while engine.rows > 1:  # the short row finishes, the long one is compacted
        results += engine.step()
    engine.submit(later, options[2:])
    results += engine.step()
    assert engine.rows == 4, "a submit after compaction did not move the rows back"
    results += list(engine)
    results.sort(key=lambda r: r.index)
    for prompt, opt, res in zip(first + later, options, results, strict=True):
        _check_alone(lm, config, prompt, opt, res)


@pytest.mark.parametrize("nbits", [4, 8], ids=["sampled-4bit", "greedy-8bit"])
def test_quantized_pages_equal_generate_with_the_quantized_cache(nbits):
    """`cache_implementation="quantized"` on pages (a pool of code pages and
    scale pages): each prompt equals `generate` with the quantized cache on it
    alone, with prefix hits and chunks, sampled at 4 bits and greedy at 8; the
    pool is a fraction of the float one, and `cache_bytes` counts codes and
    scales."""
    lm = tiny_llama()
    prompts = _workload(9, n=5)
    strategy = SAMPLED if nbits == 4 else dict(do_sample=False, logprobs=2)
    config = lm.generation_config.replace(
        **strategy, cache_implementation="quantized", cache_config={"nbits": nbits}
    )
    options = [{"seed": 11 + i, "temperature": 0.7 + 0.1 * i} for i in range(5)]
    if nbits == 8:
        options = [{"max_new_tokens": 6 + i} for i in range(5)]
    kw = dict(slots=3, max_len=80, steps_per_call=3, prompt_buckets=BUCKETS, page_size=4)
    engine = Engine(lm, config=config, prefill_chunk=8, **kw)
    engine.submit(prompts, options)
    results = sorted(engine, key=lambda r: r.index)
    for prompt, opt, res in zip(prompts, options, results, strict=True):
        _check_alone(lm, config, prompt, opt, res)
    assert engine.stats.prefix_tokens >= 3 * 20, "the shared system prompt was not reused"
    float_pool = Engine(
        lm, config=config.replace(cache_implementation=None, cache_config=None), **kw
    )
    # head_dim 8: 8 * nbits / 8 bytes of codes + 8 of scales per token and head, against 32
    assert engine.page_bytes / float_pool.page_bytes == (nbits + 8) / 32
    assert engine.kv_pages == float_pool.kv_pages
    # The pool's bytes are its pages' (codes and scales); the rest (tables, masks) is equal.
    rest = engine.cache_bytes - engine.kv_pages * engine.page_bytes
    assert rest == float_pool.cache_bytes - float_pool.kv_pages * float_pool.page_bytes > 0


def test_greedy_constraints_stop_strings_and_prompt_logprobs():
    """Greedy rows with a repetition penalty, a regex and a choice constraint,
    a stop string, and every prompt log-probability field, on pages."""
    lm = tiny_llama()
    prompts = _workload(2, n=6)
    config = lm.generation_config.replace(
        do_sample=False, repetition_penalty=1.3, stop_strings=["ab"], prompt_logprobs=2
    )
    options = [
        {"regex": r"[0-9]{2}-[a-z]+"},
        {"choices": ["light", "dark"]},
        {},
        {"regex": r"[a-c]+"},
        {"repetition_penalty": 1.1},
        {},
    ]
    engine = Engine(
        lm, slots=2, max_len=80, config=config, steps_per_call=2, prompt_buckets=BUCKETS,
        page_size=8, prefill_chunk=8,
    )  # fmt: skip
    engine.submit(prompts, options)
    results = sorted(engine, key=lambda r: r.index)
    for prompt, opt, res in zip(prompts, options, results, strict=True):
        _check_alone(lm, config, prompt, opt, res)
    # Prompt log-probabilities need every position: prefilled whole, no prefix hit.
    assert engine.stats.prefix_tokens == 0


def test_samples_of_one_prompt_share_its_pages():
    """16 samples of one 40-token prompt: the prompt's pages are stored once
    (peak KV within 1.2x one prompt plus 16 completions) and 15 prompts take
    their full pages from the prefix cache."""
    lm = tiny_llama()
    prompt = np.random.default_rng(3).integers(1, 256, 40).tolist()
    config = lm.generation_config.replace(do_sample=True, top_k=0, max_new_tokens=8)
    seeds = [{"seed": s} for s in range(16)]
    engine = Engine(
        lm, slots=16, max_len=80, config=config, steps_per_call=8, prompt_buckets=BUCKETS,
        page_size=4,
    )  # fmt: skip
    engine.submit([prompt] * 16, seeds)
    results = sorted(engine, key=lambda r: r.index)
    page = engine.page_bytes / 4  # bytes per token slot
    ideal = (40 + 16 * 8) * page
    assert engine.stats.prefix_tokens == 15 * 36  # 9 full pages below the last token
    assert engine.stats.peak_kv_bytes <= 1.2 * ideal + 16 * 4 * page  # + a partial page per row
    for opt, res in zip(seeds[:4], results[:4], strict=True):
        _check_alone(lm, config, prompt, opt, res)


def test_no_recompiles_across_admission_patterns():
    """Warm: one final-chunk program and one chunk program per chunk bucket
    (whatever the prompt buckets), one decode program. Other prompts, other
    prefix hits and chunk counts compile nothing."""
    lm = tiny_llama()
    config = lm.generation_config.replace(do_sample=True, top_k=0)
    engine = Engine(
        lm, slots=3, max_len=80, config=config, steps_per_call=3, prompt_buckets=[8, 64],
        page_size=4, prefill_chunk=8,
    )  # fmt: skip
    rng = np.random.default_rng(5)
    opts = lambda n: [{"seed": int(s), "temperature": float(t)} for s, t in
                      zip(rng.integers(0, 999, n), rng.uniform(0.5, 1.5, n), strict=True)]  # fmt: skip
    first = _workload(6, n=5)
    with count_compiles() as warm:
        engine.submit(first, opts(5))
        list(engine)
    # chunk(8), final(8), decode.
    assert warm.count <= 3
    with count_compiles() as running:
        # A prompt of the other bucket (8) ends in a chunk of 8 like the rest.
        short = [[7, 8, 9, 10, 11]]
        engine.submit(_workload(7, n=7, system=13) + first[:2] + short, opts(10))
        list(engine)
    assert running.count == 0, "the paged engine compiled while running"
    assert engine.stats.prefix_tokens > 0


@pytest.mark.parametrize("pages", [{}, dict(page_size=4, prefill_chunk=8)], ids=["dense", "paged"])
def test_warmup_compiles_every_program_before_the_prompts(pages):
    """`Engine.warmup()` compiles each bucket's (paged: chunk width's) prefill
    and the decode call; prompts of every bucket, with and without prefix hits
    and chunks, then compile nothing."""
    lm = tiny_llama()
    config = lm.generation_config.replace(do_sample=True, top_k=0)
    engine = Engine(
        lm, slots=3, max_len=80, config=config, steps_per_call=3, prompt_buckets=[8, 16, 64],
        **pages,
    )  # fmt: skip
    with pytest.raises(ValueError, match="max_prompt must be below max_len"):
        engine.warmup(max_prompt=80)
    engine.warmup(max_prompt=40)
    work = _workload(3, n=5) + [[5, 6, 7], list(range(1, 13)), list(range(1, 39))]
    with count_compiles() as running:
        engine.submit(work, [{"seed": i} for i in range(len(work))])
        results = sorted(engine, key=lambda r: r.index)
    assert running.count == 0, "warmup() left a program to compile"
    _check_alone(lm, config, work[-1], {"seed": len(work) - 1}, results[-1])


def test_refusals_before_anything_runs():
    lm = tiny_llama()
    with pytest.raises(ValueError, match=r"kv_pages=3 is too small.*raise kv_pages to at least"):
        Engine(lm, slots=2, max_len=64, page_size=4, kv_pages=3).submit([[1] * 20])
    with pytest.raises(ValueError, match="kv_pages=8 needs a paged cache: give page_size"):
        Engine(lm, slots=2, max_len=64, kv_pages=8, page_size=None)
    with pytest.raises(ValueError, match="page_size must be an integer >= 1"):
        Engine(lm, slots=2, max_len=64, page_size=0)
    with pytest.raises(ValueError, match="page_size must be an integer >= 1, got 'x'"):
        Engine(lm, slots=2, max_len=64, page_size="x")


def test_models_without_a_paged_cache_keep_the_dense_slots():
    """A decoder without a paged cache (an adapter's `from_linen`, say), or a
    quantized cache over a paged cache that is not one `PagedCache`, gets the
    dense slot cache (pages are the default); sizing the pool is refused."""
    lm = tiny_llama()
    bare = jd.CausalLM(
        params=lm.params,
        decoder=dataclasses.replace(lm.decoder, init_paged=None),
        generation_config=lm.generation_config,
    )
    engine = Engine(bare, slots=2, max_len=32)
    assert engine.page_size is None and engine.page_bytes is None
    assert engine.cache_bytes == Engine(lm, slots=2, max_len=32, page_size=None).cache_bytes
    with pytest.raises(ValueError, match="kv_pages=8 needs a paged cache: the model .* has none"):
        Engine(bare, slots=2, max_len=32, kv_pages=8)
    # A paged cache that is not one PagedCache (a tuple here) has no quantized pool.
    pair = lm.decoder.init_paged
    odd = lm.replace(decoder=dataclasses.replace(lm.decoder, init_paged=lambda *a: (pair(*a),)))
    q8 = lm.generation_config.replace(cache_implementation="quantized", cache_config={"nbits": 8})
    assert Engine(odd, slots=2, max_len=64, page_size=4, config=q8).page_size is None
    assert Engine(odd, slots=2, max_len=64, page_size=4).page_size == 4
    with pytest.raises(ValueError, match="prefill_chunk=8 needs a paged cache: .*'quantized'"):
        Engine(odd, slots=2, max_len=64, page_size=4, config=q8, prefill_chunk=8)


def test_paged_programs_export_for_tpu_and_cuda():
    lm = tiny_llama()
    engine = Engine(
        lm, slots=2, max_len=32, page_size=4, prompt_buckets=[8], prefill_chunk=8
    )  # fmt: skip
    exported = engine.export(("tpu", "cuda"), max_prompt=12)
    assert set(exported) == {"prefill_8", "chunk_8", "decode"}
    assert all(e.platforms == ("tpu", "cuda") for e in exported.values())


def test_generate_many_on_pages_equals_dense():
    lm = tiny_llama()
    prompts = _workload(8, n=5)
    kw = dict(slots=2, do_sample=False, max_new_tokens=6, prompt_buckets=BUCKETS)
    dense = jd.generate_many(lm, prompts, page_size=None, **kw)
    paged = jd.generate_many(lm, prompts, page_size=8, prefill_chunk=16, **kw)
    for a, b in zip(dense, paged, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_page_bytes_and_bytes_in_use():
    """`page_bytes` is one page's keys and values over every layer;
    `kv_bytes_in_use` the pages rows hold (none once every row is done); the
    dense engine has no pages and holds its whole cache."""
    lm = tiny_llama()
    config = lm.generation_config.replace(do_sample=False, max_new_tokens=6)
    engine = Engine(
        lm, slots=2, max_len=32, config=config, steps_per_call=2, prompt_buckets=[16],
        page_size=4,
    )  # fmt: skip
    # keys and values x 2 layers x 2 KV heads x 4 slots x head_dim 8 x float32
    assert engine.page_bytes == 2 * 2 * 2 * 4 * 8 * 4
    engine.submit([list(range(1, 11)), list(range(11, 21))])
    assert engine.kv_bytes_in_use == 0
    engine.step()  # each row: 10 prompt tokens + the 2 fed in the call's steps, 3 pages
    assert engine.kv_bytes_in_use == 2 * 3 * engine.page_bytes
    list(engine)
    assert engine.kv_bytes_in_use == 0 < engine.stats.peak_kv_bytes
    dense = Engine(lm, slots=2, max_len=32, page_size=None)
    assert dense.page_bytes is None
    assert dense.kv_bytes_in_use == dense.cache_bytes == dense.stats.peak_kv_bytes
