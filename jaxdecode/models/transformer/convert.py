"""Checkpoints of the skeleton <-> jaxdecode parameters.

The tensor-name table follows `TransformerConfig`'s fields with transformers'
names (`model.layers.3.self_attn.q_proj.weight`, `model.norm.weight`,
`lm_head.weight`), one to one onto the Flax tree (`layers_3/self_attn/q_proj/
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
from jaxdecode.models.transformer.config import TransformerConfig

__all__ = ["expected_shapes", "param_path", "params_from_state_dict", "state_dict_from_params"]


def expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """transformers' tensor names -> shapes for `config`."""
    e, d, inner = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, e),
        "model.norm.weight": (e,),
    }
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, e)
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config.post_attn_norm:
        norms.append("pre_feedforward_layernorm")
    if config.post_ffn_norm:
        norms.append("post_feedforward_layernorm")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        shapes.update({f"{p}{n}.weight": (e,) for n in norms})
        projections = {"qkv_proj": q + 2 * kv} if config.fused_qkv else {
            "q_proj": q, "k_proj": kv, "v_proj": kv
        }  # fmt: skip
        for name, rows in projections.items():
            shapes[f"{a}{name}.weight"] = (rows, e)
            if config.qkv_bias:
                shapes[f"{a}{name}.bias"] = (rows,)
        shapes[a + "o_proj.weight"] = (e, q)
        if config.o_bias:
            shapes[a + "o_proj.bias"] = (e,)
        if config.qk_norm:
            shapes.update({a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)})
        mlp = {"gate_up_proj": 2 * inner} if config.fused_gate_up else {
            "gate_proj": inner, "up_proj": inner
        }  # fmt: skip
        mlp["down_proj"] = e
        for name, rows in mlp.items():
            shapes[f"{p}mlp.{name}.weight"] = (rows, inner if name == "down_proj" else e)
            if config.mlp_bias:
                shapes[f"{p}mlp.{name}.bias"] = (rows,)
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
    state: Mapping[str, np.ndarray],
    config: TransformerConfig,
    dtype: Any = jnp.float32,
    what: str = "a model",
) -> dict[str, Any]:
    """Checks names and shapes, then builds the Flax parameter tree.

    Args:
        state: transformers-named tensors.
        config: the skeleton's fields.
        dtype: parameter dtype.
        what: the checkpoint, for messages (e.g. "a gemma2 with num_hidden_layers=2").

    Raises:
        CheckpointError: naming the first missing, unexpected or misshapen tensor.
    """
    expected = expected_shapes(config)
    head = state.get("lm_head.weight")
    tied_shape = (config.vocab_size, config.hidden_size)
    if config.tie_embeddings and head is not None and tuple(head.shape) != tied_shape:
        raise CheckpointError(
            f"tensor lm_head.weight has shape {tuple(head.shape)}, expected "
            f"{expected['model.embed_tokens.weight']} (tied to model.embed_tokens.weight)"
        )

    def normalize(raw_name: str) -> str | None:
        if raw_name.endswith(".rotary_emb.inv_freq"):
            return None  # a buffer older checkpoints saved
        if config.tie_embeddings and raw_name == "lm_head.weight":
            return None  # tied: checked above, then unused
        return raw_name

    found = checked_tensors(state, expected, normalize, what)
    params: dict[str, Any] = {}
    for name, array in found.items():
        node = params
        *parents, leaf = param_path(name)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(array, dtype=dtype)
    return params


def state_dict_from_params(
    params: Mapping[str, Any], config: TransformerConfig
) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state_dict` (float32, transformers' names)."""
    out = {}
    for name in expected_shapes(config):
        node: Any = params
        for p in param_path(name):
            node = node[p]
        out[name] = np.ascontiguousarray(np.asarray(node, dtype=np.float32))
    return out
