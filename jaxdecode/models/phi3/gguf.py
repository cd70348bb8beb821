"""phi3-architecture GGUF files -> `Phi3Config` and a transformers-named state dict.

llama.cpp keeps Phi-3's fused tensors (`attn_qkv` is `qkv_proj`, `ffn_up` the
fused `gate_up_proj`; a file with separate `attn_q` / `attn_k` / `attn_v` is
fused here in transformers' row order), rotates halves as transformers does (no
row permutation), stores the rotary width as `rope.dimension_count` (the
partial rotary factor times `head_dim`) and LongRoPE's factors as the tensors
`rope_factors_short` / `rope_factors_long`, with the original context length in
`rope.scaling.original_context_length`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdecode.models.gguf_names import BLOCK, gguf_value, rename_gguf_tensors
from jaxdecode.models.phi3.config import Phi3Config

__all__ = ["from_gguf"]

_BLOCK = {**BLOCK, "ffn_up": "mlp.gate_up_proj"}
_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")


def config_from_gguf(metadata: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Phi3Config:
    """The config of a phi3 GGUF file.

    Raises:
        ValueError: for another architecture, only one of the two LongRoPE
            factor tensors, or an attention factor other than LongRoPE's own.
    """
    arch = gguf_value(metadata, "general.architecture")
    if arch != "phi3":
        raise ValueError(f"GGUF general.architecture must be 'phi3', got {arch!r}")
    key = lambda name, default=None: gguf_value(metadata, f"phi3.{name}", default)
    hidden, heads = key("embedding_length"), key("attention.head_count")
    if not isinstance(heads, int):
        raise ValueError(f"GGUF phi3.attention.head_count must be one integer, got {heads!r}")
    head_dim = hidden // heads
    context = key("context_length", 4096)
    original = key("rope.scaling.original_context_length", context)
    rope: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "partial_rotary_factor": key("rope.dimension_count", head_dim) / head_dim,
    }
    present = [name in tensors for name in _FACTORS]
    if any(present) and not all(present):
        raise ValueError(f"GGUF phi3 file has one of {_FACTORS} without the other")
    if all(present):
        rope.update(
            rope_type="longrope",
            short_factor=[float(x) for x in tensors[_FACTORS[0]]],
            long_factor=[float(x) for x in tensors[_FACTORS[1]]],
        )
        factor = context / original
        derived = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        stored = key("rope.scaling.attn_factor", derived)
        if abs(stored - derived) > 1e-6 * max(1.0, derived):
            rope["attention_factor"] = float(stored)
    tokens = metadata.get("tokenizer.ggml.tokens")
    return Phi3Config(
        vocab_size=key("vocab_size", len(tokens) if tokens is not None else None),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        max_position_embeddings=context,
        original_max_position_embeddings=original,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_parameters=rope,
        sliding_window=key("attention.sliding_window"),
        bos_token_id=gguf_value(metadata, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_value(metadata, "tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf_value(metadata, "tokenizer.ggml.padding_token_id"),
    )


def state_dict_from_gguf(
    tensors: Mapping[str, np.ndarray], config: Phi3Config
) -> dict[str, np.ndarray]:
    """transformers' names; separate q/k/v fused into `qkv_proj` (q, k, v rows)."""
    out = rename_gguf_tensors(tensors, "phi3", _BLOCK, skip=_FACTORS)
    for i in range(config.num_hidden_layers):
        a = f"model.layers.{i}.self_attn."
        parts = [out.get(f"{a}{p}_proj.weight") for p in "qkv"]
        if all(p is not None for p in parts):
            for p in "qkv":
                del out[f"{a}{p}_proj.weight"]
            out[a + "qkv_proj.weight"] = np.concatenate(parts, axis=0)
    return out


def from_gguf(
    metadata: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> tuple[Phi3Config, dict[str, np.ndarray]]:
    """`(config, transformers-named state dict)` of a phi3 GGUF file."""
    config = config_from_gguf(metadata, tensors)
    return config, state_dict_from_gguf(tensors, config)
