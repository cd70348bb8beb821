"""GPT-2 in Flax (linen), reading the functional KV cache.

The architecture of Hugging Face's `GPT2LMHeadModel`: learned position
embeddings, pre-LayerNorm blocks, `gelu_new` MLP (or any `activation_function`
transformers allows for GPT-2), tied LM head. Parameter names mirror the
checkpoint's (`wte`, `wpe`, `h_0.attn.c_attn`, ...). Projection weights are
stored `[out, in]` (`layers.Dense`, the transpose of GPT-2's Conv1D).

`gpt2_decoder(config)` returns the `Decoder` (pure `init_cache` / `apply`) that
the decoding loops use; its cache is a `KVCache`, a `QuantizedKVCache` with
`cache_implementation="quantized"`, or a `PagedCache` (`init_paged`: the
engine's pages); each layer writes and reads it through `layers.attend_cache`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdecode.cache import KVCache, SlotMask, init_cache, slot_mask
from jaxdecode.models import lora
from jaxdecode.models.base import Bound, Decoder, last_real
from jaxdecode.models.gpt2.config import GPT2Config
from jaxdecode.models.gpt2.sharding import gpt2_param_specs
from jaxdecode.models.layers import (
    ACTIVATIONS,
    ATTENTION_BLOCK,
    Dense,
    attend_cache,
    attention_bytes,
    blocked,
    check_attention_block,
)
from jaxdecode.paged_cache import PagedCache, init_paged
from jaxdecode.quantized_cache import QuantizedKVCache, init_quantized

if TYPE_CHECKING:  # only the annotation: models never import the config
    from jaxdecode.config import QuantizedCacheConfig

Array = jax.Array
# The stacked caches a GPT-2 reads (every layer the same kind).
_Cache = KVCache | QuantizedKVCache | PagedCache

__all__ = ["GPT2LMHeadModel", "gpt2_decoder", "init_params", "LM_HEAD_T"]

# Name of the transposed LM head `gpt2_decoder`'s `prepare` adds for one-row decoding.
LM_HEAD_T = "lm_head_t"


class _Attention(nn.Module):
    config: GPT2Config
    layer: int
    dtype: Any
    block: int = ATTENTION_BLOCK

    @nn.compact
    def __call__(self, x: Array, cache: _Cache, visible: Array | SlotMask) -> tuple[Array, _Cache]:
        cfg = self.config
        b, t, _ = x.shape
        qkv = Dense(3 * cfg.n_embd, self.dtype, name="c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        shape = (b, t, cfg.n_head, cfg.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        scale = 1.0
        if cfg.scale_attn_weights:
            scale = cfg.head_dim**-0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer + 1)
        # `attend` computes scores and softmax in float32 whatever the cache dtype,
        # which is what reorder_and_upcast_attn asks for (harmless in float32).
        out, cache = attend_cache(q, k, v, cache, self.layer, visible, scale, block=self.block)
        out = out.reshape(b, t, cfg.n_embd)
        out = Dense(cfg.n_embd, self.dtype, name="c_proj")(out)
        return out, cache


class _MLP(nn.Module):
    config: GPT2Config
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = Dense(cfg.inner_dim, self.dtype, name="c_fc")(x)
        h = ACTIVATIONS[cfg.activation_function](h)
        return Dense(cfg.n_embd, self.dtype, name="c_proj")(h)


class _Block(nn.Module):
    config: GPT2Config
    layer: int
    dtype: Any
    block: int = ATTENTION_BLOCK

    @nn.compact
    def __call__(self, x: Array, cache: _Cache, visible: Array | SlotMask) -> tuple[Array, _Cache]:
        eps = self.config.layer_norm_epsilon
        ln = lambda name: nn.LayerNorm(
            epsilon=eps, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        a, cache = _Attention(self.config, self.layer, self.dtype, self.block, name="attn")(
            ln("ln_1")(x), cache, visible
        )
        x = x + a
        x = x + _MLP(self.config, self.dtype, name="mlp")(ln("ln_2")(x))
        return x, cache


class GPT2LMHeadModel(nn.Module):
    """GPT-2 over an explicit cache (`KVCache`, `QuantizedKVCache` or `PagedCache`).

    `__call__(ids [B, T], positions [B, T], cache, attention_mask [B, T])`
    writes the T new tokens at each row's `cache.index` and returns
    `(logits [B, T, vocab] float32, cache)`.
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    last_only: bool = False  # logits of the last position only (`Decoder.apply_last`)
    attention_block: int = ATTENTION_BLOCK  # calls with more new tokens attend in blocks

    @nn.compact
    def __call__(
        self, ids: Array, positions: Array, cache: _Cache, attention_mask: Array
    ) -> tuple[Array, _Cache]:
        cfg = self.config
        wte = nn.Embed(
            cfg.vocab_size, cfg.n_embd, dtype=self.dtype, param_dtype=self.dtype, name="wte"
        )
        wpe = nn.Embed(
            cfg.n_positions, cfg.n_embd, dtype=self.dtype, param_dtype=self.dtype, name="wpe"
        )
        x = wte(ids) + wpe(positions)
        # Which cache slots each new token may attend to: real tokens (mask after
        # this write) at or before its own slot.
        slots, _ = slot_mask(cache, attention_mask)
        # Short calls over a short cache: the dense [B, T, S] mask, built once
        # (pages are always read block by block, through the `SlotMask`).
        direct = not isinstance(cache, PagedCache) and not blocked(
            ids.shape[1], cache.max_len, self.attention_block
        )
        visible = slots.dense() if direct else slots
        for i in range(cfg.n_layer):
            x, cache = _Block(cfg, i, self.dtype, self.attention_block, name=f"h_{i}")(
                x, cache, visible
            )
        if self.last_only:  # the last real token (a paged prefill's chunk is right-padded)
            x = last_real(x, attention_mask)
        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.dtype, name="ln_f"
        )(x)
        if self.has_variable("params", LM_HEAD_T):  # added by the decoder's `prepare`
            logits = x @ self.get_variable("params", LM_HEAD_T)
        else:
            logits = wte.attend(x)
        logits = logits.astype(jnp.float32)
        return logits, cache.advance(attention_mask)


def _init_cache(
    config: GPT2Config, dtype: Any, batch: int, max_len: int, cache_dtype: Any = None
) -> KVCache:
    return init_cache(
        layers=config.n_layer,
        batch=batch,
        max_len=max_len,
        heads=config.n_head,
        head_dim=config.head_dim,
        dtype=cache_dtype or dtype,
    )


def _init_paged(
    config: GPT2Config,
    dtype: Any,
    batch: int,
    max_len: int,
    pages: int,
    page_size: int,
    cache_dtype: Any = None,
) -> PagedCache:
    return init_paged(
        layers=config.n_layer,
        batch=batch,
        max_len=max_len,
        pages=pages,
        page_size=page_size,
        heads=config.n_head,
        head_dim=config.head_dim,
        dtype=cache_dtype or dtype,
    )


def _quantized_cache(
    config: GPT2Config,
    dtype: Any,
    quantized: QuantizedCacheConfig,
    batch: int,
    max_len: int,
    cache_dtype: Any = None,
) -> QuantizedKVCache:
    return init_quantized(
        layers=config.n_layer,
        batch=batch,
        max_len=max_len,
        heads=config.n_head,
        head_dim=config.head_dim,
        nbits=quantized.nbits,
        group=quantized.q_group_size,
        dtype=cache_dtype or dtype,
    )


def _apply(
    module: GPT2LMHeadModel,
    params: Any,
    ids: Array,
    positions: Array,
    cache: _Cache,
    attention_mask: Array,
) -> tuple[Array, _Cache]:
    return module.apply(lora.flax_variables(params), ids, positions, cache, attention_mask)


def _prepare(params: Any, rows: int) -> Any:
    # With one row, XLA:CPU's matrix-vector product reads the tied LM head
    # [vocab, n_embd] ~25% faster as its transpose [n_embd, vocab] (measured on
    # GPT-2-small; at 2+ rows the original layout wins). One copy per program,
    # outside the loop; the barrier stops XLA folding the transpose back into
    # the dot.
    if rows != 1 or LM_HEAD_T in params:
        return params
    head = jax.lax.optimization_barrier(params["wte"]["embedding"].T)
    return {**params, LM_HEAD_T: head}


def _activation_bytes(
    config: GPT2Config, dtype: Any, block: int, batch: int, t: int, s: int
) -> int:
    """Prefill activations of `batch` x `t` tokens over `s` slots (`Decoder.prefill_bytes`):
    per token the residual and its norm, q/k/v and the output, the MLP's two widths;
    and the attention scratch."""
    width = 6 * config.n_embd + 2 * config.inner_dim
    itemsize = jnp.dtype(dtype).itemsize
    return batch * t * width * itemsize + attention_bytes(batch, config.n_head, t, s, block)


def gpt2_decoder(
    config: GPT2Config, dtype: Any = jnp.float32, *, attention_block: int = ATTENTION_BLOCK
) -> Decoder:
    """The `Decoder` of a GPT-2 model: pure `init_cache` and `apply`, equal for
    equal `(config, dtype, attention_block)` (module-level functions bound to them).

    Args:
        config: the model config; its `n_positions` (the learned position
            table) is the context length.
        dtype: parameter and computation dtype.
        attention_block: calls with more new tokens than this attend in blocks of
            this size (`layers.attend`).
    """
    attention_block = check_attention_block(attention_block)
    module = GPT2LMHeadModel(config, dtype=dtype, attention_block=attention_block)
    last = GPT2LMHeadModel(config, dtype=dtype, last_only=True, attention_block=attention_block)
    return Decoder(
        init_cache=Bound(_init_cache, (config, dtype)),
        apply=Bound(_apply, (module,)),
        prepare=_prepare,
        param_specs=gpt2_param_specs,
        vocab_size=config.vocab_size,
        max_positions=config.n_positions,
        name="GPT-2",
        apply_last=Bound(_apply, (last,)),
        limit_name="n_positions",
        fixed_limit=True,
        activation_bytes=Bound(_activation_bytes, (config, dtype, attention_block)),
        quantized_cache=Bound(_quantized_cache, (config, dtype)),
        init_paged=Bound(_init_paged, (config, dtype)),
    )


def init_params(config: GPT2Config, key: Array, dtype: Any = jnp.float32) -> Any:
    """Random parameters (normal(0.02) as GPT-2's initializer) for training from scratch."""
    params, draws = _init_draws(config, key, dtype)
    # The 0.02 scaling runs outside the compiled draws, so that the values are the
    # bits an eager init gives (XLA fuses a compiled product into the draw).
    return jax.tree.map(lambda p, d: p if d is None else 0.02 * d, params, draws)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_draws(config: GPT2Config, key: Array, dtype: Any) -> tuple[Any, Any]:
    """Flax's initial params and a standard normal draw per weight (None elsewhere),
    as one compiled program: run eagerly, Flax's init compiled each of its ~100
    operations on its own."""
    module = GPT2LMHeadModel(config, dtype=dtype)
    cache = init_cache(
        layers=config.n_layer,
        batch=1,
        max_len=1,
        heads=config.n_head,
        head_dim=config.head_dim,
        dtype=dtype,
    )
    ids = jnp.zeros((1, 1), jnp.int32)
    params = module.init(key, ids, ids, cache, jnp.ones((1, 1), jnp.int32))["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    draws = []
    for (path, leaf), k in zip(leaves, keys, strict=True):
        name = str(path[-1])
        weight = "weight" in name or "embedding" in name
        draws.append(jax.random.normal(k, leaf.shape, leaf.dtype) if weight else None)
    return params, jax.tree_util.tree_unflatten(treedef, draws)
