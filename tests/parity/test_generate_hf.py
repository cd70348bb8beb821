"""Live parity of `jaxdecode.generate` with transformers' `GPT2LMHeadModel.generate`.

One tiny random-weight GPT-2 (2 layers, n_embd 32, vocab 100) is built with
`torch.manual_seed`, saved with `save_pretrained` and loaded with
`jaxdecode.from_pretrained`. Its EOS embedding rows (tied with the LM head) are
pushed along the mean final hidden state, so that EOS really wins mid-sequence
for some rows and beams. Each search case runs on the first of a few fixed prompt
sets on which transformers' output is not vacuous (EOS ends rows mid-sequence;
for beam search, changing early_stopping changes the output), and fails when
none is.

* Greedy and beam search: token for token (`sequences`), `sequences_scores`,
  `beam_indices`, per-step processed `scores` and raw `logits`, and per-token
  scores (against `compute_transition_scores`), over a matrix of batch 1 / 3
  (left-padded), num_beams 1 / 2 / 4, length_penalty -1 / 0 / 1 / 2,
  early_stopping True / False / "never", num_return_sequences up to 4, one and
  two EOS ids, no_repeat_ngram_size, repetition_penalty, min_new_tokens, and
  `loop="while"` against `loop="scan"`.
* Sampling: processed scores at every step equal transformers' given the same
  history (both transformers' history and our own, teacher-forced through
  transformers); sampled frequencies from a fixed-logits fake model match the
  softmax of the processed scores (a chi-square test that rejects a wrong
  distribution); beam sampling runs and returns consistent hypotheses.

Random streams differ from torch, so sampled tokens are never compared.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from support import assert_same_scores
from support.hf_models import generate_processors, load_in_jaxdecode, spread_weights

import jaxdecode as jd

pytestmark = pytest.mark.parity

VOCAB = 100
EOS_A, EOS_B = 7, 11
PAD = 98  # not 0: transformers' beam search fills with `pad_token_id or eos[0]`
BOS = 97
PROMPT = 6
NEW = 10
SPREAD = 0.5  # random weights: logits of a few units, argmax far from ties
EOS_SHIFT = 7.0  # raises the EOS logits by ~7 on average (see make_model)
MODEL_SEED = 2

# Raw model outputs (greedy scores are the logits): torch vs XLA float32 noise.
GREEDY_SCORE_ATOL = 1e-5
# Beam "scores" are log_softmax(logits) then processors: values down to about
# -40, where a float32 ulp is 3.8e-6, so a few ulps of noise exceed 1e-5.
BEAM_SCORE_ATOL = 1e-4
LOGITS_ATOL = 1e-4
SEQ_SCORE_ATOL = 1e-4
# Processors alone, on identical inputs.
PROCESSED_ATOL = 1e-5

LENGTH_PENALTIES = (-1.0, 0.0, 1.0, 2.0)
PROMPT_SEEDS = tuple(range(8))


# --------------------------------------------------------------------------- #
# The model and prompts.
# --------------------------------------------------------------------------- #


def make_model(seed: int = MODEL_SEED) -> transformers.GPT2LMHeadModel:
    """A tiny float32 GPT-2 (eager attention) with wide random weights (as in
    tests/support/hf_models.py) and EOS rows biased so that EOS occurs mid-sequence."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=BOS,
        eos_token_id=EOS_A,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    spread_weights(model, SPREAD)
    with torch.no_grad():
        # The LM head is tied to wte: adding s * m / |m|^2 to an EOS row, with m
        # the mean final hidden state, raises that EOS logit by s on average (by
        # more or less depending on the context), so EOS wins at some steps only.
        probe = torch.as_tensor(np.random.default_rng(123).integers(0, 90, (64, 16)))
        hidden = model(
            probe, attention_mask=torch.ones_like(probe), output_hidden_states=True
        ).hidden_states[-1]
        m = hidden.reshape(-1, config.n_embd).mean(0)
        for e in (EOS_A, EOS_B):
            model.transformer.wte.weight[e] += EOS_SHIFT * m / m.dot(m)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, jaxdecode CausalLM) on the same checkpoint."""
    hf = make_model()
    return hf, load_in_jaxdecode(hf, tmp_path_factory.mktemp("gpt2_eos"))


def prompts(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`ids, mask: [batch, PROMPT]`; batch 3 is left-padded with 0, 2 and 4 pads."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 90, (batch, PROMPT)).astype(np.int64)
    mask = np.ones_like(ids)
    if batch > 1:
        for row, pads in enumerate((0, 2, 4)[:batch]):
            ids[row, :pads] = PAD
            mask[row, :pads] = 0
    return ids, mask


# --------------------------------------------------------------------------- #
# Running both.
# --------------------------------------------------------------------------- #


def run_hf(hf, ids, mask, **options):
    with torch.no_grad():
        return hf.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            pad_token_id=PAD,
            bos_token_id=BOS,
            max_new_tokens=NEW,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            **options,
        )


def run_jd(lm, ids, mask, loop="scan", key=None, **options):
    return jd.generate(
        lm,
        ids,
        mask,
        pad_token_id=PAD,
        bos_token_id=BOS,
        max_new_tokens=NEW,
        output_scores=True,
        output_logits=True,
        loop=loop,
        key=key,
        **options,
    )


def _stack(steps) -> np.ndarray:
    """transformers' per-step tuple -> `[rows, steps, V]`."""
    return np.stack([s.float().numpy() for s in steps], axis=1)


def eos_positions(sequences: np.ndarray, eos: tuple[int, ...]) -> list[int]:
    """Per row, the first generated index holding an EOS id (-1: none)."""
    gen = sequences[:, PROMPT:]
    hit = np.isin(gen, eos)
    return [int(np.argmax(r)) if r.any() else -1 for r in hit]


def compare(hf, h, o, ids, options: dict, what: str) -> None:
    """Everything `generate` returns, against transformers' output `h`."""
    beams = options.get("num_beams", 1)
    lp = options.get("length_penalty", 1.0)
    eos = tuple(np.atleast_1d(options["eos_token_id"]).tolist())
    hs = h.sequences.numpy()
    os_ = np.asarray(o.sequences)
    rows = ids.shape[0] * options.get("num_return_sequences", 1)
    assert os_.shape == (rows, PROMPT + NEW), what
    assert hs.shape[0] == rows, what
    width = hs.shape[1]
    np.testing.assert_array_equal(os_[:, :width], hs, err_msg=f"{what}: sequences")
    assert np.all(os_[:, width:] == PAD), f"{what}: columns past transformers' output not pad"

    # Per-step scores and logits, for the steps transformers ran ([rows, steps, V];
    # for beam search the running beams, B * num_beams rows).
    h_scores, h_logits = _stack(h.scores), _stack(h.logits)
    steps = h_scores.shape[1]
    assert steps <= NEW
    o_scores, o_logits = np.asarray(o.scores), np.asarray(o.logits)
    assert o_scores.shape == (ids.shape[0] * beams, NEW, VOCAB), what
    atol = GREEDY_SCORE_ATOL if beams == 1 else BEAM_SCORE_ATOL
    assert_same_scores(o_scores[:, :steps], h_scores, atol=atol)
    np.testing.assert_allclose(o_logits[:, :steps], h_logits, rtol=0, atol=LOGITS_ATOL)

    lengths = np.asarray(o.lengths)
    token_lp = np.asarray(o.token_logprobs)
    if beams == 1:
        pos = eos_positions(hs, eos)
        expected = np.array([p + 1 if p >= 0 else NEW for p in pos])
        np.testing.assert_array_equal(lengths, expected, err_msg=f"{what}: lengths")
        # Our per-token scores are log_softmax(processed)[token].
        trans = hf.compute_transition_scores(h.sequences, h.scores, normalize_logits=True)
        trans = trans.numpy()
        live = np.arange(width - PROMPT)[None, :] < lengths[:, None]
        np.testing.assert_allclose(
            np.where(live, token_lp[:, : width - PROMPT], 0.0),
            np.where(live, trans, 0.0),
            rtol=0,
            atol=LOGITS_ATOL,
            err_msg=f"{what}: token_logprobs",
        )
        assert np.all(token_lp[:, width - PROMPT :] == 0.0)
        return

    np.testing.assert_allclose(
        np.asarray(o.sequences_scores),
        h.sequences_scores.numpy(),
        rtol=0,
        atol=SEQ_SCORE_ATOL,
        err_msg=f"{what}: sequences_scores",
    )
    hb = h.beam_indices.numpy()
    ob = np.asarray(o.beam_indices)
    assert ob.shape == (rows, NEW)
    np.testing.assert_array_equal(ob[:, : hb.shape[1]], hb, err_msg=f"{what}: beam_indices")
    assert np.all(ob[:, hb.shape[1] :] == -1), f"{what}: beam_indices past the end"
    np.testing.assert_array_equal(lengths, (hb >= 0).sum(axis=1), err_msg=f"{what}: lengths")
    # Per-token scores: transformers' transition scores (processed log-probs
    # gathered along beam_indices), and their length-normalised sum.
    trans = hf.compute_transition_scores(h.sequences, h.scores, h.beam_indices).numpy()
    np.testing.assert_allclose(
        token_lp[:, : trans.shape[1]], trans, rtol=0, atol=SEQ_SCORE_ATOL, err_msg=what
    )
    assert np.all(token_lp[:, trans.shape[1] :] == 0.0)
    np.testing.assert_allclose(
        token_lp.sum(axis=1) / lengths.astype(np.float64) ** lp,
        np.asarray(o.sequences_scores),
        rtol=0,
        atol=SEQ_SCORE_ATOL,
        err_msg=f"{what}: sum of token scores / length ** length_penalty",
    )


def assert_same_outputs(a, b, steps: int, what: str) -> None:
    """Two `GenerateOutput`s agree (scores for the first `steps` steps only: the
    while loop leaves zeros after it stops)."""
    for name in ("sequences", "lengths", "token_logprobs", "sequences_scores", "beam_indices"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None
            continue
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what}: {name}")
    for name in ("scores", "logits"):
        np.testing.assert_array_equal(
            np.asarray(getattr(a, name))[:, :steps],
            np.asarray(getattr(b, name))[:, :steps],
            err_msg=f"{what}: {name}",
        )


# --------------------------------------------------------------------------- #
# Greedy and beam search: the matrix.
# --------------------------------------------------------------------------- #

ONE_EOS = [EOS_A]
TWO_EOS = [EOS_A, EOS_B]


def _beam(beams, early, eos, nrs, **extra):
    return dict(
        num_beams=beams,
        early_stopping=early,
        eos_token_id=eos,
        num_return_sequences=nrs,
        length_penalty=LENGTH_PENALTIES,
        **extra,
    )


# (name, batch, options, loops). Each case compiles once per loop; a tuple of
# length penalties runs them all (traced values: no recompilation). The beam
# cases cover every value of each axis -- num_beams 2 / 4, early_stopping True /
# False / "never", batch 1 / 3, one / two EOS ids, num_return_sequences 1 to 4 --
# each early_stopping value and each EOS count meeting both beam counts and both
# batch sizes, every case with length_penalty -1, 0, 1 and 2.
CASES: list[tuple[str, int, dict, tuple[str, ...]]] = [
    ("greedy-b1-eos1", 1, dict(eos_token_id=ONE_EOS), ("scan",)),
    ("greedy-b3-eos2", 3, dict(eos_token_id=TWO_EOS), ("scan", "while")),
    ("greedy-b3-ngram2", 3, dict(eos_token_id=ONE_EOS, no_repeat_ngram_size=2), ("scan",)),
    ("greedy-b3-rep1.5", 3, dict(eos_token_id=TWO_EOS, repetition_penalty=1.5), ("scan",)),
    ("greedy-b1-min_new5", 1, dict(eos_token_id=TWO_EOS, min_new_tokens=5), ("scan",)),
    ("beam2-es_True-b3-eos2-nrs1", 3, _beam(2, True, TWO_EOS, 1), ("scan",)),
    ("beam2-es_False-b1-eos2-nrs2", 1, _beam(2, False, TWO_EOS, 2), ("scan",)),
    ("beam2-es_never-b1-eos1-nrs2", 1, _beam(2, "never", ONE_EOS, 2), ("scan", "while")),
    ("beam4-es_True-b1-eos1-nrs4", 1, _beam(4, True, ONE_EOS, 4), ("scan", "while")),
    ("beam4-es_False-b3-eos1-nrs3", 3, _beam(4, False, ONE_EOS, 3), ("scan",)),
    ("beam4-es_never-b3-eos2-nrs2", 3, _beam(4, "never", TWO_EOS, 2), ("scan",)),
    ("beam4-b3-ngram2", 3, _beam(4, False, TWO_EOS, 3, no_repeat_ngram_size=2), ("scan",)),
    ("beam4-b3-rep1.5", 3, _beam(4, "never", TWO_EOS, 2, repetition_penalty=1.5), ("scan",)),
    ("beam4-b3-min_new5", 3, _beam(4, True, ONE_EOS, 3, min_new_tokens=5), ("scan",)),
]


# For early_stopping=X, the values whose output must differ from X's (each for
# some length penalty): the stopping rule under test matters.
_EARLY_ALTERNATIVES = {True: (False,), False: (True, "never"), "never": (False,)}


def _signature(h) -> tuple:
    return h.sequences.numpy().tobytes(), np.round(h.sequences_scores.numpy(), 5).tobytes()


def reference_runs(hf, batch: int, options: dict, penalties) -> tuple:
    """transformers' outputs, one per length penalty, for the first prompt set (of
    PROMPT_SEEDS) on which the case is not vacuous:

    * EOS ends some returned row before the last step in every run, and at a
      step >= 1 in at least one (EOS handling, padding, finished beams);
    * beam search: the output with each other early_stopping value of
      `_EARLY_ALTERNATIVES` differs for some length penalty.

    The choice depends on transformers' output only."""
    eos = tuple(options["eos_token_id"])
    beams = options.get("num_beams", 1)
    for seed in PROMPT_SEEDS:
        ids, mask = prompts(batch, seed)
        runs, ok, mid = [], True, False
        pending = set() if beams == 1 else set(_EARLY_ALTERNATIVES[options["early_stopping"]])
        for lp in penalties:
            opts = dict(options, length_penalty=lp) if beams > 1 else options
            h = run_hf(hf, ids, mask, do_sample=False, **opts)
            pos = eos_positions(h.sequences.numpy(), eos)
            ok &= any(0 <= p <= NEW - 2 for p in pos)
            mid |= any(1 <= p <= NEW - 2 for p in pos)
            runs.append((lp, opts, h))
            if not ok:
                break
            for other in sorted(pending, key=str):
                alt = run_hf(hf, ids, mask, do_sample=False, **dict(opts, early_stopping=other))
                if _signature(alt) != _signature(h):
                    pending.discard(other)
        if ok and mid and not pending:
            return ids, mask, runs
    raise AssertionError(f"no prompt set in {PROMPT_SEEDS} makes this case non-vacuous: {options}")


@pytest.mark.parametrize("name, batch, options, loops", CASES, ids=[c[0] for c in CASES])
def test_search_matches_transformers(models, name, batch, options, loops):
    hf, lm = models
    options = dict(options)
    penalties = options.pop("length_penalty", (1.0,))
    ids, mask, runs = reference_runs(hf, batch, options, penalties)
    for lp, opts, h in runs:
        what = f"{name} length_penalty={lp}"
        outs = {loop: run_jd(lm, ids, mask, loop=loop, **opts) for loop in loops}
        for loop, o in outs.items():
            compare(hf, h, o, ids, opts, f"{what} loop={loop}")
        if "while" in outs:
            assert_same_outputs(outs["while"], outs["scan"], len(h.scores), what)


# --------------------------------------------------------------------------- #
# Sampling: processed scores given the same history.
# --------------------------------------------------------------------------- #

SAMPLE_OPTIONS = dict(
    do_sample=True,
    temperature=0.7,
    top_k=20,
    top_p=0.9,
    repetition_penalty=1.2,
    min_new_tokens=3,
    eos_token_id=TWO_EOS,
)


def sample_config(**options) -> jd.GenerationConfig:
    return jd.GenerationConfig(
        max_new_tokens=NEW, pad_token_id=PAD, bos_token_id=BOS, **{**SAMPLE_OPTIONS, **options}
    )


def hf_processors(hf, options: dict, ids: np.ndarray, mask: np.ndarray):
    """The LogitsProcessorList transformers' `generate` builds for `options` and
    this prompt (as in tests/parity/test_processors_hf.py: defaults, special tokens and
    lengths prepared as `generate` prepares them)."""
    options = dict(options, max_new_tokens=NEW, pad_token_id=PAD, bos_token_id=BOS)
    return generate_processors(hf, options, ids, mask)


def hf_forward_logits(hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' one-pass logits, position ids from the mask as in generate."""
    positions = np.asarray(jd.positions_from_mask(mask), np.int64)
    with torch.no_grad():
        out = hf(
            torch.from_numpy(np.array(ids, np.int64)),
            attention_mask=torch.from_numpy(np.array(mask, np.int64)),
            position_ids=torch.from_numpy(positions),
        )
    return out.logits.float().numpy()


def test_sampling_scores_match_on_transformers_history(models):
    """Each step of transformers' own sampling run: our processors on its raw
    logits and its history give its processed scores."""
    hf, _ = models
    ids, mask = prompts(3, 0)
    torch.manual_seed(0)
    h = run_hf(hf, ids, mask, **SAMPLE_OPTIONS)
    seqs = h.sequences.numpy()
    assert len(h.scores) >= 4, "transformers stopped too early to compare much"
    config = sample_config()
    for t, (logits, scores) in enumerate(zip(h.logits, h.scores, strict=True)):
        ref = scores.numpy()
        ours = jd.process_logits(
            logits.numpy(),
            seqs[:, : PROMPT + t],
            config,
            prompt_length=PROMPT,
            attention_mask=mask,
        )
        assert_same_scores(np.asarray(ours), ref, atol=PROCESSED_ATOL)
        # Not vacuous: top-k / top-p removed tokens, and at most 20 survive.
        kept = np.isfinite(ref).sum(axis=1)
        assert np.all((kept >= 1) & (kept <= 20)), kept
        if t < 3:  # min_new_tokens: both EOS ids banned
            assert np.all(np.isneginf(ref[:, TWO_EOS]))


def test_sampling_own_history_matches_transformers(models):
    """Our own sampling run, replayed through transformers: raw logits by teacher
    forcing on our history, processed scores by transformers' processors."""
    hf, lm = models
    ids, mask = prompts(3, 0)
    o = run_jd(lm, ids, mask, key=jax.random.key(0), **SAMPLE_OPTIONS)
    seqs = np.asarray(o.sequences)
    assert seqs.shape == (3, PROMPT + NEW)
    np.testing.assert_array_equal(seqs[:, :PROMPT], ids)
    # Generated tokens (pad after EOS included) are fed with mask 1, as in generate.
    full_mask = np.concatenate([mask, np.ones((3, NEW), mask.dtype)], axis=1)
    ref_logits = hf_forward_logits(hf, seqs[:, :-1], full_mask[:, :-1])[:, PROMPT - 1 :]
    ours_logits = np.asarray(o.logits)
    assert ours_logits.shape == (3, NEW, VOCAB)
    np.testing.assert_allclose(ours_logits, ref_logits, rtol=0, atol=LOGITS_ATOL)

    chain = hf_processors(hf, SAMPLE_OPTIONS, ids, mask)
    names = [type(p).__name__ for p in chain]
    for expected in ("RepetitionPenalty", "MinNewTokens", "Temperature", "TopK", "TopP"):
        assert any(n.startswith(expected) for n in names), names
    ours_scores = np.asarray(o.scores)
    for t in range(NEW):
        ref = chain(
            torch.from_numpy(np.array(seqs[:, : PROMPT + t], np.int64)),
            torch.from_numpy(np.array(ours_logits[:, t])),
        ).numpy()
        assert_same_scores(ours_scores[:, t], ref, atol=PROCESSED_ATOL)
        # The sampled token was allowed (never a removed one), and after a row's
        # EOS only pad follows.
        token = seqs[:, PROMPT + t]
        done = np.isin(seqs[:, PROMPT : PROMPT + t], TWO_EOS).any(axis=1)
        assert np.all(np.where(done, token == PAD, np.isfinite(ref[np.arange(3), token])))


# --------------------------------------------------------------------------- #
# Sampling: the distribution, on a model with fixed logits.
# --------------------------------------------------------------------------- #

FAKE_VOCAB = 8
FAKE_LOGITS = np.array([2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -2.5], np.float32)
FAKE_ROWS, FAKE_STEPS = 4000, 5  # 20,000 independent draws

# Upper 0.1% points of the chi-square distribution, by degrees of freedom (NIST/
# SEMATECH e-Handbook of Statistical Methods, section 1.3.6.7.4, "Critical
# Values of the Chi-Square Distribution", column 0.001).
CHI2_CRITICAL_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def _fixed_init_cache(batch, max_len, dtype):
    return jnp.zeros((batch,), jnp.int32)


def _fixed_apply(params, ids, positions, cache, attention_mask):
    return jnp.broadcast_to(params["logits"], ids.shape + (FAKE_VOCAB,)), cache


# One Decoder object (hashed by identity): one compilation per configuration.
FIXED_DECODER = jd.Decoder(
    init_cache=_fixed_init_cache, apply=_fixed_apply, vocab_size=FAKE_VOCAB, name="fixed"
)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs`, and its degrees of freedom.

    Categories with probability 0 are left out of the sum; a draw in one of them
    makes the statistic infinite."""
    n = counts.sum()
    support = probs > 0
    if np.any(counts[~support] > 0):
        return math.inf, int(support.sum()) - 1
    expected = n * probs[support]
    assert expected.min() >= 5, "too few draws for the chi-square approximation"
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


@pytest.mark.parametrize(
    "options",
    [dict(temperature=0.7, top_k=5), dict(temperature=0.7, top_k=0, top_p=0.9)],
    ids=["temp0.7-top_k5", "temp0.7-top_p0.9"],
)
def test_sampled_frequencies_match_processed_softmax(options):
    params = {"logits": jnp.asarray(FAKE_LOGITS)}
    ids = np.zeros((FAKE_ROWS, 1), np.int32)
    out = jd.generate(
        FIXED_DECODER,
        ids,
        params=params,
        do_sample=True,
        max_new_tokens=FAKE_STEPS,
        key=jax.random.key(20240611),
        **options,
    )
    tokens = np.asarray(out.sequences)[:, 1:].reshape(-1)
    counts = np.bincount(tokens, minlength=FAKE_VOCAB)
    assert counts.sum() == FAKE_ROWS * FAKE_STEPS

    def processed_probs(**changes) -> np.ndarray:
        config = jd.GenerationConfig(do_sample=True, **{**options, **changes})
        scores = jd.process_logits(FAKE_LOGITS[None], ids[:1], config)
        return _softmax(np.asarray(scores)[0])

    probs = processed_probs()
    assert 3 <= (probs > 0).sum() < FAKE_VOCAB, "the processors must remove some tokens"
    stat, dof = chi_square(counts, probs)
    critical = CHI2_CRITICAL_P001[dof]
    assert stat < critical, f"chi2={stat:.2f} >= {critical} (dof {dof}): {counts} vs {probs}"
    # The same test rejects a wrong distribution: temperature 1 instead of 0.7,
    # and the softmax of the raw logits (no processing at all).
    for name, wrong in (
        ("temperature 1.0", processed_probs(temperature=1.0)),
        ("unprocessed softmax", _softmax(FAKE_LOGITS)),
    ):
        wrong_stat, wrong_dof = chi_square(counts, wrong)
        assert wrong_stat > CHI2_CRITICAL_P001[wrong_dof], f"{name}: chi2={wrong_stat:.2f}"


# --------------------------------------------------------------------------- #
# Beam sampling.
# --------------------------------------------------------------------------- #


def test_beam_sampling_returns_consistent_hypotheses(models):
    hf, lm = models
    ids, mask = prompts(3, 0)
    options = dict(
        num_beams=2,
        do_sample=True,
        temperature=0.7,
        top_k=20,
        eos_token_id=TWO_EOS,
        num_return_sequences=2,
        length_penalty=1.0,
    )
    o = run_jd(lm, ids, mask, key=jax.random.key(1), **options)
    seqs = np.asarray(o.sequences)
    assert seqs.shape == (6, PROMPT + NEW)
    np.testing.assert_array_equal(seqs[:, :PROMPT], np.repeat(ids, 2, axis=0))
    assert np.all((seqs >= 0) & (seqs < VOCAB))
    lengths = np.asarray(o.lengths)
    pos = eos_positions(seqs, tuple(TWO_EOS))
    np.testing.assert_array_equal(lengths, [p + 1 if p >= 0 else NEW for p in pos])
    for row, n in enumerate(lengths):
        assert np.all(seqs[row, PROMPT + n :] == PAD)
        assert not np.isin(seqs[row, PROMPT : PROMPT + n - 1], TWO_EOS).any()
    beam_idx = np.asarray(o.beam_indices)
    live = np.arange(NEW)[None, :] < lengths[:, None]
    batch_of_row = np.repeat(np.arange(3), 2)[:, None] * 2
    assert np.all(np.where(live, (beam_idx >= batch_of_row) & (beam_idx < batch_of_row + 2), 1))
    assert np.all(beam_idx[~live] == -1)
    seq_scores = np.asarray(o.sequences_scores)
    assert np.all(np.isfinite(seq_scores))
    assert np.all(seq_scores[0::2] >= seq_scores[1::2]), "hypotheses best first"
    token_lp = np.asarray(o.token_logprobs)
    assert np.all(np.isfinite(token_lp)) and np.all(token_lp <= 0.0)
    np.testing.assert_allclose(token_lp.sum(axis=1) / lengths, seq_scores, rtol=0, atol=1e-5)
    # The first step's processed scores do not depend on the draws: transformers'.
    torch.manual_seed(0)
    h = run_hf(hf, ids, mask, **options)
    assert_same_scores(np.asarray(o.scores)[:, 0], h.scores[0].numpy(), atol=BEAM_SCORE_ATOL)
