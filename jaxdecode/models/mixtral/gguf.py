"""Mixture-of-experts GGUF files: llama-architecture Mixtral (here) and the
expert tensors every MoE architecture shares (`split_expert_tensors`, used by
`models.qwen_moe.gguf` too).

llama.cpp stores a layer's experts stacked, `blk.N.ffn_gate_exps`,
`ffn_up_exps: [experts, moe_hidden, hidden]` and `ffn_down_exps: [experts,
hidden, moe_hidden]` (NumPy order), and the router as `ffn_gate_inp: [experts,
hidden]`; they are handed on under transformers' per-expert names (views, not
copies), which the skeleton's loader stacks again. A Mixtral file is a `llama`
file with `llama.expert_count` > 0: its Q/K rows are permuted as every llama
file's, and llama.cpp renormalises the top-k weights (Mixtral's routing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdecode.models.gguf_names import BLOCK, gguf_value, rename_gguf_tensors
from jaxdecode.models.mixtral.config import MixtralConfig

__all__ = ["from_gguf", "split_expert_tensors"]

_EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def split_expert_tensors(
    tensors: Mapping[str, np.ndarray], module: str, projections: tuple[str, str, str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`(the other tensors, the stacked experts under transformers' per-expert
    names)`: `blk.3.ffn_up_exps.weight [E, ...]` -> `model.layers.3.<module>.
    experts.<j>.<up>.weight` for each expert j (`projections`: the gate, up and
    down names, e.g. Mixtral's `w1`, `w3`, `w2`)."""
    rest, experts = {}, {}
    for name, array in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _EXPERTS:
            proj = projections[_EXPERTS.index(parts[2])]
            for j in range(array.shape[0]):
                key = f"model.layers.{parts[1]}.{module}.experts.{j}.{proj}.{parts[3]}"
                experts[key] = array[j]
        else:
            rest[name] = array
    return rest, experts


def from_gguf(
    metadata: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> tuple[MixtralConfig, dict[str, np.ndarray]]:
    """`(config, transformers-named state dict)` of a llama-architecture Mixtral
    GGUF file (`llama.expert_count` > 0).

    Raises:
        ValueError: for metadata that changes inference and is not supported
            (partial rotary dimensions, rope scaling, per-expert tensors of the
            oldest converters), or a tensor Mixtral does not use.
    """
    # The dense llama reader's checks and fields, then the experts.
    from jaxdecode.models.llama.from_gguf import unpermute_rotary_rows

    arch = gguf_value(metadata, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture must be 'llama' for Mixtral, got {arch!r}")
    key = lambda name, default=None: gguf_value(metadata, f"llama.{name}", default)
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError("GGUF llama.rope.dimension_count differs from head_dim (partial rotary)")
    if key("rope.scaling.type", "none") not in ("none", None):
        raise ValueError(
            f"GGUF llama.rope.scaling.type={key('rope.scaling.type')!r} (Mixtral: none)"
        )
    if any(".ffn_gate." in name and name.count(".") == 4 for name in tensors):
        raise ValueError("GGUF per-expert tensors (blk.N.ffn_gate.E) are not supported; reconvert")
    tokens = metadata.get("tokenizer.ggml.tokens")
    config = MixtralConfig(
        vocab_size=key("vocab_size", len(tokens) if tokens is not None else None),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=key("context_length", 4096 * 32),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_parameters={"rope_type": "default", "rope_theta": float(key("rope.freq_base", 1e6))},
        num_local_experts=key("expert_count"),
        num_experts_per_tok=key("expert_used_count"),
        bos_token_id=gguf_value(metadata, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_value(metadata, "tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf_value(metadata, "tokenizer.ggml.padding_token_id"),
    )
    rest, experts = split_expert_tensors(tensors, "block_sparse_moe", ("w1", "w3", "w2"))
    block = {**BLOCK, "ffn_gate_inp": "block_sparse_moe.gate"}
    out = rename_gguf_tensors(rest, "llama (Mixtral)", block)
    for i in range(config.num_hidden_layers):
        for proj, n in (("q_proj", heads), ("k_proj", config.num_key_value_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            if name in out:
                out[name] = unpermute_rotary_rows(out[name], n)
    return config, {**out, **experts}
