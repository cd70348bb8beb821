"""The cache protocol: beam search, several return sequences, speculative decoding,
the engine and sharding reach a decoder's cache only through `jd.Cache`'s methods.

The proof is a cache that breaks every shortcut: `RowsLast` keeps a per-row
counter with the rows on axis 1 (not 0) next to a `KVCache`, and the decoder
poisons its logits with NaN whenever that counter disagrees with the cache's own
row index. A caller that indexed the cache's leaves on axis 0, or forgot a leaf,
would see a shape error or different tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode import pytree
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params
from jaxdecode.serving import Engine

V = 64
EOS = 11


@pytree.dataclass
class RowsLast:
    """A `KVCache` plus `written: [1, batch]` int32 (rows on axis 1)."""

    kv: jd.KVCache
    written: jax.Array

    def take_rows(self, rows):
        return RowsLast(kv=self.kv.take_rows(rows), written=self.written[:, rows])

    def put_rows(self, rows, new):
        written = self.written.at[:, rows].set(new.written[0], mode="drop")
        return RowsLast(kv=self.kv.put_rows(rows, new.kv), written=written)

    def gather_rows(self, parent):
        return RowsLast(kv=self.kv.gather_rows(parent), written=self.written[:, parent])

    def rewind(self, n, *, width=None):
        return RowsLast(kv=self.kv.rewind(n, width=width), written=self.written - n[None, :])

    def partition_specs(self, mesh):
        return RowsLast(
            kv=self.kv.partition_specs(mesh), written=jax.sharding.PartitionSpec(None, "data")
        )

    @property
    def nbytes(self):
        return self.kv.nbytes + jd.cache_nbytes(self.written)


def rows_last(inner: jd.Decoder) -> jd.Decoder:
    """`inner` with its cache wrapped in `RowsLast` and its logits NaN on any row
    whose counter disagrees with the cache."""

    def init_cache(batch, max_len, dtype=None):
        kv = inner.init_cache(batch, max_len, dtype)
        return RowsLast(kv=kv, written=jnp.zeros((1, batch), jnp.int32))

    def apply(params, ids, positions, cache, mask):
        ok = cache.written[0] == cache.kv.index  # [B]
        logits, kv = inner.apply(params, ids, positions, cache.kv, mask)
        logits = jnp.where(ok[:, None, None], logits, jnp.nan)
        return logits, RowsLast(kv=kv, written=cache.written + ids.shape[1])

    return jd.Decoder(
        init_cache=init_cache,
        apply=apply,
        vocab_size=inner.vocab_size,
        max_positions=inner.max_positions,
        name="rows-last",
    )


@functools.cache
def models() -> tuple[jd.CausalLM, jd.CausalLM]:
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=V, n_positions=128)
    params = jax.tree_util.tree_map(lambda x: x * 4.0, init_params(config, jax.random.key(3)))
    defaults = jd.GenerationConfig(eos_token_id=EOS, pad_token_id=0, max_new_tokens=8)
    plain = gpt2_decoder(config)
    return tuple(
        jd.CausalLM(params=params, decoder=d, generation_config=defaults)
        for d in (plain, rows_last(plain))
    )


PROMPTS = np.array([[0, 0, 5, 9, 12, 5, 9], [3, 4, 5, 6, 3, 4, 5]])
MASK = (PROMPTS != 0).astype(np.int32)
MASK[1] = 1


@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=3, num_return_sequences=2, do_sample=False),  # gather_rows each step
        dict(do_sample=True, num_return_sequences=2, seed=4),  # gather_rows after prefill
        dict(do_sample=False, prompt_lookup_num_tokens=3),  # rewind_rows
    ],
    ids=["beam", "expand", "speculative"],
)
def test_generate_through_the_protocol(options):
    plain, wrapped = models()
    want = jd.generate(plain, PROMPTS, MASK, **options)
    got = jd.generate(wrapped, PROMPTS, MASK, **options)
    np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(want.sequences))
    assert np.isfinite(np.asarray(got.token_logprobs)).all() or options.get("num_beams")


def test_engine_through_the_protocol():
    """The engine over the wrapped cache gives each prompt the plain model's
    `generate` tokens (the engine's contract; one program for the reference
    instead of a second engine's)."""
    plain, wrapped = models()
    rng = np.random.default_rng(0)
    # Two prompt buckets (rows at different cache indices), fewer prefill rows than
    # slots, and the compacted tail: every way the engine moves rows.
    prompts = [rng.integers(1, V, int(rng.integers(2, 20))).tolist() for _ in range(9)]
    engine = Engine(
        wrapped, slots=4, max_len=48, steps_per_call=2, prompt_buckets=[8, 24],
        prefill_rows=2, compact_tail=True,
    )  # fmt: skip
    budgets = [3 + i % 6 for i in range(9)]
    engine.submit(prompts, [{"do_sample": False, "max_new_tokens": n} for n in budgets])
    got = {r.index: r.tokens.tolist() for r in engine}
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    want = jd.generate(
        plain, ids, (ids != 0).astype(np.int32), do_sample=False, max_new_tokens=max(budgets)
    )
    tokens, lengths = np.asarray(want.sequences)[:, width:], np.asarray(want.lengths)
    for i, n in enumerate(budgets):
        assert got[i] == tokens[i, : min(n, lengths[i])].tolist(), i


def test_tree_functions_on_a_tuple_of_caches():
    """A decoder may keep caches of different kinds and lengths side by side."""
    a = jd.init_cache(layers=1, batch=3, max_len=4, heads=1, head_dim=2)
    b = jd.init_cache(layers=2, batch=3, max_len=6, heads=2, head_dim=2)
    a = a.replace(k=a.k + jnp.arange(3.0)[None, :, None, None, None], index=jnp.arange(3))
    b = b.replace(v=b.v + jnp.arange(3.0)[None, :, None, None, None], index=jnp.arange(3) + 1)
    tree = (a, b, jnp.arange(3), jnp.int32(7))

    taken = jd.take_rows(tree, jnp.array([2, 0]))
    np.testing.assert_array_equal(taken[0].k[0, :, 0, 0, 0], [2.0, 0.0])
    np.testing.assert_array_equal(taken[1].index, [3, 1])
    np.testing.assert_array_equal(taken[2], [2, 0])
    assert int(taken[3]) == 7  # scalars (a step counter) are not rows

    back = jd.put_rows(tree, jnp.array([1, 2]), taken)
    np.testing.assert_array_equal(back[0].k[0, :, 0, 0, 0], [0.0, 2.0, 0.0])
    np.testing.assert_array_equal(back[1].index, [1, 3, 1])

    gathered = jd.gather_rows(tree, jnp.array([1, 1, 0]))
    np.testing.assert_array_equal(gathered[1].v[0, :, 0, 0, 0], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(gathered[2], [1, 1, 0])

    rewound = jd.rewind_rows(tree, jnp.array([0, 1, 1]), width=1)
    np.testing.assert_array_equal(rewound[0].index, [0, 0, 1])
    np.testing.assert_array_equal(rewound[1].index, [1, 1, 2])

    mesh = jd.make_mesh(1, 1)
    specs = jd.cache_specs(tree, mesh)
    assert isinstance(specs[0], jd.KVCache) and specs[3] == jax.sharding.PartitionSpec()
    assert jd.cache_nbytes(tree) == a.nbytes + b.nbytes + 3 * 4 + 4
    assert isinstance(a, jd.Cache) and not isinstance(jnp.zeros(3), jd.Cache)


def test_put_rows_of_a_narrower_cache_clears_the_rest():
    live = jd.init_cache(layers=1, batch=2, max_len=5, heads=1, head_dim=1)
    live = live.replace(k=live.k + 9.0, mask=live.mask | True)
    small = jd.init_cache(layers=1, batch=1, max_len=2, heads=1, head_dim=1)
    small = small.replace(k=small.k + 1.0, mask=small.mask.at[0, 0].set(True))
    out = live.put_rows(jnp.array([1]), small)
    np.testing.assert_array_equal(out.k[0, 1, 0, :, 0], [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out.mask[1], [True, False, False, False, False])
    np.testing.assert_array_equal(out.k[0, 0, 0, :, 0], [9] * 5)
    with pytest.raises(ValueError, match="max_len=5"):
        small.put_rows(jnp.array([0]), live)
