"""`generate`: loop logic, outputs, beam search and compilation behaviour.

Most tests use a fake decoder (T5X-style): its logits are a fixed table lookup
on the last token, `params["table"][token]`, with a trivial cache, so every
expected token, score and beam can be computed by hand or in NumPy. A tiny
random GPT-2 (`GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64,
n_positions=128)`) covers what needs a real model: left padding, prompt buckets,
compilation counts, `jax.jit` and `jax.vmap`.

Every distinct static configuration is one compilation, so the tests share a few
shapes (`N`, `GPT_PROMPTS`, `FAKE_PROMPTS`) on purpose.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import count_compiles

import jaxdecode as jd
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params
from jaxdecode.search import generate_program

N = 6  # max_new_tokens used wherever a test does not need another value
NEG = np.float32(-1.0e9)


# --------------------------------------------------------------------------- #
# The fake decoder.
# --------------------------------------------------------------------------- #


@functools.cache
def fake_decoder(vocab: int) -> jd.Decoder:
    """A `Decoder` whose next-token logits are `params["table"][last token]`.

    The cache counts the tokens seen per row (a pytree with the batch on axis 0,
    so beam search gathers it like any other cache). Cached per vocabulary size:
    a `Decoder` hashes by identity, so one instance means one compilation per
    static configuration across all tests.
    """

    def init_cache(batch, max_len, dtype=None):
        return {"seen": jnp.zeros((batch,), jnp.int32)}

    def apply(params, ids, positions, cache, attention_mask):
        logits = params["table"][ids]  # [B, T, V]
        return logits, {"seen": cache["seen"] + jnp.sum(attention_mask, axis=-1)}

    return jd.Decoder(init_cache=init_cache, apply=apply, vocab_size=vocab, name="fake")


def table_params(table) -> dict:
    return {"table": jnp.asarray(np.asarray(table, np.float32))}


V = 16
# next(t) = (t + 1) % V by a wide margin, plus noise so that the scores are not flat.
CYCLE = np.random.default_rng(1).normal(size=(V, V)).astype(np.float32)
CYCLE[np.arange(V), (np.arange(V) + 1) % V] += 10.0
RANDOM = np.random.default_rng(2).normal(size=(V, V)).astype(np.float32)
FLAT = np.zeros((V, V), np.float32)  # uniform: sampled rows differ

# Four prompts of 3 tokens; the last tokens are 3, 6, 10 and 0.
FAKE_PROMPTS = np.array([[5, 2, 3], [1, 1, 6], [7, 8, 10], [9, 4, 0]])


def fake_generate(table, ids=FAKE_PROMPTS, **kwargs) -> jd.GenerateOutput:
    table = np.asarray(table)
    return jd.generate(fake_decoder(table.shape[-1]), ids, params=table_params(table), **kwargs)


def log_softmax(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_(x) -> np.ndarray:
    return np.asarray(x)


# --------------------------------------------------------------------------- #
# Greedy on the fake decoder: tokens, EOS, pad, lengths, log-probs, shapes.
# --------------------------------------------------------------------------- #


def test_greedy_follows_the_table():
    out = fake_generate(CYCLE, max_new_tokens=N)
    expected = np.array(
        [
            [4, 5, 6, 7, 8, 9],
            [7, 8, 9, 10, 11, 12],
            [11, 12, 13, 14, 15, 0],
            [1, 2, 3, 4, 5, 6],
        ]
    )
    np.testing.assert_array_equal(np_(out.sequences[:, :3]), FAKE_PROMPTS)
    np.testing.assert_array_equal(np_(out.sequences[:, 3:]), expected)
    np.testing.assert_array_equal(np_(out.lengths), [N] * 4)


def test_eos_stops_a_row_and_pads_the_rest():
    out = fake_generate(CYCLE, max_new_tokens=N, eos_token_id=7)
    # pad_token_id unset: transformers pads with the first EOS id.
    expected = np.array(
        [
            [4, 5, 6, 7, 7, 7],
            [7, 7, 7, 7, 7, 7],
            [11, 12, 13, 14, 15, 0],
            [1, 2, 3, 4, 5, 6],
        ]
    )
    np.testing.assert_array_equal(np_(out.sequences[:, 3:]), expected)
    np.testing.assert_array_equal(np_(out.lengths), [4, 1, 6, 6])


def test_several_eos_ids_and_explicit_pad():
    out = fake_generate(CYCLE, max_new_tokens=N, eos_token_id=[12, 5], pad_token_id=15)
    expected = np.array(
        [
            [4, 5, 15, 15, 15, 15],
            [7, 8, 9, 10, 11, 12],
            [11, 12, 15, 15, 15, 15],
            [1, 2, 3, 4, 5, 15],
        ]
    )
    np.testing.assert_array_equal(np_(out.sequences[:, 3:]), expected)
    np.testing.assert_array_equal(np_(out.lengths), [2, 6, 2, 5])
    lp = np_(out.token_logprobs)
    for row, length in enumerate([2, 6, 2, 5]):
        assert np.all(lp[row, :length] < 0.0)
        np.testing.assert_array_equal(lp[row, length:], 0.0)


def _rep_penalty(x: np.ndarray, history, theta: float) -> np.ndarray:
    """transformers' repetition penalty on one row (prompt included)."""
    x = x.astype(np.float32).copy()
    for t in set(int(t) for t in history):
        x[t] = x[t] * theta if x[t] < 0 else x[t] / theta
    return x


def test_scores_logits_and_token_logprobs():
    """Raw logits are the table rows, scores are the processed logits (here a
    repetition penalty), and token_logprobs = log_softmax(scores)[token] while a
    row runs, 0 after."""
    theta = 1.3
    out = fake_generate(
        RANDOM,
        max_new_tokens=N,
        eos_token_id=[3, 11],
        repetition_penalty=theta,
        output_scores=True,
        output_logits=True,
    )
    seqs, lengths = np_(out.sequences), np_(out.lengths)
    scores, logits, lp = np_(out.scores), np_(out.logits), np_(out.token_logprobs)
    assert scores.shape == logits.shape == (4, N, V)
    assert lp.shape == (4, N)
    finished_early = 0
    for row in range(4):
        # The expected greedy run, computed in NumPy.
        history = list(FAKE_PROMPTS[row])
        for step in range(N):
            raw = RANDOM[history[-1]]
            processed = _rep_penalty(raw, history, theta)
            token = int(np.argmax(processed))
            if step >= lengths[row]:
                assert seqs[row, 3 + step] == 3  # pad = first EOS id
                assert lp[row, step] == 0.0
                continue
            np.testing.assert_allclose(logits[row, step], raw, rtol=0, atol=1e-6)
            np.testing.assert_allclose(scores[row, step], processed, rtol=1e-6, atol=1e-6)
            assert seqs[row, 3 + step] == token
            np.testing.assert_allclose(
                lp[row, step], log_softmax(scores[row, step])[token], rtol=0, atol=1e-5
            )
            history.append(token)
            if token in (3, 11):
                assert lengths[row] == step + 1
                finished_early += 1
                break
        else:
            assert lengths[row] == N
    assert finished_early >= 1, "the table should make at least one row hit EOS"


def test_sampled_token_logprobs_use_the_processed_distribution():
    out = fake_generate(
        RANDOM,
        max_new_tokens=N,
        do_sample=True,
        temperature=0.7,
        top_k=4,
        output_scores=True,
        key=jax.random.key(0),
    )
    seqs, scores, lp = np_(out.sequences), np_(out.scores), np_(out.token_logprobs)
    for row, step in itertools.product(range(4), range(N)):
        token = seqs[row, 3 + step]
        assert np.sum(np.isfinite(scores[row, step])) == 4  # top-k=4 survivors
        assert np.isfinite(scores[row, step, token])
        np.testing.assert_allclose(
            lp[row, step], log_softmax(scores[row, step])[token], rtol=0, atol=1e-5
        )


def test_output_shapes():
    p, b, r = FAKE_PROMPTS.shape[1], 2, 3
    kw = dict(max_new_tokens=5, do_sample=True, num_return_sequences=r, seed=0)
    plain = fake_generate(FLAT, FAKE_PROMPTS[:b], **kw)
    assert plain.sequences.shape == (b * r, p + 5)
    assert plain.sequences.dtype == jnp.int32
    assert plain.token_logprobs.shape == (b * r, 5)
    assert plain.lengths.shape == (b * r,)
    assert plain.scores is None and plain.logits is None
    assert plain.sequences_scores is None and plain.beam_indices is None

    full = fake_generate(FLAT, FAKE_PROMPTS[:b], output_scores=True, output_logits=True, **kw)
    assert full.scores.shape == (b * r, 5, V)
    assert full.logits.shape == (b * r, 5, V)
    np.testing.assert_array_equal(np_(full.sequences), np_(plain.sequences))


# --------------------------------------------------------------------------- #
# loop="while" == loop="scan".
# --------------------------------------------------------------------------- #


def _assert_same_output(a: jd.GenerateOutput, b: jd.GenerateOutput) -> None:
    np.testing.assert_array_equal(np_(a.sequences), np_(b.sequences))
    np.testing.assert_array_equal(np_(a.lengths), np_(b.lengths))
    np.testing.assert_allclose(np_(a.token_logprobs), np_(b.token_logprobs), rtol=0, atol=1e-6)
    for name in ("sequences_scores", "beam_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_allclose(np_(x), np_(y), rtol=0, atol=1e-6)


def test_while_equals_scan_greedy():
    kw = dict(max_new_tokens=N, eos_token_id=[7, 13], output_scores=True)
    scan = fake_generate(CYCLE, loop="scan", **kw)
    loop = fake_generate(CYCLE, loop="while", **kw)
    _assert_same_output(scan, loop)
    # Scores agree on every step the while loop ran (it stops once all rows end).
    ran = int(np.max(np_(scan.lengths)))
    np.testing.assert_array_equal(np_(scan.scores)[:, :ran], np_(loop.scores)[:, :ran])


def test_while_equals_scan_sampling():
    kw = dict(max_new_tokens=N, do_sample=True, eos_token_id=[3, 9], key=jax.random.key(7))
    _assert_same_output(
        fake_generate(RANDOM, loop="scan", **kw), fake_generate(RANDOM, loop="while", **kw)
    )


BEAM_V = 10
BEAM_TABLE = np.random.default_rng(5).normal(scale=1.5, size=(BEAM_V, BEAM_V)).astype(np.float32)
BEAM_TABLE[:, 3] += 1.0  # EOS likely enough to finish hypotheses at many lengths
BEAM_PROMPTS = np.array([[1, 2, 4], [6, 9, 0]])
# (num_beams, eos, early_stopping, length penalties): test_while_equals_scan_beam_search
# runs the while-loop programs of test_beam_search_matches_numpy_transformers (one
# per case: the length penalty is traced) and only compiles their scan programs.
BEAM_CASES = [
    (2, (3,), False, (1.0, 0.0, 2.0)),
    (3, (3, 7), "never", (0.0, 1.0, -0.5)),
    (3, (3,), True, (1.0, 0.5)),
]


@pytest.mark.parametrize("num_beams, eos, early_stopping, length_penalties", BEAM_CASES)
def test_while_equals_scan_beam_search(num_beams, eos, early_stopping, length_penalties):
    kw = dict(
        length_penalty=length_penalties[0],
        max_new_tokens=5,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        eos_token_id=list(eos),
        early_stopping=early_stopping,
    )
    scan = fake_generate(BEAM_TABLE, BEAM_PROMPTS, loop="scan", **kw)
    _assert_same_output(scan, fake_generate(BEAM_TABLE, BEAM_PROMPTS, loop="while", **kw))
    assert scan.sequences.shape == (2 * num_beams, 3 + 5)
    assert scan.sequences_scores.shape == (2 * num_beams,)
    assert scan.beam_indices.shape == scan.token_logprobs.shape == (2 * num_beams, 5)
    assert scan.scores is None and scan.logits is None


def counting_decoder(vocab: int, calls: list[int]) -> jd.Decoder:
    """The fake decoder, counting its executed model calls (prefill and steps) into
    `calls` with a host callback (tests only: it shows how many steps ran)."""
    fake = fake_decoder(vocab)

    def apply(params, ids, positions, cache, attention_mask):
        jax.debug.callback(lambda: calls.append(1))
        return fake.apply(params, ids, positions, cache, attention_mask)

    return jd.Decoder(init_cache=fake.init_cache, apply=apply, vocab_size=vocab, name="counted")


@pytest.mark.parametrize(
    "options",
    [{}, {"do_sample": True, "seed": 3}, {"num_beams": 2, "early_stopping": True}],
    ids=["greedy", "sampling", "beams"],
)
def test_default_loop_stops_once_every_row_has_ended(options):
    """The default loop (like transformers) runs no step after every row has
    ended: with EOS two tokens away and max_new_tokens=40, 3 model calls
    (prefill + 2 steps; beam search: it stops once every prompt has its beams),
    not 40; the output keeps its fixed shapes and equals loop="scan"'s."""
    table = np.full((V, V), -5.0, np.float32)
    table[:, 1] = 5.0  # every token -> 1 -> EOS 2 -> ...
    table[1, 1], table[1, 2] = -5.0, 5.0
    table[2, 1], table[2, 2] = -5.0, 5.0
    ids = FAKE_PROMPTS[:2]
    calls: list[int] = []
    decoder = counting_decoder(V, calls)
    kw = dict(params=table_params(table), max_new_tokens=40, eos_token_id=2, **options)
    out = jd.generate(decoder, ids, **kw)
    jax.block_until_ready(out.sequences)
    assert len(calls) <= 4, f"{len(calls)} model calls for 2 tokens per row"
    rows = ids.shape[0] * options.get("num_beams", 1)
    assert out.sequences.shape[1] == 3 + 40 and out.token_logprobs.shape[1] == 40
    calls.clear()
    scan = jd.generate(decoder, ids, loop="scan", **kw)
    jax.block_until_ready(scan.sequences)
    assert len(calls) == 40, "scan runs every step (its last without the model)"
    _assert_same_output(out, scan)
    assert np_(out.sequences).shape[0] == (2 if "num_beams" in options else rows)


def test_default_loop_under_grad_jit_and_vmap():
    """The early-stopping default works where users put generate: inside `jit`,
    under `vmap`, and differentiated (`jax.grad` through the token
    log-probabilities, directly and through a `jit`), where it gives the
    fixed-length loop's gradient."""
    table = jnp.asarray(CYCLE)
    decoder = fake_decoder(V)

    def loss(t, loop="while"):
        out = jd.generate(
            decoder, FAKE_PROMPTS, params={"table": t}, max_new_tokens=N, eos_token_id=7, loop=loop
        )
        return jnp.sum(out.token_logprobs)

    want = np_(jax.grad(functools.partial(loss, loop="scan"))(table))
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(np_(jax.grad(loss)(table)), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np_(jax.jit(jax.grad(loss))(table)), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np_(jax.grad(jax.jit(loss))(table)), want, rtol=1e-6, atol=1e-6)
    mapped = jax.vmap(
        lambda t: (
            jd.generate(
                decoder, FAKE_PROMPTS, params={"table": t}, max_new_tokens=N, eos_token_id=7
            ).sequences
        )
    )
    both = mapped(jnp.stack([table, table]))
    alone = fake_generate(CYCLE, max_new_tokens=N, eos_token_id=7, loop="scan").sequences
    np.testing.assert_array_equal(np_(both[1]), np_(alone))


def test_speculative_decoding_under_grad_is_a_clear_error(lm):
    def loss(model):
        out = model.generate(GPT_PROMPTS, max_new_tokens=N, prompt_lookup_num_tokens=2)
        return jnp.sum(out.token_logprobs)

    with pytest.raises(ValueError, match="speculative decoding .* cannot be differentiated"):
        jax.grad(jax.jit(loss))(lm)


# --------------------------------------------------------------------------- #
# Sampling: per-row streams, seed, num_return_sequences.
# --------------------------------------------------------------------------- #


def test_num_return_sequences_gives_distinct_rows_per_prompt():
    out = fake_generate(
        FLAT, FAKE_PROMPTS[:2], max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=0
    )
    seqs = np_(out.sequences)
    assert seqs.shape == (6, 8)
    for prompt in range(2):
        rows = seqs[3 * prompt : 3 * prompt + 3]
        np.testing.assert_array_equal(
            rows[:, :3], np.repeat(FAKE_PROMPTS[prompt : prompt + 1], 3, 0)
        )
        assert len({tuple(r) for r in rows[:, 3:]}) > 1, "all 3 samples are identical"


# --------------------------------------------------------------------------- #
# The tiny GPT-2.
# --------------------------------------------------------------------------- #

GPT_CFG = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=128)
_rng = np.random.default_rng(0)
GPT_PROMPTS = _rng.integers(0, 64, (4, 5))  # [4, 5]: bucket 8 under "pow2"
LEFT_PADDED = (
    np.array([[11, 12, 13, 14, 15], [0, 0, 21, 22, 23]]),
    np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]),
)


@pytest.fixture(scope="module")
def lm() -> jd.CausalLM:
    # Jitted: eager Flax init runs (and compiles) op by op.
    params = jax.jit(init_params, static_argnums=0)(GPT_CFG, jax.random.key(0))
    return jd.CausalLM(params=params, decoder=gpt2_decoder(GPT_CFG), config=GPT_CFG)


SAMPLE_KW = dict(max_new_tokens=N, do_sample=True, temperature=0.7)


def test_gpt2_sampling_rows_do_not_depend_on_other_rows(lm):
    key = jax.random.key(42)
    four = np_(lm.generate(GPT_PROMPTS, key=key, **SAMPLE_KW).sequences)
    one = np_(lm.generate(GPT_PROMPTS[:1], key=key, **SAMPLE_KW).sequences)
    np.testing.assert_array_equal(four[0], one[0])
    changed = GPT_PROMPTS.copy()
    changed[2] = (changed[2] + 1) % 64
    other = np_(lm.generate(changed, key=key, **SAMPLE_KW).sequences)
    np.testing.assert_array_equal(other[[0, 1, 3]], four[[0, 1, 3]])
    assert not np.array_equal(other[2], four[2])
    assert len({tuple(r) for r in four[:, 5:]}) == 4, "rows should draw different tokens"


def test_seed_gives_reproducible_samples(lm):
    a = np_(lm.generate(GPT_PROMPTS, seed=3, **SAMPLE_KW).sequences)
    b = np_(lm.generate(GPT_PROMPTS, config=jd.GenerationConfig(seed=3, **SAMPLE_KW)).sequences)
    c = np_(lm.generate(GPT_PROMPTS, key=jax.random.key(3), **SAMPLE_KW).sequences)
    d = np_(lm.generate(GPT_PROMPTS, seed=4, **SAMPLE_KW).sequences)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, d)


def test_prompt_buckets_are_invisible(lm):
    ids, mask = LEFT_PADDED
    outs = {
        str(buckets): lm.generate(
            ids, mask, max_new_tokens=N, prompt_buckets=buckets, output_scores=False
        )
        for buckets in (None, "pow2", 8, [8, 32])  # 8 three ways: one program
    }
    ref = outs["None"]
    assert ref.sequences.shape == (2, 5 + N)
    for name, out in outs.items():
        np.testing.assert_array_equal(np_(out.sequences), np_(ref.sequences), err_msg=name)
        np.testing.assert_array_equal(np_(out.lengths), np_(ref.lengths), err_msg=name)
        np.testing.assert_allclose(
            np_(out.token_logprobs), np_(ref.token_logprobs), rtol=0, atol=1e-5, err_msg=name
        )


def test_bucket_length():
    assert [jd.bucket_length(n) for n in (1, 3, 8, 9, 16, 17)] == [8, 8, 8, 16, 16, 32]
    assert jd.bucket_length(5, None) == 5
    assert jd.bucket_length(5, 16) == 16 and jd.bucket_length(17, 16) == 32
    assert jd.bucket_length(9, [8, 32]) == 32 and jd.bucket_length(40, [8, 32]) == 40


def _prompts(length: int) -> np.ndarray:
    # Batch 3: no other test compiles these programs.
    return np.random.default_rng(length).integers(0, 64, (3, length))


def test_prompt_lengths_in_one_bucket_do_not_recompile(lm):
    prompts = {n: _prompts(n) for n in (3, 4, 5, 6, 7)}
    lm.generate(prompts[4], max_new_tokens=N)  # warm-up: bucket 8
    for n in (3, 5, 6, 7):
        with count_compiles() as c:
            out = lm.generate(prompts[n], max_new_tokens=N)
        assert out.sequences.shape == (3, n + N)
        np.testing.assert_array_equal(np_(out.sequences)[:, :n], prompts[n])
        assert c.count == 0, f"prompt length {n} (bucket 8) compiled {c.names}"


def test_a_new_bucket_compiles_one_program(lm):
    p4, p9, p10 = _prompts(4), _prompts(9), _prompts(10)
    lm.generate(p4, max_new_tokens=N)  # warm-up: bucket 8
    with count_compiles() as c9:
        lm.generate(p9, max_new_tokens=N)  # bucket 16
    assert c9.of(generate_program.__name__) == 1, c9.names
    with count_compiles() as c10:
        out = lm.generate(p10, max_new_tokens=N)  # bucket 16 again
    assert out.sequences.shape == (3, 10 + N)
    assert c10.count == 0, f"prompt length 10 (bucket 16, compiled) compiled {c10.names}"


def test_changing_numbers_does_not_recompile(lm):
    sweeps = [
        dict(
            temperature=0.7,
            top_p=0.9,
            top_k=20,
            min_p=0.05,
            repetition_penalty=1.2,
            frequency_penalty=0.1,
            presence_penalty=0.2,
        ),
        dict(
            temperature=1.3,
            top_p=0.5,
            top_k=7,
            min_p=0.2,
            repetition_penalty=0.8,
            frequency_penalty=-0.5,
            presence_penalty=1.0,
        ),
        dict(
            temperature=0.2,
            top_p=0.99,
            top_k=40,
            min_p=0.0,
            repetition_penalty=2.0,
            frequency_penalty=1.5,
            presence_penalty=-1.0,
        ),
    ]
    key = jax.random.key(0)
    first = lm.generate(GPT_PROMPTS, max_new_tokens=N, do_sample=True, key=key, **sweeps[0])
    outs = []
    with count_compiles() as c:
        for kw in sweeps[1:]:
            outs.append(lm.generate(GPT_PROMPTS, max_new_tokens=N, do_sample=True, key=key, **kw))
    assert c.count == 0
    assert not np.array_equal(np_(first.token_logprobs), np_(outs[0].token_logprobs))


def test_changing_beam_numbers_does_not_recompile():
    kw = dict(max_new_tokens=N, num_beams=3, eos_token_id=[3, 9], early_stopping="never")
    fake_generate(RANDOM, length_penalty=1.0, repetition_penalty=1.1, **kw)
    with count_compiles() as c:
        outs = [
            fake_generate(RANDOM, length_penalty=lp, repetition_penalty=rp, **kw)
            for lp, rp in ((0.0, 1.5), (2.0, 0.7), (-1.0, 1.1))
        ]
    assert c.count == 0
    assert len({tuple(np_(o.sequences_scores).round(5)) for o in outs}) == 3


def test_generate_inside_a_users_jit(lm):
    @jax.jit
    def sample(model: jd.CausalLM, temperature, key):
        out = model.generate(
            GPT_PROMPTS, max_new_tokens=N, do_sample=True, temperature=temperature, key=key
        )
        return out.sequences

    key = jax.random.key(11)
    lm2 = lm.replace(params=jax.tree_util.tree_map(lambda x: x * 1.5, lm.params))
    jax.block_until_ready(lm2.params)
    with count_compiles() as first:
        traced = np_(sample(lm, 0.7, key))
    with count_compiles() as again:
        sample(lm2, 1.3, key).block_until_ready()
    assert first.count >= 1
    assert again.count == 0, "a new temperature / new params recompiled the user's jit"
    assert first.of("sample") == 1, first.names
    eager = np_(
        lm.generate(
            GPT_PROMPTS, max_new_tokens=N, do_sample=True, temperature=0.7, key=key
        ).sequences
    )
    np.testing.assert_array_equal(traced, eager)


def test_sampling_inside_jit_needs_a_key(lm):
    @jax.jit
    def no_key(model):
        return model.generate(GPT_PROMPTS, max_new_tokens=N, do_sample=True).sequences

    with pytest.raises(ValueError, match="key"):
        no_key(lm)

    @jax.jit
    def traced_prompts(ids):  # params are constants here; the prompts are traced
        return lm.generate(ids, max_new_tokens=N, do_sample=True).sequences

    with pytest.raises(ValueError, match="key"):
        traced_prompts(GPT_PROMPTS)


def test_vmap_over_prompts_equals_the_batched_call(lm):
    ids, mask = LEFT_PADDED

    def one(prompt, prompt_mask):
        return lm.generate(prompt[None], prompt_mask[None], max_new_tokens=N).sequences[0]

    mapped = np_(jax.vmap(one)(jnp.asarray(ids), jnp.asarray(mask)))
    batched = np_(lm.generate(ids, mask, max_new_tokens=N).sequences)
    np.testing.assert_array_equal(mapped, batched)


# --------------------------------------------------------------------------- #
# Beam search against NumPy.
# --------------------------------------------------------------------------- #


def hf_beam_search(
    table, prompt, *, n, num_beams, eos, length_penalty, early_stopping, batch_row=0
):
    """transformers 5's vectorised beam search for one prompt, in NumPy float32,
    for a model whose logits are `table[last token]` (see HF_SEMANTICS.md).

    Returns (tokens [nb, n], scores [nb], beam_indices [nb, n], token_scores [nb, n])
    of the finished hypotheses, best first; tokens are pad (= eos[0]) after the end.
    """
    nb, vocab = num_beams, table.shape[1]
    logp = log_softmax(table).astype(np.float32)
    k = max(2, 1 + len(eos)) * nb
    lp = np.float32(length_penalty)
    pad = eos[0]
    top_mask = np.arange(k) < nb

    run_tok = np.full((nb, n), pad)
    run_scores = np.where(np.arange(nb) == 0, 0.0, NEG).astype(np.float32)
    run_bidx = np.full((nb, n), -1)
    run_tlp = np.zeros((nb, n), np.float32)
    run_last = np.full(nb, prompt[-1])
    fin_tok = np.full((nb, n), pad)
    fin_scores = np.full(nb, NEG, np.float32)
    fin_bidx = np.full((nb, n), -1)
    fin_tlp = np.zeros((nb, n), np.float32)
    fin_flag = np.zeros(nb, bool)
    unsatisfied = True

    def top(x, m):  # indices of the m largest, lower index first among ties (as lax.top_k)
        return np.argsort(-x, kind="stable")[:m]

    for step in range(n):
        scores = logp[run_last]  # [nb, V]
        acc = (scores + run_scores[:, None]).reshape(-1).astype(np.float32)
        idx = top(acc, k)
        vals, parent, tok = acc[idx], idx // vocab, idx % vocab
        c_tok = run_tok[parent].copy()
        c_tok[:, step] = tok
        c_bidx = run_bidx[parent].copy()
        c_bidx[:, step] = parent + batch_row * nb
        c_tlp = run_tlp[parent].copy()
        c_tlp[:, step] = scores[parent, tok]
        hits = np.isin(tok, eos) | (step == n - 1)

        run_lp = (vals + hits * NEG).astype(np.float32)
        nxt = top(run_lp, nb)

        just = hits & top_mask
        cand = (vals / np.float32(step + 1) ** lp).astype(np.float32)
        if early_stopping is True and fin_flag.all():
            cand = cand + NEG
        if not unsatisfied:
            cand = cand + NEG
        cand = (cand + (~just) * NEG).astype(np.float32)
        merged = np.concatenate([fin_scores, cand])
        best = top(merged, nb)
        fin_scores = merged[best]
        fin_tok = np.concatenate([fin_tok, c_tok])[best]
        fin_bidx = np.concatenate([fin_bidx, c_bidx])[best]
        fin_tlp = np.concatenate([fin_tlp, c_tlp])[best]
        fin_flag = np.concatenate([fin_flag, just])[best]

        run_scores, run_tok, run_bidx, run_tlp = run_lp[nxt], c_tok[nxt], c_bidx[nxt], c_tlp[nxt]
        run_last = tok[nxt]

        best_len = n if (early_stopping == "never" and lp > 0) else step + 1
        best_running = run_scores[0] / np.float32(best_len) ** lp
        worst = np.where(fin_flag, fin_scores.min(), NEG)
        unsatisfied = unsatisfied and bool(np.any(best_running > worst))
        if not unsatisfied or (early_stopping is True and fin_flag.all()):
            break
    return fin_tok, fin_scores, fin_bidx, fin_tlp


@pytest.mark.parametrize("num_beams, eos, early_stopping, length_penalties", BEAM_CASES)
def test_beam_search_matches_numpy_transformers(num_beams, eos, early_stopping, length_penalties):
    n = 5
    for lp in length_penalties:
        out = fake_generate(
            BEAM_TABLE,
            BEAM_PROMPTS,
            max_new_tokens=n,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            eos_token_id=list(eos),
            early_stopping=early_stopping,
            length_penalty=lp,
        )
        seqs, scores = np_(out.sequences), np_(out.sequences_scores)
        bidx, tlp, lengths = np_(out.beam_indices), np_(out.token_logprobs), np_(out.lengths)
        for b, prompt in enumerate(BEAM_PROMPTS):
            tok, sc, bi, tl = hf_beam_search(
                BEAM_TABLE,
                prompt,
                n=n,
                num_beams=num_beams,
                eos=eos,
                length_penalty=lp,
                early_stopping=early_stopping,
                batch_row=b,
            )
            rows = slice(b * num_beams, (b + 1) * num_beams)
            msg = f"batch row {b}, length_penalty={lp}"
            np.testing.assert_array_equal(seqs[rows, :3], np.repeat(prompt[None], num_beams, 0))
            np.testing.assert_array_equal(seqs[rows, 3:], tok, err_msg=msg)
            np.testing.assert_allclose(scores[rows], sc, rtol=1e-5, atol=1e-5, err_msg=msg)
            np.testing.assert_array_equal(bidx[rows], bi, err_msg=msg)
            np.testing.assert_allclose(tlp[rows], tl, rtol=1e-5, atol=1e-5, err_msg=msg)
            np.testing.assert_array_equal(lengths[rows], np.sum(bi >= 0, axis=1), err_msg=msg)


# A hand-checkable case (V = 5, EOS = 4, two beams): greedy takes 1 (p = .5) and
# never ends; beam search also keeps 2 (p = .4), whose EOS (p = .9) gives the
# best hypothesis [2, EOS] with log-probability log(.4 * .9) = log(.36).
HAND_PROBS = np.array(
    [
        [0.02, 0.5, 0.4, 0.05, 0.03],
        [0.24, 0.22, 0.2, 0.18, 0.16],
        [0.025, 0.025, 0.025, 0.025, 0.9],
        [0.3, 0.25, 0.2, 0.15, 0.1],
        [0.2, 0.2, 0.2, 0.2, 0.2],
    ]
)
HAND_TABLE = np.log(HAND_PROBS).astype(np.float32)


def _exhaustive_best(table, first: int, n: int, eos: int, lp: float):
    """Best (tokens, score) over every hypothesis: ending with EOS, or n tokens."""
    logp = log_softmax(table)
    best = (None, -np.inf)
    for length in range(1, n + 1):
        for seq in itertools.product(range(table.shape[1]), repeat=length):
            if eos in seq[:-1] or (length < n and seq[-1] != eos):
                continue
            prev = (first,) + seq[:-1]
            score = sum(logp[a, b] for a, b in zip(prev, seq, strict=True)) / length**lp
            if score > best[1]:
                best = (seq, score)
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_hand_checked_optimum(length_penalty):
    n, eos = 4, 4
    prompt = np.array([[3, 0]])
    best_seq, best_score = _exhaustive_best(HAND_TABLE, 0, n, eos, length_penalty)
    assert best_seq == (2, eos)
    np.testing.assert_allclose(best_score, np.log(0.36) / 2**length_penalty, rtol=1e-6)

    out = fake_generate(
        HAND_TABLE,
        prompt,
        max_new_tokens=n,
        num_beams=2,
        eos_token_id=eos,
        early_stopping="never",
        length_penalty=length_penalty,
    )
    np.testing.assert_array_equal(np_(out.sequences)[0], [3, 0, 2, eos, eos, eos])
    np.testing.assert_allclose(np_(out.sequences_scores)[0], best_score, rtol=1e-5)
    np.testing.assert_array_equal(np_(out.lengths), [2])
    np.testing.assert_allclose(
        np_(out.token_logprobs)[0], [np.log(0.4), np.log(0.9), 0.0, 0.0], rtol=1e-5, atol=1e-6
    )

    greedy = fake_generate(HAND_TABLE, prompt, max_new_tokens=n, eos_token_id=eos)
    np.testing.assert_array_equal(np_(greedy.sequences)[0, 2:], [1, 0, 1, 0])


# --------------------------------------------------------------------------- #
# Bad inputs.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.arange(5),), dict(max_new_tokens=4), "input_ids must be a \\[batch, prompt_len\\]"),
        ((np.zeros((1, 2, 3), int),), dict(max_new_tokens=4), "input_ids must be"),
        (
            ([[1, 2, 3], [4, 5]],),  # unpadded prompts of different lengths
            dict(max_new_tokens=4),
            r"input_ids rows have different lengths \(3, 2\); left-pad .*attention_mask",
        ),
        ((np.array([[1.0, 2.0]]),), dict(max_new_tokens=4), "integer"),
        ((np.array([[1, 64]]),), dict(max_new_tokens=4), "input_ids must be in \\[0, 63\\]"),
        ((np.array([[-1, 3]]),), dict(max_new_tokens=4), "input_ids must be in"),
        (
            (np.ones((2, 3), int), np.ones((2, 4), int)),
            dict(max_new_tokens=4),
            "attention_mask shape",
        ),
        ((np.ones((1, 3), int), np.array([[0, 2, 1]])), dict(max_new_tokens=4), "only 0 and 1"),
        ((np.ones((1, 10), int),), dict(max_new_tokens=119), "n_positions=128"),
        ((np.ones((1, 20), int),), {"max_length": 20}, "max_length=20 leaves no room"),
        (
            (np.ones((1, 3), int),),
            dict(max_new_tokens=4, num_beams=2, num_return_sequences=3),
            "num_return_sequences",
        ),
        (
            (np.ones((1, 3), int),),
            dict(max_new_tokens=4, temprature=0.5),
            "unknown GenerationConfig field.*temprature",
        ),
        (
            (np.ones((1, 3), int),),
            dict(max_new_tokens=4, loop="for"),
            "loop must be 'scan' or 'while'",
        ),
        (
            (np.ones((1, 3), int),),
            dict(max_new_tokens=4, prompt_buckets=0),
            "prompt_buckets must be >= 1",
        ),
    ],
    ids=[
        "ids-1d",
        "ids-3d",
        "ids-ragged",
        "ids-float",
        "id-too-large",
        "id-negative",
        "mask-shape",
        "mask-values",
        "too-long-for-n_positions",
        "no-max-new-tokens",
        "return-more-than-beams",
        "unknown-override",
        "loop-for",
        "buckets-0",
    ],
)
def test_bad_inputs_raise_value_error(lm, args, kwargs, match):
    with count_compiles() as c, pytest.raises(ValueError, match=match):
        lm.generate(*args, **kwargs)
    assert c.count == 0, "a bad input should be rejected before anything compiles"


def test_n_positions_limit_is_inclusive(lm):
    lm.decoder.check_length(GPT_CFG.n_positions)  # prompt + new tokens == n_positions fits
    with pytest.raises(ValueError, match="n_positions=128"):
        lm.decoder.check_length(GPT_CFG.n_positions + 1)


def test_generate_timed_is_generate_with_its_timings(lm):
    """`generate_timed` (`jaxdecode generate --verbose`) returns what `generate`
    returns for the same arguments, keyword options and overrides alike, and
    where the time went."""
    from jaxdecode.generation import generate_timed

    kwargs = dict(key=jax.random.key(3), **SAMPLE_KW)
    want = lm.generate(GPT_PROMPTS, **kwargs)
    got, timings = generate_timed(lm, GPT_PROMPTS, **kwargs)
    _assert_same_output(got, want)
    assert timings.steps == N and timings.tokens == int(np.sum(np_(want.lengths)))
    assert timings.compile_s > 0 and timings.prefill_s > 0 and timings.prepare_s >= 0
    assert timings.decode_s >= 0
    assert timings.tokens_per_s > 0
