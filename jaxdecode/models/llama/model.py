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

from jaxdecode.cache import KVCache, SlotMask, init_cache, slot_mask
from jaxdecode.models import lora
from jaxdecode.models.base import Bound, Decoder
from jaxdecode.models.layers import (
    ATTENTION_BLOCK,
    Dense,
    GatedMLP,
    RMSNorm,
    apply_rope,
    attend,
    attention_bytes,
    blocked,
    check_attention_block,
    rope_cos_sin,
)
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
    block: int = ATTENTION_BLOCK

    @nn.compact
    def __call__(
        self, x: Array, cache: KVCache, visible: Array | SlotMask, cos: Array, sin: Array
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
        out = attend(q, cache.k, cache.v, visible, d**-0.5, block=self.block, layer=self.layer)
        out = proj(cfg.hidden_size, "o_proj", cfg.o_bias)(out.reshape(b, t, hq * d))
        return out, cache


class _Block(nn.Module):
    config: LlamaConfig
    layer: int
    dtype: Any
    block: int = ATTENTION_BLOCK

    @nn.compact
    def __call__(
        self, x: Array, cache: KVCache, visible: Array | SlotMask, cos: Array, sin: Array
    ) -> tuple[Array, KVCache]:
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, cfg.norm_offset, name=name)
        a, cache = _Attention(cfg, self.layer, self.dtype, self.block, name="self_attn")(
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
    attention_block: int = ATTENTION_BLOCK  # calls with more new tokens attend in blocks

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
        slots, after = slot_mask(cache, attention_mask)
        cos, sin = rope_tables(cfg, positions)
        dense: dict[int | None, Array] = {}  # short calls: each window's mask built once
        for i in range(cfg.num_hidden_layers):
            # transformers' sliding_window_overlay on cache positions:
            # key slot > query slot - window.
            layer_mask = slots.with_window(cfg.sliding(i))
            if not blocked(ids.shape[1], cache.max_len, self.attention_block):
                if layer_mask.window not in dense:
                    dense[layer_mask.window] = layer_mask.dense()
                layer_mask = dense[layer_mask.window]
            x, cache = _Block(cfg, i, self.dtype, self.attention_block, name=f"layers_{i}")(
                x, cache, layer_mask, cos, sin
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
    return module.apply(lora.flax_variables(params), ids, positions, cache, attention_mask)


def _activation_bytes(
    config: LlamaConfig, dtype: Any, block: int, batch: int, t: int, s: int
) -> int:
    """Prefill activations of `batch` x `t` tokens over `s` slots (`Decoder.prefill_bytes`):
    per token at a layer's widest point the residual and its norm, q/k/v/out, the
    rotary tables, and the MLP's gate, up and their product; and the attention
    scratch."""
    d, hq, hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    width = 2 * config.hidden_size + (2 * hq + 2 * hkv + 2) * d + 3 * config.intermediate_size
    itemsize = jnp.dtype(dtype).itemsize
    return batch * t * width * itemsize + attention_bytes(batch, hq, t, s, block)


def llama_decoder(
    config: LlamaConfig, dtype: Any = jnp.float32, *, attention_block: int = ATTENTION_BLOCK
) -> Decoder:
    """The `Decoder` of a Llama-style model: pure `init_cache` and `apply`, equal
    for equal `(config, dtype, attention_block)` (module-level functions bound to them).

    Its context length (`max_positions`) is `max_position_embeddings` (the
    extended length, for rope scaling types that extend it), except with
    "dynamic" rope scaling, whose frequencies stretch with the input: no limit.
    Raise it with `Decoder.with_max_positions` (`from_pretrained(...,
    max_positions=N)`).

    Args:
        config: the model config.
        dtype: parameter and computation dtype.
        attention_block: calls with more new tokens than this attend in blocks of
            this size (`layers.attend`).
    """
    attention_block = check_attention_block(attention_block)
    module = LlamaForCausalLM(config, dtype=dtype, attention_block=attention_block)
    last = LlamaForCausalLM(config, dtype=dtype, last_only=True, attention_block=attention_block)
    dynamic = config.rope.get("rope_type") == "dynamic"
    return Decoder(
        init_cache=Bound(_init_cache, (config, dtype)),
        apply=Bound(_apply, (module,)),
        param_specs=llama_param_specs,
        vocab_size=config.vocab_size,
        max_positions=None if dynamic else config.max_position_embeddings,
        name=_NAMES[config.model_type],
        apply_last=Bound(_apply, (last,)),
        limit_name="max_position_embeddings",
        activation_bytes=Bound(_activation_bytes, (config, dtype, attention_block)),
    )


def init_params(config: LlamaConfig, key: Array, dtype: Any = jnp.float32) -> Any:
    """Random parameters: normal(0.02) weights and embeddings, zero biases, norms
    at identity (weight 1; Gemma's `(1 + w)` form: 0)."""
    module = LlamaForCausalLM(config, dtype=dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    cache = _empty_cache(config, 1, 1, dtype)
    return module.init(key, ids, ids, cache, jnp.ones((1, 1), jnp.int32))["params"]
