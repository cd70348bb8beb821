"""Choosers: `greedy` and `categorical` (per-row keys), under `jax.jit`."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdecode as jd

B, V = 4, 16


@jax.jit
def _greedy(logits):
    return jd.greedy(logits)


@jax.jit
def _draw(keys, logits):
    return jd.categorical(keys, logits)


@jax.jit
def _draw_row(keys, logits, i):
    """Row i drawn in a batch of 1 (traced i: one compilation for every row)."""
    one = lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1)
    return jd.categorical(one(keys), one(logits))[0]


@jax.jit
def _process(processor, logits, ctx):
    return processor(logits, ctx)


_CTX = jd.DecodeContext.from_ids(np.zeros((B, 2), np.int32), vocab_size=V)


# --------------------------------------------------------------------------- #
# greedy
# --------------------------------------------------------------------------- #


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        (B, V),
        elements=st.sampled_from([-np.inf, -2.0, 0.0, 1.5, 3.0, 3.0, 3.0]),
    )
)
def test_greedy_is_argmax_lowest_index_on_ties(x):
    ours = np.asarray(_greedy(jnp.asarray(x)))
    ref = torch.argmax(torch.from_numpy(x), dim=-1).numpy()
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, ref)
    best = x.max(-1, keepdims=True)
    np.testing.assert_array_equal(ours, np.argmax(x == best, axis=-1))  # first maximum


def test_greedy_ties_explicit():
    x = np.array(
        [[1.0, 5.0, 5.0, 2.0], [7.0, 7.0, 7.0, 7.0], [-np.inf, -np.inf, 0.0, 0.0], [0, 0, 0, 9]],
        np.float32,
    )
    np.testing.assert_array_equal(np.asarray(_greedy(jnp.asarray(x))), [1, 0, 2, 3])
    np.testing.assert_array_equal(torch.argmax(torch.from_numpy(x), -1).numpy(), [1, 0, 2, 3])


# --------------------------------------------------------------------------- #
# categorical: per-row independence
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("key_kind", ["typed", "raw"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_categorical_rows_are_independent(key_kind, seed):
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed) if key_kind == "typed" else jax.random.PRNGKey(seed)
    n = 8
    keys = jd.split_keys(key, n)
    assert keys.shape[0] == n
    logits = (rng.normal(size=(n, V)) * 2).astype(np.float32)
    full = np.asarray(_draw(keys, logits))
    other = (rng.normal(size=(n, V)) * 2).astype(np.float32)
    for i in range(n):
        assert int(_draw_row(keys, logits, i)) == full[i], i
        # Changing every other row's logits does not change row i's draw.
        changed = other.copy()
        changed[i] = logits[i]
        assert np.asarray(_draw(keys, changed))[i] == full[i], i
    # Rows with the same logits but different keys do not all draw alike.
    same = np.zeros((n, V), np.float32)
    assert len(set(np.asarray(_draw(keys, same)).tolist())) > 1


def test_categorical_row_with_few_candidates_draws_alike_beside_any_row():
    """A row with few finite logits (after top-k) draws among its candidates;
    a neighbour with a whole finite vocabulary must not change its path."""
    rng = np.random.default_rng(4)
    vocab = 4 * jd.sampling.SAMPLE_CANDIDATES + 1  # large enough for the candidate path
    keys = jd.split_keys(jax.random.key(5), 2)
    few = np.full((2, vocab), -np.inf, np.float32)
    for row in range(2):
        few[row, rng.choice(vocab, 10, replace=False)] = rng.normal(size=10)
    alone = [int(_draw_row(keys, few, i)) for i in range(2)]
    many = rng.normal(size=(2, vocab)).astype(np.float32)
    for i in range(2):
        mixed = many.copy()
        mixed[i] = few[i]
        assert int(np.asarray(_draw(keys, mixed))[i]) == alone[i]
        # and the row with every logit finite draws as alone too
        assert int(np.asarray(_draw(keys, mixed))[1 - i]) == int(_draw_row(keys, mixed, 1 - i))


def test_categorical_is_deterministic_in_its_key():
    keys = jd.split_keys(jax.random.key(3), B)
    logits = jnp.zeros((B, V), jnp.float32)
    np.testing.assert_array_equal(_draw(keys, logits), _draw(keys, logits))


# --------------------------------------------------------------------------- #
# categorical: never a -inf token
# --------------------------------------------------------------------------- #

N_DRAWS = 4096


@pytest.mark.parametrize("n_finite", [1, 2, 5, V - 1])
def test_categorical_never_draws_neg_inf(n_finite):
    rng = np.random.default_rng(n_finite)
    logits = np.full((N_DRAWS, V), -np.inf, np.float32)
    finite = np.argsort(rng.random((N_DRAWS, V)), -1)[:, :n_finite]
    rows = np.arange(N_DRAWS)[:, None]
    # Finite entries spread widely, including very negative ones.
    logits[rows, finite] = rng.uniform(-80, 10, size=(N_DRAWS, n_finite)).astype(np.float32)
    draws = np.asarray(_draw(jd.split_keys(jax.random.key(n_finite), N_DRAWS), logits))
    assert np.all(np.isfinite(logits[np.arange(N_DRAWS), draws]))


# --------------------------------------------------------------------------- #
# categorical: chi-square goodness of fit
# --------------------------------------------------------------------------- #

P8 = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
N_CHI = 20_000
# Critical value of the chi-square distribution with 8 - 1 = 7 degrees of freedom
# at upper-tail probability 0.001 (standard chi-square table: df = 7, p = 0.001
# -> 24.322). A correct sampler exceeds it with probability 0.1%; keys are fixed,
# so the test is deterministic.
CHI2_CRIT_DF7_P001 = 24.322


def _chi2(counts, probs):
    expected = counts.sum() * np.asarray(probs, np.float64)
    return float(((counts - expected) ** 2 / expected).sum())


def _counts(logits, seed):
    keys = jd.split_keys(jax.random.key(seed), N_CHI)
    draws = np.asarray(_draw(keys, jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N_CHI, 8))))
    return np.bincount(draws, minlength=8)


@pytest.mark.parametrize("seed", [0, 1])
def test_categorical_chi_square_fits_and_can_fail(seed):
    counts = _counts(np.log(P8), seed)
    assert counts.sum() == N_CHI
    assert _chi2(counts, P8) < CHI2_CRIT_DF7_P001
    # The same statistic rejects wrong distributions, clearly: two tokens swapped,
    # uniform, and a near miss (0.02 of mass moved between two tokens).
    swapped = P8[[1, 0, 2, 3, 4, 5, 6, 7]]
    uniform = np.full(8, 1 / 8)
    near = P8 + np.array([-0.02, 0, 0, 0, 0, 0, 0, 0.02])
    for wrong in (swapped, uniform, near):
        assert _chi2(counts, wrong) > 3 * CHI2_CRIT_DF7_P001, wrong


def test_categorical_chi_square_after_temperature():
    """Sampling the processed scores draws from softmax(log p / T) ~ p ** (1 / T)."""
    logits = jnp.asarray(np.broadcast_to(np.log(P8), (B, 8)), jnp.float32)
    ctx = jd.DecodeContext.from_ids(np.zeros((B, 2), np.int32), vocab_size=8)
    scaled = np.asarray(_process(jd.temperature(0.5), logits, ctx))[0]
    want = P8**2 / (P8**2).sum()
    counts = _counts(scaled, 7)
    assert _chi2(counts, want) < CHI2_CRIT_DF7_P001
    assert _chi2(counts, P8) > 3 * CHI2_CRIT_DF7_P001


@pytest.mark.parametrize("n_finite", [8, jd.sampling.SAMPLE_CANDIDATES + 1])
def test_categorical_chi_square_large_vocab(n_finite):
    """A 1000-token vocabulary with 8 finite tokens (drawn among `lax.top_k`
    candidates) or 65 (drawn over the whole row): the same distribution."""
    rng = np.random.default_rng(n_finite)
    vocab = 1000
    where = rng.choice(vocab, n_finite, replace=False)
    row = np.full(vocab, -np.inf, np.float32)
    # 8 tokens carry P8 (up to a factor); the other finite ones are negligible.
    row[where[:8]] = np.log(P8)
    row[where[8:]] = -60.0
    keys = jd.split_keys(jax.random.key(n_finite), N_CHI)
    draws = np.asarray(_draw(keys, jnp.broadcast_to(jnp.asarray(row), (N_CHI, vocab))))
    assert np.all(np.isin(draws, where[:8]))
    counts = np.array([np.sum(draws == w) for w in where[:8]])
    assert _chi2(counts, P8) < CHI2_CRIT_DF7_P001
    assert _chi2(counts, P8[::-1]) > 3 * CHI2_CRIT_DF7_P001


# --------------------------------------------------------------------------- #
# sampling after truncation never draws a removed token
# --------------------------------------------------------------------------- #

REPEAT = 256


@settings(max_examples=25, deadline=None)
@given(
    x=hnp.arrays(np.float32, (B, V), elements=st.floats(-8, 8, width=32)),
    k=st.integers(1, V),
    p=st.floats(0.05, 1.0),
    method=st.sampled_from(["exact", "fast"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sampling_after_top_k_top_p_never_draws_removed(x, k, p, method, seed):
    for processor in (
        jd.top_k(k, method=method),
        jd.top_p(p, method=method),
        jd.chain(jd.temperature(0.7), jd.top_k(k, method=method), jd.top_p(p, method=method)),
    ):
        out = _process(processor, jnp.asarray(x), _CTX)
        kept = np.isfinite(np.asarray(out))
        tiled = jnp.repeat(out, REPEAT, axis=0)
        draws = np.asarray(_draw(jd.split_keys(jax.random.key(seed), B * REPEAT), tiled))
        rows = np.repeat(np.arange(B), REPEAT)
        assert np.all(kept[rows, draws])
