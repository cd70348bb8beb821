"""GPT-2 in Flax against transformers' `GPT2LMHeadModel`.

Checkpoints are created here with random weights (`tests/support/hf_models.py`), saved
with `save_pretrained` and loaded with `jaxdecode.from_pretrained`. Two paths are
compared with transformers' one-pass logits (position ids from the mask, as
transformers computes them for left padding), on real (mask == 1) positions only:

* `lm.logits(ids, mask)`: a full forward pass;
* prefill of the first tokens through `lm.decoder.apply` followed by one-token
  steps through the cache (under one `jax.jit`, steps in a `lax.scan`; and once
  unjitted, in a Python loop).

float32: max abs difference <= 1e-4. bfloat16: see `BF16_REL_TOL`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from support.hf_models import (
    TINY,
    hf_logits,
    left_padded_batch,
    load_in_jaxdecode,
    make_hf_model,
)

import jaxdecode as jd

F32_ATOL = 1e-4
V = TINY["vocab_size"]

# Tiny configs (on top of hf_models.TINY: vocab 96, n_positions 32, n_embd 32,
# n_layer 2, n_head 4) covering every GPT2Config field that changes inference.
CONFIGS: dict[str, dict] = {
    "base": {},
    "n_layer_1": dict(n_layer=1),
    "n_layer_3": dict(n_layer=3),
    "n_head_1": dict(n_head=1),
    "n_inner_40": dict(n_inner=40),
    "ln_eps_1e-3": dict(layer_norm_epsilon=1e-3),
    "act_gelu": dict(activation_function="gelu"),
    "act_relu": dict(activation_function="relu"),
    "act_silu": dict(activation_function="silu"),
    "act_gelu_pytorch_tanh": dict(activation_function="gelu_pytorch_tanh"),
    "act_quick_gelu": dict(activation_function="quick_gelu"),
    "no_scale_attn_weights": dict(scale_attn_weights=False),
    "scale_by_inverse_layer_idx": dict(n_layer=3, scale_attn_by_inverse_layer_idx=True),
    "reorder_and_upcast": dict(reorder_and_upcast_attn=True),
    "all_flags": dict(
        n_layer=3,
        n_head=2,
        n_inner=24,
        layer_norm_epsilon=1e-3,
        activation_function="quick_gelu",
        scale_attn_weights=False,
        scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True,
    ),
}
# The cache path is exercised for the configs that change attention or depth
# (the MLP-only fields go through the same cache code as "base"); the full pass
# for all of them.
CACHE_CONFIGS = [
    "base",
    "n_layer_1",
    "n_layer_3",
    "n_head_1",
    "no_scale_attn_weights",
    "scale_by_inverse_layer_idx",
    "reorder_and_upcast",
    "all_flags",
]

LENGTH = 9
PREFILL = 4  # row 2 of the 3-row batch has 5 pads: its prefill and first step are padding
BATCHES = {"b1": [0], "b3_left_padded": [0, 2, 5]}
CASES = [(c, "b3_left_padded") for c in CONFIGS] + [("base", "b1")]
CACHE_CASES = [case for case in CASES if case[0] in CACHE_CONFIGS]


def _case_id(case) -> str:
    return "-".join(case)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """`load(name) -> (HF model, jaxdecode CausalLM)`: each tiny config is built,
    saved and loaded once per module (per xdist worker)."""
    built: dict[str, tuple] = {}

    def load(name: str):
        if name not in built:
            model = make_hf_model(seed=list(CONFIGS).index(name), **CONFIGS[name])
            built[name] = (model, load_in_jaxdecode(model, tmp_path_factory.mktemp(name)))
        return built[name]

    return load


def _batch(name: str, seed: int = 0):
    return left_padded_batch(np.random.default_rng(seed), V, LENGTH, BATCHES[name])


def _max_real_diff(ours, ref, mask) -> float:
    real = np.asarray(mask) == 1
    return float(np.abs(np.asarray(ours) - ref)[real].max())


def _check_final_cache(cache, mask, max_len: int) -> None:
    """The cache remembers exactly the real tokens; unwritten slots stay masked out."""
    b, t = np.shape(mask)
    expected_mask = np.zeros((b, max_len), bool)
    expected_mask[:, :t] = np.asarray(mask) == 1
    np.testing.assert_array_equal(np.asarray(cache.mask), expected_mask)
    np.testing.assert_array_equal(np.asarray(cache.index), t)


@functools.partial(jax.jit, static_argnames=("decoder", "prefill", "max_len"))
def _decode_jit(decoder, params, ids, mask, *, prefill: int, max_len: int):
    """Prefill of `prefill` tokens, then a `lax.scan` of one-token steps."""
    cache = decoder.init_cache(ids.shape[0], max_len, None)
    first, cache = decoder.apply(
        params,
        ids[:, :prefill],
        jd.positions_from_mask(mask[:, :prefill]),
        cache,
        mask[:, :prefill],
    )
    prefill_index = cache.index

    def step(cache, xs):
        tok, m, seen = xs  # [B] each; seen: real tokens already in the cache
        positions = jd.positions_from_mask(m[:, None], offset=seen)
        logits, cache = decoder.apply(params, tok[:, None], positions, cache, m[:, None])
        return cache, (logits[:, 0], cache.index)

    seen = jnp.cumsum(mask, axis=1) - mask
    xs = (ids[:, prefill:].T, mask[:, prefill:].T, seen[:, prefill:].T)
    cache, (rest, indices) = jax.lax.scan(step, cache, xs)
    return jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1), prefill_index, indices, cache


def _prefill_then_steps(lm, ids, mask, prefill: int, max_len: int) -> np.ndarray:
    """Logits `[B, T, V]` of the jitted prefill + steps, checking the cache."""
    logits, prefill_index, indices, cache = _decode_jit(
        lm.decoder, lm.params, jnp.asarray(ids), jnp.asarray(mask), prefill=prefill, max_len=max_len
    )
    t = np.shape(ids)[1]
    np.testing.assert_array_equal(np.asarray(prefill_index), prefill)
    expected = np.broadcast_to(np.arange(prefill + 1, t + 1)[:, None], indices.shape)
    np.testing.assert_array_equal(np.asarray(indices), expected)
    _check_final_cache(cache, mask, max_len)
    return np.asarray(logits)


def _prefill_then_steps_eager(lm, ids, mask, prefill: int, max_len: int) -> np.ndarray:
    """The same with unjitted `decoder.apply` in a Python loop."""
    decoder = lm.decoder
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    cache = decoder.init_cache(ids.shape[0], max_len, None)
    logits, cache = decoder.apply(
        lm.params,
        ids[:, :prefill],
        jd.positions_from_mask(mask[:, :prefill]),
        cache,
        mask[:, :prefill],
    )
    out = [np.asarray(logits)]
    np.testing.assert_array_equal(np.asarray(cache.index), prefill)
    for i in range(prefill, ids.shape[1]):
        seen = mask[:, :i].sum(axis=1)
        positions = jd.positions_from_mask(mask[:, i : i + 1], offset=seen)
        logits, cache = decoder.apply(
            lm.params, ids[:, i : i + 1], positions, cache, mask[:, i : i + 1]
        )
        out.append(np.asarray(logits))
        np.testing.assert_array_equal(np.asarray(cache.index), i + 1)
    _check_final_cache(cache, mask, max_len)
    return np.concatenate(out, axis=1)


# --------------------------------------------------------------------------- #
def test_positions_from_mask_matches_transformers_rule():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], np.int32)
    ref = np.cumsum(mask, axis=-1) - 1
    ref[mask == 0] = 1  # transformers: position_ids.masked_fill_(attention_mask == 0, 1)
    offset = np.array([3, 0, 7], np.int32)
    for fn in (jd.positions_from_mask, jax.jit(jd.positions_from_mask)):
        np.testing.assert_array_equal(np.asarray(fn(mask)), ref)
        np.testing.assert_array_equal(
            np.asarray(fn(mask, offset)), np.where(mask == 0, 1, ref + offset[:, None])
        )
        np.testing.assert_array_equal(np.asarray(fn(mask, 2)), np.where(mask == 0, 1, ref + 2))
    out = jd.positions_from_mask(mask)
    assert out.dtype == jnp.int32 and out.shape == mask.shape


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_full_forward_matches_transformers(case, tiny_models):
    name, batch = case
    model, lm = tiny_models(name)
    ids, mask = _batch(batch)
    ref = hf_logits(model, ids, mask)
    ours = lm.logits(ids, mask)
    assert ours.shape == (len(BATCHES[batch]), LENGTH, V)
    assert ours.dtype == jnp.float32
    assert _max_real_diff(ours, ref, mask) <= F32_ATOL


@pytest.mark.parametrize("case", CACHE_CASES, ids=_case_id)
def test_prefill_then_steps_match_transformers(case, tiny_models):
    name, batch = case
    model, lm = tiny_models(name)
    ids, mask = _batch(batch, seed=1)
    ref = hf_logits(model, ids, mask)
    ours = _prefill_then_steps(lm, ids, mask, PREFILL, max_len=LENGTH + 3)
    assert _max_real_diff(ours, ref, mask) <= F32_ATOL


def test_eager_decoder_apply_and_logits_inside_jit(tmp_path):
    """Unjitted `decoder.apply` in a Python loop; `lm.logits` inside a user's jit;
    `attention_mask=None` (all tokens real)."""
    model = make_hf_model(seed=7, n_layer=1)
    lm = load_in_jaxdecode(model, tmp_path)
    ids, mask = left_padded_batch(np.random.default_rng(2), V, 5, [1, 0])
    ref = hf_logits(model, ids, mask)
    ours = _prefill_then_steps_eager(lm, ids, mask, prefill=3, max_len=5)
    assert _max_real_diff(ours, ref, mask) <= F32_ATOL
    inside = jax.jit(lambda lm, i, m: lm.logits(i, m))(lm, ids, mask)
    assert _max_real_diff(inside, ref, mask) <= F32_ATOL
    np.testing.assert_allclose(
        np.asarray(lm.logits(ids)), hf_logits(model, ids), rtol=0, atol=F32_ATOL
    )


# Field -> the value it is compared against, to show that each tiny config changes
# the logits well beyond F32_ATOL (so the parity tests would catch the field being
# ignored). Structural fields (n_layer, n_inner) change tensor shapes anyway.
_SENSITIVITY = {
    "n_head_1": dict(n_head=4),
    "ln_eps_1e-3": dict(layer_norm_epsilon=1e-5),
    "act_gelu": dict(activation_function="gelu_new"),
    "act_relu": dict(activation_function="gelu_new"),
    "act_silu": dict(activation_function="gelu_new"),
    "act_gelu_pytorch_tanh": dict(activation_function="gelu"),
    "act_quick_gelu": dict(activation_function="gelu_new"),
    "no_scale_attn_weights": dict(scale_attn_weights=True),
    "scale_by_inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=False),
}


def test_tiny_configs_are_sensitive_to_their_field():
    ids, mask = left_padded_batch(np.random.default_rng(0), V, LENGTH, [0, 2])
    for name, reference in _SENSITIVITY.items():
        model = make_hf_model(seed=list(CONFIGS).index(name), **CONFIGS[name])
        other = make_hf_model(seed=0, **{**CONFIGS[name], **reference})
        other.load_state_dict(model.state_dict())
        diff = _max_real_diff(hf_logits(model, ids, mask), hf_logits(other, ids, mask), mask)
        assert diff > 10 * F32_ATOL, (name, diff)


def test_gpt2_small_sized_model(tmp_path):
    """n_layer 12, n_embd 768, n_head 12, vocab 50257, n_positions 1024; short prompt.

    Weights spread 0.3: logits of std ~9 and max ~150, a trained GPT-2's scale."""
    model = make_hf_model(
        seed=0,
        spread=0.3,
        n_layer=12,
        n_embd=768,
        n_head=12,
        vocab_size=50257,
        n_positions=1024,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    lm = load_in_jaxdecode(model, tmp_path)
    assert lm.config.n_layer == 12 and lm.config.n_positions == 1024
    ids, mask = left_padded_batch(np.random.default_rng(0), 50257, 7, [0, 3])
    ref = hf_logits(model, ids, mask)
    assert np.abs(ref[mask == 1]).max() > 50  # a realistic logit scale
    assert _max_real_diff(lm.logits(ids, mask), ref, mask) <= F32_ATOL
    ours = _prefill_then_steps(lm, ids, mask, prefill=5, max_len=8)
    assert _max_real_diff(ours, ref, mask) <= F32_ATOL


# --------------------------------------------------------------------------- #
# bfloat16 (params, activations and cache; softmax in float32). Measured against
# transformers' float32 logits on these random-weight tiny models (logits of std
# ~6, max |logit| 20-32), 5 configs (base, n_layer_3, all_flags,
# no_scale_attn_weights, act_relu) x 3 seeds, batch 3 left-padded, 12 tokens:
# max abs difference 0.15-0.36, i.e. 0.5%-1.5% of the largest |logit|, the same
# for the full pass and for prefill + steps; greedy argmax agrees on 96-100% of
# positions. Tolerance: 3% of the largest |logit|, >= 90% argmax agreement.
BF16_REL_TOL = 0.03
BF16_MIN_ARGMAX_AGREEMENT = 0.90


@pytest.mark.parametrize("name", ["base", "all_flags"])
def test_bfloat16_within_documented_tolerance(tmp_path, name):
    model = make_hf_model(seed=list(CONFIGS).index(name), **CONFIGS[name])
    lm = load_in_jaxdecode(model, tmp_path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(lm.params))
    cache = lm.decoder.init_cache(2, 4, None)
    assert cache.k.dtype == jnp.bfloat16 and cache.v.dtype == jnp.bfloat16
    ids, mask = left_padded_batch(np.random.default_rng(3), V, 12, [0, 3, 7])
    real = mask == 1
    ref = hf_logits(model, ids, mask)
    scale = np.abs(ref[real]).max()
    full = np.asarray(lm.logits(ids, mask))
    assert full.dtype == np.float32
    steps = _prefill_then_steps(lm, ids, mask, prefill=5, max_len=12)
    for ours in (full, steps):
        assert np.isfinite(ours[real]).all()
        rel = _max_real_diff(ours, ref, mask) / scale
        assert rel <= BF16_REL_TOL, (name, rel)
        agree = (ours.argmax(-1) == ref.argmax(-1))[real].mean()
        assert agree >= BF16_MIN_ARGMAX_AGREEMENT, (name, agree)
    # Not float32 in disguise: bfloat16 really changes the logits.
    assert _max_real_diff(full, ref, mask) > 10 * F32_ATOL


# --------------------------------------------------------------------------- #
def test_length_beyond_n_positions(tmp_path):
    model = make_hf_model(seed=3, n_layer=1, n_positions=16)
    lm = load_in_jaxdecode(model, tmp_path)
    assert lm.decoder.max_positions == 16
    assert lm.logits(np.ones((2, 16), np.int32)).shape == (2, 16, V)  # exactly n_positions
    with pytest.raises(ValueError, match="n_positions=16"):
        lm.logits(np.ones((2, 17), np.int32))
    with pytest.raises(ValueError, match="n_positions=16"):
        jax.jit(lambda lm, i: lm.logits(i))(lm, np.ones((1, 40), np.int32))
    lm.decoder.check_length(16)
    lm.decoder.check_length(1)
    with pytest.raises(ValueError, match=r"17 exceeds .*n_positions=16"):
        lm.decoder.check_length(17)
    dataclasses.replace(lm.decoder, max_positions=None).check_length(10**6)


def test_config_reads_every_inference_field_of_transformers():
    hf = transformers.GPT2Config(
        **{**TINY, **CONFIGS["all_flags"], "n_embd": 24, "n_head": 3, "n_positions": 20}
    )
    ours = jd.GPT2Config.from_hf(hf.to_dict())
    for field in (
        "n_layer",
        "n_head",
        "n_embd",
        "n_positions",
        "vocab_size",
        "layer_norm_epsilon",
        "activation_function",
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "n_inner",
    ):
        assert getattr(ours, field) == getattr(hf, field), field
    assert ours.head_dim == 8 and ours.inner_dim == 24
    assert jd.GPT2Config.from_hf(transformers.GPT2Config(**TINY).to_dict()).inner_dim == 4 * 32
