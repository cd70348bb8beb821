"""Speculative decoding (`prompt_lookup_num_tokens`, `assistant_model`).

* Greedy: token for token plain greedy's output (and its log-probabilities) for
  every row of a left-padded batch with ragged prompts, for both drafters, with
  history-reading processors (repetition penalty, no-repeat n-grams, min new
  tokens, forced EOS) and two EOS ids; with stop strings on the bundled model.
* Parity: each row equals transformers' `generate(prompt_lookup_num_tokens=...)`
  and `generate(assistant_model=...)` at batch 1 on the same tiny weights (the
  draft model is the target truncated to its first layer, in both libraries).
* Sampling: the joint distribution of the generated tokens equals the target's
  own sampling distribution (computed exactly with `jd.score` over every
  possible continuation): a chi-square test over 4,000 draws from one batched
  call, for prompt lookup, a deliberately bad draft (acceptance ~0.1) and a
  perfect draft (the target itself: acceptance 1), with temperature, top-k and a
  repetition penalty in the chain.

Models are tiny (2 layers, width 32) and each program is compiled once per
module.
"""

from __future__ import annotations

import copy
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.hf_models import make_llama_model, target_and_draft

import jaxdecode as jd

VOCAB = 96
EOS = (2, 59)  # 59: a token row 0 generates mid-sequence
NEW = 14
PROMPTS = [[5, 17, 33, 5, 17, 40, 9], [61, 8, 8, 23], [44, 3, 71, 44, 3, 71, 12, 30, 7]]
GREEDY = dict(
    max_new_tokens=NEW,
    do_sample=False,
    eos_token_id=list(EOS),
    pad_token_id=0,
    repetition_penalty=1.15,
    no_repeat_ngram_size=4,
    min_new_tokens=2,
    forced_eos_token_id=EOS[0],
)
LOOKUP_K, DRAFT_K = 3, 2
# Every optional output, compared with plain decoding's.
OUTPUTS = dict(output_scores=True, output_raw_logprobs=True, logprobs=2, prompt_logprobs=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(jaxdecode target, jaxdecode draft, transformers target, transformers draft)."""
    # Tied embeddings: greedy text repeats runs of tokens (no_repeat_ngram_size
    # breaks them), so lookup drafts are often right and sometimes wrong.
    hf = make_llama_model("llama", seed=3, spread=1.0, vocab_size=VOCAB, tie_word_embeddings=True)
    return target_and_draft(tmp_path_factory, hf)


def _batch():
    width = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def greedy_runs(models):
    lm, draft, _, _ = models
    ids, mask = _batch()
    options = {**GREEDY, **OUTPUTS}
    return {
        "plain": jd.generate(lm, ids, mask, **options),
        "lookup": jd.generate(lm, ids, mask, prompt_lookup_num_tokens=LOOKUP_K, **options),
        "draft": jd.generate(
            lm, ids, mask, assistant_model=draft, num_assistant_tokens=DRAFT_K, **options
        ),
    }


@pytest.mark.parametrize("drafter", ["lookup", "draft"])
def test_greedy_equals_plain_greedy_for_every_row(greedy_runs, drafter):
    plain, spec = greedy_runs["plain"], greedy_runs[drafter]
    np.testing.assert_array_equal(np.asarray(spec.sequences), np.asarray(plain.sequences))
    np.testing.assert_array_equal(np.asarray(spec.lengths), np.asarray(plain.lengths))
    np.testing.assert_allclose(
        np.asarray(spec.token_logprobs), np.asarray(plain.token_logprobs), atol=1e-5
    )
    lengths = np.asarray(plain.lengths)
    for name in ("raw_token_logprobs", "top_logprobs", "prompt_logprobs", "prompt_top_logprobs"):
        np.testing.assert_allclose(
            np.asarray(getattr(spec, name)), np.asarray(getattr(plain, name)), atol=1e-5
        )
    for name in ("top_token_ids", "prompt_top_token_ids"):
        np.testing.assert_array_equal(
            np.asarray(getattr(spec, name)), np.asarray(getattr(plain, name))
        )
    for row, n in enumerate(lengths):  # after its end a row has no scores
        np.testing.assert_allclose(
            np.asarray(spec.scores)[row, :n], np.asarray(plain.scores)[row, :n], atol=1e-4
        )
    assert lengths.min() < NEW, "some row must end with EOS before the limit"
    drafted, accepted = np.asarray(spec.drafted), np.asarray(spec.accepted)
    assert np.all(accepted <= drafted) and accepted.sum() > 0
    assert np.any(accepted < drafted), "some drafts must be rejected (rewind exercised)"


@pytest.mark.parity
@pytest.mark.parametrize("drafter", ["lookup", "draft"])
def test_each_row_equals_transformers_at_batch_1(models, greedy_runs, drafter):
    _, _, hf, hf_draft = models
    ours = greedy_runs[drafter]
    ids, _ = _batch()
    hf_draft = copy.deepcopy(hf_draft)
    hf_draft.generation_config.num_assistant_tokens = DRAFT_K
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    extra = (
        {"prompt_lookup_num_tokens": LOOKUP_K}
        if drafter == "lookup"
        else {"assistant_model": hf_draft}
    )
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), **GREEDY, **extra)[0, len(prompt) :]
        n = int(ours.lengths[row])
        got = np.asarray(ours.sequences)[row, ids.shape[1] : ids.shape[1] + n]
        np.testing.assert_array_equal(got, ref.numpy()[:n])
        assert len(ref) == n or ref[n:].eq(0).all()  # transformers pads after EOS


def test_stop_strings_end_rows_where_plain_decoding_does():
    lm = jd.from_pretrained("bundled")
    texts = ["And God said", "In the beginning God"]
    rows = [lm.tokenizer.encode(t) for t in texts]
    ids, mask = np.zeros((2, 20), np.int32), np.zeros((2, 20), np.int32)
    for i, r in enumerate(rows):
        ids[i, 20 - len(r) :], mask[i, 20 - len(r) :] = r, 1
    options = dict(max_new_tokens=40, do_sample=False, stop_strings=["LORD of"])
    plain = jd.generate(lm, ids, mask, **options)
    spec = jd.generate(lm, ids, mask, prompt_lookup_num_tokens=6, **options)
    np.testing.assert_array_equal(np.asarray(spec.sequences), np.asarray(plain.sequences))
    np.testing.assert_array_equal(np.asarray(spec.lengths), np.asarray(plain.lengths))
    assert np.asarray(plain.lengths).min() < 40, "a stop string must end a row"
    assert np.asarray(spec.accepted).sum() > 0


# --------------------------------------------------------------------------- #
# Sampling: the output distribution is the target's.
# --------------------------------------------------------------------------- #

SMALL_VOCAB = 8
SAMPLE_PROMPT = [4, 5, 6, 7, 0, 1, 2, 3, 4, 5]  # every token: every row finds a match
SAMPLE_NEW = 3
DRAWS = 4000
SAMPLING = dict(
    max_new_tokens=SAMPLE_NEW,
    do_sample=True,
    temperature=1.2,
    top_k=5,
    repetition_penalty=1.4,
    eos_token_id=None,
    pad_token_id=0,
    num_return_sequences=DRAWS,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    hf = make_llama_model("llama", seed=5, spread=1.0, vocab_size=SMALL_VOCAB)
    path = tmp_path_factory.mktemp("small")
    hf.save_pretrained(path)
    return jd.from_pretrained(str(path))


@pytest.fixture(scope="module")
def exact_probs(small):
    """The probability of every continuation under plain sampling, from `jd.score`
    (the processor chain scanned along the tokens): `{tokens: p}`."""
    conts = np.array(list(itertools.product(range(SMALL_VOCAB), repeat=SAMPLE_NEW)), np.int32)
    seqs = np.concatenate([np.tile(SAMPLE_PROMPT, (len(conts), 1)), conts], axis=1)
    config = jd.GenerationConfig(**{**SAMPLING, "num_return_sequences": 1})
    logp = np.asarray(jd.score(small, seqs, config, prompt_length=len(SAMPLE_PROMPT)).logprobs)
    probs = np.exp(logp.astype(np.float64).sum(axis=1))
    assert abs(probs.sum() - 1) < 1e-4
    return {tuple(c): p for c, p in zip(conts.tolist(), probs, strict=True) if p > 0}


def _wilson_hilferty_p001(dof: int) -> float:
    """Upper 0.1% point of the chi-square distribution (Wilson-Hilferty, z = 3.0902)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + 3.0902 * math.sqrt(a)) ** 3


def chi_square_stat(draws: np.ndarray, probs: dict) -> tuple[float, int]:
    """Pearson's statistic of the drawn continuations against `probs`, cells with
    expected count < 5 pooled; inf when a draw has probability 0."""
    counts: dict = {}
    for row in map(tuple, draws.tolist()):
        if row not in probs:
            return math.inf, 1
        counts[row] = counts.get(row, 0) + 1
    n = len(draws)
    stat, dof, pooled_obs, pooled_exp = 0.0, 0, 0, 0.0
    for cell, p in probs.items():
        e, o = n * p, counts.get(cell, 0)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
        else:
            stat, dof = stat + (o - e) ** 2 / e, dof + 1
    if pooled_exp >= 5:
        stat, dof = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, dof + 1
    return stat, dof - 1


def _bad_draft(target: jd.Decoder) -> jd.Decoder:
    """The target with its logits reversed: it proposes what the target rarely picks."""

    def apply(params, ids, positions, cache, mask):
        logits, cache = target.apply(params, ids, positions, cache, mask)
        return -1.5 * logits, cache

    return jd.Decoder(init_cache=target.init_cache, apply=apply, vocab_size=target.vocab_size)


@pytest.mark.parametrize("drafter", ["lookup", "bad", "perfect"])
def test_sampled_distribution_equals_the_target_distribution(small, exact_probs, drafter):
    ids = np.array([SAMPLE_PROMPT], np.int32)
    extra = {
        "lookup": dict(prompt_lookup_num_tokens=2),
        "bad": dict(
            assistant_model=_bad_draft(small.decoder),
            assistant_params=small.params,
            num_assistant_tokens=2,
        ),
        "perfect": dict(assistant_model=small, num_assistant_tokens=2),
    }[drafter]
    out = jd.generate(small, ids, key=jax.random.key(11), **SAMPLING, **extra)
    draws = np.asarray(out.sequences)[:, len(SAMPLE_PROMPT) :]
    assert draws.shape == (DRAWS, SAMPLE_NEW) and np.all(np.asarray(out.lengths) == SAMPLE_NEW)
    rate = float(np.asarray(out.accepted).sum() / np.asarray(out.drafted).sum())
    if drafter == "bad":
        assert rate < 0.2, rate
    elif drafter == "perfect":
        assert rate > 0.999, rate
    else:
        # Both branches of the rule are exercised (~200 acceptances in 8,000 drafts).
        assert 0.01 < rate < 0.95, rate
    stat, dof = chi_square_stat(draws, exact_probs)
    assert dof >= 20
    assert stat < _wilson_hilferty_p001(dof), f"chi2={stat:.1f} (dof {dof}), acceptance {rate}"
    # The token log-probabilities are the target's processed ones, as plain sampling's.
    logp = np.log([exact_probs[tuple(r)] for r in draws[:50].tolist()])
    np.testing.assert_allclose(np.asarray(out.token_logprobs)[:50].sum(1), logp, atol=1e-4)


# --------------------------------------------------------------------------- #
# Refusals, before anything is traced.
# --------------------------------------------------------------------------- #


def test_bad_combinations_are_clear_errors(models, small):
    lm, draft, _, _ = models
    ids = np.array([[5, 6, 7]], np.int32)
    with pytest.raises(ValueError, match="num_beams"):
        jd.generate(lm, ids, num_beams=2, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="num_beams"):
        jd.generate(lm, ids, num_beams=2, assistant_model=draft)
    with pytest.raises(ValueError, match="not both"):
        jd.generate(lm, ids, prompt_lookup_num_tokens=3, assistant_model=draft)
    with pytest.raises(ValueError, match="vocab_size is 8"):
        jd.generate(lm, ids, assistant_model=small)
    with pytest.raises(ValueError, match="assistant_params"):
        jd.generate(lm, ids, assistant_params=draft.params)
    with pytest.raises(ValueError, match="assistant_model"):
        jd.generate(lm, ids, assistant_model=draft.decoder)  # a Decoder needs its params
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be an integer >= 1"):
        jd.generate(lm, ids, prompt_lookup_num_tokens=0)
    with pytest.raises(ValueError, match="num_assistant_tokens must be an integer >= 1"):
        jd.generate(lm, ids, assistant_model=draft, num_assistant_tokens=0)
    with pytest.raises(ValueError, match="stream"):
        next(jd.stream(lm, ids, prompt_lookup_num_tokens=3))
    mesh = jd.make_mesh(data=1, model=1)
    with pytest.raises(ValueError, match="mesh"):
        jd.generate(lm, ids, prompt_lookup_num_tokens=3, mesh=mesh)


def test_prompt_lookup_proposes_the_continuation_of_the_most_recent_match():
    from jaxdecode.search.drafters import PromptLookup

    # Row 0: "7 8" occurs at 1 and at 5; the most recent (5) is followed by 9 4.
    # Row 1: only a 1-gram match ("3" at 2), followed by 6 then periodically 1 3.
    seq = jnp.array([[0, 7, 8, 1, 2, 7, 8, 9, 4, 7, 8], [0, 0, 3, 6, 1, 3, 0, 0, 0, 0, 0]])
    ctx = jd.DecodeContext.from_ids(seq, vocab_size=16, cur_len=jnp.array([11, 6]))
    drafts, found = PromptLookup(k=5, max_ngram=2).propose(ctx)
    assert np.asarray(found).tolist() == [True, True]
    assert np.asarray(drafts).tolist() == [[9, 4, 7, 8, 9], [6, 1, 3, 6, 1]]
