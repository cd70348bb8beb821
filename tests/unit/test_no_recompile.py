"""Reloading a model, or asking for the same length another way, compiles nothing
(issue 24): `Decoder`s and tokenizers compare by value, and the static config
carries only what a compiled program reads."""

from __future__ import annotations

import jax
import numpy as np
from support import count_compiles

import jaxdecode as jd
from jaxdecode.models.gpt2 import GPT2Config, init_params
from jaxdecode.models.llama import LlamaConfig, llama_decoder


def test_reload_and_max_length_compile_nothing():
    lm = jd.from_pretrained("bundled")
    ids = np.array([lm.tokenizer.encode("And God said")], np.int32)
    greedy = dict(do_sample=False, max_new_tokens=4)
    first = jd.generate(lm, ids, **greedy)
    logits = lm.logits(ids)

    again = jd.from_pretrained("bundled")
    assert again.decoder == lm.decoder and hash(again.decoder) == hash(lm.decoder)
    assert again.tokenizer == lm.tokenizer and hash(again.tokenizer) == hash(lm.tokenizer)
    with count_compiles() as reload:
        out = jd.generate(again, ids, **greedy)
        np.testing.assert_array_equal(again.logits(ids), logits)
    assert reload.count == 0, "a second load of the same model compiled again"
    np.testing.assert_array_equal(out.sequences, first.sequences)

    with count_compiles() as by_length:
        out = jd.generate(
            lm, ids, do_sample=False, max_new_tokens=None, max_length=ids.shape[1] + 4
        )
    assert by_length.count == 0, "max_length = prompt + 4 compiled another program"
    np.testing.assert_array_equal(out.sequences, first.sequences)


def test_decoders_are_equal_by_value():
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    assert llama_decoder(config) == llama_decoder(config)
    assert hash(llama_decoder(config)) == hash(llama_decoder(config))
    assert llama_decoder(config) != llama_decoder(config, jax.numpy.bfloat16)
    other = LlamaConfig(**{**config.__dict__, "num_hidden_layers": 2})
    assert llama_decoder(config) != llama_decoder(other)


def test_gpt2_init_params_is_one_program_with_eager_values():
    """`init_params` compiles its draws as one program (eagerly, Flax's init compiled
    ~90 operations one by one, the largest share of a small test's compilations) and
    gives the bits an eager init gives."""
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=24)
    with count_compiles() as n:
        params = init_params(config, jax.random.key(3))
    assert n.count <= 10, f"init_params compiled {n.count} programs"
    with jax.disable_jit():
        eager = init_params(config, jax.random.key(3))
    assert jax.tree.structure(params) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(eager), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
