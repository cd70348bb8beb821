"""The continuous-batching engine: each prompt's output equals `generate` on that
prompt alone, whatever its slot, its neighbours or the steps per call; one
prefill program per bucket and one decode program; clear refusals."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from support import count_compiles

import jaxdecode as jd
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params
from jaxdecode.serving import Engine, generate_many, programs, scheduler

V = 64
EOS = 11
BUCKETS = [32]  # one prompt bucket for the parity test: generate compiles less


@functools.cache
def tiny_lm() -> jd.CausalLM:
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=V, n_positions=128)
    params = init_params(config, jax.random.key(3))
    # Sharper logits than the default init, so that greedy is not all ties.
    params = jax.tree_util.tree_map(lambda x: x * 4.0, params)
    defaults = jd.GenerationConfig(eos_token_id=EOS, pad_token_id=0, max_new_tokens=10)
    return jd.CausalLM(params=params, decoder=gpt2_decoder(config), generation_config=defaults)


def _prompts(rng, n, lo=1, hi=30):
    return [rng.integers(1, V, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


# Groups of prompts: within a group only per-row values, seeds and lengths differ.
# Every processor appears in some group.
STATIC = {
    "greedy": dict(do_sample=False),
    "greedy-rules": dict(
        do_sample=False,
        no_repeat_ngram_size=2,
        min_new_tokens=2,
        suppress_tokens=[5],
        begin_suppress_tokens=[7],
        sequence_bias=[[[3], 2.0], [[4, 6], -1.5]],
        bad_words_ids=[[9], [1, 2]],
        forced_eos_token_id=EOS,
        exponential_decay_length_penalty=(2, 1.3),
        remove_invalid_values=True,
        repetition_penalty=1.2,
        frequency_penalty=0.3,
        presence_penalty=0.2,
    ),
    "sample-warpers": dict(
        do_sample=True,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        min_p=0.02,
        typical_p=0.95,
        epsilon_cutoff=1e-4,
        eta_cutoff=1e-4,
        repetition_penalty=1.1,
        frequency_penalty=0.1,
        presence_penalty=0.1,
        # The extra log-probability outputs, recorded per slot.
        output_raw_logprobs=True,
        logprobs=3,
        prompt_logprobs=2,
    ),
    "sample-fast-min_length": dict(
        do_sample=True,
        top_k=8,
        top_k_method="fast",
        top_p=0.8,
        top_p_method="fast",
        min_length=12,
        forced_bos_token_id=13,
        renormalize_logits=True,
    ),
}


def _per_row(rng, name: str) -> dict:
    """Per-row values, seed and length of one prompt of group `name`."""
    out = {"max_new_tokens": int(rng.choice([4, 10]))}
    if "rules" in name:
        out.update(repetition_penalty=float(rng.uniform(1.0, 1.6)))
        out.update(frequency_penalty=float(rng.uniform(-0.5, 0.5)))
    if name.startswith("sample"):
        out["seed"] = int(rng.integers(0, 2**32 - 1))
        out["temperature"] = float(rng.uniform(0.5, 1.5))
        out["top_p"] = float(rng.uniform(0.5, 1.0))
    if name == "sample-warpers":
        out.update(top_k=int(rng.integers(1, 40)), min_p=float(rng.uniform(0, 0.1)))
        out.update(typical_p=float(rng.uniform(0.5, 0.99)))
        out.update(presence_penalty=float(rng.uniform(-0.5, 0.5)))
    return out


def _workload(seed: int = 0, per_group: int = 6):
    rng = np.random.default_rng(seed)
    prompts, configs = [], []
    for name, static in STATIC.items():
        group = _prompts(rng, per_group)
        if name == "sample-fast-min_length":
            group[0] = group[0][:1]  # a one-token prompt: the forced BOS acts on it
        for p in group:
            prompts.append(p)
            configs.append({**static, **_per_row(rng, name)})
    order = rng.permutation(len(prompts))  # groups interleaved in submission order
    return [prompts[i] for i in order], [configs[i] for i in order]


def _alone(lm, prompt, options, res=None):
    """`generate` on `prompt` alone: its tokens and log-probabilities; with `res`
    (the engine's result), its other log-probability fields are checked too."""
    out = jd.generate(
        lm, np.asarray([prompt]), config=lm.generation_config.replace(**options),
        prompt_buckets=BUCKETS,
    )  # fmt: skip
    n, p = int(out.lengths[0]), len(prompt)
    tokens = np.asarray(out.sequences)[0, p : p + n]
    fields = {  # generate's columns: generated tokens, or the prompt's
        "raw_token_logprobs": n, "top_logprobs": n, "top_token_ids": n,
        "prompt_logprobs": p, "prompt_top_logprobs": p, "prompt_top_token_ids": p,
    }  # fmt: skip
    for name, cols in fields.items() if res is not None else ():
        want, got = getattr(out, name), getattr(res, name)
        assert (want is None) == (got is None), name
        if want is not None:  # ids exactly, log-probabilities to float32 rounding
            atol = 0 if name.endswith("ids") else 1e-5
            np.testing.assert_allclose(got, np.asarray(want)[0, :cols], rtol=0, atol=atol)
    return tokens, np.asarray(out.token_logprobs)[0, :n]


def test_each_prompt_equals_generate_alone():
    """24 prompts of 1-29 tokens in 4 groups (every processor, per-row values,
    seeds and lengths differing) over 3 slots, refilled as rows finish; one group
    also records raw log-probabilities, the top-3 alternatives and the prompt's
    log-probabilities with its top-2, equal to generate's too."""
    lm = tiny_lm()
    prompts, configs = _workload()
    results = generate_many(lm, prompts, configs, slots=3, steps_per_call=4, prompt_buckets=BUCKETS)
    assert [r.index for r in results] == list(range(len(prompts)))
    lengths = []
    for prompt, options, res in zip(prompts, configs, results, strict=True):
        tokens, logps = _alone(lm, prompt, options, res)
        np.testing.assert_array_equal(res.tokens, tokens, err_msg=f"{prompt} {options}")
        # A row of a batch rounds its matmuls in another order than one row alone
        # (as in generate with several prompts): the last float32 bit may differ.
        np.testing.assert_allclose(res.token_logprobs, logps, rtol=0, atol=1e-5)
        assert res.seed == options.get("seed")
        lengths.append(len(tokens))
    # The workload has rows stopped by EOS and rows cut by their own max_new_tokens.
    assert any(n < c["max_new_tokens"] for n, c in zip(lengths, configs, strict=True))
    assert any(n == c["max_new_tokens"] for n, c in zip(lengths, configs, strict=True))


def test_results_do_not_depend_on_scheduling():
    """The same prompts in another order, with other steps per call (hence other
    slots and neighbours): bitwise the same tokens and log-probabilities."""
    lm = tiny_lm()
    rng = np.random.default_rng(1)
    prompts = _prompts(rng, 14)
    options = [{**STATIC["sample-warpers"], **_per_row(rng, "sample-warpers")} for _ in prompts]
    config = lm.generation_config.replace(**STATIC["sample-warpers"])
    runs = []
    for n_steps, order in [(1, range(14)), (7, range(13, -1, -1)), (3, rng.permutation(14))]:
        engine = Engine(lm, slots=4, max_len=48, config=config, steps_per_call=n_steps)
        order = list(order)
        engine.submit([prompts[i] for i in order], [options[i] for i in order])
        runs.append({order[r.index]: r for r in engine})
        assert engine.stats.finished == 14 and engine.pending == 0
    for other in runs[1:]:
        for i in range(14):
            np.testing.assert_array_equal(other[i].tokens, runs[0][i].tokens)
            np.testing.assert_array_equal(other[i].token_logprobs, runs[0][i].token_logprobs)


def test_one_prefill_program_per_bucket_and_one_decode_program():
    lm = tiny_lm()
    rng = np.random.default_rng(2)
    config = lm.generation_config.replace(do_sample=True, top_p=0.9, repetition_penalty=1.2)
    # The dense slot cache (pages compile per chunk width: test_engine_pages.py).
    engine = Engine(lm, slots=5, max_len=44, config=config, steps_per_call=6, page_size=None)
    lengths = [3, 12, 20, 5, 14, 30, 2]  # buckets 8, 16, 32
    per_row = lambda: dict(
        seed=int(rng.integers(0, 1000)),
        temperature=float(rng.uniform(0.5, 1.5)),
        top_p=float(rng.uniform(0.5, 0.99)),
        repetition_penalty=float(rng.uniform(1.0, 2.0)),
        max_new_tokens=int(rng.integers(1, 12)),
    )
    with count_compiles() as warm:
        engine.submit(
            [rng.integers(1, V, n).tolist() for n in lengths], [per_row() for _ in lengths]
        )
        first = list(engine)
    assert warm.count == 3 + 1, "one prefill program per bucket and one decode program"
    with count_compiles() as running:
        engine.submit(
            [rng.integers(1, V, n).tolist() for n in lengths * 2], [per_row() for _ in lengths * 2]
        )
        second = list(engine)
    assert running.count == 0, "the engine compiled while running"
    assert len(first) == 7 and len(second) == 14
    stats = engine.stats
    assert stats.tokens == stats.work == sum(len(r.tokens) for r in first + second)
    assert 0 < stats.occupancy <= 1


def test_greedy_engine_equals_generate_over_buckets():
    """Default buckets (powers of two), prompts in several buckets, the engine's
    own config for every prompt."""
    lm = tiny_lm()
    rng = np.random.default_rng(3)
    prompts = _prompts(rng, 6, 1, 40)
    engine = Engine(lm, slots=2, max_len=64, steps_per_call=2)
    engine.submit(prompts)
    results = sorted(engine, key=lambda r: r.index)
    for prompt, res in zip(prompts, results, strict=True):
        out = jd.generate(lm, np.asarray([prompt]))
        n = int(out.lengths[0])
        np.testing.assert_array_equal(res.tokens, np.asarray(out.sequences)[0, len(prompt) :][:n])


def test_refusals():
    lm = tiny_lm()
    with pytest.raises(ValueError, match=r"num_beams=2.*generate\(\)"):
        Engine(lm, max_len=32, config=lm.generation_config.replace(num_beams=2))
    engine = Engine(lm, slots=2, max_len=32)
    with pytest.raises(ValueError, match=r"num_return_sequences=3.*generate\(\)"):
        engine.submit([[1, 2]], {"num_return_sequences": 3, "do_sample": True})
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size=2.*generate_many"):
        engine.submit([[1, 2]], {"no_repeat_ngram_size": 2})
    with pytest.raises(
        ValueError, match=r"bucket \(16 tokens\) plus max_new_tokens=20.*max_len=32"
    ):
        engine.submit([list(range(1, 10))], {"max_new_tokens": 20})
    with pytest.raises(ValueError, match=r"prompt 0 is empty"):
        engine.submit([[]])
    with pytest.raises(ValueError, match=r"configs has 1 entries for 2 prompts"):
        engine.submit([[1], [2]], [None])
    with pytest.raises(ValueError, match=r"output_scores=True needs generate"):
        engine.submit([[1]], {"output_scores": True})
    with pytest.raises(ValueError, match=r"prompt 0: regex needs the model's tokenizer \(the mod"):
        engine.submit([[1]], {"regex": "a+"})
    with pytest.raises(ValueError, match=r"prompt 0: .*list of 2 per-row constraints"):
        engine.submit([[1]], {"regex": ["a+", None]})
    assert engine.pending == 0, "a refused submit queued nothing"
    with pytest.raises(ValueError, match=r"slots must be an integer >= 1, got 0"):
        Engine(lm, slots=0, max_len=32)


def test_a_cache_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    lm = tiny_lm()
    monkeypatch.setattr(scheduler, "available_bytes", lambda: 10_000)

    def allocated(*args):
        raise AssertionError("allocated before checking memory")

    monkeypatch.setattr(programs, "empty_program", allocated)
    with pytest.raises(
        jd.MemoryBudgetError, match=r"slots=64, max_len=100.*KV cache.*lower slots or max_len"
    ):
        Engine(lm, slots=64, max_len=100)


def test_cache_bytes_are_reported():
    lm = tiny_lm()
    engine = Engine(lm, slots=3, max_len=40, page_size=None)  # the dense slot cache
    # k and v: [layers, slots, heads, max_len, head_dim] float32, plus mask and index.
    kv = 2 * 2 * 3 * 2 * 40 * 8 * 4
    assert engine.cache_bytes == kv + 3 * 40 + 3 * 4
    # Pages of 16 by default: 3 pages of 16 per row (48 slots), plus the page tables.
    paged = Engine(lm, slots=3, max_len=40)
    assert paged.page_size == 16 and paged.kv_pages == 3 * 3
    assert paged.cache_bytes == 2 * 2 * 9 * 2 * 16 * 8 * 4 + 3 * 3 * 4 + 3 * 48 + 3 * 4


def test_compact_tail_same_results_no_compilation_after_warm_up():
    """compact_tail: the live rows of the tail move into smaller states (8 -> 2
    -> 1 rows) and back when prompts are submitted afterwards; each prompt's
    tokens stay those of a plain engine, and a second engine of the same shape
    compiles nothing (every size's programs were compiled by the first)."""
    lm = tiny_lm()
    rng = np.random.default_rng(1)
    prompts = _prompts(rng, 14)
    options = [{**STATIC["sample-warpers"], **_per_row(rng, "sample-warpers")} for _ in prompts]
    config = lm.generation_config.replace(**STATIC["sample-warpers"])
    plain = Engine(lm, slots=4, max_len=48, config=config, steps_per_call=3)
    plain.submit(prompts, options)
    want = {r.index: r for r in plain}
    for round_ in range(2):
        with count_compiles() as compiles:
            engine = Engine(
                lm, slots=8, max_len=48, config=config, steps_per_call=3, compact_tail=True
            )
            engine.submit(prompts[:10], options[:10])
            got = {r.index: r for r in engine}
            assert engine.rows < 8, "the tail was not compacted"
            engine.submit(prompts[10:], options[10:])  # back to 8 rows
            got.update({r.index: r for r in engine})
        if round_:
            assert compiles.count == 0, "compact_tail compiled after warm-up"
        stats = engine.stats
        assert stats.row_steps < stats.steps * 8 and stats.compute_occupancy > stats.occupancy
        for i in range(14):
            np.testing.assert_array_equal(got[i].tokens, want[i].tokens)
            np.testing.assert_allclose(got[i].token_logprobs, want[i].token_logprobs, atol=1e-5)


def _live_copies(array: jax.Array) -> int:
    """Live device arrays of `array`'s shape and dtype (the array itself included)."""
    return sum(a.shape == array.shape and a.dtype == array.dtype for a in jax.live_arrays())


@pytest.mark.parametrize("hook", [True, False], ids=["prepare-hook", "no-hook"])
def test_engines_hold_no_copy_of_the_weights(hook):
    """One copy of the weights whatever the number of engines and row counts
    (`compact_tail`: 4 and 1 rows): the engine decodes with the caller's
    arrays (GPT-2's `prepare` hook derives only its one-row LM head), and an
    engine that is gone leaves nothing behind."""
    import dataclasses

    lm = tiny_lm()
    if not hook:
        lm = lm.replace(decoder=dataclasses.replace(lm.decoder, prepare=None))
    wpe = lm.params["wpe"]["embedding"]  # [n_positions, n_embd]: no other array's shape
    weights = jax.tree_util.tree_leaves(lm.params)
    before = _live_copies(wpe)
    engines = [Engine(lm, slots=4, max_len=48, compact_tail=True) for _ in range(2)]
    for engine in engines:
        engine.submit(_prompts(np.random.default_rng(0), 3))
        assert len(list(engine)) == 3
        assert all(
            a is b for a, b in zip(jax.tree_util.tree_leaves(engine.params), weights, strict=True)
        )
    assert _live_copies(wpe) == before, "an engine copied the weights"
    del engines, engine
    assert _live_copies(wpe) == before


# --------------------------------------------------------------------------- #
# Output constraints and the extra log-probability outputs, per slot.
# --------------------------------------------------------------------------- #

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
# Constraints of a few states each (the table stays in its smallest bucket, 16).
CONSTRAINTS = [
    {"regex": r"[0-9]{3}-[a-z ]+"},
    {"choices": ["light", "darkness"]},
    {"json_schema": SCHEMA},
    {},
]
TEXTS = ["And God said", "In", "Let there be light and there was", "Unto the", "b", "He called"]


@functools.cache
def bundled() -> jd.CausalLM:
    return jd.from_pretrained("bundled")


def _check_valid(lm, tokens, options) -> None:
    """An output that ended with EOS matches its constraint."""
    import json
    import re

    toks = tokens.tolist()
    if not toks or toks[-1] not in lm.generation_config.eos_ids:
        return
    text = lm.tokenizer.decode(toks[:-1])
    if "regex" in options:
        assert re.fullmatch(options["regex"], text), text
    if "choices" in options:
        assert text in options["choices"], text
    if "json_schema" in options:
        assert isinstance(json.loads(text)["n"], int), text


def test_constrained_prompts_equal_generate_alone():
    """Regex, choices, JSON schema and free prompts of 1-33 tokens share 3 slots;
    each output equals `generate` on that prompt alone, greedy and sampled (per-row
    seeds and temperatures). The sampled engine starts with free rows and one
    regex; the other constraints arrive while those rows decode (the table grows
    past its bucket, the live rows keep their states)."""
    lm = bundled()
    prompts = [lm.tokenizer.encode(t) for t in TEXTS * 2]
    rng = np.random.default_rng(4)
    greedy = [{**CONSTRAINTS[i % 4], "do_sample": False, "max_new_tokens": 16} for i in range(12)]
    sampled = [
        {**CONSTRAINTS[i % 4], "seed": int(rng.integers(0, 2**32 - 1)), "top_k": 0,
         "top_p": 1.0, "temperature": float(rng.uniform(0.6, 1.2)), "max_new_tokens": 16}
        for i in (3, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1)
    ]  # fmt: skip
    results = generate_many(lm, prompts, greedy, slots=3, steps_per_call=3, prompt_buckets=BUCKETS)
    config = lm.generation_config.replace(top_k=0, top_p=1.0)
    engine = Engine(
        lm, slots=3, max_len=48, config=config, steps_per_call=2, prompt_buckets=BUCKETS
    )
    engine.submit(prompts[:3], sampled[:3])
    got = {r.index: r for r in engine.step()}
    assert len(engine.constraint_table) == 1 and engine.pending == 3
    engine.submit(prompts[3:], sampled[3:])
    got.update({r.index: r for r in engine})
    assert len(engine.constraint_table) == 3
    for prompt, options, res in [
        *zip(prompts, greedy, results, strict=True),
        *((p, o, got[i]) for i, (p, o) in enumerate(zip(prompts, sampled, strict=True))),
    ]:
        tokens, logps = _alone(lm, prompt, options)
        np.testing.assert_array_equal(res.tokens, tokens, err_msg=f"{prompt} {options}")
        np.testing.assert_allclose(res.token_logprobs, logps, rtol=0, atol=1e-5)
        _check_valid(lm, res.tokens, options)
    ended = [r for r in results if r.tokens[-1] == 256]
    assert len(ended) >= 3, "too few outputs completed their constraint"


def test_constraint_table_compiles_only_when_its_bucket_grows():
    """A warm engine compiles nothing for other constraints of the same table
    bucket, submitted after a run or while rows decode; a constraint that grows
    the table changes its shape (new programs). Every output that ended matches
    its constraint. (The engine has the sampled one's shape above: after that
    test, nothing here compiles.)"""
    lm = bundled()
    config = lm.generation_config.replace(top_k=0, top_p=1.0, max_new_tokens=16)
    engine = Engine(
        lm, slots=3, max_len=48, config=config, steps_per_call=2, prompt_buckets=BUCKETS
    )
    prompt = lm.tokenizer.encode("And God")
    ended = []

    def run(constraints, then=()):
        engine.submit([prompt] * len(constraints), constraints)
        out = engine.step()
        if then:
            engine.submit([prompt] * len(then), list(then))  # while rows decode
        out += list(engine)
        assert len(out) == len(constraints) + len(then)
        for res in out:
            options = res.config.constraints()
            _check_valid(lm, res.tokens, dict([options[1][0]]) if options else {})
            ended.append(res.tokens[-1] == 256)

    run([{"regex": "[0-9]{3}"}, {"choices": ["yes", "no"]}, {}])  # warm-up
    shape = engine.constraint_table.shape
    with count_compiles() as same:
        run([{"regex": "[a-c]+x"}, {"choices": ["maybe", "no"]}], then=[{"regex": "[0-9]x"}, {}])
    assert same.count == 0, "a constraint table of the same bucket compiled"
    assert engine.constraint_table.shape == shape == ("dense", 16, 0)
    assert len(engine.constraint_table) == 3
    run([CONSTRAINTS[0], {}], then=CONSTRAINTS[1:])
    assert engine.constraint_table.shape == ("dense", 64, 0)  # 7 + 13 + 14 states: grown past 32
    assert engine.table_bytes == engine.constraint_table.tables.nbytes > 0
    assert sum(ended) >= 4
    with pytest.raises(ValueError, match=r"prompt 13: regex '\(' is invalid"):
        engine.submit([prompt, prompt], [{"choices": ["new"]}, {"regex": "("}])
    assert engine.pending == 0 and ("choices", ["new"]) not in engine.constraint_table


def test_generate_many_sizes_text_prompts_in_tokens():
    """A text prompt's length is its tokens, not its characters: 12 "é" are 24
    byte tokens for the bundled model (sized by characters, max_len was 8 columns
    short and the prompt was refused)."""
    lm = jd.from_pretrained("bundled")
    text = "\u00e9" * 12
    ids = lm.tokenizer.encode(text)
    assert len(ids) == 24
    options = dict(do_sample=False, max_new_tokens=3)
    (res,) = generate_many(lm, [text], slots=2, **options)
    alone = jd.generate(lm, np.array([ids]), **options)
    n = int(alone.lengths[0])
    np.testing.assert_array_equal(
        res.tokens, np.asarray(alone.sequences)[0, len(ids) : len(ids) + n]
    )
