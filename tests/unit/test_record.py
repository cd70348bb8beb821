"""The per-token record (`jaxdecode.search.record`) against NumPy: the one place
every decoding path computes a token's log-probability, raw log-probability and
alternatives."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode.search.record import FIELDS, finished, record_fields, token_record


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("mode", ["processed", "raw"])
def test_token_record_matches_numpy(mode):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 11)).astype(np.float32)
    logits = rng.normal(size=(3, 11)).astype(np.float32)
    tokens = np.array([4, 0, 10], np.int32)
    cfg = jd.GenerationConfig(
        output_raw_logprobs=True, logprobs=3, logprobs_mode=mode, output_scores=True
    ).static()
    got = token_record(cfg, jnp.asarray(scores), jnp.asarray(logits), jnp.asarray(tokens))
    assert (
        tuple(got)
        == record_fields(cfg)
        == tuple(f for f in FIELDS if f not in ("logits", "routed_experts"))
    )
    rows = np.arange(3)
    np.testing.assert_allclose(got["token_logprobs"], _log_softmax(scores)[rows, tokens], atol=1e-6)
    np.testing.assert_allclose(
        got["raw_token_logprobs"], _log_softmax(logits)[rows, tokens], atol=1e-6
    )
    source = _log_softmax(logits if mode == "raw" else scores)
    best = np.argsort(-source, axis=-1)[:, :3]
    np.testing.assert_array_equal(got["top_token_ids"], best)
    np.testing.assert_allclose(got["top_logprobs"], np.take_along_axis(source, best, -1), atol=1e-6)
    chex.assert_trees_all_equal(got["scores"], jnp.asarray(scores))


def test_finished_rows_hold_pad_and_zero():
    cfg = jd.GenerationConfig(
        output_raw_logprobs=True, logprobs=2, output_logits=True, output_routed_experts=True
    ).static()
    x = jnp.arange(12.0).reshape(2, 6)
    experts = jnp.arange(8, dtype=jnp.int32).reshape(2, 2, 2)  # [rows, layers, k]
    rec = token_record(cfg, x, x, jnp.array([5, 5], jnp.int32), experts)
    got = finished(rec, jnp.array([False, True]), pad=7)
    np.testing.assert_array_equal(got["routed_experts"], [[[0, 1], [2, 3]], [[-1, -1], [-1, -1]]])
    for name in ("token_logprobs", "raw_token_logprobs", "top_logprobs"):
        np.testing.assert_array_equal(got[name][1], 0)
        np.testing.assert_array_equal(got[name][0], rec[name][0])
    np.testing.assert_array_equal(got["tokens"], [5, 7])
    np.testing.assert_array_equal(got["top_token_ids"][1], [7, 7])
    chex.assert_trees_all_equal(got["logits"], rec["logits"])  # a finished row keeps its logits
    assert got["tokens"].dtype == jnp.int32 and got["top_logprobs"].dtype == jnp.float32
