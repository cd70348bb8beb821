"""Rows are independent: per-row lengths, multi-token appends, cache rewind and
slot insertion, and stateful processors (reordered by beam search).

These are the core capabilities that speculative decoding (different numbers of
accepted tokens per row) and a continuous-batching engine (rows at different
positions, prompts inserted into live slots) stand on. A tiny random GPT-2 is
the model; every check compares a batch against its rows run alone.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import fake_decoder, table_params

import jaxdecode as jd
from jaxdecode import generation
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params
from jaxdecode.search import prefill_program
from jaxdecode.search.sample import decode_step

V = 64
BUCKET = 16
N = 8


@functools.cache
def tiny():
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=V, n_positions=128)
    decoder = gpt2_decoder(config)
    params = init_params(config, jax.random.key(3))
    # Sharper logits than the default init, so that greedy is not all ties.
    params = jax.tree_util.tree_map(lambda x: x * 4.0, params)
    return decoder, params


PROMPT_A = np.array([5, 9, 1, 33, 2], np.int32)
PROMPT_B = np.array([7, 7, 40, 12, 3, 61, 8, 0, 19], np.int32)


def _stack_rows(a, b):
    """Concatenates two decode states row-wise (the KV cache has rows on axis 1)."""

    def cat(x, y):
        if isinstance(x, jd.KVCache):
            return x.replace(
                k=jnp.concatenate([x.k, y.k], axis=1),
                v=jnp.concatenate([x.v, y.v], axis=1),
                mask=jnp.concatenate([x.mask, y.mask]),
                index=jnp.concatenate([x.index, y.index]),
            )
        if jnp.ndim(x) == 0:
            return x  # the loop's step counter
        return jnp.concatenate([x, y])

    return jax.tree_util.tree_map(cat, a, b, is_leaf=lambda x: isinstance(x, jd.KVCache))


_prefill = jax.jit(prefill_program, static_argnums=0)
_step = jax.jit(decode_step, static_argnums=(0, 4))


def _alone_state(prompt, config, key):
    decoder, params = tiny()
    req = generation.prepare(
        decoder, prompt[None], config=config, params=params, key=key, prompt_buckets=[BUCKET]
    )
    params = req.plan.decoder.prepared(req.params, req.plan.rows)
    traced, state = _prefill(req.plan, params, *req.args()[1:])
    return req.plan, params, traced, state


# Plain greedy search is not a case of its own: every case below runs it, with
# processors on top (one compiled set per case is the cost of this test).
CONFIGS = {
    "greedy-min_new_tokens-no_repeat": dict(
        do_sample=False, min_new_tokens=4, eos_token_id=11, no_repeat_ngram_size=2
    ),
    "greedy-forced_eos-decay": dict(
        do_sample=False,
        eos_token_id=[11, 3],
        forced_eos_token_id=11,
        exponential_decay_length_penalty=(2, 1.5),
    ),
    "sample-penalties": dict(
        do_sample=True,
        top_k=20,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.2,
    ),
    "sample-min_new_tokens-decay": dict(
        do_sample=True,
        temperature=0.8,
        min_new_tokens=3,
        eos_token_id=11,
        exponential_decay_length_penalty=(1, 2.0),
        no_repeat_ngram_size=3,
    ),
}


AHEAD = 3  # row B runs this many steps alone before the rows share a batch


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_at_different_lengths_decode_as_alone(name):
    """Two rows at different logical lengths, offsets, positions and generated
    counts in one batch (row B is AHEAD tokens further) give, step by step, each
    row's tokens alone."""
    config = jd.GenerationConfig(max_new_tokens=N, **CONFIGS[name])
    key_a, key_b = jax.random.key(1), jax.random.key(2)
    plan, params, traced, state_a = _alone_state(PROMPT_A, config, key_a)
    _, _, _, state_b = _alone_state(PROMPT_B, config, key_b)
    for _ in range(AHEAD):
        state_b, _ = _step(plan, params, traced, state_b, True)
    state = _stack_rows(state_a, state_b)
    np.testing.assert_array_equal(state.ctx.generated, [0, AHEAD])
    assert len(set(np.asarray(state.ctx.write_col).tolist())) == 2
    tokens = []
    for i in range(N - AHEAD):
        state, out = _step(plan, params, traced, state, i < N - AHEAD - 1)
        tokens.append(np.asarray(out["tokens"]))
    batch = np.stack(tokens, axis=1)
    decoder, raw_params = tiny()
    alone = {}
    for row, (prompt, key) in enumerate([(PROMPT_A, key_a), (PROMPT_B, key_b)]):
        out = jd.generate(
            decoder,
            prompt[None],
            config=config,
            params=raw_params,
            key=key,
            prompt_buckets=[BUCKET],
        )
        alone[row] = np.asarray(out.sequences)[0, len(prompt) :]
    np.testing.assert_array_equal(batch[0], alone[0][: N - AHEAD])
    np.testing.assert_array_equal(batch[1], alone[1][AHEAD:])


def test_per_prompt_keys_draw_what_each_prompt_draws_alone():
    """`key` of shape [batch]: prompt r draws exactly what it draws alone with key[r],
    also with num_return_sequences > 1."""
    decoder, params = tiny()
    config = jd.GenerationConfig(max_new_tokens=N, do_sample=True, num_return_sequences=2)
    prompts = np.stack([PROMPT_A, PROMPT_B[:5]])
    keys = jax.vmap(jax.random.key)(jnp.array([11, 12]))
    both = jd.generate(decoder, prompts, config=config, params=params, key=keys)
    for r in range(2):
        alone = jd.generate(decoder, prompts[r : r + 1], config=config, params=params, key=keys[r])
        np.testing.assert_array_equal(
            np.asarray(both.sequences)[2 * r : 2 * r + 2], np.asarray(alone.sequences)
        )
    # The same with seeds as raw key data [batch, 2].
    raw = np.asarray(jax.random.key_data(keys))
    again = jd.generate(decoder, prompts, config=config, params=params, key=raw)
    np.testing.assert_array_equal(np.asarray(again.sequences), np.asarray(both.sequences))


class TestAppend(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_append_several_tokens_with_per_row_counts(self):
        """`append(tokens [B, T], n [B])` equals appending each row's first n tokens
        one at a time."""
        rng = np.random.default_rng(0)
        ids = rng.integers(0, V, (3, 4)).astype(np.int32)
        buffer = np.concatenate([ids, np.zeros((3, 8), np.int32)], axis=1)
        ctx = jd.DecodeContext.from_ids(buffer, vocab_size=V, cur_len=4, prompt_length=4)
        tokens = rng.integers(0, V, (3, 3)).astype(np.int32)
        n = np.array([3, 0, 2], np.int32)
        got = self.variant(lambda c, t, k: c.append(t, k))(ctx, tokens, n)
        np.testing.assert_array_equal(got.cur_len, 4 + n)
        for row in range(3):
            one = jd.DecodeContext.from_ids(
                buffer[row : row + 1], vocab_size=V, cur_len=4, prompt_length=4
            )
            for t in range(n[row]):
                one = one.append(tokens[row : row + 1, t])
            kept = 4 + n[row]
            np.testing.assert_array_equal(got.sequences[row, :kept], one.sequences[0, :kept])
            chex.assert_trees_all_equal(got.cur_len[row], one.cur_len[0])


def _random_kv(rng, batch, t, heads=2, head_dim=4):
    shape = (batch, t, heads, head_dim)
    return (
        jnp.asarray(rng.normal(size=shape), jnp.float32),
        jnp.asarray(rng.normal(size=shape), jnp.float32),
    )


def _write(cache, k, v):
    for layer in range(cache.k.shape[0]):
        cache = cache.write(layer, k, v)
    return cache.advance(jnp.ones(k.shape[:2], jnp.int32))


def _rewound(cache, prompt, draft, n, final, *, width):
    cache = _write(_write(cache, *prompt), *draft).rewind(n, width=width)
    return _write(cache, *final)


def _written(row, keep, prompt, draft, final):
    """Row `row` alone, as if only its first `keep` draft tokens were ever written."""
    one = jd.init_cache(layers=2, batch=1, max_len=12, heads=2, head_dim=4)
    one = _write(one, *(x[row : row + 1] for x in prompt))
    if keep:
        one = _write(one, *(x[row : row + 1, :keep] for x in draft))
    return _write(one, *(x[row : row + 1] for x in final))


class TestCacheRewind(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_rewind_then_rewrite_is_bitwise_never_written(self):
        rng = np.random.default_rng(0)
        empty = jd.init_cache(layers=2, batch=2, max_len=12, heads=2, head_dim=4)
        prompt, draft, final = _random_kv(rng, 2, 3), _random_kv(rng, 2, 4), _random_kv(rng, 2, 2)
        n = jnp.array([1, 4], jnp.int32)  # keep 3 and 0 draft tokens
        for width in (None, 4):  # the whole-cache clear and the windowed scatter
            got = self.variant(functools.partial(_rewound, width=width))(
                empty, prompt, draft, n, final
            )
            for row, keep in enumerate([3, 0]):
                one = _written(row, keep, prompt, draft, final)
                chex.assert_trees_all_equal(
                    (got.mask[row : row + 1], got.index[row : row + 1]), (one.mask, one.index)
                )
                chex.assert_trees_all_equal(got.k[:, row : row + 1], one.k)
                chex.assert_trees_all_equal(got.v[:, row : row + 1], one.v)


def test_insert_rows_then_decode_equals_alone():
    """A prompt prefilled into a small cache and inserted into a slot of a live
    cache (other rows mid-generation) decodes as it does alone."""
    decoder, params = tiny()
    steps, max_len = 6, 32
    apply = jax.jit(decoder.apply)  # four programs (eagerly, every operation compiled alone)

    def prefill(ids, cache):
        mask = jnp.ones_like(ids)
        logits, cache = apply(params, ids, jd.positions_from_mask(mask), cache, mask)
        return logits[:, -1], cache

    def greedy_steps(logits, cache, positions, k):
        out = []
        for _ in range(k):
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            out.append(np.asarray(tok))
            logits, cache = apply(
                params, tok[:, None], positions[:, None], cache, jnp.ones_like(tok)[:, None]
            )
            logits, positions = logits[:, 0], positions + 1
        return np.stack(out, 1)

    new = jnp.asarray(PROMPT_B[None])
    logits1, small = prefill(new, decoder.init_cache(1, 16, None))
    alone = greedy_steps(
        logits1,
        decoder.init_cache(1, max_len, None).put_rows(jnp.array([0]), small),
        jnp.array([len(PROMPT_B)]),
        steps,
    )
    # Three live rows, two tokens into their own generation.
    live_ids = jnp.asarray(np.random.default_rng(5).integers(0, V, (3, 4)), jnp.int32)
    logits3, live = prefill(live_ids, decoder.init_cache(3, max_len, None))
    positions = jnp.full((3,), 4)
    for _ in range(2):
        tok = jnp.argmax(logits3, -1).astype(jnp.int32)
        logits3, live = apply(
            params, tok[:, None], positions[:, None], live, jnp.ones((3, 1), jnp.int32)
        )
        logits3, positions = logits3[:, 0], positions + 1
    live = live.put_rows(jnp.array([1]), small)
    logits3 = logits3.at[1].set(logits1[0])
    positions = positions.at[1].set(len(PROMPT_B))
    batch = greedy_steps(logits3, live, positions, steps)
    np.testing.assert_array_equal(batch[1], alone[0])


# --------------------------------------------------------------------------- #
# A stateful processor: its state is reordered with the beams.
# --------------------------------------------------------------------------- #


@jd.pytree_dataclass
class NoRepeatToken(jd.LogitsProcessor):
    """Bans every token the row generated before; keeps them as state
    (`[batch, vocab]` bool), as a grammar keeps its automaton state."""

    def init(self, ctx):
        rows = jnp.arange(ctx.batch)[:, None]
        empty = jnp.zeros((ctx.batch, ctx.vocab_size), bool)
        return empty.at[rows, ctx.sequences].max(ctx.generated_mask(), mode="drop")

    def update(self, state, tokens):
        return state.at[jnp.arange(tokens.shape[0]), tokens].set(True)

    def apply(self, logits, ctx, state):
        return jnp.where(state, -jnp.inf, logits)


@jd.pytree_dataclass
class NoRepeatTokenFromHistory(jd.LogitsProcessor):
    """The same rule read from the token buffer at every step (stateless reference)."""

    def apply(self, logits, ctx, state):
        return jnp.where(NoRepeatToken().init(ctx), -jnp.inf, logits)


# The fake decoder's next token is a table lookup on the last token; this table
# always prefers repeating it, so the ban decides every step.
STICKY = np.random.default_rng(7).normal(size=(16, 16)).astype(np.float32)
STICKY[np.arange(16), np.arange(16)] += 10.0


@pytest.mark.parametrize(
    "options",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=10),
        dict(num_beams=3, num_return_sequences=3),
        dict(num_beams=3, do_sample=True),
    ],
    ids=["greedy", "sample", "beam", "beam-sample"],
)
def test_stateful_processor_equals_its_stateless_reference(options):
    """Under greedy, sampling and beam search (state gathered by parent beam), a
    processor keeping its memory as state acts exactly as one reading the buffer."""
    decoder, params = fake_decoder(16), table_params(STICKY)
    prompts = np.array([[5, 2, 3], [1, 1, 6]])
    config = jd.GenerationConfig(max_new_tokens=N, **options)
    key = jax.random.key(4)
    run = lambda proc: np.asarray(
        jd.generate(
            decoder, prompts, config=config, params=params, key=key, logits_processor=proc
        ).sequences
    )
    got = run(NoRepeatToken())
    np.testing.assert_array_equal(got, run(NoRepeatTokenFromHistory()))
    for row in got[:, prompts.shape[1] :]:
        assert len(set(row.tolist())) == len(row), f"a token repeated: {row}"
    if options == {"do_sample": False}:  # the premise, once: +10 on the diagonal repeats
        plain = run(None)[:, prompts.shape[1] :]
        assert any(len(set(r.tolist())) < len(r) for r in plain), "the sticky model should repeat"


def test_per_row_value_of_the_wrong_length_is_a_clear_error():
    decoder, params = tiny()
    with pytest.raises(ValueError, match=r"temperature has 3 values.*2 here"):
        jd.generate(
            decoder,
            np.stack([PROMPT_A, PROMPT_A]),
            params=params,
            do_sample=True,
            temperature=[0.5, 0.7, 0.9],
            key=jax.random.key(0),
        )


def test_all_zero_attention_mask_row_is_refused():
    decoder, params = tiny()
    ids = np.stack([PROMPT_A, PROMPT_A])
    mask = np.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] are all 0"):
        jd.generate(decoder, ids, mask, params=params)
