"""Live parity: jaxdecode's processors against transformers' own, on the same inputs.

Our side runs through `jaxdecode.process_logits` (which jits internally) and through
the processor called inside this module's own `jax.jit` on a
`DecodeContext.from_ids(...)` whose buffer also holds bucket-padding columns before
the history (`offset`) and unfilled columns after it; `GenerationConfig` chains also
run as a decoding loop reaches them (context from the prompt, then one `append` per
generated token). Every path must equal transformers: identical -inf masks and
finite values within 1e-6 (`assert_same_scores`). transformers' chains come from
`model._get_logits_processor` of a tiny GPT-2, prepared as `generate` prepares them.
Frequency/presence penalties and the CTRL repetition penalty, which transformers
lacks, are checked against NumPy.

Numeric hyper-parameters are pytree leaves, so each test loops over its values
inside one compilation; shapes are few and small.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from support import assert_same_scores, count_compiles
from support.hf_models import generate_processors
from transformers.generation import logits_process as hf

import jaxdecode as jd

pytestmark = pytest.mark.parity

NEG_INF = -math.inf
ATOL = 1e-6
HIST = 16  # columns of history in the random cases


# --------------------------------------------------------------------------- #
# Helpers.
# --------------------------------------------------------------------------- #


def hf_apply(processors, input_ids, scores) -> np.ndarray:
    """transformers' processors (one or a list) applied to float32 scores."""
    if not isinstance(processors, (list, tuple)):
        processors = [processors]
    chain = hf.LogitsProcessorList(processors)
    with torch.no_grad():
        out = chain(
            torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            torch.tensor(np.asarray(scores, np.float32)),
        )
    return out.numpy()


LEAD, JUNK = 2, 3  # bucket-padding columns before, unused columns after, in the jit path
JIT_PATH = f"jit(from_ids with {LEAD} bucket columns before and {JUNK} unused columns after)"


@jax.jit
def _direct(processor, scores, ids, prompt_length, max_length, attention_mask, lead, junk):
    """The processor under a user's own jit, on a context built by `from_ids`.

    The buffer is laid out as in `generate`: `lead` bucket-padding columns first
    (`offset`, masked out), then the history, then `junk` columns past `cur_len`
    that are not filled yet. Processors must see neither.
    """
    mask = jnp.concatenate([jnp.zeros_like(lead), attention_mask], axis=1)
    ctx = jd.DecodeContext.from_ids(
        jnp.concatenate([lead, ids], axis=1),
        vocab_size=scores.shape[-1],
        prompt_length=prompt_length,
        max_length=max_length,
        attention_mask=mask,
        offset=lead.shape[1],
    )
    ctx = ctx.replace(sequences=jnp.concatenate([ctx.sequences, junk], axis=1))
    return processor(scores, ctx)


def ours(
    processor,
    scores,
    input_ids,
    *,
    prompt_length=None,
    attention_mask=None,
    max_length=None,
    jit: bool = True,
) -> dict[str, np.ndarray]:
    """Our scores through `process_logits` and (with `jit`) through a user-side `jax.jit`.

    `processor` is a LogitsProcessor or a `jaxdecode.GenerationConfig`. A bare
    processor in `process_logits` always means `max_length = length + 1`, so with
    another `max_length` only the jit path runs.
    """
    scores = np.asarray(scores, np.float32)
    ids = np.asarray(input_ids)
    batch, length = ids.shape
    prompt = length if prompt_length is None else prompt_length
    out = {}
    if isinstance(processor, jd.GenerationConfig) or max_length is None:
        out["process_logits"] = jd.process_logits(
            scores, ids, processor, prompt_length=prompt_length, attention_mask=attention_mask
        )
    if not jit:
        return {k: np.asarray(v) for k, v in out.items()}
    if isinstance(processor, jd.GenerationConfig):
        max_length = processor.resolve_max_length(prompt)
        processor = jd.logits_processor(processor)
    mask = np.ones((batch, prompt), np.int32) if attention_mask is None else attention_mask
    rng = np.random.default_rng(length)
    out[JIT_PATH] = _direct(
        processor,
        jnp.asarray(scores),
        jnp.asarray(ids, jnp.int32),
        jnp.int32(prompt),
        jnp.int32(length + 1 if max_length is None else max_length),
        jnp.asarray(mask, jnp.int32),
        jnp.asarray(rng.integers(0, scores.shape[-1], (batch, LEAD)), jnp.int32),
        jnp.asarray(rng.integers(0, scores.shape[-1], (batch, JUNK)), jnp.int32),
    )
    return {k: np.asarray(v) for k, v in out.items()}


def check(
    ref: np.ndarray, outs: dict[str, np.ndarray], atol: float = ATOL, what: str = "", rtol=0.0
) -> None:
    assert outs
    for path, got in outs.items():
        try:
            assert_same_scores(got, ref, atol, rtol)
        except AssertionError as e:
            raise AssertionError(f"{what} via {path}: {e}") from None


def compare(ours_proc, hf_procs, scores, input_ids, *, atol=ATOL, what="", **kwargs) -> None:
    ref = hf_apply(hf_procs, input_ids, scores)
    check(ref, ours(ours_proc, scores, input_ids, **kwargs), atol, what)


# --------------------------------------------------------------------------- #
# Inputs.
# --------------------------------------------------------------------------- #

# (batch, vocab, scale); the seed is the index. Two shapes only, so that each
# processor compiles twice per path.
CASES = [(1, 50, 1.0), (1, 50, 10.0), (4, 1000, 1.0), (4, 1000, 10.0)]


def random_case(i: int) -> tuple[np.ndarray, np.ndarray]:
    batch, vocab, scale = CASES[i]
    rng = np.random.default_rng(1000 + i)
    scores = (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)
    # Draw the history from a few dozen ids so that tokens repeat.
    ids = rng.integers(0, 40, (batch, HIST))
    return scores, ids


def random_cases():
    """Yields (label, scores, ids). Tests loop over the cases themselves, so that a
    processor's compilations stay in one pytest-xdist worker."""
    for i, (b, v, s) in enumerate(CASES):
        yield f"b{b}-v{v}-x{s:g}", *random_case(i)


def adversarial_case(vocab: int, *, ties: bool, huge: bool) -> tuple[np.ndarray, np.ndarray]:
    """Four rows (seven when vocab <= 16) with -inf entries and, optionally, huge
    values (±1e30, whose neighbours' probabilities underflow to a tied 0) and
    tied logits."""
    rng = np.random.default_rng(77 + vocab)
    rows = []
    r = rng.standard_normal(vocab) * 3  # many -inf entries
    r[rng.random(vocab) < 0.4] = NEG_INF
    r[2] = 5.0
    rows.append(r)
    r = rng.standard_normal(vocab) * 10  # one huge value, one huge negative
    r[[1, 4]] = NEG_INF
    if huge:
        r[3], r[0] = 1e30, -1e30
    rows.append(r)
    if ties:
        rows.append(rng.integers(-3, 4, vocab).astype(np.float64))  # ties everywhere
    else:
        rows.append(rng.standard_normal(vocab) * 2)
    r = np.full(vocab, NEG_INF)  # only a handful of finite values
    r[[2, 5, 7]] = [1.0, 3.0, -2.0]
    if huge and ties:
        r[[9, 11]] = 1e30  # a tied huge pair
    rows.append(r)
    if vocab <= 16:
        rows.append(rng.standard_normal(vocab) * 5)
        rows.append(np.zeros(vocab) if ties else np.arange(vocab) * 0.5)  # uniform
        r = rng.standard_normal(vocab)
        r[6] = -1e30 if huge else -50.0
        rows.append(r)
    scores = np.stack(rows).astype(np.float32)
    ids = rng.integers(0, min(vocab, 12), (scores.shape[0], HIST))
    return scores, ids


# --------------------------------------------------------------------------- #
# One table for the processors that need no special setup:
# (name, ours(value), transformers(value), values, ties)
#
# `ties` says which tied inputs give transformers a defined answer:
#   "any":  the result does not depend on how ties are ordered;
#   "sort": it depends on torch.sort's order, which is stable up to 16 entries
#           only, so ties (including probabilities underflowing to a tied 0 next
#           to a huge logit, which matter with min_tokens_to_keep > 1) are
#           compared at vocab 16 only;
#   "none": torch.topk's order among ties is unspecified at any size (min-p's
#           min_tokens_to_keep), or our documented sort-free top-p keeps every
#           tie at the boundary: no ties.
# --------------------------------------------------------------------------- #

EOS2 = [2, 5]

SPECS = [
    ("temperature", jd.temperature, hf.TemperatureLogitsWarper, [0.3, 0.7, 1.0, 1.3, 2.0], "any"),
    ("top_h", jd.top_h, lambda h: hf.TopHLogitsWarper(top_h=h), [0.05, 0.3, 0.7, 0.95], "none"),
    ("top_k-exact", jd.top_k, hf.TopKLogitsWarper, [1, 2, 7, 40, 60], "any"),
    (
        "top_k-exact-keep3",
        lambda k: jd.top_k(k, min_tokens_to_keep=3),
        lambda k: hf.TopKLogitsWarper(k, min_tokens_to_keep=3),
        [1, 2, 7],
        "any",
    ),
    (
        "top_k-fast",
        lambda k: jd.top_k(k, method="fast", max_k=64),
        hf.TopKLogitsWarper,
        [1, 2, 7, 40, 60],
        "any",
    ),
    (
        "top_k-fast-keep3",
        lambda k: jd.top_k(k, min_tokens_to_keep=3, method="fast"),
        lambda k: hf.TopKLogitsWarper(k, min_tokens_to_keep=3),
        [1, 2, 30],
        "any",
    ),
    ("top_p-exact", jd.top_p, hf.TopPLogitsWarper, [0.05, 0.3, 0.75, 0.95, 1.0], "sort"),
    (
        "top_p-exact-keep3",
        lambda p: jd.top_p(p, min_tokens_to_keep=3),
        lambda p: hf.TopPLogitsWarper(p, min_tokens_to_keep=3),
        [0.01, 0.5, 0.9],
        "sort",
    ),
    (
        "top_p-fast",  # p = 1.0: test_top_p_fast_with_p_one_removes_nothing
        lambda p: jd.top_p(p, method="fast"),
        hf.TopPLogitsWarper,
        [0.05, 0.3, 0.75, 0.95, 0.99],
        "none",
    ),
    (
        "top_p-fast-keep3",
        lambda p: jd.top_p(p, min_tokens_to_keep=3, method="fast"),
        lambda p: hf.TopPLogitsWarper(p, min_tokens_to_keep=3),
        [0.01, 0.5, 0.9],
        "none",
    ),
    ("min_p", jd.min_p, hf.MinPLogitsWarper, [0.0, 0.05, 0.2, 0.9, 1.0], "any"),
    (
        "min_p-keep3",
        lambda v: jd.min_p(v, min_tokens_to_keep=3),
        lambda v: hf.MinPLogitsWarper(v, min_tokens_to_keep=3),
        [0.05, 0.9],
        "none",
    ),
    ("typical_p", jd.typical_p, hf.TypicalLogitsWarper, [0.05, 0.2, 0.5, 0.9, 0.99], "sort"),
    (
        "typical_p-keep3",
        lambda m: jd.typical_p(m, min_tokens_to_keep=3),
        lambda m: hf.TypicalLogitsWarper(m, min_tokens_to_keep=3),
        [0.05, 0.5],
        "sort",
    ),
    ("epsilon_cutoff", jd.epsilon_cutoff, hf.EpsilonLogitsWarper, [1e-4, 3e-3, 0.05, 0.5], "any"),
    (
        "epsilon_cutoff-keep3",
        lambda e: jd.epsilon_cutoff(e, min_tokens_to_keep=3),
        lambda e: hf.EpsilonLogitsWarper(e, min_tokens_to_keep=3),
        [3e-3, 0.5],
        "any",
    ),
    ("eta_cutoff", jd.eta_cutoff, hf.EtaLogitsWarper, [1e-4, 3e-3, 0.05, 0.5], "any"),
    (
        "eta_cutoff-keep3",
        lambda e: jd.eta_cutoff(e, min_tokens_to_keep=3),
        lambda e: hf.EtaLogitsWarper(e, min_tokens_to_keep=3),
        [3e-3, 0.5],
        "any",
    ),
    (
        "repetition_penalty",
        jd.repetition_penalty,
        hf.RepetitionPenaltyLogitsProcessor,
        [0.5, 0.9, 1.2, 2.0],
        "any",
    ),
    (
        "no_repeat_ngram_size-2",
        lambda _: jd.no_repeat_ngram_size(2),
        lambda _: hf.NoRepeatNGramLogitsProcessor(2),
        [None],
        "any",
    ),
    (
        "suppress_tokens",
        jd.suppress_tokens,
        hf.SuppressTokensLogitsProcessor,
        [[1, 3, 7], [0, 49, 2]],
        "any",
    ),
    (
        "min_length",
        lambda n: jd.min_length(n, EOS2),
        lambda n: hf.MinLengthLogitsProcessor(n, EOS2),
        [0, HIST, HIST + 1, 40],
        "any",
    ),
    (
        "min_length-one-eos",
        lambda n: jd.min_length(n, 4),
        lambda n: hf.MinLengthLogitsProcessor(n, 4),
        [HIST, HIST + 1],
        "any",
    ),
    (
        "remove_invalid_values",
        lambda _: jd.remove_invalid_values(),
        lambda _: hf.InfNanRemoveLogitsProcessor(),
        [None],
        "any",
    ),
]
SPEC_IDS = [s[0] for s in SPECS]


def run_spec(spec, scores, ids, label: str) -> None:
    name, make_ours, make_hf, values, _ = spec
    for value in values:
        compare(make_ours(value), make_hf(value), scores, ids, what=f"{label} {name}({value!r})")


def adversarial_inputs(spec):
    """The adversarial cases a spec is held to (see the `ties` policies above)."""
    policy = spec[4]
    for vocab in (16, 1000) if policy == "sort" else (1000,):
        ties = policy == "any" or (policy == "sort" and vocab <= 16)
        huge = ties or "keep" not in spec[0]  # huge logits make tied zero probabilities
        label = f"adversarial-v{vocab}{'-ties' if ties else ''}{'-huge' if huge else ''}"
        yield label, *adversarial_case(vocab, ties=ties, huge=huge)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_processor(spec):
    """Random logits (batch 1 and 4, vocab 50 and 1000, scale 1 and 10), then -inf
    entries, huge values and ties."""
    for label, scores, ids in random_cases():
        run_spec(spec, scores, ids, label)
    for label, scores, ids in adversarial_inputs(spec):
        run_spec(spec, scores, ids, label)


# --------------------------------------------------------------------------- #
# Warpers: adversarial boundaries.
# --------------------------------------------------------------------------- #


def test_top_k_ties_at_boundary_are_kept():
    scores = np.array(
        [
            [3.0, 2.0, 2.0, 2.0, 1.0, 0.0, 2.0, -1.0],
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [NEG_INF, NEG_INF, 0.5, 0.5, NEG_INF, 0.25, NEG_INF, NEG_INF],
            [1e30, 1e30, 1e30, -1e30, 0.0, 0.0, NEG_INF, 1e30],
        ],
        np.float32,
    )
    ids = np.zeros((4, 3), np.int64)
    for k in (1, 2, 3, 4, 5, 8):
        for method in ("exact", "fast"):
            compare(jd.top_k(k, method=method), hf.TopKLogitsWarper(k), scores, ids, what=f"k={k}")
    ref = hf_apply(hf.TopKLogitsWarper(2), ids, scores)
    assert np.isfinite(ref[0]).sum() == 5  # 3 and all four 2s


def _dyadic_rows() -> np.ndarray:
    """Logits whose softmax is exactly 1/2, 1/4, 1/8, 1/8 (or uniform 1/8), permuted."""
    probs = np.array([0.5, 0.25, 0.125, 0.125], np.float32)
    rows = []
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        r = np.full(8, NEG_INF, np.float32)
        r[[0, 2, 5, 7]] = np.log(probs[perm])
        rows.append(r)
    rows.append(np.log(probs[[1, 2, 0, 3]]).tolist() + [NEG_INF] * 4)
    rows.append(np.zeros(8, np.float32))  # uniform: eight ties of 1/8
    return np.asarray(rows, np.float32)


def test_top_h_transformers_unit_values():
    """transformers' test_top_h_dist_warper: probabilities in, the kept ones out."""
    cases = [
        ([0.97, 0.01, 0.01, 0.01], 0.3, [0.97, 0, 0, 0]),
        ([0.4, 0.3, 0.2, 0.1], 0.7, [0.4, 0.3, 0, 0]),
        ([0.25, 0.25, 0.25, 0.25], 1.0, [0.25, 0.25, 0.25, 0.25]),
        ([0.75, 0.25, 0.0, 0.0], 0.4, [0.75, 0, 0, 0]),
    ]
    for probs, h, expected in cases:
        with np.errstate(divide="ignore"):
            logits = np.log(np.asarray([probs], np.float32))
        got = np.exp(np.asarray(jd.process_logits(logits, np.zeros((1, 1), int), jd.top_h(h))))
        np.testing.assert_allclose(got, [expected], rtol=1e-3, atol=1e-3)
    # Per row, one compilation: row 0 keeps 1 token, row 1 all four.
    logits = np.log(np.asarray([[0.4, 0.3, 0.2, 0.1]] * 2, np.float32))
    got = np.asarray(jd.process_logits(logits, np.zeros((2, 1), int), jd.top_h([0.1, 1.0])))
    assert np.isinf(got).sum(axis=1).tolist() == [3, 0]
    with pytest.raises(ValueError, match="top_h"):
        jd.top_h(1.5)
    with pytest.raises(ValueError, match="top_h"):
        jd.GenerationConfig(do_sample=True, top_h=0.0).validate()


def test_top_p_exact_cumulative_probability_at_threshold():
    scores = _dyadic_rows()
    ids = np.zeros((scores.shape[0], 2), np.int64)
    # Preconditions: torch's softmax is exactly dyadic, so the ascending cumulative
    # sums land exactly on 1 - top_p for top_p in {0.5, 0.75, 0.875}.
    probs = torch.tensor(scores).softmax(-1).numpy()
    assert set(np.unique(probs[:4])) <= {0.0, 0.125, 0.25, 0.5}
    assert np.all(probs[4] == 0.125)
    for p in (0.25, 0.5, 0.75, 0.8, 0.875, 0.9, 1.0):
        for keep in (1, 2):
            compare(
                jd.top_p(p, min_tokens_to_keep=keep),
                hf.TopPLogitsWarper(p, min_tokens_to_keep=keep),
                scores,
                ids,
                what=f"top_p={p}, keep={keep}",
            )
    # What transformers does at the boundary: c <= 1 - p is removed, so with
    # p = 0.75 the two 1/8 tokens (c = 1/8, 1/4) go and exactly 0.75 of mass stays.
    ref = hf_apply(hf.TopPLogitsWarper(0.75), ids, scores)
    np.testing.assert_array_equal(np.isfinite(ref[0]), [1, 0, 1, 0, 0, 0, 0, 0])
    # Uniform 1/8 with p = 0.5: the first four in (stable) sort order are removed.
    ref = hf_apply(hf.TopPLogitsWarper(0.5), ids, scores)
    np.testing.assert_array_equal(np.isfinite(ref[4]), [0, 0, 0, 0, 1, 1, 1, 1])


def _top_p_large_vocab_cases():
    """(label, scores [4, 1000], top_p, min_tokens_to_keep, candidate path exact?)."""
    rng = np.random.default_rng(7)
    v = 1000
    after_top_k = np.full((4, v), NEG_INF, np.float32)  # 40 finite, as after top_k(40)
    for r in range(4):
        after_top_k[r, rng.choice(v, 40, replace=False)] = rng.standard_normal(40) * 2
    peaked = (rng.standard_normal((4, v)) * 6).astype(np.float32)  # small nucleus
    flat = (rng.standard_normal((4, v)) * 0.1).astype(np.float32)  # nucleus ~ 900 tokens
    # 200 large distinct values, then 100 tied at 0 across the 256-candidate
    # boundary (kept out of the nucleus: torch's sort orders large ties its own way).
    tied = np.full((4, v), -5.0, np.float32)
    tied[:, :200] = 10 + rng.standard_normal((4, 200))
    tied[:, 200:300] = 0.0
    # 260 finite tokens, the rest -inf: the -inf tie straddles nothing that matters.
    few_finite = np.full((4, v), NEG_INF, np.float32)
    few_finite[:, :200] = rng.standard_normal((4, 200)) * 3
    return [
        ("after top_k", after_top_k, 0.9, 1, True),
        ("after top_k, p=1", after_top_k, 1.0, 1, True),
        ("after top_k, keep 45 > 40 finite", after_top_k, 0.5, 45, False),
        ("peaked", peaked, 0.9, 1, True),
        ("peaked, keep 300 > candidates", peaked, 0.9, 300, False),
        ("flat", flat, 0.9, 1, False),
        ("tie across the boundary", tied, 0.9, 1, False),
        ("few finite", few_finite, 0.95, 3, True),
    ]


def test_top_p_exact_large_vocab_both_paths():
    """Top-p ranks only `lax.top_k` candidates when that is provably the sort's
    mask, else sorts: both paths equal transformers, and each case takes the path
    it was built for."""
    from jaxdecode import sampling

    candidate_check = jax.jit(sampling.top_p_candidates)
    for label, scores, p, keep, want_exact in _top_p_large_vocab_cases():
        ids = np.zeros((scores.shape[0], 2), np.int64)
        cutoff = jnp.full((4, 1), np.float32(1 - np.float64(p)))
        _, exact = candidate_check(jnp.asarray(scores), cutoff, jnp.full((4, 1), keep))
        assert bool(exact) == want_exact, label
        compare(
            jd.top_p(p, min_tokens_to_keep=keep),
            hf.TopPLogitsWarper(p, min_tokens_to_keep=keep),
            scores,
            ids,
            what=label,
        )


def test_top_p_fast_dyadic_without_ties():
    # Exact cumulative sums, but only p whose boundary does not split the 1/8 pair
    # (p = 0.8 or 0.875 would: the sort-free method then keeps both, by design).
    scores = _dyadic_rows()[:4]
    ids = np.zeros((scores.shape[0], 2), np.int64)
    for p in (0.25, 0.5, 0.6, 0.75, 1.0):
        compare(jd.top_p(p, method="fast"), hf.TopPLogitsWarper(p), scores, ids, what=f"p={p}")


def test_top_p_fast_with_p_one_removes_nothing():
    """top_p = 1.0 keeps every token of non-zero probability (transformers removes
    only cumulative sums <= 0), also as one row of a per-row top_p."""
    for label, scores, ids in random_cases():
        compare(jd.top_p(1.0, method="fast"), hf.TopPLogitsWarper(1.0), scores, ids, what=label)
    scores, ids = random_case(3)
    per_row = [0.9, 1.0, 0.5, 1.0]
    ref = np.concatenate(
        [
            hf_apply(hf.TopPLogitsWarper(p), ids[r : r + 1], scores[r : r + 1])
            for r, p in enumerate(per_row)
        ]
    )
    check(ref, ours(jd.top_p(per_row, method="fast"), scores, ids), what="per row")
    cfg = jd.GenerationConfig(do_sample=True, top_k=0, top_p=per_row, top_p_method="fast")
    check(ref, ours(cfg, scores, ids), what="GenerationConfig per row")


# A logit found by scanning float32 values near log(0.2 / 0.9): with [x, 0, 0],
# torch's ascending cumulative softmax at the smallest token is 0.100000016f, which
# lies strictly between float32(1 - 0.9) = 0.1f and float32(1) - float32(0.9).
_TOP_P_GAP_LOGIT = np.float32(-1.5040772)


def test_top_p_threshold_is_one_minus_p_rounded_once():
    """transformers compares with `float32(1 - p)` (1 - p in double, one rounding);
    computing `1 - float32(p)` in float32 moves the threshold by up to a few ulps."""
    scores = np.array([[_TOP_P_GAP_LOGIT, 0.0, 0.0]], np.float32)
    ids = np.zeros((1, 1), np.int64)
    c0 = torch.tensor(scores).sort()[0].softmax(-1).cumsum(-1)[0, 0].item()
    assert np.float32(1 - 0.9) < np.float32(c0) <= np.float32(1) - np.float32(0.9)
    ref = hf_apply(hf.TopPLogitsWarper(0.9), ids, scores)
    assert np.all(np.isfinite(ref))  # transformers keeps all three tokens
    compare(jd.top_p(0.9), hf.TopPLogitsWarper(0.9), scores, ids, what="top_p=0.9")
    compare(jd.top_p([0.9]), hf.TopPLogitsWarper(0.9), scores, ids, what="per row")
    cfg = jd.GenerationConfig(do_sample=True, top_k=0, top_p=0.9)
    check(ref, ours(cfg, scores, ids), what="GenerationConfig")


# --------------------------------------------------------------------------- #
# Penalties.
# --------------------------------------------------------------------------- #


def test_repetition_penalty_left_padding():
    rng = np.random.default_rng(5)
    batch, vocab, prompt = 4, 60, 10
    scores = (rng.standard_normal((batch, vocab)) * 4).astype(np.float32)
    ids = rng.integers(0, 30, (batch, prompt + 3))
    mask = np.ones((batch, prompt), np.int64)
    for row, pad in enumerate((0, 3, 7, 1)):
        mask[row, :pad] = 0
        ids[row, :pad] = 50 + row  # pad ids occur nowhere else: penalised only if not skipped
    start = torch.tensor((mask != 0).argmax(axis=1))
    for penalty in (0.7, 1.3, 2.5):
        compare(
            jd.repetition_penalty(penalty),
            hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=start),
            scores,
            ids,
            prompt_length=prompt,
            attention_mask=mask,
            what=f"penalty={penalty}",
        )
    # The padding really is ignored: without the mask the pad ids get penalised.
    ref = hf_apply(
        hf.RepetitionPenaltyLogitsProcessor(2.5, prompt_ignore_length=start), ids, scores
    )
    assert ref[1, 51] == scores[1, 51]
    unmasked = np.asarray(jd.process_logits(scores, ids, jd.repetition_penalty(2.5)))
    assert unmasked[1, 51] != scores[1, 51]


def test_repetition_penalty_prompt_ignore_length_unit_values():
    """transformers' test_repetition_penalty_dist_process_exclusion_*: ignoring the
    original prompt penalises nothing on it, and the repeats after it as before."""
    vocab = 10
    scores = np.full((2, vocab), 1 / vocab, np.float32)
    scores[0, 0], scores[1, 5] = -(1 / vocab), 4 / vocab
    orig = np.array([[0, 1], [5, 0]])
    proc = jd.repetition_penalty(2.0, prompt_ignore_length=orig.shape[-1])
    np.testing.assert_array_equal(np.asarray(jd.process_logits(scores, orig, proc)), scores)
    cur = np.array([[0, 1, 0, 1], [5, 0, 5, 0]])
    got = np.asarray(jd.process_logits(scores, cur, proc))
    np.testing.assert_allclose(
        [got[0, 0], got[0, 1], got[1, 0], got[1, 5]],
        [-(1 / vocab) * 2, (1 / vocab) / 2, (1 / vocab) / 2, (4 / vocab) / 2],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="prompt_ignore_length"):
        jd.repetition_penalty(1.2, prompt_ignore_length=-1)
    with pytest.raises(ValueError, match="prompt_ignore_length"):
        jd.GenerationConfig(repetition_penalty=1.2, prompt_ignore_length=1.5).validate()


def test_repetition_penalty_prompt_ignore_length_live():
    """One length for all rows (transformers slices the columns) and one per row
    (transformers masks them), on random histories, as a processor and from the
    config; the per-row values are leaves (one compilation for every value)."""
    for label, scores, ids in random_cases():
        batch = ids.shape[0]
        for n in (0, 3, HIST - 1, HIST):
            for penalty in (0.7, 1.5):
                hf_proc = hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=n)
                compare(
                    jd.repetition_penalty(penalty, prompt_ignore_length=n),
                    hf_proc,
                    scores,
                    ids,
                    what=f"{label} n={n}",
                )
                cfg = jd.GenerationConfig(repetition_penalty=penalty, prompt_ignore_length=n)
                check(hf_apply(hf_proc, ids, scores), ours(cfg, scores, ids), what=f"{label} cfg")
        lengths = [(3 * r + 2) % HIST for r in range(batch)]
        hf_proc = hf.RepetitionPenaltyLogitsProcessor(
            1.3, prompt_ignore_length=torch.tensor(lengths)
        )
        compare(
            jd.repetition_penalty(1.3, prompt_ignore_length=lengths),
            hf_proc,
            scores,
            ids,
            what=f"{label} per row {lengths}",
        )


def _seen(ids: np.ndarray, vocab: int, start=None) -> np.ndarray:
    seen = np.zeros((ids.shape[0], vocab), bool)
    for r, row in enumerate(ids):
        seen[r, row[0 if start is None else start[r] :]] = True
    return seen


def test_repetition_penalty_ctrl_form():
    """The CTRL paper's form has no transformers equivalent: NumPy x / θ on seen tokens."""
    for label, scores, ids in random_cases():
        seen = _seen(ids, scores.shape[-1])
        for theta in (0.8, 1.2, 3.0):
            ref = np.where(seen, scores / np.float32(theta), scores).astype(np.float32)
            proc = jd.repetition_penalty(theta, form="ctrl")
            check(ref, ours(proc, scores, ids), what=f"{label} {theta}")
            cfg = jd.GenerationConfig(repetition_penalty=theta, repetition_penalty_form="ctrl")
            check(ref, ours(cfg, scores, ids), what=f"{label} config {theta}")
        # CTRL raises negative logits of seen tokens where transformers lowers them.
        negative_seen = seen & (scores < 0)
        assert negative_seen.any()
        hf_ref = hf_apply(hf.RepetitionPenaltyLogitsProcessor(1.2), ids, scores)
        ctrl = ours(jd.repetition_penalty(1.2, form="ctrl"), scores, ids)["process_logits"]
        assert np.all(ctrl[negative_seen] > hf_ref[negative_seen])


def _counts(generated: np.ndarray, vocab: int) -> np.ndarray:
    counts = np.zeros((generated.shape[0], vocab), np.float32)
    for r, row in enumerate(generated):
        np.add.at(counts[r], row, 1)
    return counts


@pytest.mark.parametrize("prompt_length", [HIST, 10, 0])
def test_frequency_presence_penalty(prompt_length):
    """No transformers equivalent: a NumPy reference over *generated* tokens only."""
    for label, scores, ids in random_cases():
        _check_frequency_presence(label, scores, ids, prompt_length)


def _check_frequency_presence(label, scores, ids, prompt_length):
    counts = _counts(ids[:, prompt_length:], scores.shape[-1])
    for f, p in ((0.5, 0.0), (0.0, 0.7), (0.4, -1.0), (-2.0, 2.0)):
        penalty = np.float32(f) * counts + np.float32(p) * (counts > 0).astype(np.float32)
        ref = (scores - penalty).astype(np.float32)
        procs = [jd.frequency_presence_penalty(f, p)]
        if p == 0.0:
            procs.append(jd.frequency_penalty(f))
        if f == 0.0:
            procs.append(jd.presence_penalty(p))
        for proc in procs:
            out = ours(proc, scores, ids, prompt_length=prompt_length)
            check(ref, out, what=f"{label} f={f} p={p}")
        cfg = jd.GenerationConfig(frequency_penalty=f, presence_penalty=p)
        out = ours(cfg, scores, ids, prompt_length=prompt_length)
        check(ref, out, what=f"{label} config f={f} p={p}")


# --------------------------------------------------------------------------- #
# Sequence bias and bad words.
# --------------------------------------------------------------------------- #


def _bias_history() -> np.ndarray:
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 12, (4, 6))
    ids[0, -2:] = [3, 4]  # row 0 ends with (3, 4)
    ids[1, -1:] = [4]  # row 1 ends with (4,) but not (3, 4)
    ids[2, -3:] = [7, 8, 9]  # row 2 ends with (7, 8, 9)
    ids[3, -1] = 11
    return ids


def test_sequence_bias():
    ids = _bias_history()
    rng = np.random.default_rng(12)
    scores = (rng.standard_normal((4, 50)) * 3).astype(np.float32)
    entries = [
        [[5], 2.5],
        [[6], -1.0],
        [[3, 4, 5], 1.5],  # same last token as a single entry: both add
        [[4, 20], -4.0],
        [[3, 4, 21], 3.0],
        [[7, 8, 9, 22], 7.0],
        [[9, 22], -0.5],  # two entries with the same last token
        [[8, 9], 0.25],
        [[1, 2, 3, 4, 5, 6, 7, 8, 23], 9.0],  # prefix longer than the context
        [[0, 1, 2, 3, 4, 5, 24], 9.0],  # prefix as long as the context (6)
    ]
    for biases in (1.0, -2.0):
        e = [[ids_, b * biases] for ids_, b in entries]
        compare(jd.sequence_bias(e), hf.SequenceBiasLogitsProcessor(e), scores, ids)
        as_dict = {tuple(k): v for k, v in e}
        compare(jd.sequence_bias(as_dict), hf.SequenceBiasLogitsProcessor(e), scores, ids)
    # Short histories: the long prefixes never apply, the short ones still do.
    for length in (1, 2, 3):
        compare(
            jd.sequence_bias(entries),
            hf.SequenceBiasLogitsProcessor(entries),
            scores,
            ids[:, -length:],
            what=f"length {length}",
        )


@pytest.mark.parametrize("eos", [None, 5, [5, 9]], ids=["no-eos", "eos", "two-eos"])
def test_bad_words_ids(eos):
    ids = _bias_history()
    rng = np.random.default_rng(13)
    scores = (rng.standard_normal((4, 50)) * 3).astype(np.float32)
    words = [[5], [9], [1], [3, 4, 12], [4, 13], [8, 9, 14], [5, 9, 15], [2, 3, 4, 5, 6, 7, 8, 16]]
    compare(
        jd.bad_words_ids(words, eos_token_id=eos),
        hf.NoBadWordsLogitsProcessor(words, eos_token_id=eos),
        scores,
        ids,
        what=f"eos={eos}",
    )
    ref = hf_apply(hf.NoBadWordsLogitsProcessor(words, eos_token_id=eos), ids, scores)
    eos_ids = [] if eos is None else np.atleast_1d(eos)
    for t in (5, 9):
        assert np.isfinite(ref[:, t]).all() == (t in eos_ids)


# --------------------------------------------------------------------------- #
# n-grams and lengths.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_size(n):
    rng = np.random.default_rng(20 + n)
    scores = (rng.standard_normal((4, 16)) * 2).astype(np.float32)
    ids = rng.integers(0, 4, (4, 24))  # four symbols: many repeated n-grams
    ids[0] = np.tile([1, 2, 3], 8)
    ids[1, :] = 0
    ids[2] = np.tile([0, 1, 1, 2, 3, 1], 4)
    proc = jd.no_repeat_ngram_size(n)
    for length in (1, 3, 4, 24):  # shorter than, equal to and longer than n
        compare(
            proc,
            hf.NoRepeatNGramLogitsProcessor(n),
            scores,
            ids[:, :length],
            what=f"n={n} length={length}",
        )
    ref = hf_apply(hf.NoRepeatNGramLogitsProcessor(n), ids, scores)
    assert np.isneginf(ref).any()


def test_min_new_tokens():
    scores, ids = random_case(3)
    for prompt in (0, 5, HIST):
        for m in (0, 1, HIST - prompt, HIST - prompt + 1, 30):
            compare(
                jd.min_new_tokens(m, EOS2),
                hf.MinNewTokensLengthLogitsProcessor(prompt, m, EOS2),
                scores,
                ids,
                prompt_length=prompt,
                what=f"prompt={prompt} min_new_tokens={m}",
            )


def test_forced_bos_token_id():
    scores, ids = random_case(1)
    for length in (1, 2, 5):
        for bos in (0, 7):
            compare(
                jd.forced_bos_token_id(bos),
                hf.ForcedBOSTokenLogitsProcessor(bos),
                scores,
                ids[:, :length],
                what=f"length={length} bos={bos}",
            )


@pytest.mark.parametrize("eos", [3, [3, 7]], ids=["one-eos", "two-eos"])
def test_forced_eos_token_id(eos):
    scores, ids = random_case(3)
    length = ids.shape[1]
    for max_length in (length, length + 1, length + 2):
        # process_logits with a config (which carries max_length) and the processor
        # under jit with the same max_length in the context.
        ref = hf_apply(hf.ForcedEOSTokenLogitsProcessor(max_length, eos), ids, scores)
        cfg = jd.GenerationConfig(forced_eos_token_id=eos, max_length=max_length)
        check(ref, ours(cfg, scores, ids, prompt_length=4), what=f"max_length={max_length}")
        proc = jd.forced_eos_token_id(eos)
        check(ref, ours(proc, scores, ids, max_length=max_length), what=f"max_length={max_length}")
    # A bare processor in process_logits means "the next token is the last one".
    ref = hf_apply(hf.ForcedEOSTokenLogitsProcessor(length + 1, eos), ids, scores)
    check(ref, ours(jd.forced_eos_token_id(eos), scores, ids))


def test_suppress_and_begin_suppress_tokens():
    scores, ids = random_case(2)
    tokens = [0, 4, 9]
    for prompt in (HIST - 1, HIST):  # the first generated step is cur_len == prompt
        compare(
            jd.begin_suppress_tokens(tokens),
            hf.SuppressTokensAtBeginLogitsProcessor(tokens, prompt),
            scores,
            ids,
            prompt_length=prompt,
            what=f"prompt={prompt}",
        )
        compare(
            jd.chain(jd.suppress_tokens([1, 2]), jd.begin_suppress_tokens(tokens)),
            [
                hf.SuppressTokensLogitsProcessor([1, 2]),
                hf.SuppressTokensAtBeginLogitsProcessor(tokens, prompt),
            ],
            scores,
            ids,
            prompt_length=prompt,
        )


@pytest.mark.parametrize("prompt", [1, 3])
def test_forced_bos_then_begin_suppress(prompt):
    """transformers starts begin-suppression one step later after a 1-token prompt
    when a BOS is forced; generate computes begin_index that way."""
    scores, ids = random_case(1)
    begin_index = prompt if prompt > 1 else prompt + 1
    tokens = [7, 3]
    for length in (prompt, prompt + 1, prompt + 2):
        compare(
            jd.chain(
                jd.forced_bos_token_id(7), jd.begin_suppress_tokens(tokens, after_forced_bos=True)
            ),
            [
                hf.ForcedBOSTokenLogitsProcessor(7),
                hf.SuppressTokensAtBeginLogitsProcessor(tokens, begin_index),
            ],
            scores,
            ids[:, :length],
            prompt_length=prompt,
            what=f"prompt={prompt} length={length}",
        )


@pytest.mark.parametrize("eos", [2, [2, 5]], ids=["one-eos", "two-eos"])
def test_exponential_decay_length_penalty(eos):
    # Factors whose powers are exact in float32; see the next test for the others.
    for label, scores, ids in random_cases():
        _check_decay(label, scores, ids, eos, ((0, 1.5), (2, 1.5), (3, 1.25), (1, 2.0)))


def test_exponential_decay_length_penalty_inexact_factor():
    """transformers computes `factor ** n - 1` in float64 (Python) and rounds once;
    with logits of scale 10 a float32 power of a rounded factor is off by > 1e-6."""
    for label, scores, ids in random_cases():
        _check_decay(label, scores, ids, [2, 5], ((3, 1.1), (0, 1.01), (1, 1.3)))


def _check_decay(label, scores, ids, eos, start_and_factors):
    scores = scores.copy()
    scores[:, 2] = -np.abs(scores[:, 2])  # a negative EOS logit is raised too
    if scores.shape[0] > 1:
        scores[1, 5] = NEG_INF  # a -inf EOS stays -inf
    for prompt in (HIST, 12, 6):
        for start, factor in start_and_factors:
            compare(
                jd.exponential_decay_length_penalty((start, factor), eos),
                hf.ExponentialDecayLengthPenalty((start, factor), eos, prompt),
                scores,
                ids,
                prompt_length=prompt,
                what=f"{label} prompt={prompt} start={start} factor={factor}",
            )


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"b{b}-v{v}-x{s:g}" for b, v, s in CASES])
def test_renormalize_logits(index):
    """log_softmax of the processed scores. XLA's exp/log round differently from
    torch's in the last bit, so log-probs of magnitude |x| are compared within one
    float32 ulp of |x| (1e-6 below |x| = 8; about 4e-6 at |x| = 40), a tolerance
    no other implementation could beat; everything else is exact."""
    scores, ids = random_case(index)
    ref = hf_apply([hf.LogitNormalization()], ids, scores)
    finite = np.isfinite(ref)
    ulp = float(np.max(np.spacing(np.abs(ref[finite]).astype(np.float32)), initial=0.0))
    atol = max(ATOL, ulp)
    compare(jd.renormalize_logits(), hf.LogitNormalization(), scores, ids, atol=atol)
    cfg = jd.GenerationConfig(renormalize_logits=True, do_sample=True, top_k=7)
    ref = hf_apply([hf.TopKLogitsWarper(7), hf.LogitNormalization()], ids, scores)
    check(ref, ours(cfg, scores, ids), atol=atol, what="after top-k")


def test_renormalize_logits_adversarial():
    """Log-probabilities down to about -30 (and ±1e30 rows), where one float32 ulp
    is 2e-6: an absolute 1e-6 asked for bit-equality with torch's rounding, which
    differs between CPUs (AMD EPYC: torch 1.2e-6 from the float64 value, ours
    2.7e-7, 1.4e-6 apart). So: within 4 ulps (relative) of transformers, and of the
    exact float64 log-softmax."""
    scores, ids = adversarial_case(1000, ties=True, huge=True)
    rtol = 4 * np.finfo(np.float32).eps
    ref = hf_apply(hf.LogitNormalization(), ids, scores)
    got = ours(jd.renormalize_logits(), scores, ids)
    check(ref, got, rtol=rtol)
    x = scores.astype(np.float64)
    top = x.max(-1, keepdims=True)
    exact = x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))
    check(exact, got, rtol=rtol, what="against the float64 log-softmax")


def test_remove_invalid_values_nan_and_infinities():
    scores = np.array(
        [
            [np.nan, 1.0, np.inf, NEG_INF, 1e30, -1e30, 0.0, np.nan],
            [np.inf, np.inf, np.nan, 2.0, -3.0, NEG_INF, NEG_INF, 1.0],
        ],
        np.float32,
    )
    ids = np.zeros((2, 1), np.int64)
    compare(jd.remove_invalid_values(), hf.InfNanRemoveLogitsProcessor(), scores, ids)
    cfg = jd.GenerationConfig(remove_invalid_values=True, do_sample=True, temperature=0.5, top_k=3)
    ref = hf_apply(
        [hf.InfNanRemoveLogitsProcessor(), hf.TemperatureLogitsWarper(0.5), hf.TopKLogitsWarper(3)],
        ids,
        scores,
    )
    check(ref, ours(cfg, scores, ids))


# --------------------------------------------------------------------------- #
# The full GenerationConfig path against transformers' _get_logits_processor.
# --------------------------------------------------------------------------- #

PROMPT = 8
VOCAB = 64


@functools.cache
def tiny_model(vocab: int) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=vocab,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def hf_generate_processors(options: dict, prompt_ids: np.ndarray, mask: np.ndarray):
    """The LogitsProcessorList `generate` builds for `options`, prepared as generate does
    (global defaults such as top_k=50 filled in, special tokens, lengths)."""
    return generate_processors(tiny_model(VOCAB), options, prompt_ids, mask)


COMBOS = {
    "greedy-rep-ngram-min_new": dict(
        repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5, eos_token_id=3
    ),
    "sample-temp-topk-topp": dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    "sample-default-top_k-50": dict(do_sample=True),
    "sample-min_p": dict(do_sample=True, min_p=0.1, top_k=0, temperature=1.5),
    "sample-typical": dict(do_sample=True, typical_p=0.8, repetition_penalty=0.9),
    "sample-epsilon": dict(do_sample=True, epsilon_cutoff=3e-3, top_k=0, temperature=0.5),
    "sample-eta": dict(do_sample=True, eta_cutoff=3e-3, top_k=30, repetition_penalty=1.1),
    "greedy-badwords-bias-suppress": dict(
        bad_words_ids=[[3], [5], [9, 10], [2, 4, 6]],
        sequence_bias=[[[7], 2.5], [[1, 8], -3.0], [[4, 4, 11], 4.0], [[4, 11], 1.0]],
        suppress_tokens=[0, 12],
        begin_suppress_tokens=[13, 14],
        eos_token_id=3,
        remove_invalid_values=True,  # turns the bad words' -inf into the lowest float
    ),
    "beam-sample-two-eos": dict(
        num_beams=3,
        do_sample=True,
        eos_token_id=[3, 7],
        top_k=2,  # < min_tokens_to_keep = 1 + 2 EOS ids
        top_p=0.3,
        min_p=0.5,
        temperature=0.9,
        renormalize_logits=True,
    ),
    "forced-eos-decay-min_length": dict(
        max_new_tokens=7,  # EOS is forced after 6 generated tokens
        forced_eos_token_id=3,
        eos_token_id=[3, 6],
        exponential_decay_length_penalty=(1, 1.5),
        min_length=PROMPT + 5,
        repetition_penalty=1.2,
    ),
}


def combo_inputs(generated: int, seed: int):
    rng = np.random.default_rng(seed)
    batch = 3
    ids = rng.integers(0, 16, (batch, PROMPT + generated))
    mask = np.ones((batch, PROMPT), np.int64)
    for row, pad in enumerate((0, 2, 5)):
        mask[row, :pad] = 0
        ids[row, :pad] = 40  # a pad id found nowhere else
    ids[0, -1:] = [1]  # sequence_bias (1, 8) applies
    ids[1, -2:] = [4, 4]  # (4, 4, 11) and (4, 11) apply
    ids[2, -1:] = [9]  # bad word (9, 10) applies
    scores = (rng.standard_normal((batch, VOCAB)) * 3).astype(np.float32)
    return scores, ids, mask


GEN_MAX = 8


@jax.jit
def _decode_loop(processor, scores, prompt, mask, generated, num_generated, max_length, junk):
    """The step as a decoding loop reaches it: a context built once from the prompt in
    a buffer with room, then one `append` per generated token; unfilled columns hold
    junk. The processor state is built once from the prompt (`init`) and updated
    per token (`update`), as the loops do."""
    ctx = jd.DecodeContext.from_ids(
        prompt,
        vocab_size=scores.shape[-1],
        max_length=max_length,
        attention_mask=mask,
    )
    ctx = ctx.replace(sequences=jnp.concatenate([ctx.sequences, junk], axis=1))
    state = processor.init(ctx)

    def step(i, carry):
        c, s = carry
        return c.append(generated[:, i]), processor.update(s, generated[:, i])

    ctx, state = jax.lax.fori_loop(0, num_generated, step, (ctx, state))
    return processor(scores, ctx, state)


@pytest.mark.parametrize("name", list(COMBOS))
def test_generation_config_matches_generate_processors(name):
    options = dict(COMBOS[name])
    options.setdefault("max_new_tokens", 10)
    cfg = jd.GenerationConfig(**options)
    processor = jd.logits_processor(cfg)
    for generated in (0, 6):  # the first step, and one after six generated tokens
        scores, ids, mask = combo_inputs(generated, seed=len(name) + generated)
        hf_chain = hf_generate_processors(options, ids[:, :PROMPT], mask)
        ref = hf_apply(list(hf_chain), ids, scores)
        names = [type(p).__name__ for p in hf_chain]
        # process_logits, then the chain as a decoding loop reaches this step (the
        # from_ids-in-jit path is covered processor by processor above).
        outs = ours(cfg, scores, ids, prompt_length=PROMPT, attention_mask=mask, jit=False)
        rng = np.random.default_rng(generated)
        padded = np.concatenate(
            [ids[:, PROMPT:], rng.integers(0, VOCAB, (len(ids), GEN_MAX - generated))], axis=1
        )
        outs["jit(from_ids(prompt) + append per generated token)"] = _decode_loop(
            processor,
            jnp.asarray(scores),
            jnp.asarray(ids[:, :PROMPT], jnp.int32),
            jnp.asarray(mask, jnp.int32),
            jnp.asarray(padded, jnp.int32),
            jnp.int32(generated),
            jnp.int32(cfg.resolve_max_length(PROMPT)),
            jnp.asarray(rng.integers(0, VOCAB, (len(ids), GEN_MAX)), jnp.int32),
        )
        check(
            ref,
            {k: np.asarray(v) for k, v in outs.items()},
            what=f"{name} generated={generated} {names}",
        )


def _config_vs_generate(options: dict, generated: int) -> None:
    scores, ids, mask = combo_inputs(generated, seed=generated)
    hf_chain = hf_generate_processors(options, ids[:, :PROMPT], mask)
    ref = hf_apply(list(hf_chain), ids, scores)
    outs = ours(
        jd.GenerationConfig(**options), scores, ids, prompt_length=PROMPT, attention_mask=mask
    )
    check(ref, outs, what=f"{options} generated={generated} {[type(p).__name__ for p in hf_chain]}")


def test_generation_config_min_new_tokens_takes_precedence_over_min_length():
    """generate sets `min_length = prompt length + min_new_tokens` when min_new_tokens
    is given, whatever min_length says (with a warning)."""
    options = dict(min_length=PROMPT + 10, min_new_tokens=2, eos_token_id=3, max_new_tokens=10)
    for generated in (0, 6):  # EOS banned at the first step only
        _config_vs_generate(options, generated)


def test_generation_config_default_max_length_is_twenty_new_tokens():
    """With max_length and max_new_tokens unset, generate allows 20 *new* tokens
    (`max_length = 20 + prompt length`, within n_positions), so a forced EOS comes
    at prompt + 19, not at total length 19."""
    options = dict(forced_eos_token_id=3)
    # An explicit max_length is a total length, as in transformers.
    _config_vs_generate(dict(options, max_length=20), 19 - PROMPT)
    _config_vs_generate(options, 19 - PROMPT)


def test_generation_config_min_tokens_to_keep_matches_transformers():
    for options, keep in (
        (dict(do_sample=True), 1),
        (dict(do_sample=True, num_beams=2), 2),
        (dict(do_sample=True, num_beams=2, eos_token_id=4), 2),
        (dict(do_sample=True, num_beams=4, eos_token_id=[3, 7, 9]), 4),
    ):
        prompt = np.zeros((1, PROMPT), np.int64)
        hf_chain = hf_generate_processors(options, prompt, np.ones_like(prompt))
        top_k = [p for p in hf_chain if isinstance(p, hf.TopKLogitsWarper)]
        assert top_k[0].min_tokens_to_keep == keep
        assert jd.GenerationConfig(**options).min_tokens_to_keep() == keep


# --------------------------------------------------------------------------- #
# Per-row parameters.
# --------------------------------------------------------------------------- #

ROW_TEMPERATURE = [0.5, 1.0, 1.7, 0.8]
ROW_TOP_K = [3, 50, 1, 20]
ROW_TOP_P = [0.9, 0.5, 1.0, 0.75]
ROW_TOP_P_FAST = [0.9, 0.5, 0.99, 0.75]  # p = 1.0: test_top_p_fast_with_p_one_removes_nothing
ROW_PENALTY = [1.0, 1.3, 0.8, 2.0]


def _per_row_reference(make_hf_chain, scores, ids) -> np.ndarray:
    return np.concatenate(
        [hf_apply(make_hf_chain(r), ids[r : r + 1], scores[r : r + 1]) for r in range(len(scores))]
    )


def test_per_row_parameters():
    rng = np.random.default_rng(31)
    scores = (rng.standard_normal((4, 1000)) * 3).astype(np.float32)
    ids = rng.integers(0, 40, (4, HIST))
    singles = [
        (
            jd.temperature(ROW_TEMPERATURE),
            lambda r: [hf.TemperatureLogitsWarper(ROW_TEMPERATURE[r])],
        ),
        (jd.top_k(ROW_TOP_K), lambda r: [hf.TopKLogitsWarper(ROW_TOP_K[r])]),
        (jd.top_k(ROW_TOP_K, method="fast"), lambda r: [hf.TopKLogitsWarper(ROW_TOP_K[r])]),
        (jd.top_p(ROW_TOP_P), lambda r: [hf.TopPLogitsWarper(ROW_TOP_P[r])]),
        (
            jd.top_p(ROW_TOP_P_FAST, method="fast"),
            lambda r: [hf.TopPLogitsWarper(ROW_TOP_P_FAST[r])],
        ),
        (
            jd.repetition_penalty(ROW_PENALTY),
            lambda r: [hf.RepetitionPenaltyLogitsProcessor(ROW_PENALTY[r])],
        ),
    ]
    for proc, make_hf in singles:
        ref = _per_row_reference(make_hf, scores, ids)
        check(ref, ours(proc, scores, ids), what=type(proc).__name__)

    def hf_chain(r):
        return [
            hf.RepetitionPenaltyLogitsProcessor(ROW_PENALTY[r]),
            hf.TemperatureLogitsWarper(ROW_TEMPERATURE[r]),
            hf.TopKLogitsWarper(ROW_TOP_K[r]),
            hf.TopPLogitsWarper(ROW_TOP_P[r]),
        ]

    ref = _per_row_reference(hf_chain, scores, ids)
    chain = jd.chain(
        jd.repetition_penalty(ROW_PENALTY),
        jd.temperature(ROW_TEMPERATURE),
        jd.top_k(ROW_TOP_K),
        jd.top_p(ROW_TOP_P),
    )
    check(ref, ours(chain, scores, ids), what="chain")

    # The same through GenerationConfig, against generate's own chain per row.
    options = dict(
        do_sample=True,
        temperature=ROW_TEMPERATURE,
        top_k=ROW_TOP_K,
        top_p=ROW_TOP_P,
        repetition_penalty=ROW_PENALTY,
    )
    cfg = jd.GenerationConfig(**options)
    ref = np.concatenate(
        [
            hf_apply(
                list(
                    hf_generate_processors(
                        {k: (v if k == "do_sample" else v[r]) for k, v in options.items()},
                        ids[r : r + 1],
                        np.ones((1, ids.shape[1]), np.int64),
                    )
                ),
                ids[r : r + 1],
                scores[r : r + 1],
            )
            for r in range(4)
        ]
    )
    check(ref, ours(cfg, scores, ids), what="GenerationConfig per row")

    # New per-row values reuse the compiled program.
    other = jd.GenerationConfig(
        do_sample=True,
        temperature=ROW_TEMPERATURE[::-1],
        top_k=ROW_TOP_K[::-1],
        top_p=ROW_TOP_P[::-1],
        repetition_penalty=ROW_PENALTY[::-1],
    )
    with count_compiles() as compiles:
        jax.block_until_ready(jd.process_logits(scores, ids, other))
    assert compiles.count == 0
