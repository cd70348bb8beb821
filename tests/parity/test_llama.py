"""Llama-style families (llama, mistral, qwen2, qwen3, gemma) against transformers.

Tiny random checkpoints (`tests/support/hf_models.make_llama_model`: eager attention,
wide weights) saved with `save_pretrained` and loaded with `jd.from_pretrained`:
logits of a full pass and of prefill + one-token cache steps within 1e-4 of
transformers on left-padded batches, sharded safetensors, greedy and beam search
token for token with transformers' `generate`, `save_pretrained` round trips,
and every refused config value.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from support.hf_models import (
    LLAMA_CLASSES,
    hf_logits,
    hf_step_logits,
    left_padded_batch,
    make_llama_model,
)

import jaxdecode as jd
from jaxdecode.models.llama import LlamaConfig

ATOL = 1e-4
V = 96
LENGTH, PREFILL = 10, 4
PADS = [0, 3, 6]

ROPE = {
    "linear": dict(rope_type="linear", factor=2.0, rope_theta=100.0),
    # Short max_position_embeddings: the 10-token batch runs past it, so the
    # NTK base grows with the length seen (and differs per decoding step).
    "dynamic": dict(rope_type="dynamic", factor=3.0, rope_theta=100.0),
    "llama3": dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
        rope_theta=500.0,
    ),
    "yarn": dict(
        rope_type="yarn",
        factor=4.0,
        original_max_position_embeddings=16,
        beta_fast=8.0,
        beta_slow=2.0,
        rope_theta=1000.0,
    ),
    "yarn_mscale": dict(
        rope_type="yarn",
        factor=4.0,
        original_max_position_embeddings=16,
        mscale=2.0,
        mscale_all_dim=1.0,
        rope_theta=1000.0,
    ),
}

# (model_type, config overrides on hf_models.LLAMA_TINY)
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama-tied-biases": (
        "llama",
        dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
    "llama-mha-gelu": (
        "llama",
        dict(num_key_value_heads=4, head_dim=None, hidden_act="gelu_pytorch_tanh"),
    ),
    "llama-mqa-eps": ("llama", dict(num_key_value_heads=1, rms_norm_eps=1e-2, num_hidden_layers=3)),
    **{
        f"llama-rope-{name}": (
            "llama",
            dict(rope_parameters=rope, max_position_embeddings=6 if name == "dynamic" else 64),
        )
        for name, rope in ROPE.items()
    },
    "mistral-window3": ("mistral", dict(sliding_window=3)),
    "qwen2": ("qwen2", dict(rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen2-window": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=3, max_window_layers=1, num_hidden_layers=3),
    ),
    "qwen3": ("qwen3", {}),
    "qwen3-bias-tied": ("qwen3", dict(attention_bias=True, tie_word_embeddings=True)),
    "gemma-mqa": ("gemma", dict(num_key_value_heads=1)),
    "gemma-gelu-exact": ("gemma", dict(hidden_act="gelu_pytorch_tanh", head_dim=16)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, its directory, jaxdecode CausalLM), built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model_type, overrides = CASES[name]
            hf = make_llama_model(model_type, seed=len(cache), **overrides)
            directory = str(tmp_path_factory.mktemp(name))
            hf.save_pretrained(directory)
            cache[name] = (hf, directory, jd.from_pretrained(directory))
        return cache[name]

    return get


def _fresh(hf, directory: str):
    """The checkpoint reloaded into a new transformers model. Dynamic RoPE in
    transformers is stateful (the rotary module keeps the longest length seen
    across calls and reuses its frequencies for shorter ones), so each reference
    computation starts from a fresh model, as a first `generate` call does."""
    return type(hf).from_pretrained(directory, attn_implementation="eager").eval()


def _batch(seed: int = 0):
    return left_padded_batch(np.random.default_rng(seed), V, LENGTH, PADS)


def _max_real_diff(ours, ref, mask) -> float:
    return float(np.abs(np.asarray(ours) - ref)[np.asarray(mask) == 1].max())


def _prefill_then_steps(lm: jd.CausalLM, ids, mask, prefill: int) -> np.ndarray:
    """Logits of `decoder.apply` on the first `prefill` tokens, then one token per
    call through the cache (jitted)."""
    apply = jax.jit(lm.decoder.apply)
    cache = lm.decoder.init_cache(ids.shape[0], ids.shape[1] + 2, None)
    pos = np.asarray(jd.positions_from_mask(mask))
    out = []
    for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
        logits, cache = apply(
            lm.params, ids[:, start:stop], pos[:, start:stop], cache, mask[:, start:stop]
        )
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


# --------------------------------------------------------------------------- #
@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_full_forward_matches_transformers(name, checkpoints):
    hf, _, lm = checkpoints(name)
    ids, mask = _batch()
    ref = hf_logits(hf, ids, mask)
    ours = lm.logits(ids, mask)
    assert ours.shape == (len(PADS), LENGTH, V) and ours.dtype == jnp.float32
    assert _max_real_diff(ours, ref, mask) <= ATOL


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_prefill_then_steps_match_transformers(name, checkpoints):
    hf, directory, lm = checkpoints(name)
    ids, mask = _batch(seed=1)
    ref = hf_step_logits(_fresh(hf, directory), ids, mask, PREFILL)
    assert _max_real_diff(_prefill_then_steps(lm, ids, mask, PREFILL), ref, mask) <= ATOL


# Field -> the value it is compared against: each case's field changes
# transformers' logits far beyond ATOL, so ignoring it would fail the tests above.
_SENSITIVITY = {
    **{
        f"llama-rope-{n}": dict(
            rope_parameters=dict(rope_type="default", rope_theta=ROPE[n]["rope_theta"])
        )
        for n in ROPE
    },
    "mistral-window3": dict(sliding_window=None),
    "qwen2-window": dict(use_sliding_window=False),
    "llama-mqa-eps": dict(rms_norm_eps=1e-6),
    "gemma-gelu-exact": dict(hidden_act="silu"),
}


def test_case_fields_change_transformers_logits(checkpoints):
    ids, mask = _batch()
    for name, other in _SENSITIVITY.items():
        hf, _, _ = checkpoints(name)
        model_type, overrides = CASES[name]
        twin = make_llama_model(model_type, **{**overrides, **other})
        twin.load_state_dict(hf.state_dict())
        for ref in (hf_logits, lambda m, i, k: hf_step_logits(m, i, k, PREFILL)):
            diff = _max_real_diff(ref(hf, ids, mask), ref(twin, ids, mask), mask)
            assert diff > 10 * ATOL, (name, diff)


def test_dynamic_rope_steps_differ_from_a_full_pass(checkpoints):
    """As in transformers, keys cached at early steps keep their rotation."""
    _, _, lm = checkpoints("llama-rope-dynamic")
    ids, mask = _batch()
    steps = _prefill_then_steps(lm, ids, mask, PREFILL)
    assert _max_real_diff(steps, np.asarray(lm.logits(ids, mask)), mask) > 10 * ATOL


def test_sharded_safetensors(checkpoints, tmp_path):
    hf, directory, lm = checkpoints("llama-tied-biases")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    files = os.listdir(tmp_path)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    ids, mask = _batch()
    np.testing.assert_array_equal(
        np.asarray(jd.from_pretrained(tmp_path).logits(ids, mask)), np.asarray(lm.logits(ids, mask))
    )


def test_bfloat16_loads_and_stays_close(checkpoints):
    hf, directory, _ = checkpoints("qwen3")
    lm = jd.from_pretrained(directory, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(lm.params))
    assert lm.decoder.init_cache(1, 2, None).k.dtype == jnp.bfloat16
    ids, mask = _batch()
    ref = hf_logits(hf, ids, mask)
    rel = _max_real_diff(lm.logits(ids, mask), ref, mask) / np.abs(ref[mask == 1]).max()
    assert 10 * ATOL / np.abs(ref[mask == 1]).max() < rel < 0.05


# --------------------------------------------------------------------------- #
# Search against transformers' generate.
NEW = 12
# Not 0: transformers' beam search fills finished hypotheses with
# `pad_token_id or eos_token_id[0]`, i.e. with EOS when the pad id is 0.
PAD = 3


def _generate_hf(hf, ids, mask, eos, **options):
    with torch.no_grad():
        return hf.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=PAD,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_scores=True,
            **options,
        )


def _generate_both(hf, directory, lm, ids, mask, eos, **options):
    h = _generate_hf(_fresh(hf, directory), ids, mask, eos, **options)
    o = jd.generate(
        lm,
        ids,
        mask,
        do_sample=False,
        max_new_tokens=NEW,
        pad_token_id=PAD,
        eos_token_id=eos,
        **options,
    )
    return h, o


@pytest.mark.parity
@pytest.mark.parametrize(
    "name", ["llama", "llama-rope-dynamic", "mistral-window3", "qwen2-window", "qwen3", "gemma-mqa"]
)
def test_greedy_and_beam_match_generate(name, checkpoints):
    hf, directory, lm = checkpoints(name)
    ids, mask = _batch(seed=2)
    ids = ids.astype(np.int64)
    # An EOS id that greedy search reaches mid-sequence in some row (the most
    # frequent token transformers generates without one), so that EOS handling,
    # padding after it and beams finishing early are all exercised.
    free = _generate_hf(_fresh(hf, directory), ids, mask, eos=V + 1)
    gen = free.sequences.numpy()[:, LENGTH:]
    eos = int(np.bincount(gen[:, 2:-2].ravel(), minlength=V).argmax())
    for options in (
        dict(num_beams=1),
        dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
    ):
        h, o = _generate_both(hf, directory, lm, ids, mask, eos, **options)
        hs, os_ = h.sequences.numpy(), np.asarray(o.sequences)
        assert os_.shape[1] == LENGTH + NEW
        np.testing.assert_array_equal(os_[:, : hs.shape[1]], hs, err_msg=str(options))
        assert np.all(os_[:, hs.shape[1] :] == PAD)
        if options["num_beams"] > 1:
            np.testing.assert_allclose(
                np.asarray(o.sequences_scores), h.sequences_scores.numpy(), rtol=0, atol=ATOL
            )
        assert (hs[:, LENGTH:] == eos).any(), "EOS never generated: the test lost its point"


# --------------------------------------------------------------------------- #
@pytest.mark.parity
@pytest.mark.parametrize(
    "name",
    [
        "llama-tied-biases",
        "mistral-window3",
        "qwen2-window",
        "qwen3-bias-tied",
        "gemma-mqa",
        "llama-rope-yarn",
    ],
)
def test_save_pretrained_round_trip(name, checkpoints, tmp_path):
    hf, _, lm = checkpoints(name)
    lm.save_pretrained(str(tmp_path))
    model_cls = getattr(transformers, LLAMA_CLASSES[CASES[name][0]][1])
    again_hf = model_cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(again_hf) is type(hf)
    for key, tensor in hf.state_dict().items():
        torch.testing.assert_close(again_hf.state_dict()[key], tensor, rtol=0, atol=0)
    ids, mask = _batch()
    np.testing.assert_array_equal(hf_logits(again_hf, ids, mask), hf_logits(hf, ids, mask))
    again = jd.from_pretrained(tmp_path)
    assert again.config == lm.config
    np.testing.assert_array_equal(
        np.asarray(again.logits(ids, mask)), np.asarray(lm.logits(ids, mask))
    )


# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(hidden_act="swiglu"), "hidden_act"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads=3"),
        (dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4)), "rope_type"),
        (dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4)), "'factor'"),
        (
            dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[1])),
            "mrope_section",
        ),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=0), "sliding_window"),
        (dict(model_type="gemma", use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(model_type="qwen3", layer_types=["full_attention"]), "layer_types has 1 entries"),
        (
            dict(model_type="qwen3", layer_types=["full_attention", "chunked_attention"]),
            "chunked_attention",
        ),
    ],
)
def test_refused_config_values(checkpoints, tmp_path, change, match):
    _, directory, _ = checkpoints("llama")
    with open(os.path.join(directory, "config.json")) as f:
        data = json.load(f)
    data.update(change)
    for name in os.listdir(directory):
        if name != "config.json":
            os.link(os.path.join(directory, name), tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        jd.from_pretrained(tmp_path)


def test_old_style_rope_scaling_and_hand_written_config(checkpoints, tmp_path):
    """config.json with `rope_scaling` {"type": ...} and a top-level rope_theta
    reads as transformers 5 standardizes it; omitted keys take transformers' defaults."""
    old = {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 100.0}
    cfg = LlamaConfig.from_hf({**_tiny_json(), **old})
    assert cfg.rope == {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}
    hf_cfg = transformers.LlamaConfig(**{**_tiny_json(), **old})
    assert {k: v for k, v in hf_cfg.rope_parameters.items() if k != "type"} == cfg.rope
    defaults = LlamaConfig.from_hf({"model_type": "gemma"})
    ref = transformers.GemmaConfig()
    for field in (
        "vocab_size",
        "hidden_size",
        "head_dim",
        "num_key_value_heads",
        "hidden_act",
        "tie_word_embeddings",
    ):
        assert getattr(defaults, field) == getattr(ref, field), field
    qwen = LlamaConfig.from_hf(
        {
            "model_type": "qwen2",
            "num_hidden_layers": 4,
            "use_sliding_window": True,
            "max_window_layers": 2,
        }
    )
    assert qwen.layer_types == tuple(
        transformers.Qwen2Config(
            num_hidden_layers=4, use_sliding_window=True, max_window_layers=2
        ).layer_types
    )


def _tiny_json() -> dict:
    """A hand-written llama config.json (most keys omitted)."""
    return dict(
        model_type="llama",
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


# --------------------------------------------------------------------------- #
@pytest.mark.parity
def test_projections_fused_at_load_equal_separate(checkpoints):
    """q/k/v and gate/up load fused (`qkv_proj`, `gate_up_proj`: the checkpoint's
    rows stacked, biases too); split back, they are transformers' tensors, and
    both layouts give transformers' logits."""
    from jaxdecode.models.transformer.convert import separate_projections

    hf, _, lm = checkpoints("llama-tied-biases")
    attn, mlp = lm.params["layers_1"]["self_attn"], lm.params["layers_1"]["mlp"]
    assert sorted(attn) == ["o_proj", "qkv_proj"] and sorted(mlp) == ["down_proj", "gate_up_proj"]
    assert attn["qkv_proj"]["weight"].shape == (64, 32) and attn["qkv_proj"]["bias"].shape == (64,)
    separate = lm.replace(params=separate_projections(lm.params, lm.config.transformer()))
    theirs = dict(hf.named_parameters())
    for module, name in [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("mlp", "up_proj")]:
        for leaf in ("weight", "bias"):
            np.testing.assert_array_equal(
                np.asarray(separate.params["layers_1"][module][name][leaf]),
                theirs[f"model.layers.1.{module}.{name}.{leaf}"].detach().numpy(),
            )
    ids, mask = _batch(seed=3)
    ref = hf_logits(hf, ids, mask)
    for model in (lm, separate):
        assert _max_real_diff(model.logits(ids, mask), ref, mask) <= ATOL


@pytest.mark.parity
def test_fused_products_split_over_many_rows(checkpoints, monkeypatch):
    """Over `SPLIT_PRODUCT_ROWS` rows the products fused at load are computed one
    part at a time (`Dense.split`): transformers' logits still, and the program
    holds one product per part (here forced from 1 row on)."""
    from jaxdecode.models import layers
    from jaxdecode.models.base import positions_from_mask

    hf, _, lm = checkpoints("llama-tied-biases")
    ids, mask = _batch(seed=4)
    ref = hf_logits(hf, ids, mask)
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)

    def forward(params):  # traced afresh per jit: `lm.logits` keeps its trace
        cache = lm.decoder.init_cache(ids.shape[0], ids.shape[1], jnp.float32)
        positions = positions_from_mask(mask)
        return lm.decoder.apply(params, ids, positions, cache, mask)[0]

    products = [jax.jit(forward).lower(lm.params).as_text().count("dot_general")]
    monkeypatch.setattr(layers, "SPLIT_PRODUCT_ROWS", 1)
    split = jax.jit(lambda p: forward(p))
    products.append(split.lower(lm.params).as_text().count("dot_general"))
    assert _max_real_diff(split(lm.params), ref, mask) <= ATOL
    assert products[1] - products[0] == 2 * (2 + 1)
