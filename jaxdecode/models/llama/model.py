"""Llama-style decoders in Flax (linen) over the functional KV cache.

One model for the llama, mistral, qwen2, qwen3 and gemma model types (their
differences are switches of `LlamaConfig`): token embedding (Gemma: times
sqrt(hidden) in the model dtype), pre-norm blocks of RoPE grouped-query
attention and a gated MLP, a final RMSNorm, and a tied or separate LM head.
Parameter names mirror transformers' (`embed_tokens`, `layers_3/self_attn/q_proj`,
`input_layernorm`, `mlp/gate_proj`, `norm`, `lm_head`); projections are stored
`[out, in]`, PyTorch's layout, so checkpoints convert without transposes. The
cache holds `num_key_value_heads` heads: `layers.attend` groups the queries
instead of repeating K/V.

RoPE: the static rope types' frequencies are computed once from the config;
"dynamic" (NTK) recomputes them inside the program from the largest position
of the call, as transformers' `dynamic_rope_update` does in each forward (keys
already in the cache keep the rotation they were written with, as in
transformers).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode.cache import KVCache, init_cache, visible_slots
from jaxdecode.models.base import Bound, Decoder
from jaxdecode.models.layers import Dense, GatedMLP, RMSNorm, apply_rope, attend, rope_cos_sin
from jaxdecode.models.llama.config import LlamaConfig
from jaxdecode.models.llama.sharding import llama_param_specs

Array = jax.Array

__all__ = ["LlamaForCausalLM", "init_params", "llama_decoder", "rope_tables"]

_NAMES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
}


def rope_tables(config: LlamaConfig, positions: Array) -> tuple[Array, Array]:
    """`cos, sin: [batch, T, head_dim]` float32 for `positions: [batch, T]`."""
    inv_freq, scaling = config.inv_freq()
    rope = config.rope
    if rope.get("rope_type") == "dynamic":
        # transformers: seq_len = max(position_ids) + 1 over the whole call,
        # never below max_position_embeddings (where the formula gives the base).
        dim = config.head_dim
        factor = jnp.float32(rope["factor"])
        limit = config.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, limit).astype(jnp.float32)
        base = jnp.float32(rope["rope_theta"]) * (
            (factor * seq_len / jnp.float32(limit)) - (factor - 1)
        ) ** jnp.float32(dim / (dim - 2))
        exponents = jnp.asarray(np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        inv_freq = 1.0 / jnp.power(base, exponents)
    return rope_cos_sin(positions, inv_freq, scaling)


class _Attention(nn.Module):
    config: LlamaConfig
    layer: int
    dtype: Any

    @nn.compact
    def __call__(
        self, x: Array, cache: KVCache, visible: Array, cos: Array, sin: Array
    ) -> tuple[Array, KVCache]:
        cfg = self.config
        b, t, _ = x.shape
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        proj = lambda n, name, bias: Dense(n, self.dtype, bias, name=name)
        q = proj(hq * d, "q_proj", cfg.qkv_bias)(x).reshape(b, t, hq, d)
        k = proj(hkv * d, "k_proj", cfg.qkv_bias)(x).reshape(b, t, hkv, d)
        v = proj(hkv * d, "v_proj", cfg.qkv_bias)(x).reshape(b, t, hkv, d)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            q = RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = cache.write(self.layer, k, v)
        out = attend(q, cache.k[self.layer], cache.v[self.layer], visible, d**-0.5)
        out = proj(cfg.hidden_size, "o_proj", cfg.o_bias)(out.reshape(b, t, hq * d))
        return out, cache


class _Block(nn.Module):
    config: LlamaConfig
    layer: int
    dtype: Any

    @nn.compact
    def __call__(
        self, x: Array, cache: KVCache, visible: Array, cos: Array, sin: Array
    ) -> tuple[Array, KVCache]:
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, cfg.norm_offset, name=name)
        a, cache = _Attention(cfg, self.layer, self.dtype, name="self_attn")(
            norm("input_layernorm")(x), cache, visible, cos, sin
        )
        x = x + a
        mlp = GatedMLP(
            cfg.intermediate_size, cfg.hidden_act, self.dtype, cfg.uses_mlp_bias, name="mlp"
        )
        return x + mlp(norm("post_attention_layernorm")(x)), cache


class LlamaForCausalLM(nn.Module):
    """A Llama-style decoder over an explicit `KVCache`.

    `__call__(ids [B, T], positions [B, T], cache, attention_mask [B, T])`
    writes the T new tokens at each row's `cache.index` and returns
    `(logits [B, T, vocab] float32, cache)`.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    last_only: bool = False  # logits of the last position only (`Decoder.apply_last`)

    @nn.compact
    def __call__(
        self, ids: Array, positions: Array, cache: KVCache, attention_mask: Array
    ) -> tuple[Array, KVCache]:
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
        )
        x = embed(ids)
        if cfg.embed_scale is not None:
            # transformers multiplies by the scale cast to the weights' dtype.
            x = x * jnp.asarray(cfg.embed_scale, jnp.float32).astype(x.dtype)
        visible, after = visible_slots(cache, attention_mask)
        windowed = {}
        slot_q = cache.index[:, None] + jnp.arange(ids.shape[1])[None, :]  # [B, T]
        slot_k = jnp.arange(cache.max_len)
        cos, sin = rope_tables(cfg, positions)
        for i in range(cfg.num_hidden_layers):
            window = cfg.sliding(i)
            if window is None:
                layer_visible = visible
            else:
                # transformers' sliding_window_overlay on cache positions:
                # key slot > query slot - window.
                if window not in windowed:
                    recent = slot_k[None, None, :] > slot_q[:, :, None] - window
                    windowed[window] = visible & recent
                layer_visible = windowed[window]
            x, cache = _Block(cfg, i, self.dtype, name=f"layers_{i}")(
                x, cache, layer_visible, cos, sin
            )
        if self.last_only:
            x = x[:, -1:]
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, cfg.norm_offset, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = Dense(cfg.vocab_size, self.dtype, use_bias=False, name="lm_head")(x)
        return logits.astype(jnp.float32), cache.replace(mask=after.mask, index=after.index)


def _empty_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any) -> KVCache:
    return init_cache(
        layers=config.num_hidden_layers,
        batch=batch,
        max_len=max_len,
        heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        dtype=dtype,
    )


def _init_cache(
    config: LlamaConfig, dtype: Any, batch: int, max_len: int, cache_dtype: Any = None
) -> KVCache:
    return _empty_cache(config, batch, max_len, cache_dtype or dtype)


def _apply(
    module: LlamaForCausalLM,
    params: Any,
    ids: Array,
    positions: Array,
    cache: KVCache,
    attention_mask: Array,
) -> tuple[Array, KVCache]:
    return module.apply({"params": params}, ids, positions, cache, attention_mask)


def llama_decoder(config: LlamaConfig, dtype: Any = jnp.float32) -> Decoder:
    """The `Decoder` of a Llama-style model: pure `init_cache` and `apply`, equal
    for equal `(config, dtype)` (module-level functions bound to them).

    No `max_positions`: like transformers, RoPE models decode past
    `max_position_embeddings` (what the rope scaling types are for).
    """
    return Decoder(
        init_cache=Bound(_init_cache, (config, dtype)),
        apply=Bound(_apply, (LlamaForCausalLM(config, dtype=dtype),)),
        param_specs=llama_param_specs,
        vocab_size=config.vocab_size,
        max_positions=None,
        name=_NAMES[config.model_type],
        apply_last=Bound(_apply, (LlamaForCausalLM(config, dtype=dtype, last_only=True),)),
    )


def init_params(config: LlamaConfig, key: Array, dtype: Any = jnp.float32) -> Any:
    """Random parameters: normal(0.02) weights and embeddings, zero biases, norms
    at identity (weight 1; Gemma's `(1 + w)` form: 0)."""
    module = LlamaForCausalLM(config, dtype=dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    cache = _empty_cache(config, 1, 1, dtype)
    return module.init(key, ids, ids, cache, jnp.ones((1, 1), jnp.int32))["params"]
