"""Tensor-parallel parameter specs of the skeleton (`Transformer`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from jaxdecode.sharding import EXPERT, MODEL, logical_spec, path_names

__all__ = ["transformer_param_specs"]

# Split by output (heads, hidden units); the fused forms too: a shard holds a
# contiguous block of their rows, and the compiler moves what the split needs.
_COLUMN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj")
_ROW = ("o_proj", "down_proj")  # split by input


def transformer_param_specs(params: Mapping[str, Any]) -> Any:
    """Megatron-style tensor parallelism over the `model` axis.

    Projections are `[out, in]`: q/k/v (or the fused `qkv_proj`) and the MLP's
    gate/up (or `gate_up_proj`) are split by output, o_proj and down_proj by
    input, so each pair needs one reduction; the embedding and an untied LM head
    `[vocab, hidden]` are split by vocabulary (vocabulary-sharded logits). With
    fewer KV heads than devices on the model axis, k/v's output rows still split
    evenly when `kv_heads * head_dim` divides (`sharding.fit_spec` moves or
    drops the axis otherwise), and the cache's KV-head axis moves to the head
    dimension: a placement that never changes the result. Norms and
    row-parallel biases are replicated. A mixture of experts' stacked weights
    `[experts, out, in]` are split by expert (the logical `expert` axis, over
    the `model` mesh axis by `sharding.AXIS_RULES`: each device holds whole
    experts); its router and a shared expert's gate are replicated, the shared
    expert split as a dense MLP.
    """

    def spec(path: tuple[Any, ...], leaf: Any) -> P:
        names = path_names(path)
        name = names[-1]
        module = names[-2] if len(names) > 1 else ""
        if module == "experts":
            return logical_spec(EXPERT, None, None)
        if module in ("embed_tokens", "lm_head"):
            return P(MODEL, None)
        if module in _COLUMN:
            return P(MODEL, None) if name == "weight" else P(MODEL)
        if module in _ROW:
            return P(None, MODEL) if name == "weight" else P()
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)
