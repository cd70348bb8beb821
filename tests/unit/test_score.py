"""Sampling for reinforcement learning: `jd.score` reproduces `generate`'s
log-probabilities across the processor matrix (finished rows included), is
differentiable and jittable; `generate`'s log-probability outputs (raw, top-N,
prompt); shared-prefix samples prefill each prompt once and sample what
repeating the prompt samples.

A tiny random GPT-2 (sharpened weights) is the model; several EOS ids make rows
finish early. The transformers comparison lives in `test_score_matches_transformers`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params

V = 64
N = 12
EOS = (1, 2, 3, 4, 5)
PAD = 0
R = 2


@functools.cache
def tiny():
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=V, n_positions=64)
    params = init_params(config, jax.random.key(3))
    params = jax.tree_util.tree_map(lambda x: x * 4.0, params)
    return jd.CausalLM(params=params, decoder=gpt2_decoder(config), config=config)


# Two prompts of 7 columns, the second left-padded by 3.
IDS = np.array([[9, 33, 12, 40, 7, 21, 50], [PAD, PAD, PAD, 17, 8, 60, 30]], np.int32)
MASK = (np.arange(7)[None, :] >= np.array([[0], [3]])).astype(np.int32)

SAMPLE = dict(do_sample=True, num_return_sequences=R)
# Each case is one generate and one score program: the cases combine processors
# (plain greedy is in every case's raw log-probabilities).
MATRIX = {
    "greedy-penalties": dict(repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=3),
    "temperature-top_k-top_p-min_p": dict(SAMPLE, temperature=0.7, top_k=10, top_p=0.8, min_p=0.05),
    "typical-epsilon-eta": dict(
        SAMPLE, typical_p=0.95, epsilon_cutoff=0.005, eta_cutoff=0.01, top_k=0
    ),
    "frequency-presence-repetition": dict(
        SAMPLE, frequency_penalty=0.6, presence_penalty=0.4, repetition_penalty=1.2, top_k=20
    ),
    "rules": dict(
        SAMPLE,
        forced_eos_token_id=3,
        exponential_decay_length_penalty=(3, 1.5),
        suppress_tokens=[6],
        begin_suppress_tokens=[7],
        sequence_bias={(8, 9): 2.0},
        bad_words_ids=[[10, 11]],
        top_k=0,
    ),
    "per-row-renormalize": dict(
        SAMPLE, temperature=[0.5, 1.5], top_k=5, remove_invalid_values=True, renormalize_logits=True
    ),
}


def _config(options: dict) -> jd.GenerationConfig:
    return jd.GenerationConfig(
        max_new_tokens=N, eos_token_id=list(EOS), pad_token_id=PAD, **options
    ).validate(vocab_size=V)


def _per_sequence(config: jd.GenerationConfig, rows: int) -> jd.GenerationConfig:
    """Per-prompt values repeated for the R sequences of each prompt, as `score`
    takes one value per sequence row."""
    t = np.asarray(config.temperature)
    return config.replace(temperature=np.repeat(t, rows // t.size)) if t.ndim else config


@pytest.mark.parametrize("name", list(MATRIX))
def test_score_reproduces_generate(name):
    lm = tiny()
    config = _config(MATRIX[name])
    out = jd.generate(lm, IDS, MASK, config, key=jax.random.key(11), output_raw_logprobs=True)
    rows = out.sequences.shape[0]
    mask = np.repeat(MASK, rows // 2, axis=0)
    s = jd.score(
        lm, out.sequences, _per_sequence(config, rows), prompt_length=7, attention_mask=mask
    )
    assert s.logprobs.shape == s.raw_logprobs.shape == s.mask.shape == (rows, N)
    # The mask covers exactly the generated tokens (EOS included), 0 after.
    np.testing.assert_array_equal(np.asarray(s.mask).sum(1), np.asarray(out.lengths))
    np.testing.assert_array_equal(np.asarray(s.logprobs)[~np.asarray(s.mask)], 0.0)
    np.testing.assert_allclose(s.logprobs, out.token_logprobs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(s.raw_logprobs, out.raw_token_logprobs, rtol=0, atol=1e-5)


def test_matrix_is_not_vacuous():
    """Rows finish early, and truncation makes processed differ from raw."""
    lm = tiny()
    finished_early = 0
    for name in ("temperature-top_k-top_p-min_p", "rules"):
        out = jd.generate(
            lm, IDS, MASK, _config(MATRIX[name]), key=jax.random.key(11), output_raw_logprobs=True
        )
        finished_early += int(np.sum(np.asarray(out.lengths) < N))
        gap = np.abs(np.asarray(out.token_logprobs) - np.asarray(out.raw_token_logprobs))
        assert gap.max() > 0.1, name
    assert finished_early >= 2


def test_score_is_a_differentiable_jittable_function_of_params():
    """raw_logprobs are the model's log-softmax (one forward pass) and their
    gradient is the same; processed log-probs with a temperature alone are
    log_softmax(logits / T); `score` runs under jit with traced params."""
    lm = tiny()
    config = _config(dict(SAMPLE, temperature=0.5, top_k=0))
    out = jd.generate(lm, IDS, MASK, config, key=jax.random.key(1))
    seqs = out.sequences
    full = np.concatenate([np.repeat(MASK, R, 0), np.ones((2 * R, N), np.int32)], axis=1)

    def direct(params, temperature):
        logits = lm.replace(params=params).logits(seqs, full)[:, 6:-1] / temperature
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, seqs[:, 7:, None], axis=-1)[..., 0]

    @jax.jit
    def ours(params):
        s = jd.score(lm.replace(params=params), seqs, config, prompt_length=7, attention_mask=full)
        return s.logprobs, s.raw_logprobs, s.mask

    logp, raw, mask = ours(lm.params)
    assert bool(np.all(mask)) == bool(np.all(np.asarray(out.lengths) == N))
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(raw)[m], np.asarray(direct(lm.params, 1.0))[m], atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(logp)[m], np.asarray(direct(lm.params, 0.5))[m], atol=1e-5
    )

    weights = jnp.asarray(np.random.default_rng(0).normal(size=m.shape) * m, jnp.float32)
    g_ours = jax.jit(jax.grad(lambda p: jnp.sum(ours(p)[0] * weights)))(lm.params)
    g_ref = jax.grad(lambda p: jnp.sum(direct(p, 0.5) * weights))(lm.params)
    leaves = zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert max(float(jnp.abs(a).max()) for a in jax.tree_util.tree_leaves(g_ours)) > 1e-3


def test_support_size_and_mass():
    """Truncation at temperature 1: processed = raw - log(kept raw mass); the
    kept count is the number of finite processed scores."""
    lm = tiny()
    config = _config(dict(SAMPLE, top_p=0.7, top_k=0))
    out = jd.generate(lm, IDS, MASK, config, key=jax.random.key(5), output_scores=True)
    s = jd.score(
        lm,
        out.sequences,
        config,
        prompt_length=7,
        attention_mask=np.repeat(MASK, R, 0),
        return_support=True,
    )
    m = np.asarray(s.mask)
    lhs = np.asarray(s.logprobs)[m]
    rhs = (np.asarray(s.raw_logprobs) - np.asarray(s.support_logmass))[m]
    np.testing.assert_allclose(lhs, rhs, atol=1e-5)
    kept = np.isfinite(np.asarray(out.scores)).sum(-1)
    np.testing.assert_array_equal(np.asarray(s.support_size)[m], kept[m])
    assert np.asarray(s.support_size)[m].max() < V  # top-p truncated something


def test_score_refuses_bad_input():
    lm = tiny()
    seqs = np.zeros((2, 10), np.int32)
    with pytest.raises(ValueError, match="prompt_length"):
        jd.score(lm, seqs, prompt_length=10)
    with pytest.raises(ValueError, match="attention_mask"):
        jd.score(lm, seqs, prompt_length=4, attention_mask=np.ones((2, 5)))
    with pytest.raises(ValueError, match="sequences"):
        jd.score(lm, seqs + V, prompt_length=4)
    with pytest.raises(ValueError, match="max_length"):
        jd.score(lm, seqs, prompt_length=4, max_new_tokens=3)


# --------------------------------------------------------------------------- #
# generate's log-probability outputs.
# --------------------------------------------------------------------------- #


def test_generate_logprob_outputs():
    lm = tiny()
    config = _config(dict(SAMPLE, top_k=8))
    out = jd.generate(
        lm,
        IDS,
        MASK,
        config,
        key=jax.random.key(2),
        output_scores=True,
        output_logits=True,
        output_raw_logprobs=True,
        logprobs=3,
        prompt_logprobs=2,
    )
    done = np.arange(N)[None, :] >= np.asarray(out.lengths)[:, None]
    tokens = np.asarray(out.sequences)[:, 7:]
    pick = lambda a: np.take_along_axis(a, tokens[..., None], axis=-1)[..., 0]
    raw_all = np.asarray(jax.nn.log_softmax(out.logits, axis=-1))
    proc_all = np.asarray(jax.nn.log_softmax(out.scores, axis=-1))
    np.testing.assert_allclose(out.raw_token_logprobs, np.where(done, 0, pick(raw_all)), atol=1e-6)
    top = np.sort(proc_all, axis=-1)[..., ::-1][..., :3]
    np.testing.assert_allclose(out.top_logprobs, np.where(done[..., None], 0, top), atol=1e-6)
    ids = np.asarray(out.top_token_ids)
    chosen = np.take_along_axis(proc_all, ids, axis=-1)
    np.testing.assert_allclose(chosen[~done], top[~done], atol=1e-6)
    assert np.all(ids[done] == PAD)
    # Where the sampled token is among the top 3, its entry is its token_logprob.
    hit = (ids == tokens[..., None]) & ~done[..., None]
    assert hit.any()
    lp = np.broadcast_to(np.asarray(out.token_logprobs)[..., None], hit.shape)
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[hit], lp[hit], atol=1e-6)

    # Prompt log-probabilities: the model's, from a plain forward pass; one row
    # per returned sequence; 0 on the first real token and on padding.
    logits = np.asarray(lm.logits(IDS, MASK))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    ref = np.zeros((2, 7), np.float32)
    for b, start in enumerate((0, 3)):
        for j in range(start + 1, 7):
            ref[b, j] = logp[b, j - 1, IDS[b, j]]
    np.testing.assert_allclose(out.prompt_logprobs, np.repeat(ref, R, 0), atol=1e-5)
    assert out.prompt_top_logprobs.shape == out.prompt_top_token_ids.shape == (2 * R, 7, 2)
    best = np.argmax(logp[1, 5])
    assert int(out.prompt_top_token_ids[R, 6, 0]) == best
    assert np.all(np.asarray(out.prompt_top_token_ids)[R, :4] == PAD)

    # Off by default: nothing extra is computed or returned.
    plain = jd.generate(lm, IDS, MASK, config, key=jax.random.key(2))
    for name in ("raw_token_logprobs", "top_logprobs", "top_token_ids", "prompt_logprobs"):
        assert getattr(plain, name) is None
    np.testing.assert_array_equal(plain.sequences, out.sequences)


def test_top_logprobs_raw_mode_and_stream():
    lm = tiny()
    config = _config(dict(SAMPLE, top_k=4, logprobs=5, logprobs_mode="raw"))
    out = jd.generate(lm, IDS, MASK, config, key=jax.random.key(4), output_logits=True)
    raw_all = np.asarray(jax.nn.log_softmax(out.logits, axis=-1))
    done = np.arange(N)[None, :] >= np.asarray(out.lengths)[:, None]
    top = np.sort(raw_all, axis=-1)[..., ::-1][..., :5]
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[~done], top[~done], atol=1e-6)
    assert np.all(np.isfinite(np.asarray(out.top_logprobs)))  # raw: beyond the top-4 too
    steps = list(jd.stream(lm, IDS, MASK, config, key=jax.random.key(4)))
    got = np.stack([s.top_token_ids for s in steps], axis=1)
    np.testing.assert_array_equal(got, np.asarray(out.top_token_ids)[:, : len(steps)])


def test_logprob_options_refused_where_they_do_not_apply():
    lm = tiny()
    with pytest.raises(ValueError, match="logprobs"):
        jd.generate(lm, IDS, MASK, _config(dict(num_beams=2, logprobs=2)))
    with pytest.raises(ValueError, match="output_raw_logprobs"):
        jd.generate(lm, IDS, MASK, _config(dict(num_beams=2, output_raw_logprobs=True)))
    with pytest.raises(ValueError, match="logprobs"):
        jd.generate(lm, IDS, MASK, _config(dict(logprobs=-1)))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        jd.generate(lm, IDS, MASK, _config(dict(prompt_logprobs=V + 1)))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        next(jd.stream(lm, IDS, MASK, _config(dict(prompt_logprobs=0))))
    beams = jd.generate(lm, IDS, MASK, _config(dict(num_beams=3, prompt_logprobs=0)))
    plain = jd.generate(lm, IDS, MASK, _config(dict(prompt_logprobs=0)))
    np.testing.assert_array_equal(beams.prompt_logprobs, plain.prompt_logprobs)


# --------------------------------------------------------------------------- #
# Shared-prefix samples.
# --------------------------------------------------------------------------- #


def _recording(decoder: jd.Decoder, calls: list) -> jd.Decoder:
    """The decoder, recording the `[rows, T]` of every model call at trace time."""

    def apply(params, ids, positions, cache, mask):
        calls.append(ids.shape)
        return decoder.apply(params, ids, positions, cache, mask)

    return jd.Decoder(
        init_cache=decoder.init_cache, apply=apply, vocab_size=decoder.vocab_size, name="rec"
    )


@pytest.mark.parametrize("loop", ["scan", "while"])
def test_shared_prefill_samples_what_repeated_prompts_sample(loop):
    """R samples of a prompt prefill it once, and draw the tokens that R copies
    of the prompt draw with R = 1 (row r of either uses `fold_in(key, r)`).

    The log-probabilities agree to float rounding, not bitwise: XLA's matrix
    products round differently for a different number of rows (B vs B * R in the
    prefill)."""
    lm = tiny()
    calls: list = []
    decoder = _recording(lm.decoder, calls)
    config = _config(dict(do_sample=True, top_p=0.9, repetition_penalty=1.1))
    key = jax.random.key(21)
    shared = jd.generate(
        decoder, IDS, MASK, config, params=lm.params, key=key, num_return_sequences=4, loop=loop
    )
    assert calls[0] == (2, 8), calls  # the prompts, once each (bucket 8)
    assert all(c == (8, 1) for c in calls[1:]), calls
    alone = jd.generate(lm, np.repeat(IDS, 4, 0), np.repeat(MASK, 4, 0), config, key=key, loop=loop)
    np.testing.assert_array_equal(shared.sequences, alone.sequences)
    np.testing.assert_array_equal(shared.lengths, alone.lengths)
    np.testing.assert_allclose(shared.token_logprobs, alone.token_logprobs, rtol=0, atol=1e-5)
    if loop == "scan":
        return  # the per-prompt keys below do not depend on the loop: checked once
    # Per-prompt keys: each prompt's R samples are what it samples alone.
    keys = jax.random.split(key, 2)
    both = jd.generate(lm, IDS, MASK, config, key=keys, num_return_sequences=4, loop=loop)
    first = jd.generate(lm, IDS[:1], MASK[:1], config, key=keys[:1], num_return_sequences=4)
    np.testing.assert_array_equal(both.sequences[:4], first.sequences)


def test_score_ends_completions_at_stop_strings():
    """With stop strings, `score`'s mask ends where `generate` stopped."""
    lm = tiny()
    tok = jd.byte_tokenizer()  # ids 48..52 are the bytes "0".."4"
    config = _config(dict(SAMPLE, top_k=0, stop_strings=["0", "1", "2", "3", "4"]))
    out = jd.generate(lm, IDS, MASK, config, key=jax.random.key(8), tokenizer=tok)
    s = jd.score(
        lm, out.sequences, config, prompt_length=7, attention_mask=np.repeat(MASK, R, 0),
        tokenizer=tok,
    )  # fmt: skip
    lengths = np.asarray(out.lengths)
    rows = np.arange(len(lengths))
    last = np.asarray(out.sequences)[rows, 7 + lengths - 1]
    assert np.any((lengths < N) & np.isin(last, np.arange(48, 53)))  # stopped by a stop string
    np.testing.assert_array_equal(np.asarray(s.mask).sum(1), lengths)
    np.testing.assert_allclose(s.logprobs, out.token_logprobs, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- #
# One chain builder: score places the caller's processors and the output
# constraint where generate does (issue 24).
# --------------------------------------------------------------------------- #

BIAS = {(t,): 4.0 for t in b"aeiou "}  # a per-token bias: pushes tokens into the nucleus
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "maxDigits": 2}},
    "required": ["n"],
}
# Rows 0-2 carry one constraint kind each (regex, json_schema, choices), row 3 none.
CONSTRAINED = dict(
    regex=[r"[a-z]{2,6}( [a-z]{2,6}){0,3}\.", None, None, None],
    json_schema=[None, SCHEMA, None, None],
    choices=[None, None, ["light", "darkness", "waters"], None],
)
CHAIN_CASES = {
    # The case (a per-token bias at temperature 0.7, top-k 30, top-p 0.9),
    # with a stateful processor and every constraint kind.
    "sampled": dict(do_sample=True, temperature=0.7, top_k=30, top_p=0.9, **CONSTRAINED),
    "greedy": dict(do_sample=False),
}


@functools.cache
def bundled():
    return jd.from_pretrained("bundled")


@pytest.mark.parametrize("name", list(CHAIN_CASES))
def test_score_places_callers_processors_and_constraints_as_generate(name):
    """`score(...).logprobs` equals `generate(...).token_logprobs` (under jit) with a
    caller's stateless and stateful processors (a bias, a repetition penalty, a
    grammar) and each constraint kind built with the model's tokenizer, greedy
    and sampling."""
    lm = bundled()
    tok = lm.tokenizer
    if name == "sampled":
        processor = jd.chain(jd.sequence_bias(BIAS), jd.repetition_penalty(1.5))
    else:  # a caller's grammar: stateful, its EOS ids from the config
        processor = jd.chain(jd.sequence_bias(BIAS), jd.regex(r"(and|the|of) [a-z]{1,5}", tok))
    texts = ["And God said, ", "And the earth ", "Let there be  ", "In the waters "]
    ids = np.array([tok.encode(t) for t in texts])
    config = lm.generation_config.replace(max_new_tokens=10, **CHAIN_CASES[name])
    out = jd.generate(lm, ids, config=config, key=jax.random.key(4), logits_processor=processor)

    @jax.jit
    def scored(params):
        return jd.score(
            lm.replace(params=params), out.sequences, config, prompt_length=ids.shape[1],
            logits_processor=processor,
        )  # fmt: skip

    s = scored(lm.params)
    np.testing.assert_array_equal(np.asarray(s.mask).sum(1), np.asarray(out.lengths))
    np.testing.assert_allclose(s.logprobs, out.token_logprobs, rtol=0, atol=1e-5)
