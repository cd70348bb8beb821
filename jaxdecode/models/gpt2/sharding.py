"""Tensor-parallel parameter specs of jaxdecode's GPT-2 over the `model` mesh axis."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from jaxdecode.sharding import MODEL, path_names

__all__ = ["gpt2_param_specs"]


def gpt2_param_specs(params: Mapping[str, Any]) -> Any:
    """Megatron-style tensor parallelism for jaxdecode's GPT-2 parameters.

    Projections are stored `[out, in]`: the QKV and MLP-in projections are split
    by output (heads, hidden units), the attention and MLP-out projections by
    input, so each pair needs one reduction; the tied embedding `[vocab, embd]`
    is split by vocabulary, so the logits come out vocabulary-sharded. Layer
    norms and position embeddings are replicated.
    """

    def spec(path: tuple[Any, ...], leaf: Any) -> P:
        names = path_names(path)
        name = names[-1]
        module = names[-2] if len(names) > 1 else ""
        parent = names[-3] if len(names) > 2 else ""
        if module == "wte" and name == "embedding":
            return P(MODEL, None)
        if module in ("c_attn", "c_fc"):
            return P(MODEL, None) if name == "weight" else P(MODEL)
        if module == "c_proj" and parent in ("attn", "mlp"):
            return P(None, MODEL) if name == "weight" else P()
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)
