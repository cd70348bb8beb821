"""Long prompts: blocked prefill attention, last-position LM head, the context
check and the prefill in the memory pre-check (issue 23, item 3).

Tiny random models throughout; the real SmolLM2 GGUF's context check is in
tests/integration/test_gguf.py (it shares that file's loaded model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.hf_models import (
    hf_logits,
    left_padded_batch,
    make_hf_model,
    make_llama_model,
    save_hf_model,
)

import jaxdecode as jd
from jaxdecode import generation
from jaxdecode.cache import init_cache, slot_mask
from jaxdecode.models.gpt2 import gpt2_decoder
from jaxdecode.models.layers import attend
from jaxdecode.models.llama import llama_decoder
from jaxdecode.search.program import prefill_program

V = 96


# --------------------------------------------------------------------------- #
# attend: blocked == direct
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "hq, hkv, t, extra, start, pads, window, block, softcap",
    [
        (4, 4, 37, 5, 0, (0, 9), None, 8, None),  # MHA, left padding, 8 does not divide 37
        (6, 2, 37, 5, 0, (3, 0), None, 8, None),  # GQA
        (3, 1, 40, 0, 0, (0, 17), 5, 8, None),  # MQA, sliding window smaller than a block
        (4, 2, 41, 7, 0, (0, 12), 11, 7, 2.0),  # window across blocks, soft-cap
        (4, 2, 30, 9, 6, (0, 0), None, 8, None),  # a cache already holding 6 tokens
        (2, 2, 9, 0, 0, (4,), None, 16, None),  # one block wider than T and S
        (6, 2, 1, 33, 6, (0, 0), None, 8, None),  # a decode step over a wide cache
        (4, 4, 3, 30, 9, (1, 0), 4, 8, 2.0),  # a few tokens, wide cache, window, soft-cap
        # Key blocks narrower than the block (128 of 256): a step, and a few tokens
        # whose window starts inside the second key block.
        (6, 2, 1, 290, 9, (0, 0), None, 256, None),
        (4, 2, 3, 150, 140, (0, 1), 20, 256, None),
        (4, 2, 3, 1, 290, (0, 1), None, 256, None),  # the last key block overlaps
        # Longer prefills (T=70 and 53 over blocks of 16): padding past a third of
        # a block, a window inside one, soft-cap after cached tokens.
        (6, 2, 70, 6, 0, (0, 11), None, 16, None),
        (4, 2, 70, 3, 0, (5, 0), 9, 16, None),
        (4, 4, 53, 0, 12, (0, 20), None, 16, 2.0),
    ],
)
def test_blocked_attention_equals_direct(hq, hkv, t, extra, start, pads, window, block, softcap):
    b, d = len(pads), 8
    s = start + t + extra
    k = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k[0], (b, t, hq, d))
    # A stack of 3 layers, read at layer 1 as the models read `KVCache.k`.
    stack_k = jax.random.normal(k[1], (3, b, hkv, s, d))
    stack_v = jax.random.normal(k[2], (3, b, hkv, s, d))
    keys, values = stack_k[1], stack_v[1]
    mask = np.ones((b, t), np.int32)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    cache = init_cache(layers=1, batch=b, max_len=s, heads=hkv, head_dim=d)
    if start:  # `start` real tokens already in the cache
        cache = cache.advance(jnp.ones((b, start), jnp.int32))
    slots, _ = slot_mask(cache, jnp.asarray(mask))
    slots = slots.with_window(window)
    direct = attend(q, keys, values, slots.dense(), 0.3, softcap)
    blocked = jax.jit(
        lambda q: attend(q, stack_k, stack_v, slots, 0.3, softcap, block=block, layer=1)
    )(q)
    assert blocked.shape == direct.shape and blocked.dtype == direct.dtype
    real = mask == 1
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(direct)[real], atol=2e-6)
    assert np.isfinite(np.asarray(blocked)).all()  # padding queries see nothing: no NaN


def test_blocked_attention_is_differentiable():
    """Reverse mode through the blocked path (jax.grad of a score or a loss over
    a long sequence) gives the direct path's gradient."""
    b, t, hq, hkv, d = 1, 20, 4, 2, 8
    k = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(k[0], (b, t, hq, d))
    keys, values = (jax.random.normal(x, (b, hkv, t, d)) for x in k[1:])
    cache = init_cache(layers=1, batch=b, max_len=t, heads=hkv, head_dim=d)
    slots, _ = slot_mask(cache, jnp.ones((b, t), jnp.int32))
    blocked = jax.grad(lambda q: attend(q, keys, values, slots, 0.3, block=4).sum())(q)
    direct = jax.grad(lambda q: attend(q, keys, values, slots.dense(), 0.3).sum())(q)
    np.testing.assert_allclose(blocked, direct, atol=2e-6)


# --------------------------------------------------------------------------- #
# Whole models: blocked prefill == direct == transformers
# --------------------------------------------------------------------------- #
LLAMA_CASES = {
    "llama-gqa": ("llama", {}),
    "mistral-window": ("mistral", dict(sliding_window=5)),
    "qwen2-window-layers": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, num_hidden_layers=3),
    ),
    "gemma-mqa": ("gemma", dict(num_key_value_heads=1)),
}
LENGTH, PADS, BLOCK = 23, [0, 5, 11], 4  # 4 does not divide 23


def _blocked_and_direct(lm: jd.CausalLM, build, ids, mask):
    """Logits of the model's own decoder with a block of BLOCK and of one whose
    block exceeds the prompt (the direct path)."""
    out = []
    for block in (BLOCK, 10**6):
        decoder = build(lm.config, attention_block=block)
        out.append(np.asarray(lm.replace(decoder=decoder).logits(ids, mask)))
    return out


@pytest.mark.parity
@pytest.mark.parametrize("name", list(LLAMA_CASES))
def test_blocked_llama_prefill_matches_direct_and_transformers(name, tmp_path):
    model_type, overrides = LLAMA_CASES[name]
    hf = make_llama_model(model_type, seed=7, **overrides)
    hf.save_pretrained(tmp_path)
    lm = jd.from_pretrained(tmp_path)
    ids, mask = left_padded_batch(np.random.default_rng(0), V, LENGTH, PADS)
    blocked, direct = _blocked_and_direct(lm, llama_decoder, ids, mask)
    real = mask == 1
    np.testing.assert_allclose(blocked[real], direct[real], atol=2e-5)
    np.testing.assert_allclose(blocked[real], hf_logits(hf, ids, mask)[real], atol=1e-4)


@pytest.mark.parity
def test_blocked_gpt2_prefill_matches_direct_and_transformers(tmp_path):
    hf = make_hf_model(seed=5, n_positions=64)
    lm = jd.from_pretrained(save_hf_model(hf, tmp_path))
    ids, mask = left_padded_batch(np.random.default_rng(1), V, LENGTH, PADS)
    blocked, direct = _blocked_and_direct(lm, gpt2_decoder, ids, mask)
    real = mask == 1
    np.testing.assert_allclose(blocked[real], direct[real], atol=2e-5)
    np.testing.assert_allclose(blocked[real], hf_logits(hf, ids, mask)[real], atol=1e-4)


def _tiny_llama(tmp_path, **config) -> jd.CausalLM:
    make_llama_model("llama", seed=3, **config).save_pretrained(tmp_path)
    return jd.from_pretrained(tmp_path)


def test_blocked_generate_equals_direct(tmp_path):
    """Greedy tokens and prompt log-probs of a left-padded batch: a blocked
    prefill then one-token steps give what the direct prefill gives."""
    lm = _tiny_llama(tmp_path)
    ids, mask = left_padded_batch(np.random.default_rng(2), V, LENGTH, PADS)
    outs = []
    for block in (BLOCK, 10**6):
        model = lm.replace(decoder=llama_decoder(lm.config, attention_block=block))
        outs.append(
            model.generate(
                ids, mask, max_new_tokens=6, do_sample=False, prompt_logprobs=0, eos_token_id=None
            )
        )
    np.testing.assert_array_equal(outs[0].sequences, outs[1].sequences)
    real = mask == 1
    np.testing.assert_allclose(
        np.asarray(outs[0].prompt_logprobs)[real],
        np.asarray(outs[1].prompt_logprobs)[real],
        atol=1e-5,
    )


# --------------------------------------------------------------------------- #
# Memory: the prefill program grows linearly with the prompt
# --------------------------------------------------------------------------- #
def _prefill_temp_bytes(lm: jd.CausalLM, length: int) -> int:
    ids = np.ones((1, length), np.int32)
    options = dict(max_new_tokens=4, do_sample=False)
    req = generation.prepare(lm, ids, overrides=options, prompt_buckets=None)
    compiled = jax.jit(prefill_program, static_argnums=0).lower(req.plan, *req.args()).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_prefill_memory_is_linear_in_the_prompt(tmp_path):
    """generate's prefill program (its scratch, as XLA plans it): from 1024 to
    4096 prompt tokens it grows under 8x (about 4x; [heads, T, T] scores or
    every position's logits would give 16x). The vocabulary is wide, so the
    LM head over every position would dominate."""
    lm = _tiny_llama(tmp_path, vocab_size=4096, max_position_embeddings=8192)
    small, large = _prefill_temp_bytes(lm, 1024), _prefill_temp_bytes(lm, 4096)
    assert large < 8 * small, (small, large)
    # Every position's logits alone would be 4096 x 4096 float32 (64 MiB).
    assert large < 4096 * 4096 * 4, large


def test_long_prompts_pad_by_under_a_quarter():
    """ "pow2" buckets: powers of two up to 1024, then quarters of the next power
    (6000 pads to 6144, not 8192)."""
    assert [jd.bucket_length(n) for n in (1000, 1024, 1025, 1281, 2049, 6000, 8192)] == [
        1024,
        1024,
        1280,
        1536,
        2560,
        6144,
        8192,
    ]
    lengths = range(1, 20000)
    assert all(n <= jd.bucket_length(n) < 1.25 * n or n <= 1024 for n in lengths)
    assert len({jd.bucket_length(n) for n in range(1025, 16385)}) == 16  # 4 per doubling


# --------------------------------------------------------------------------- #
# Context length, and the prefill in the memory pre-check
# --------------------------------------------------------------------------- #
def test_context_length_is_checked_up_front(tmp_path):
    lm = _tiny_llama(tmp_path / "llama", max_position_embeddings=32)
    assert lm.decoder.max_positions == 32
    ids = np.ones((1, 30), np.int32)
    with pytest.raises(
        ValueError,
        match=r"^prompt length 30 \+ max_new_tokens 3 = 33 exceeds the Llama model's context "
        r"length max_position_embeddings=32; .*from_pretrained\(\.\.\., max_positions=N\)",
    ):
        lm.generate(ids, max_new_tokens=3)
    lm.generate(ids, max_new_tokens=2, do_sample=False)  # exactly the context: fine
    with pytest.raises(ValueError, match="33 exceeds .*max_position_embeddings=32"):
        lm.logits(np.ones((1, 33), np.int32))
    # Raised on request (e.g. with rope scaling): no clamping, the limit moves.
    longer = jd.from_pretrained(tmp_path / "llama", max_positions=40)
    assert longer.decoder.max_positions == 40
    longer.generate(ids, max_new_tokens=10, do_sample=False)
    with pytest.raises(ValueError, match=r"= 41 exceeds .* context length max_positions=40;"):
        longer.generate(ids, max_new_tokens=11)
    with pytest.raises(ValueError, match="max_positions must be an integer >= 1 or None, got 0"):
        jd.from_pretrained(tmp_path / "llama", max_positions=0)
    # Dynamic NTK scaling stretches past max_position_embeddings: no limit.
    dynamic = _tiny_llama(
        tmp_path / "dynamic",
        max_position_embeddings=8,
        rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=100.0),
    )
    assert dynamic.decoder.max_positions is None

    gpt2 = jd.from_pretrained(save_hf_model(make_hf_model(n_positions=16), tmp_path / "gpt2"))
    with pytest.raises(
        ValueError,
        match=r"^prompt length 14 \+ max_new_tokens 3 = 17 exceeds the GPT-2 model's context "
        r"length n_positions=16; shorten the prompt or max_new_tokens$",
    ):
        gpt2.generate(np.ones((1, 14), np.int32), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_positions=17 exceeds the GPT-2 model's n_positions"):
        jd.from_pretrained(tmp_path / "gpt2", max_positions=17)


def test_memory_check_counts_the_prefill(tmp_path, monkeypatch):
    """With room for the cache and the decoding steps but not for the prompt's
    activations, generate refuses before tracing, naming the prefill."""
    lm = _tiny_llama(tmp_path, max_position_embeddings=4096)
    ids = np.ones((1, 2048), np.int32)
    plan = generation.prepare(lm, ids, overrides=dict(max_new_tokens=4, do_sample=False)).plan
    cache = lm.decoder.init_cache(1, plan.bucket + plan.new_tokens, None).nbytes_kv()
    monkeypatch.setattr(generation, "available_bytes", lambda: 2 * cache)
    with pytest.raises(ValueError, match=r"prefill of the 2048-token padded prompt .* GiB free"):
        lm.generate(ids, max_new_tokens=4, do_sample=False)
    lm.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # a short prompt still fits
    # The estimate: activations [T, width] and one attention tile, not [T, T].
    prefill = lm.decoder.prefill_bytes(1, 2048, 2052, all_logits=False)
    assert 4 * cache < prefill < 4 * 2048 * 2052 * 4  # below one [heads, T, S] score array


@pytest.mark.parametrize("block", [0, -3, 2.5, True, "512"])
def test_attention_block_is_validated(block):
    """A decoder's `attention_block` is a positive int, refused by name otherwise."""
    with pytest.raises(ValueError, match=r"attention_block must be a positive int"):
        gpt2_decoder(jd.GPT2Config(n_layer=1, n_embd=8, n_head=2), attention_block=block)
    from jaxdecode.models.llama.config import LlamaConfig

    with pytest.raises(ValueError, match=r"attention_block must be a positive int"):
        llama_decoder(LlamaConfig(), attention_block=block)
