"""Property tests of the logits processors (hypothesis), every call under `jax.jit`.

Shapes are few and fixed (a new shape is a new compilation); values vary.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support import assert_same_scores, count_compiles

import jaxdecode as jd

B, V = 4, 16
SETTINGS = settings(max_examples=30, deadline=None)


@jax.jit
def _apply(processor, logits, ctx):
    return processor(logits, ctx)


@jax.jit
def _append(processor, ctx, state, tokens):
    return ctx.append(tokens), processor.update(state, tokens)


def _ctx(ids=None, prompt_length=None, **kw):
    """A context with both tallies; default history `[B, 6]`, 3 tokens generated."""
    if ids is None:
        ids = np.arange(B * 6).reshape(B, 6) % V
        prompt_length = 3
    return jd.DecodeContext.from_ids(
        np.asarray(ids), vocab_size=V, prompt_length=prompt_length, **kw
    )


def run(processor, logits, ctx=None):
    logits = jnp.asarray(logits, jnp.float32)
    return np.asarray(_apply(processor, logits, _ctx() if ctx is None else ctx))


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def logits_st(lo=-20.0, hi=20.0, shape=(B, V), **kw):
    lo, hi = float(np.float32(lo)), float(np.float32(hi))
    # No subnormals: XLA on CPU flushes them to zero (0 and 1e-45 would tie).
    elements = st.floats(lo, hi, width=32, allow_subnormal=False)
    return hnp.arrays(np.float32, shape, elements=elements, **kw)


# Logits with ties on purpose: values from a small grid.
tied_logits = hnp.arrays(
    np.float32, (B, V), elements=st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0, 2.0, 4.0])
)


@st.composite
def separated_logits(draw, gap=0.1):
    """Tie-free rows: distinct multiples of `gap` (probabilities differ by e^gap)."""
    rows = [draw(st.permutations(range(-150, 150)).map(lambda p: p[:V])) for _ in range(B)]
    return np.asarray(rows, np.float32) * np.float32(gap)


def n_kept(out):
    return np.isfinite(out).sum(-1)


# --------------------------------------------------------------------------- #
# top-k
# --------------------------------------------------------------------------- #


@SETTINGS
@given(x=st.one_of(logits_st(), tied_logits), k=st.integers(1, V + 3))
def test_top_k_keeps_at_least_k_and_exact_equals_fast(x, k):
    exact = run(jd.top_k(k), x)
    fast = run(jd.top_k(k, method="fast"), x)
    np.testing.assert_array_equal(exact, fast)
    assert np.all(n_kept(exact) >= min(k, V))
    # Survivors keep their value; the k-th largest value survives.
    kth = np.sort(x, -1)[:, V - min(k, V)]
    np.testing.assert_array_equal(exact[np.isfinite(exact)], x[np.isfinite(exact)])
    np.testing.assert_array_equal(np.isfinite(exact), x >= kth[:, None])


@SETTINGS
@given(x=logits_st(unique=True), k=st.integers(1, V + 3), mtk=st.sampled_from([1, 3]))
def test_top_k_keeps_exactly_k_without_ties(x, k, mtk):
    want = min(max(k, mtk), V)
    for method in ("exact", "fast"):
        out = run(jd.top_k(k, min_tokens_to_keep=mtk, method=method), x)
        np.testing.assert_array_equal(n_kept(out), want)


# --------------------------------------------------------------------------- #
# top-p
# --------------------------------------------------------------------------- #


def _needed(x, p):
    """Fewest top tokens whose (float64) mass reaches p, with float32 slack."""
    probs = -np.sort(-softmax64(x), -1)
    return np.argmax(np.cumsum(probs, -1) >= p - 1e-5, axis=-1) + 1


@SETTINGS
@given(
    x=st.one_of(logits_st(), tied_logits, logits_st(-1e4, 1e4)),
    p=st.floats(0.01, 1.0),
    mtk=st.sampled_from([1, 3]),
)
def test_top_p_keeps_mass_and_argmax(x, p, mtk):
    probs = softmax64(x)
    needed = _needed(x, p)
    for method in ("exact", "fast"):
        out = run(jd.top_p(p, min_tokens_to_keep=mtk, method=method), x)
        kept = np.isfinite(out)
        mass = np.where(kept, probs, 0.0).sum(-1)
        assert np.all(mass >= p - 1e-5), (method, mass, p)
        # A largest logit always survives (with ties, which one is an index matter).
        assert np.all((kept & (x == x.max(-1, keepdims=True))).any(-1)), method
        assert np.all(kept.sum(-1) >= min(mtk, V)), method
        np.testing.assert_array_equal(out[kept], x[kept])
        if method == "fast":
            assert np.all(kept.sum(-1) >= needed), (kept.sum(-1), needed)


@SETTINGS
@given(x=separated_logits(), p=st.floats(0.01, 1.0), mtk=st.sampled_from([1, 3]))
def test_top_p_exact_equals_fast_without_ties(x, p, mtk):
    # Documented difference: a cumulative sum within float32 rounding of 1 - p may
    # fall on either side. Exclude those boundary cases, nothing else.
    cum = np.cumsum(np.sort(softmax64(x), -1), -1)
    assume(np.all(np.abs(cum - (1.0 - p)) > 1e-5))
    exact = run(jd.top_p(p, min_tokens_to_keep=mtk), x)
    fast = run(jd.top_p(p, min_tokens_to_keep=mtk, method="fast"), x)
    np.testing.assert_array_equal(np.isfinite(exact), np.isfinite(fast))


# --------------------------------------------------------------------------- #
# temperature
# --------------------------------------------------------------------------- #


@st.composite
def peaked_logits(draw):
    x = draw(logits_st(-10.0, 10.0))
    gap = draw(st.floats(0.05, 5.0))
    top = draw(st.lists(st.integers(0, V - 1), min_size=B, max_size=B))
    rows = np.arange(B)
    x[rows, top] = x.max(-1) + np.float32(gap)
    return x, np.asarray(top)


@SETTINGS
@given(xt=peaked_logits())
def test_low_temperature_approaches_greedy(xt):
    x, top = xt
    out = run(jd.temperature(1e-3), x)
    probs = softmax64(out)
    assert np.all(probs[np.arange(B), top] > 0.99)
    np.testing.assert_array_equal(np.asarray(jd.greedy(jnp.asarray(out))), top)


@SETTINGS
@given(x=st.one_of(logits_st(), logits_st(-3.0e38, 3.0e38), tied_logits))
def test_temperature_one_is_identity(x):
    x = x.copy()
    x[0, :3] = [-np.inf, np.inf, -0.0]
    out = run(jd.temperature(1.0), x)
    np.testing.assert_array_equal(out, x)
    assert np.signbit(out[0, 2])


# --------------------------------------------------------------------------- #
# Per-row values == each row alone with its scalar value
# --------------------------------------------------------------------------- #

_fl = lambda lo, hi: st.floats(lo, hi, allow_nan=False)
PER_ROW = {
    "temperature": (jd.temperature, _fl(0.2, 3.0)),
    "top_k": (jd.top_k, st.integers(1, V + 2)),
    "top_k_fast": (lambda v: jd.top_k(v, method="fast"), st.integers(1, V + 2)),
    "top_p": (jd.top_p, _fl(0.01, 1.0)),
    "top_p_fast": (lambda v: jd.top_p(v, method="fast"), _fl(0.01, 1.0)),
    "top_p_keep3": (lambda v: jd.top_p(v, min_tokens_to_keep=3), _fl(0.01, 1.0)),
    "min_p": (jd.min_p, _fl(0.0, 1.0)),
    "typical_p": (jd.typical_p, _fl(0.01, 0.99)),
    "epsilon_cutoff": (jd.epsilon_cutoff, _fl(1e-4, 0.3)),
    "eta_cutoff": (jd.eta_cutoff, _fl(1e-4, 0.3)),
    "repetition_penalty": (jd.repetition_penalty, _fl(0.3, 3.0)),
    "repetition_penalty_ctrl": (
        lambda v: jd.repetition_penalty(v, form="ctrl"),
        _fl(0.3, 3.0),
    ),
    "frequency_penalty": (jd.frequency_penalty, _fl(-2.0, 2.0)),
    "presence_penalty": (jd.presence_penalty, _fl(-2.0, 2.0)),
}


@pytest.mark.parametrize("name", sorted(PER_ROW))
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_per_row_values_equal_rows_alone(name, data):
    factory, values_st = PER_ROW[name]
    x = data.draw(st.one_of(logits_st(), tied_logits), label="logits")
    values = data.draw(st.lists(values_st, min_size=B, max_size=B), label="values")
    ids = data.draw(hnp.arrays(np.int32, (B, 6), elements=st.integers(0, V - 1)), label="ids")
    # Float values packed as float64, as the engine and generate pack them: a
    # float32 array would round each value before top_p's float64 cutoff
    # (1 - p), and a row could then keep one token more than the same row alone
    # with the Python float (seen: 16 tied logits, 6 kept vs 5).
    dtype = np.int32 if isinstance(values[0], int) else np.float64
    batched = run(factory(np.asarray(values, dtype)), x, _ctx(ids, 3))
    for i in range(B):
        alone = run(factory(values[i]), x[i : i + 1], _ctx(ids[i : i + 1], 3))
        assert_same_scores(batched[i : i + 1], alone, atol=1e-6)


def test_frequency_presence_per_row_pair(rng):
    x = rng.normal(size=(B, V)).astype(np.float32)
    ids = rng.integers(0, V, size=(B, 8))
    f, p = rng.uniform(-2, 2, B).astype(np.float32), rng.uniform(-2, 2, B).astype(np.float32)
    batched = run(jd.frequency_presence_penalty(f, p), x, _ctx(ids, 2))
    for i in range(B):
        alone = run(
            jd.frequency_presence_penalty(float(f[i]), float(p[i])),
            x[i : i + 1],
            _ctx(ids[i : i + 1], 2),
        )
        assert_same_scores(batched[i : i + 1], alone, atol=1e-6)


# --------------------------------------------------------------------------- #
# min_tokens_to_keep and the penalties
# --------------------------------------------------------------------------- #

CUTOFFS = {
    "min_p": (jd.min_p, _fl(0.0, 1.0)),
    "epsilon_cutoff": (jd.epsilon_cutoff, _fl(1e-6, 0.999)),
    "eta_cutoff": (jd.eta_cutoff, _fl(1e-6, 0.999)),
    "typical_p": (jd.typical_p, _fl(1e-3, 0.999)),
}


@pytest.mark.parametrize("name", sorted(CUTOFFS))
@pytest.mark.parametrize("mtk", [1, 2, 5])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_cutoffs_keep_min_tokens(name, mtk, data):
    factory, values_st = CUTOFFS[name]
    x = data.draw(st.one_of(logits_st(), logits_st(-1e4, 1e4), tied_logits), label="logits")
    value = data.draw(values_st, label="value")
    out = run(factory(value, min_tokens_to_keep=mtk), x)
    assert np.all(n_kept(out) >= mtk)
    if name != "typical_p":  # typical sampling may drop the most likely token
        assert np.all((np.isfinite(out) & (x == x.max(-1, keepdims=True))).any(-1))
    np.testing.assert_array_equal(out[np.isfinite(out)], x[np.isfinite(out)])


@SETTINGS
@given(
    x=st.one_of(logits_st(), tied_logits),
    ids=hnp.arrays(np.int32, (B, 5), elements=st.integers(0, V - 1)),
    theta=st.floats(1.0, 10.0),
)
def test_repetition_penalty_hf_lowers_seen_tokens(x, ids, theta):
    ctx = _ctx(ids, 5)
    seen = np.asarray(jd.repetition_penalty(theta).init(ctx))
    out = run(jd.repetition_penalty(theta), x, ctx)
    # Seen logits never rise, unseen ones are untouched.
    assert np.all(out[seen] <= x[seen])
    np.testing.assert_array_equal(out[~seen], x[~seen])
    before, after = softmax64(x), softmax64(out)
    # Probability moves from seen to unseen tokens, never the other way.
    assert np.all((after * seen).sum(-1) <= (before * seen).sum(-1) + 1e-12)
    assert np.all(after[~seen] >= before[~seen] * (1 - 1e-12))
    # A token that is the only seen one of its row never gains probability. (With
    # several seen tokens one of them can: penalising a large seen logit shrinks
    # the normaliser, e.g. logits [10, 0.1, 0], both first two seen, theta=2.)
    alone = seen.sum(-1) == 1
    assert np.all(after[alone][seen[alone]] <= before[alone][seen[alone]] * (1 + 1e-12))


def test_repetition_penalty_can_raise_a_seen_token_probability_with_two_seen():
    """Documents the counterexample above: HF's form lowers logits, not every probability."""
    x = np.zeros((1, V), np.float32)
    x[0, :2] = [10.0, 0.1]
    out = run(jd.repetition_penalty(2.0), x, _ctx(np.array([[0, 1]]), 2))
    assert softmax64(out)[0, 1] > softmax64(x)[0, 1]


@SETTINGS
@given(
    x=st.one_of(logits_st(), tied_logits),
    ids=hnp.arrays(np.int32, (B, 5), elements=st.integers(0, V - 1)),
    theta=st.floats(0.1, 10.0),
)
def test_repetition_penalty_ctrl_divides_seen_tokens(x, ids, theta):
    ctx = _ctx(ids, 5)
    seen = np.asarray(jd.repetition_penalty(theta, form="ctrl").init(ctx))
    out = run(jd.repetition_penalty(theta, form="ctrl"), x, ctx)
    want = np.where(seen, x / np.float32(theta), x)
    # XLA flushes subnormal results to zero; compare up to the smallest normal float.
    np.testing.assert_allclose(out, want, rtol=0, atol=np.finfo(np.float32).tiny)


# --------------------------------------------------------------------------- #
# Processor state: incremental tallies (init + update per token) == recomputed
# --------------------------------------------------------------------------- #

BUF = 12
token_ids = st.one_of(st.integers(0, 3), st.integers(0, V - 1))  # repeats are likely


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_append_matches_from_ids(data):
    # Two prompt shapes only (each new shape compiles `from_ids`' eager ops).
    plen = data.draw(st.sampled_from([2, 5]), label="prompt_length")
    prompt = data.draw(hnp.arrays(np.int32, (B, plen), elements=token_ids), label="prompt")
    gen = data.draw(hnp.arrays(np.int32, (B, BUF - plen), elements=token_ids), label="generated")
    pads = data.draw(st.lists(st.integers(0, plen - 1), min_size=B, max_size=B), label="pads")
    mask = (np.arange(plen)[None, :] >= np.asarray(pads)[:, None]).astype(np.int32)
    ctx = jd.DecodeContext.from_ids(prompt, vocab_size=V, attention_mask=mask)
    buf = np.zeros((B, BUF), np.int32)
    buf[:, :plen] = prompt
    ctx = ctx.replace(sequences=jnp.asarray(buf))
    tallies = jd.chain(jd.repetition_penalty(1.5), jd.frequency_penalty(0.5))
    state = tallies.init(ctx)
    for t in range(BUF - plen):
        ctx, state = _append(tallies, ctx, state, gen[:, t])
    ref = jd.DecodeContext.from_ids(
        np.concatenate([prompt, gen], 1), vocab_size=V, prompt_length=plen, attention_mask=mask
    )
    assert np.all(np.asarray(ctx.cur_len) == BUF)
    assert np.all(np.asarray(ctx.prompt_length) == plen)
    np.testing.assert_array_equal(ctx.sequences, ref.sequences)
    seen, counts = state
    ref_seen, ref_counts = tallies.init(ref)
    np.testing.assert_array_equal(seen, ref_seen)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(ctx.prompt_start, ref.prompt_start)


# --------------------------------------------------------------------------- #
# No NaN from finite input
# --------------------------------------------------------------------------- #


def _all_processors():
    eos = [2, 5]
    return {
        "temperature": jd.temperature(0.5),
        "top_k": jd.top_k(3),
        "top_k_fast": jd.top_k(3, method="fast"),
        "top_p": jd.top_p(0.7),
        "top_p_fast": jd.top_p(0.7, method="fast"),
        "min_p": jd.min_p(0.2, min_tokens_to_keep=2),
        "typical_p": jd.typical_p(0.6),
        "epsilon_cutoff": jd.epsilon_cutoff(0.05),
        "eta_cutoff": jd.eta_cutoff(0.05),
        "repetition_penalty": jd.repetition_penalty(1.5),
        "repetition_penalty_ctrl": jd.repetition_penalty(1.5, form="ctrl"),
        "frequency_presence": jd.frequency_presence_penalty(1.5, -0.5),
        "no_repeat_ngram": jd.no_repeat_ngram_size(2),
        "sequence_bias": jd.sequence_bias({(1,): 2.0, (3, 4): -1.0, (4, 7): 5.0}),
        "bad_words": jd.bad_words_ids([[6], [4, 5]]),
        "min_length": jd.min_length(20, eos),
        "min_new_tokens": jd.min_new_tokens(5, eos),
        "forced_bos": jd.forced_bos_token_id(1),
        "forced_eos": jd.forced_eos_token_id(eos),
        "suppress": jd.suppress_tokens([0, 9]),
        "begin_suppress": jd.begin_suppress_tokens([3]),
        "decay": jd.exponential_decay_length_penalty((1, 1.5), eos),
        "remove_invalid": jd.remove_invalid_values(),
        "renormalize": jd.renormalize_logits(),
    }


ALL = _all_processors()
WARPER_CHAIN = jd.chain(
    jd.repetition_penalty(1.3),
    jd.frequency_presence_penalty(0.5, 0.5),
    jd.temperature(0.7),
    jd.top_k(8),
    jd.top_p(0.9),
    jd.min_p(0.05),
    jd.typical_p(0.9),
    jd.epsilon_cutoff(1e-3),
    jd.eta_cutoff(1e-3),
    jd.renormalize_logits(),
)


@settings(max_examples=20, deadline=None)
@given(
    x=st.one_of(
        logits_st(),
        tied_logits,
        hnp.arrays(
            np.float32,
            (B, V),
            elements=st.floats(
                width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False
            ),
        ),
    )
)
def test_no_nan_from_finite_input(x):
    ctx = _ctx(max_length=7)  # cur_len 6 = max_length - 1: forced EOS is active
    for name, proc in ALL.items():
        out = run(proc, x, ctx)
        assert not np.any(np.isnan(out)), name
    moderate = np.clip(x, -1e4, 1e4)
    assert not np.any(np.isnan(run(WARPER_CHAIN, moderate, ctx)))


def test_decay_penalty_no_nan_when_factor_overflows():
    """|0| * (factor ** steps - 1) must be 0, also once factor ** steps overflows float32.

    (transformers computes the same 0 * inf = NaN here; the penalty is still 0.) An
    overflowing penalty caps at the largest float32, so EOS becomes certain, not NaN.
    """
    ctx = _ctx(np.zeros((1, 300), np.int32), 10)  # 290 generated tokens, 2 ** 290 > float32 max
    x = np.zeros((1, V), np.float32)
    x[0, 3] = 1.0
    out = run(jd.exponential_decay_length_penalty((0, 2.0), [2, 3]), x, ctx)
    assert not np.any(np.isnan(out)), out
    assert out[0, 2] == 0.0 and out[0, 3] == np.finfo(np.float32).max


# --------------------------------------------------------------------------- #
# Changing a number never recompiles
# --------------------------------------------------------------------------- #


@jax.jit
def _f(processor_chain, logits, ctx):
    return processor_chain(logits, ctx)


def _numeric_chain(t, p, k, mp, typ, eps, eta, rep, freq, pres):
    return jd.chain(
        jd.repetition_penalty(rep),
        jd.frequency_penalty(freq),
        jd.presence_penalty(pres),
        jd.temperature(t),
        jd.top_k(k),
        jd.top_p(p),
        jd.min_p(mp),
        jd.typical_p(typ),
        jd.epsilon_cutoff(eps),
        jd.eta_cutoff(eta),
    )


@pytest.mark.parametrize("per_row", [False, True])
def test_changing_values_does_not_recompile(per_row, rng):
    x = jnp.asarray(rng.normal(size=(B, V)), jnp.float32)
    ctx = _ctx()
    sets = [
        (0.7, 0.9, 10, 0.05, 0.95, 1e-3, 1e-3, 1.2, 0.1, 0.2),
        (1.3, 0.5, 3, 0.2, 0.5, 0.02, 0.05, 0.8, -1.0, 1.5),
        (0.2, 1.0, 16, 0.0, 0.99, 0.1, 0.2, 2.0, 2.0, -2.0),
    ]
    if per_row:
        sets = [
            tuple(np.full(B, v, np.int32 if isinstance(v, int) else np.float32) for v in s)
            for s in sets
        ]
    _f(_numeric_chain(*sets[0]), x, ctx).block_until_ready()
    with count_compiles() as c:
        outs = [np.asarray(_f(_numeric_chain(*s), x, ctx)) for s in sets[1:]]
    assert c.count == 0
    assert not np.array_equal(outs[0], outs[1])  # the values did reach the program
    # The counter does see a compilation when the structure changes.
    with count_compiles() as c:
        _f(jd.chain(_numeric_chain(*sets[0]), jd.top_k(sets[0][2], min_tokens_to_keep=2)), x, ctx)
    assert c.count >= 1


def test_process_logits_does_not_recompile_on_new_values(rng):
    scores = rng.normal(size=(B, V)).astype(np.float32)
    ids = rng.integers(0, V, size=(B, 6))

    def config(t, p, k, mp, typ, eps, eta, rep, freq, pres, lp):
        return jd.GenerationConfig(
            do_sample=True,
            temperature=t,
            top_p=p,
            top_k=k,
            min_p=mp,
            typical_p=typ,
            epsilon_cutoff=eps,
            eta_cutoff=eta,
            repetition_penalty=rep,
            frequency_penalty=freq,
            presence_penalty=pres,
            length_penalty=lp,
            no_repeat_ngram_size=2,
            eos_token_id=2,
            min_new_tokens=1,
            max_new_tokens=10,
        )

    first = config(0.7, 0.9, 10, 0.05, 0.95, 1e-3, 1e-3, 1.2, 0.1, 0.2, 1.0)
    jd.process_logits(scores, ids, first, prompt_length=4).block_until_ready()
    outs = []
    with count_compiles() as c:
        for values in [
            (1.3, 0.5, 3, 0.2, 0.5, 0.02, 0.05, 0.8, -1.0, 1.5, 0.5),
            (0.4, 0.99, 50, 0.01, 0.9, 1e-4, 1e-4, 3.0, 2.0, -2.0, 2.0),
        ]:
            outs.append(
                np.asarray(jd.process_logits(scores, ids, config(*values), prompt_length=4))
            )
    assert c.count == 0
    assert not np.array_equal(outs[0], outs[1])


# --------------------------------------------------------------------------- #
# Factories reject bad values, naming the parameter and the value
# --------------------------------------------------------------------------- #

BAD_FACTORY_CALLS = [
    (lambda: jd.temperature(0), "temperature", "0"),
    (lambda: jd.temperature(-1.0), "temperature", "-1.0"),
    (lambda: jd.temperature(float("nan")), "temperature", "nan"),
    (lambda: jd.temperature(True), "temperature", "True"),
    (lambda: jd.temperature([[1.0]]), "temperature", "(1, 1)"),
    (lambda: jd.temperature(np.array([1.0, 0.5, -2.0])), "temperature", "-2."),
    (lambda: jd.top_k(0), "top_k", "0"),
    (lambda: jd.top_k(-1), "top_k", "-1"),
    (lambda: jd.top_k(2.5), "top_k", "2.5"),
    (lambda: jd.top_k(float("nan")), "top_k", "nan"),
    (lambda: jd.top_k([3, 0, 5]), "top_k", "[3, 0, 5]"),
    (lambda: jd.top_k(100, method="fast", max_k=64), "top_k", "100"),
    (lambda: jd.top_k(5, method="slow"), "method", "slow"),
    (lambda: jd.top_k(5, min_tokens_to_keep=0), "min_tokens_to_keep", "0"),
    (lambda: jd.top_p(0), "top_p", "0"),
    (lambda: jd.top_p(1.5), "top_p", "1.5"),
    (lambda: jd.top_p(float("nan")), "top_p", "nan"),
    (lambda: jd.top_p([0.5, 1.5]), "top_p", "1.5"),
    (lambda: jd.top_p(0.5, method="bisect"), "method", "bisect"),
    (lambda: jd.min_p(-0.1), "min_p", "-0.1"),
    (lambda: jd.min_p(1.1), "min_p", "1.1"),
    (lambda: jd.typical_p(1.0), "typical_p", "1.0"),
    (lambda: jd.typical_p(0.0), "typical_p", "0.0"),
    (lambda: jd.epsilon_cutoff(1.0), "epsilon_cutoff", "1.0"),
    (lambda: jd.epsilon_cutoff(0.0), "epsilon_cutoff", "0.0"),
    (lambda: jd.eta_cutoff(0), "eta_cutoff", "0"),
    (lambda: jd.eta_cutoff(float("inf")), "eta_cutoff", "inf"),
    (lambda: jd.repetition_penalty(0), "repetition_penalty", "0"),
    (lambda: jd.repetition_penalty(float("nan")), "repetition_penalty", "nan"),
    (lambda: jd.repetition_penalty([1.2, -1.0]), "repetition_penalty", "-1.0"),
    (lambda: jd.repetition_penalty(1.2, form="openai"), "form", "openai"),
    (lambda: jd.frequency_penalty(3), "frequency_penalty", "3"),
    (lambda: jd.presence_penalty(-2.5), "presence_penalty", "-2.5"),
    (lambda: jd.frequency_presence_penalty(0.0, 9.0), "presence_penalty", "9.0"),
    (lambda: jd.no_repeat_ngram_size(0), "no_repeat_ngram_size", "0"),
    (lambda: jd.no_repeat_ngram_size(2.0), "no_repeat_ngram_size", "2.0"),
    (lambda: jd.suppress_tokens([]), "suppress_tokens", "[]"),
    (lambda: jd.suppress_tokens([1, -3]), "suppress_tokens", "-3"),
    (lambda: jd.begin_suppress_tokens([1.5]), "begin_suppress_tokens", "1.5"),
    (lambda: jd.bad_words_ids([]), "bad_words_ids", "[]"),
    (lambda: jd.bad_words_ids([[-1]]), "bad_words_ids", "-1"),
    (lambda: jd.bad_words_ids([3, 4]), "bad_words_ids", "[3, 4]"),
    (lambda: jd.sequence_bias({}), "sequence_bias", "{}"),
    (lambda: jd.sequence_bias({(1, -2): 1.0}), "sequence_bias", "-2"),
    (lambda: jd.sequence_bias({(1,): float("nan")}), "sequence_bias", "nan"),
    (lambda: jd.sequence_bias({(1,): "big"}), "sequence_bias", "big"),
    (lambda: jd.min_length(-1, 2), "min_length", "-1"),
    (lambda: jd.min_new_tokens(3, []), "eos_token_id", "[]"),
    (lambda: jd.forced_bos_token_id(-1), "forced_bos_token_id", "-1"),
    (
        lambda: jd.exponential_decay_length_penalty((2, 0.5), 2),
        "exponential_decay_length_penalty",
        "0.5",
    ),
    (
        lambda: jd.exponential_decay_length_penalty((2,), 2),
        "exponential_decay_length_penalty",
        "(2,)",
    ),
]


@pytest.mark.parametrize(
    "call,name,value", BAD_FACTORY_CALLS, ids=[f"{n}={v}" for _, n, v in BAD_FACTORY_CALLS]
)
def test_factory_rejects_bad_values(call, name, value):
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert name in message, message
    assert value.lower() in message.lower(), message


def test_factory_accepts_boundary_values():
    for make in (
        lambda: jd.top_p(1.0),
        lambda: jd.min_p(0.0),
        lambda: jd.min_p(1.0),
        lambda: jd.frequency_penalty(-2.0),
        lambda: jd.top_k(64, method="fast", max_k=64),
        lambda: jd.top_k(np.array([1, V])),
    ):
        assert isinstance(make(), jd.LogitsProcessor)
    assert math.isclose(float(jd.temperature(1e-6).temperature), 1e-6, rel_tol=1e-6)
