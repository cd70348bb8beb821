"""GPT-2 in Flax (linen), reading the functional KV cache.

The architecture of Hugging Face's `GPT2LMHeadModel`: learned position
embeddings, pre-LayerNorm blocks, `gelu_new` MLP (or any `activation_function`
transformers allows for GPT-2), tied LM head. Parameter names mirror the
checkpoint's (`wte`, `wpe`, `h_0.attn.c_attn`, ...). Projection weights are
stored `[out, in]` (PyTorch `Linear`'s layout, the transpose of GPT-2's Conv1D):
XLA's CPU matrix-vector product streams that layout ~15% faster at small batch,
and decoding one token per step is all matrix-vector products.

`gpt2_decoder(config)` returns the `Decoder` (pure `init_cache` / `apply`) that
the decoding loops use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdecode.cache import KVCache, init_cache, visible_slots
from jaxdecode.models.base import Decoder
from jaxdecode.sharding import gpt2_param_specs

Array = jax.Array

__all__ = ["GPT2Config", "GPT2LMHeadModel", "gpt2_decoder", "ACTIVATIONS"]

# Name of the transposed LM head `gpt2_decoder`'s `prepare` adds for one-row decoding.
LM_HEAD_T = "lm_head_t"


def _gelu_tanh(x: Array) -> Array:
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3.0))))


def _gelu_fast(x: Array) -> Array:
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


# The activation names transformers' ACT2FN accepts that make sense for GPT-2.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """The `GPT2Config` fields that change inference (names as in transformers)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be an integer >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config.n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(
                f"GPT2Config.n_inner must be None or an integer >= 1, got {self.n_inner!r}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"GPT2Config.activation_function must be one of {sorted(ACTIVATIONS)}, "
                f"got {self.activation_function!r}"
            )
        if not self.tie_word_embeddings:
            raise ValueError(
                "GPT2Config.tie_word_embeddings=False is not supported (GPT-2 ties its LM head)"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> GPT2Config:
        """From a transformers `config.json` dict (unknown keys ignored)."""
        model_type = data.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json model_type must be 'gpt2', got {model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key, alias in (
            ("n_embd", "hidden_size"),
            ("n_layer", "num_hidden_layers"),
            ("n_head", "num_attention_heads"),
            ("n_positions", "max_position_embeddings"),
        ):
            if key not in kwargs and alias in data:
                kwargs[key] = data[alias]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that `transformers.GPT2Config` loads."""
        out = dataclasses.asdict(self)
        out.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        return out


class _Linear(nn.Module):
    """`x @ weight.T + bias` with `weight: [out, in]`."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.normal(0.02)
        weight = self.param("weight", init, (self.features, x.shape[-1]), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), weight, (((x.ndim - 1,), (1,)), ((), ())))
        return y + bias


class _Attention(nn.Module):
    config: GPT2Config
    layer: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, cache: KVCache, visible: Array) -> tuple[Array, KVCache]:
        cfg = self.config
        b, t, _ = x.shape
        qkv = _Linear(3 * cfg.n_embd, self.dtype, name="c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        shape = (b, t, cfg.n_head, cfg.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        cache = cache.write(self.layer, k, v)
        keys, values = cache.k[self.layer], cache.v[self.layer]  # [B, H, S, D]
        scale = 1.0
        if cfg.scale_attn_weights:
            scale = cfg.head_dim**-0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer + 1)
        # Scores and softmax in float32 whatever the cache dtype (what
        # reorder_and_upcast_attn asks for; harmless in float32), accumulated by the
        # matmul itself rather than by upcasting the whole cache.
        scores = jnp.einsum(
            "bthd,bhsd->bhts", q.astype(keys.dtype), keys, preferred_element_type=jnp.float32
        ) * jnp.float32(scale)
        scores = jnp.where(visible[:, None], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("bhts,bhsd->bthd", weights, values).reshape(b, t, cfg.n_embd)
        out = _Linear(cfg.n_embd, self.dtype, name="c_proj")(out)
        return out, cache


class _MLP(nn.Module):
    config: GPT2Config
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = _Linear(cfg.inner_dim, self.dtype, name="c_fc")(x)
        h = ACTIVATIONS[cfg.activation_function](h)
        return _Linear(cfg.n_embd, self.dtype, name="c_proj")(h)


class _Block(nn.Module):
    config: GPT2Config
    layer: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, cache: KVCache, visible: Array) -> tuple[Array, KVCache]:
        eps = self.config.layer_norm_epsilon
        ln = lambda name: nn.LayerNorm(
            epsilon=eps, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        a, cache = _Attention(self.config, self.layer, self.dtype, name="attn")(
            ln("ln_1")(x), cache, visible
        )
        x = x + a
        x = x + _MLP(self.config, self.dtype, name="mlp")(ln("ln_2")(x))
        return x, cache


class GPT2LMHeadModel(nn.Module):
    """GPT-2 over an explicit `KVCache`.

    `__call__(ids [B, T], positions [B, T], cache, attention_mask [B, T])`
    writes the T new tokens at each row's `cache.index` and returns
    `(logits [B, T, vocab] float32, cache)`.
    """

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, ids: Array, positions: Array, cache: KVCache, attention_mask: Array
    ) -> tuple[Array, KVCache]:
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
        visible, after = visible_slots(cache, attention_mask)
        for i in range(cfg.n_layer):
            x, cache = _Block(cfg, i, self.dtype, name=f"h_{i}")(x, cache, visible)
        x = nn.LayerNorm(
            epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.dtype, name="ln_f"
        )(x)
        if self.has_variable("params", LM_HEAD_T):  # added by the decoder's `prepare`
            logits = x @ self.get_variable("params", LM_HEAD_T)
        else:
            logits = wte.attend(x)
        logits = logits.astype(jnp.float32)
        return logits, cache.replace(mask=after.mask, index=after.index)


def gpt2_decoder(config: GPT2Config, dtype: Any = jnp.float32) -> Decoder:
    """The `Decoder` of a GPT-2 model: pure `init_cache` and `apply`."""
    module = GPT2LMHeadModel(config, dtype=dtype)

    def init(batch: int, max_len: int, cache_dtype: Any = None) -> KVCache:
        return init_cache(
            layers=config.n_layer,
            batch=batch,
            max_len=max_len,
            heads=config.n_head,
            head_dim=config.head_dim,
            dtype=cache_dtype or dtype,
        )

    def apply(params: Any, ids: Array, positions: Array, cache: KVCache, attention_mask: Array):
        return module.apply({"params": params}, ids, positions, cache, attention_mask)

    def prepare(params: Any, rows: int) -> Any:
        # With one row, XLA:CPU's matrix-vector product reads the tied LM head
        # [vocab, n_embd] ~25% faster as its transpose [n_embd, vocab] (measured on
        # GPT-2-small; at 2+ rows the original layout wins). One copy per program,
        # outside the loop; the barrier stops XLA folding the transpose back into
        # the dot.
        if rows != 1 or LM_HEAD_T in params:
            return params
        head = jax.lax.optimization_barrier(params["wte"]["embedding"].T)
        return {**params, LM_HEAD_T: head}

    return Decoder(
        init_cache=init,
        apply=apply,
        prepare=prepare,
        param_specs=gpt2_param_specs,
        vocab_size=config.vocab_size,
        max_positions=config.n_positions,
        name="GPT-2",
    )


def init_params(config: GPT2Config, key: Array, dtype: Any = jnp.float32) -> Any:
    """Random parameters (normal(0.02) as GPT-2's initializer) for training from scratch."""
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
    out = []
    for (path, leaf), k in zip(leaves, keys, strict=True):
        name = str(path[-1])
        if "weight" in name or "embedding" in name:
            out.append(0.02 * jax.random.normal(k, leaf.shape, leaf.dtype))
        else:
            out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)
