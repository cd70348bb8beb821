"""Shared model layers (`jaxdecode.models.layers`) against NumPy references, and
the model-family registry."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode.models import layers, registry


def _np_attention(q, k, v, visible, scale, softcap=None):
    """transformers' eager attention: K/V repeated to the query heads (`repeat_kv`)."""
    group = q.shape[2] // k.shape[1]
    k = np.repeat(k, group, axis=1)  # [B, Hq, S, D]
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("bthd,bhsd->bhts", q, k) * scale
    if softcap is not None:
        scores = np.tanh(scores / softcap) * softcap
    scores = np.where(visible[:, None], scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    w = np.exp(scores)
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bthd", w, v)


@pytest.mark.parametrize(
    ("q_heads", "kv_heads"), [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa", "mqa"]
)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_attend_matches_repeated_kv(q_heads, kv_heads, softcap):
    rng = np.random.default_rng(0)
    b, t, s, d = 2, 3, 7, 8
    q = rng.normal(size=(b, t, q_heads, d)).astype(np.float32)
    k = rng.normal(size=(b, kv_heads, s, d)).astype(np.float32)
    v = rng.normal(size=(b, kv_heads, s, d)).astype(np.float32)
    visible = rng.random((b, t, s)) < 0.6
    visible[..., 0] = True
    want = _np_attention(q, k, v, visible, 0.4, softcap)
    got = jax.jit(layers.attend, static_argnums=(4, 5))(q, k, v, visible, 0.4, softcap)
    assert got.shape == (b, t, q_heads, d)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_attend_refuses_heads_that_do_not_group():
    x = jnp.zeros((1, 1, 3, 4))
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of KV heads \(2\)"):
        layers.attend(
            x, jnp.zeros((1, 2, 5, 4)), jnp.zeros((1, 2, 5, 4)), jnp.ones((1, 1, 5), bool), 1.0
        )


@pytest.mark.parametrize("adapter", [False, True])
def test_dense_split_equals_slicing_the_whole_product(adapter):
    """`Dense(split=...)` (the parts of a product fused at load, each its own
    product over its rows of the weight) returns the whole product's output
    sliced, bias and a LoRA adapter's update included."""
    from jaxdecode.models import lora

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    params = {
        "weight": jnp.asarray(rng.normal(size=(9, 6)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(9,)), jnp.float32),
    }
    variables = {"params": params}
    if adapter:
        a = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
        b = jnp.asarray(rng.normal(size=(9, 2)), jnp.float32)
        variables[lora.LORA] = {"adapter": lora.LoraWeights(a=a, b=b, scale=0.5)}
    whole = layers.Dense(9).apply(variables, x)
    parts = layers.Dense(9, split=(4, 2, 3)).apply(variables, x)
    assert isinstance(parts, tuple) and [p.shape[-1] for p in parts] == [4, 2, 3]
    np.testing.assert_allclose(np.concatenate(parts, -1), np.asarray(whole), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"split \(4, 2\) must sum to features \(9\)"):
        layers.Dense(9, split=(4, 2)).apply(variables, x)


def test_split_products_from_rows():
    """Fused products split from `SPLIT_PRODUCT_ROWS` rows (batch x tokens) on."""
    rows = layers.SPLIT_PRODUCT_ROWS
    assert not layers.split_products(jnp.zeros((1, rows - 1, 3)))
    assert layers.split_products(jnp.zeros((1, rows, 3)))
    assert layers.split_products(jnp.zeros((2, rows // 2, 3)))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(offset):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    w = rng.normal(size=(8,)).astype(np.float32)
    norm = layers.RMSNorm(eps=1e-3, offset=offset)
    got = norm.apply({"params": {"weight": w}}, x)
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-3) * (offset + w)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_rope_rotates_half_split_pairs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 2, 1, 4)).astype(np.float32)
    pos = np.array([[0, 5]])
    inv = np.array([1.0, 0.1], np.float32)
    cos, sin = layers.rope_cos_sin(pos, inv, 2.0)
    got = np.asarray(layers.apply_rope(x, cos, sin))
    for t in range(2):
        for i in range(2):  # pair (i, i + 2) rotates by angle pos * inv[i], scaled by 2
            a = pos[0, t] * inv[i]
            x1, x2 = x[0, t, 0, i], x[0, t, 0, i + 2]
            want = 2 * np.array([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)])
            np.testing.assert_allclose(got[0, t, 0, [i, i + 2]], want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
def test_registry_lookup_and_config_family():
    family = registry.lookup("gpt2")
    assert family.config_class is jd.GPT2Config and "gpt2" in registry.model_types()
    assert registry.family_for_config(jd.GPT2Config()) is family
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported.*'gpt2'"):
        registry.lookup("bert")
    with pytest.raises(ValueError, match="names no model_type"):
        registry.family_for_config(object())
    with pytest.raises(TypeError, match="needs a Family"):  # a wrong type
        registry.register("gpt2")


def test_a_registered_family_loads_and_saves_without_touching_generic_code(tmp_path):
    """A user family (here GPT-2's pieces under another model_type) goes through
    from_pretrained and save_pretrained by the registry alone."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class OtherConfig(jd.GPT2Config):
        model_type = "other-gpt"

        @classmethod
        def from_hf(cls, data):
            return cls(
                **{
                    k: v
                    for k, v in data.items()
                    if k in {"n_layer", "n_embd", "n_head", "vocab_size", "n_positions"}
                }
            )

        def to_hf(self):
            return {**super().to_hf(), "model_type": "other-gpt"}

    gpt2 = registry.lookup("gpt2")
    registry.register(
        dataclasses.replace(
            gpt2, name="Other", model_types=("other-gpt",), config_class=OtherConfig
        )
    )
    cfg = OtherConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    # Jitted: eager Flax init runs (and compiles) op by op.
    params = jax.jit(gpt2.init_params, static_argnums=(0, 2))(cfg, jax.random.key(0), jnp.float32)
    lm = jd.CausalLM(params=params, decoder=jd.gpt2_decoder(cfg), config=cfg)
    lm.save_pretrained(str(tmp_path))
    again = jd.from_pretrained(tmp_path)
    assert isinstance(again.config, OtherConfig) and again.config == cfg
    ids = np.arange(6, dtype=np.int32).reshape(1, 6)
    np.testing.assert_array_equal(np.asarray(again.logits(ids)), np.asarray(lm.logits(ids)))


def test_save_pretrained_needs_a_family_config(tmp_path):
    lm = jd.from_pretrained("bundled")
    with pytest.raises(ValueError, match="names no model_type"):
        lm.replace(config=None).save_pretrained(str(tmp_path))


def test_gguf_paths_and_architectures(tmp_path):
    with pytest.raises(ValueError, match="GGUF file /nope/model.gguf does not exist"):
        jd.from_pretrained("/nope/model.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="is a file"):
        jd.from_pretrained(fake)
    assert registry.lookup_gguf("llama").name == "Llama"
    with pytest.raises(ValueError, match="architecture 'falcon' is not supported.*'llama'"):
        registry.lookup_gguf("falcon")
