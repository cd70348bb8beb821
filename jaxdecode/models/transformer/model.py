"""The one decoder skeleton (Flax linen) over the functional KV cache, driven by
`TransformerConfig`'s fields. Full-attention layers read a `KVCache` of
`max_len` slots (or a `QuantizedKVCache`: `cache_implementation="quantized"`);
sliding-window layers a window-sized `RingCache`, float in both cases. On
pages (`PagedCache`) every layer reads the pool, a sliding one through its
window mask.

Token embedding (times sqrt(hidden) in the model dtype with `embed_scale`),
`num_layers` pre-norm blocks, a final RMSNorm, a tied or separate LM head and an
optional final soft-cap. A block is

    x = x + [post_attn_norm](attention(input_layernorm(x)))
    x = x + [post_ffn_norm](mlp(pre_ffn_norm(x)))

with RoPE grouped-query attention (`layers.attend`: the cache holds
`num_kv_heads` heads, queries are grouped instead of K/V repeated), optional
q/k norms, fused or separate projections, partial rotary, a rope and a window
per layer type, an attention scale and soft-cap. Parameter names mirror
transformers' (`embed_tokens`, `layers_3/self_attn/q_proj`, `input_layernorm`,
`mlp/gate_proj`, `norm`, `lm_head`); projections are stored `[out, in]`,
PyTorch's layout, so checkpoints convert without transposes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdecode.cache import KVCache, SlotMask, init_cache, slot_mask
from jaxdecode.models import lora
from jaxdecode.models.base import Bound, Decoder, last_real
from jaxdecode.models.layers import (
    ATTENTION_BLOCK,
    Dense,
    GatedMLP,
    RMSNorm,
    apply_rope,
    attend,
    attend_cache,
    attention_bytes,
    blocked,
    check_attention_block,
    split_products,
)
from jaxdecode.models.moe import MoE, expert_views
from jaxdecode.models.rope import rope_tables
from jaxdecode.models.transformer.config import TransformerConfig
from jaxdecode.models.transformer.sharding import transformer_param_specs
from jaxdecode.paged_cache import PagedCache, init_paged
from jaxdecode.quantized_cache import QuantizedKVCache, init_quantized, is_paged
from jaxdecode.ring_cache import RING_SLACK, RingCache, init_ring

if TYPE_CHECKING:  # only the annotation: models never import the config
    from jaxdecode.config import QuantizedCacheConfig

Array = jax.Array
# A layer's cache, and the whole model's (a ring beside the full layers when
# some layers slide).
_LayerCache = KVCache | QuantizedKVCache | RingCache | PagedCache
_FullCache = KVCache | QuantizedKVCache
_Cache = _FullCache | PagedCache | tuple[_FullCache, RingCache]

__all__ = ["Transformer", "init_params", "transformer_decoder"]


class _Attention(nn.Module):
    config: TransformerConfig
    layer: int  # this layer's index in its cache's stack
    dtype: Any
    block: int = ATTENTION_BLOCK

    @nn.compact
    def __call__(
        self, x: Array, cache: _LayerCache, visible: Array | SlotMask, cos: Array, sin: Array
    ) -> tuple[Array, _LayerCache]:
        cfg = self.config
        b, t, _ = x.shape
        d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        proj = lambda n, name, bias: Dense(n, self.dtype, bias, name=name)
        # Fused in the checkpoint (Phi-3), or at load (`convert.fuse_projections`):
        # the params say which.
        if cfg.fused_qkv or "qkv_proj" in self.variables.get("params", {}):
            # One product (one per part over a long prompt: `split_products`);
            # transformers' order: q rows, then k, then v.
            width = (hq + 2 * hkv) * d
            if split_products(x):
                parts = (hq * d, hkv * d, hkv * d)
                q, k, v = Dense(width, self.dtype, cfg.qkv_bias, split=parts, name="qkv_proj")(x)
            else:
                qkv = proj(width, "qkv_proj", cfg.qkv_bias)(x)
                q, k, v = jnp.split(qkv, [hq * d, (hq + hkv) * d], axis=-1)
            q, k, v = (  # adapters on the parts of a product fused at load
                y if (w := lora.part_entry(self, name)) is None else y + w(x.astype(self.dtype))
                for name, y in (("q_proj", q), ("k_proj", k), ("v_proj", v))
            )
        else:
            q = proj(hq * d, "q_proj", cfg.qkv_bias)(x)
            k = proj(hkv * d, "k_proj", cfg.qkv_bias)(x)
            v = proj(hkv * d, "v_proj", cfg.qkv_bias)(x)
        q, k, v = q.reshape(b, t, hq, d), k.reshape(b, t, hkv, d), v.reshape(b, t, hkv, d)
        if cfg.qk_norm:  # RMSNorm over each head's vector, before RoPE
            q = RMSNorm(cfg.norm_eps, self.dtype, cfg.norm_offset, name="q_norm")(q)
            k = RMSNorm(cfg.norm_eps, self.dtype, cfg.norm_offset, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(cache, RingCache):
            # The ring's last `size` slots in slot order, then the new ones:
            # `visible` is over these `size + T` columns (`_ring_mask`).
            old_k, old_v = cache.linear(self.layer)
            keys = jnp.concatenate([old_k, k.astype(old_k.dtype).transpose(0, 2, 1, 3)], axis=2)
            values = jnp.concatenate([old_v, v.astype(old_v.dtype).transpose(0, 2, 1, 3)], axis=2)
            out = attend(
                q, keys, values, visible, cfg.attn_scale, cfg.attn_softcap, block=self.block
            )
            cache = cache.write(self.layer, k, v)
        else:  # a stacked cache: dense, quantized or pages
            out, cache = attend_cache(
                q, k, v, cache, self.layer, visible, cfg.attn_scale, cfg.attn_softcap, self.block
            )
        out = proj(cfg.hidden_size, "o_proj", cfg.o_bias)(out.reshape(b, t, hq * d))
        return out, cache


def _dense_mlp(cfg: TransformerConfig, dtype: Any) -> nn.Module:
    return GatedMLP(
        cfg.intermediate_size,
        cfg.activation,
        dtype,
        cfg.mlp_bias,
        fused=cfg.fused_gate_up,
        name="mlp",
    )


def _moe_mlp(cfg: TransformerConfig, dtype: Any) -> nn.Module:
    return MoE(
        cfg.num_experts,
        cfg.experts_per_token,
        cfg.expert_intermediate_size,
        cfg.activation,
        dtype,
        cfg.norm_topk_prob,
        cfg.shared_expert_intermediate_size,
        name="mlp",
    )


# `TransformerConfig.mlp_kinds` value -> `(config, dtype) -> module named "mlp"`
# mapping `[B, T, hidden]` to `[B, T, hidden]`.
_MLPS: dict[str, Callable[[TransformerConfig, Any], nn.Module]] = {
    "dense": _dense_mlp,
    "moe": _moe_mlp,
}


class _Block(nn.Module):
    config: TransformerConfig
    layer: int
    dtype: Any
    block: int = ATTENTION_BLOCK
    stacked: int = 0  # the layer's index in its cache's stack

    @nn.compact
    def __call__(
        self, x: Array, cache: _LayerCache, visible: Array | SlotMask, cos: Array, sin: Array
    ) -> tuple[Array, _LayerCache]:
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, self.dtype, cfg.norm_offset, name=name)
        a, cache = _Attention(cfg, self.stacked, self.dtype, self.block, name="self_attn")(
            norm("input_layernorm")(x), cache, visible, cos, sin
        )
        if cfg.post_attn_norm:
            a = norm("post_attention_layernorm")(a)
        x = x + a
        pre_ffn = "pre_feedforward_layernorm" if cfg.post_attn_norm else "post_attention_layernorm"
        m = _MLPS[cfg.mlp_kinds[self.layer]](cfg, self.dtype)(norm(pre_ffn)(x))
        if cfg.post_ffn_norm:
            m = norm("post_feedforward_layernorm")(m)
        return x + m, cache


def _ring_mask(ring: RingCache, attention_mask: Array, block: int) -> Array | SlotMask:
    """Which of a ring layer's `size + T` columns (`RingCache.linear`, then the T
    new tokens) each new query may read: relative to that block of slots the
    queries sit at `size + t`, and the window, causality and padding apply as on
    a full cache."""
    b, t = attention_mask.shape
    q_slot = jnp.broadcast_to(ring.size + jnp.arange(t, dtype=jnp.int32), (b, t))
    real = jnp.concatenate([ring.valid(), attention_mask.astype(bool)], axis=1)
    mask = SlotMask(q_slot=q_slot, kv_mask=real, window=ring.window)
    return mask if blocked(t, ring.size + t, block) else mask.dense()


class Transformer(nn.Module):
    """A decoder over an explicit cache, shaped by `TransformerConfig`.

    `__call__(ids [B, T], positions [B, T], cache, attention_mask [B, T])`
    writes the T new tokens at each row's next slot and returns
    `(logits [B, T, vocab] float32, cache)`. The cache is a `KVCache` of every
    layer, or, with sliding-window layers, `(KVCache of the full layers,
    RingCache of the sliding ones)` (`transformer_decoder`'s `init_cache`).
    """

    config: TransformerConfig
    dtype: Any = jnp.float32
    last_only: bool = False  # logits of the last position only (`Decoder.apply_last`)
    attention_block: int = ATTENTION_BLOCK  # calls with more new tokens attend in blocks

    @nn.compact
    def __call__(
        self, ids: Array, positions: Array, cache: _Cache, attention_mask: Array
    ) -> tuple[Array, _Cache]:
        cfg = self.config
        full, ring = cache if isinstance(cache, tuple) else (cache, None)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
        )
        x = embed(ids)
        if cfg.embed_scale:
            # transformers multiplies by the scale cast to the weights' dtype.
            x = x * jnp.asarray(cfg.hidden_size**0.5, jnp.float32).astype(x.dtype)
        slots, _ = slot_mask(full, attention_mask)
        ring_visible = (
            None if ring is None else _ring_mask(ring, attention_mask, self.attention_block)
        )
        tables = {
            layer_type: rope_tables(
                cfg.rope_of(layer_type), cfg.rotary_dim, cfg.max_position_embeddings, positions
            )
            for layer_type in sorted(set(cfg.layer_types))
        }
        # Short calls over a short cache: the dense mask built once.
        full_visible = slots
        paged = is_paged(full)
        if not paged and not blocked(ids.shape[1], full.max_len, self.attention_block):
            full_visible = slots.dense()
        stacked = {"full_attention": 0, "sliding_attention": 0}
        for i in range(cfg.num_layers):
            kind = cfg.layer_types[i] if ring is not None else "full_attention"
            block = _Block(
                cfg, i, self.dtype, self.attention_block, stacked[kind], name=f"layers_{i}"
            )
            stacked[kind] += 1
            cos, sin = tables[cfg.layer_types[i]]
            if kind == "sliding_attention":
                x, ring = block(x, ring, ring_visible, cos, sin)
            elif paged and cfg.layer_types[i] == "sliding_attention":
                # On pages, a sliding layer reads the pool with the window mask
                # (key blocks before the window are skipped).
                x, full = block(x, full, full_visible.with_window(cfg.sliding_window), cos, sin)
            else:
                # Without a ring (no sliding layer), every layer reads the full cache.
                x, full = block(x, full, full_visible, cos, sin)
        if self.last_only:
            x = last_real(x, attention_mask)
        x = RMSNorm(cfg.norm_eps, self.dtype, cfg.norm_offset, name="norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = Dense(cfg.vocab_size, self.dtype, use_bias=False, name="lm_head")(x)
        if cfg.final_softcap is not None:
            cap = jnp.asarray(cfg.final_softcap, jnp.float32).astype(logits.dtype)
            logits = jnp.tanh(logits / cap) * cap
        full = full.advance(attention_mask)
        if ring is None:
            return logits.astype(jnp.float32), full
        return logits.astype(jnp.float32), (full, ring.advance(attention_mask))


def _empty_cache(
    config: TransformerConfig,
    batch: int,
    max_len: int,
    dtype: Any,
    slack: int = RING_SLACK,
    quantized: QuantizedCacheConfig | None = None,
) -> _Cache:
    """A `KVCache` of every layer (`QuantizedKVCache` with `quantized`); with
    sliding layers, `(that cache of the full layers, RingCache of the sliding
    ones)`. The ring stays float: it holds a window, not the context."""
    sliding = config.layer_types.count("sliding_attention")
    shape = dict(
        layers=config.num_layers - sliding,
        batch=batch,
        max_len=max_len,
        heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=dtype,
    )
    if quantized is None:
        full = init_cache(**shape)
    else:
        full = init_quantized(**shape, nbits=quantized.nbits, group=quantized.q_group_size)
    if not sliding:
        return full
    ring = init_ring(
        layers=sliding,
        batch=batch,
        max_len=max_len,
        heads=config.num_kv_heads,
        head_dim=config.head_dim,
        window=config.sliding_window,
        slack=slack,
        dtype=dtype,
    )
    return full, ring


def _init_cache(
    config: TransformerConfig,
    dtype: Any,
    slack: int,
    batch: int,
    max_len: int,
    cache_dtype: Any = None,
) -> _Cache:
    return _empty_cache(config, batch, max_len, cache_dtype or dtype, slack)


def _init_paged(
    config: TransformerConfig,
    dtype: Any,
    batch: int,
    max_len: int,
    pages: int,
    page_size: int,
    cache_dtype: Any = None,
) -> PagedCache:
    """A `PagedCache` of every layer, sliding-window layers included: they read
    the pages through the window mask, so their compute is bound by the window
    but their memory is not (it holds every token, as a full layer's does)."""
    return init_paged(
        layers=config.num_layers,
        batch=batch,
        max_len=max_len,
        pages=pages,
        page_size=page_size,
        heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=cache_dtype or dtype,
    )


def _quantized_cache(
    config: TransformerConfig,
    dtype: Any,
    slack: int,
    quantized: QuantizedCacheConfig,
    batch: int,
    max_len: int,
    cache_dtype: Any = None,
) -> _Cache:
    return _empty_cache(config, batch, max_len, cache_dtype or dtype, slack, quantized)


def _apply(
    module: Transformer,
    params: Any,
    ids: Array,
    positions: Array,
    cache: _Cache,
    attention_mask: Array,
) -> tuple[Array, _Cache]:
    return module.apply(lora.flax_variables(params), ids, positions, cache, attention_mask)


def _apply_routed(
    full: Transformer,
    last_only: Transformer,
    params: Any,
    ids: Array,
    positions: Array,
    cache: _Cache,
    attention_mask: Array,
    last: bool = False,
) -> tuple[Array, _Cache, Array]:
    """`_apply` (of the last position only with `last`) and the experts the MoE
    layers routed each of the T tokens to (`MoE` sows them): `[B, T, MoE layers,
    k]` int32, layers in order."""
    module = last_only if last else full
    (logits, cache), sown = module.apply(
        lora.flax_variables(params),
        ids,
        positions,
        cache,
        attention_mask,
        mutable=["intermediates"],
    )
    cfg = module.config
    layers = [i for i, kind in enumerate(cfg.mlp_kinds) if kind == "moe"]
    found = sown["intermediates"]
    experts = [found[f"layers_{i}"]["mlp"]["routed_experts"][0] for i in layers]
    return logits, cache, jnp.stack(experts, axis=2)


def _activation_bytes(
    config: TransformerConfig, dtype: Any, block: int, batch: int, t: int, s: int
) -> int:
    """Prefill activations of `batch` x `t` tokens over `s` slots (`Decoder.prefill_bytes`):
    per token at a layer's widest point the residual and its norm, q/k/v/out, the
    rotary tables, and the MLP's gate, up and their product (with experts: their
    routed copies too); and the attention scratch. Not counted: XLA:CPU's
    ragged-dot decomposition, which expands the routed rows once per expert."""
    d, hq, hkv = config.head_dim, config.num_heads, config.num_kv_heads
    width = 2 * config.hidden_size + (2 * hq + 2 * hkv + 2) * d + 3 * config.intermediate_size
    if "moe" in config.mlp_kinds:
        # The routed rows: k copies of the token, each expert's gate, up and product,
        # the output before the scatter; the shared expert; the router's logits.
        k, inner = config.experts_per_token, config.expert_intermediate_size
        width += k * (2 * config.hidden_size + 3 * inner) + config.num_experts
        width += 3 * config.shared_expert_intermediate_size
    itemsize = jnp.dtype(dtype).itemsize
    return batch * t * width * itemsize + attention_bytes(batch, hq, t, s, block)


def transformer_decoder(
    config: TransformerConfig,
    dtype: Any = jnp.float32,
    *,
    attention_block: int = ATTENTION_BLOCK,
    ring_slack: int = RING_SLACK,
) -> Decoder:
    """The `Decoder` of the skeleton: pure `init_cache` and `apply`, equal for
    equal `(config, dtype, attention_block)` (module-level functions bound to them).

    Its context length (`max_positions`) is `max_position_embeddings`, except
    with "dynamic" rope scaling, whose frequencies stretch with the input: no
    limit. Raise it with `Decoder.with_max_positions` (`from_pretrained(...,
    max_positions=N)`).

    Args:
        config: the skeleton's fields.
        dtype: parameter and computation dtype.
        attention_block: calls with more new tokens than this attend in blocks of
            this size (`layers.attend`).
        ring_slack: ring positions beyond the window of sliding layers: the
            longest rewind (speculative decoding's draft length + 1) the cache
            can undo (`RingCache`).

    Sliding-window layers keep `min(max_len, sliding_window + ring_slack)`
    slots per row (`RingCache`), full layers `max_len` (`KVCache`, or
    `QuantizedKVCache` through `Decoder.with_cache`). Any model can also keep
    its cache in pages (`init_paged`, `PagedCache`): every layer, sliding ones
    included (their window applied as a mask over the pages).
    """
    attention_block = check_attention_block(attention_block)
    if isinstance(ring_slack, bool) or not isinstance(ring_slack, int) or ring_slack < 1:
        raise ValueError(f"ring_slack must be a positive int, got {ring_slack!r}")
    module = Transformer(config, dtype=dtype, attention_block=attention_block)
    last = Transformer(config, dtype=dtype, last_only=True, attention_block=attention_block)
    moe_layers = config.mlp_kinds.count("moe")
    return Decoder(
        init_cache=Bound(_init_cache, (config, dtype, ring_slack)),
        apply=Bound(_apply, (module,)),
        quantized_cache=Bound(_quantized_cache, (config, dtype, ring_slack)),
        param_specs=transformer_param_specs,
        vocab_size=config.vocab_size,
        max_positions=None if config.unbounded else config.max_position_embeddings,
        name=config.name,
        apply_last=Bound(_apply, (last,)),
        limit_name="max_position_embeddings",
        activation_bytes=Bound(_activation_bytes, (config, dtype, attention_block)),
        apply_routed=Bound(_apply_routed, (module, last)) if moe_layers else None,
        # On CPU, the host's params gain one aliasing array per expert
        # (`moe.expert_views`): the decode steps' products read them in place.
        host_views=expert_views if moe_layers else None,
        routed_shape=(moe_layers, config.experts_per_token) if moe_layers else None,
        # Pages for every layer; a sliding layer reads its window of them.
        init_paged=Bound(_init_paged, (config, dtype)),
    )


def init_params(config: TransformerConfig, key: Array, dtype: Any = jnp.float32) -> Any:
    """Random parameters: normal(0.02) weights and embeddings, zero biases, norms
    at identity (weight 1; the `(1 + w)` form: 0)."""
    module = Transformer(config, dtype=dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    cache = _empty_cache(config, 1, 1, dtype)
    return module.init(key, ids, ids, cache, jnp.ones((1, 1), jnp.int32))["params"]
