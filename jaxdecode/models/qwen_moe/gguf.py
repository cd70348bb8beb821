"""qwen2moe- and qwen3moe-architecture GGUF files -> `QwenMoeConfig` and a
transformers-named state dict.

llama.cpp keeps Qwen's half-split rotation (no Q/K permutation), stores the
experts stacked (`ffn_{gate,up,down}_exps`, split by
`mixtral.gguf.split_expert_tensors`), the router as `ffn_gate_inp`, and
Qwen2-MoE's shared expert as `ffn_{gate,up,down}_shexp` with its gate
`ffn_gate_inp_shexp` (`[hidden]` or `[1, hidden]`). The metadata has no
`decoder_sparse_step` / `mlp_only_layers`: a layer is a mixture when its file has
a router, a dense MLP otherwise. The routing is llama.cpp's: top-k weights
renormalised for qwen3moe, not for qwen2moe (transformers' GGUF loader reads them
the same way).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdecode.models.gguf_names import BLOCK, gguf_value, rename_gguf_tensors
from jaxdecode.models.mixtral.gguf import split_expert_tensors
from jaxdecode.models.qwen_moe.config import QwenMoeConfig

__all__ = ["ARCHITECTURES", "from_gguf"]

# GGUF general.architecture -> transformers' model_type.
ARCHITECTURES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}

_MOE_BLOCK = {
    **BLOCK,
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}


def from_gguf(
    metadata: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> tuple[QwenMoeConfig, dict[str, np.ndarray]]:
    """`(config, transformers-named state dict)` of a qwen2moe or qwen3moe file.

    Raises:
        ValueError: for metadata that changes inference and is not supported
            (partial rotary dimensions, rope scaling, value heads wider than key
            heads), or a tensor the architecture does not use.
    """
    arch = gguf_value(metadata, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF general.architecture must be one of {sorted(ARCHITECTURES)}, got {arch!r}"
        )
    model_type = ARCHITECTURES[arch]
    key = lambda name, default=None: gguf_value(metadata, f"{arch}.{name}", default)
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"GGUF {arch}.attention.value_length != key_length is not supported")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"GGUF {arch}.rope.dimension_count differs from head_dim (partial rotary)")
    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported (none)")
    layers = key("block_count")
    dense = tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors)
    tokens = metadata.get("tokenizer.ggml.tokens")
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=key("vocab_size", len(tokens) if tokens is not None else None),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=key("context_length", 32768),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_parameters={"rope_type": "default", "rope_theta": float(key("rope.freq_base", 1e4))},
        moe_intermediate_size=key("expert_feed_forward_length"),
        num_experts=key("expert_count"),
        num_experts_per_tok=key("expert_used_count"),
        norm_topk_prob=arch == "qwen3moe",
        mlp_only_layers=dense,
        bos_token_id=gguf_value(metadata, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_value(metadata, "tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf_value(metadata, "tokenizer.ggml.padding_token_id"),
    )
    if dense and len(dense) == layers:
        raise ValueError(f"GGUF {arch} file has no expert router (ffn_gate_inp) in any layer")
    if arch == "qwen2moe":
        fields["qkv_bias"] = "blk.0.attn_q.bias" in tensors
        fields["shared_expert_intermediate_size"] = key("expert_shared_feed_forward_length", 0)
        fields["layer_types"] = ("full_attention",) * layers
    else:
        fields["attention_bias"] = "blk.0.attn_q.bias" in tensors
    config = QwenMoeConfig(**fields)
    rest, experts = split_expert_tensors(tensors, "mlp", ("gate_proj", "up_proj", "down_proj"))
    out = rename_gguf_tensors(rest, arch, _MOE_BLOCK)
    for name, array in out.items():
        if name.endswith("shared_expert_gate.weight"):
            out[name] = array.reshape(1, -1)
    return config, {**out, **experts}
