"""Llama-style checkpoints <-> jaxdecode parameters.

transformers' names (`model.layers.3.self_attn.q_proj.weight`, `model.norm.weight`,
`lm_head.weight`) map one to one onto the Flax tree (`layers_3/self_attn/q_proj/
weight`, ...); both store projections `[out, in]`, so nothing is transposed. A
tied head is absent from the file (transformers 5 drops it) or, when present,
must match the embedding's shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdecode.checkpoints import checked_tensors
from jaxdecode.errors import CheckpointError
from jaxdecode.models.llama.config import LlamaConfig

__all__ = ["expected_shapes", "param_path", "params_from_state_dict", "state_dict_from_params"]


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """transformers' tensor names -> shapes for `config`."""
    e, d = config.hidden_size, config.head_dim
    q, kv, inner = (
        config.num_attention_heads * d,
        config.num_key_value_heads * d,
        config.intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, e),
        "model.norm.weight": (e,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, e)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        shapes.update(
            {
                p + "input_layernorm.weight": (e,),
                p + "post_attention_layernorm.weight": (e,),
                a + "q_proj.weight": (q, e),
                a + "k_proj.weight": (kv, e),
                a + "v_proj.weight": (kv, e),
                a + "o_proj.weight": (e, q),
                p + "mlp.gate_proj.weight": (inner, e),
                p + "mlp.up_proj.weight": (inner, e),
                p + "mlp.down_proj.weight": (e, inner),
            }
        )
        if config.qkv_bias:
            shapes.update(
                {a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)}
            )
        if config.o_bias:
            shapes[a + "o_proj.bias"] = (e,)
        if config.qk_norm:
            shapes.update({a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)})
        if config.uses_mlp_bias:
            shapes.update(
                {
                    p + "mlp.gate_proj.bias": (inner,),
                    p + "mlp.up_proj.bias": (inner,),
                    p + "mlp.down_proj.bias": (e,),
                }
            )
    return shapes


def param_path(name: str) -> tuple[str, ...]:
    """`model.layers.3.mlp.up_proj.weight` -> `("layers_3", "mlp", "up_proj", "weight")`."""
    parts = name.removeprefix("model.").split(".")
    if parts[0] == "layers":
        parts = [f"layers_{parts[1]}", *parts[2:]]
    if parts[0] == "embed_tokens":
        parts[-1] = "embedding"
    return tuple(parts)


def params_from_state_dict(
    state: Mapping[str, np.ndarray], config: LlamaConfig, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Checks names and shapes, then builds the Flax parameter tree.

    Raises:
        CheckpointError: naming the first missing, unexpected or misshapen tensor.
    """
    expected = expected_shapes(config)
    head = state.get("lm_head.weight")
    tied_shape = (config.vocab_size, config.hidden_size)
    if config.tie_word_embeddings and head is not None and tuple(head.shape) != tied_shape:
        raise CheckpointError(
            f"tensor lm_head.weight has shape {tuple(head.shape)}, expected "
            f"{expected['model.embed_tokens.weight']} (tied to model.embed_tokens.weight)"
        )

    def normalize(raw_name: str) -> str | None:
        if raw_name.endswith(".rotary_emb.inv_freq"):
            return None  # a buffer older checkpoints saved
        if config.tie_word_embeddings and raw_name == "lm_head.weight":
            return None  # tied: checked above, then unused
        return raw_name

    found = checked_tensors(
        state,
        expected,
        normalize,
        f"a {config.model_type} with num_hidden_layers={config.num_hidden_layers}",
    )
    params: dict[str, Any] = {}
    for name, array in found.items():
        node = params
        *parents, leaf = param_path(name)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(array, dtype=dtype)
    return params


def state_dict_from_params(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state_dict` (float32, transformers' names)."""
    out = {}
    for name in expected_shapes(config):
        node: Any = params
        for p in param_path(name):
            node = node[p]
        out[name] = np.ascontiguousarray(np.asarray(node, dtype=np.float32))
    return out
