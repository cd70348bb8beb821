"""gemma2- and gemma3-architecture GGUF files -> `Gemma2Config` /
`Gemma3TextConfig` and a transformers-named state dict.

llama.cpp's converter stores Gemma's `(1 + w)` norm weights as `1 + w` (its
RMSNorm multiplies by the weight), so 1 is subtracted back from every
`*norm.weight`; names follow llama.cpp (`ffn_norm` is the
`pre_feedforward_layernorm`, `post_attention_norm` / `post_ffw_norm` the two
post-norms). What the file does not store is fixed as llama.cpp fixes it: the
layer pattern (Gemma 2 alternates sliding and global layers; Gemma 3 has a
global one in every 6 unless `attention.sliding_window_pattern` says otherwise), Gemma 3's local rope base (10,000, unscaled), and the
query scale (`1 / sqrt(hidden / heads)` for the 27B models, 46 and 62 layers,
`1 / sqrt(head_dim)` otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdecode.models.gemma2.config import Gemma2Config, Gemma3TextConfig
from jaxdecode.models.gguf_names import BLOCK, gguf_value, rename_gguf_tensors

__all__ = ["from_gguf"]

_BLOCK = {
    **BLOCK,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Layer counts of the 27B models, whose query scale is 1 / sqrt(hidden / heads).
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}


def config_from_gguf(
    metadata: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> Gemma2Config:
    """The config of a gemma2 / gemma3 GGUF file.

    Raises:
        ValueError: for an architecture other than these two, or metadata that
            changes inference and is not supported (rope scaling other than
            linear, a sliding-window pattern neither an integer nor one bool per
            layer).
    """
    arch = gguf_value(metadata, "general.architecture")
    if arch not in _LAYERS_27B:
        raise ValueError(f"GGUF general.architecture must be 'gemma2' or 'gemma3', got {arch!r}")
    key = lambda name, default=None: gguf_value(metadata, f"{arch}.{name}", default)
    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    if not isinstance(heads, int):
        raise ValueError(f"GGUF {arch}.attention.head_count must be one integer, got {heads!r}")
    head_dim = key("attention.key_length", 256)
    if key("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"GGUF {arch}.attention.value_length != key_length is not supported")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"GGUF {arch}.rope.dimension_count != head_dim is not supported")
    tokens = metadata.get("tokenizer.ggml.tokens")
    common: dict[str, Any] = dict(
        vocab_size=key("vocab_size", len(tokens) if tokens is not None else None),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=key("context_length", 8192),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensors,
        sliding_window=key("attention.sliding_window", 4096),
        query_pre_attn_scalar=hidden // heads if layers == _LAYERS_27B[arch] else head_dim,
        bos_token_id=gguf_value(metadata, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_value(metadata, "tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf_value(metadata, "tokenizer.ggml.padding_token_id"),
    )
    if arch == "gemma2":
        return Gemma2Config(
            **common,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": float(key("rope.freq_base", 1e4)),
            },
            attn_logit_softcapping=key("attn_logit_softcapping", 50.0),
            final_logit_softcapping=key("final_logit_softcapping", 30.0),
        )
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 1e6))}
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        full.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif scaling not in ("none", None):
        raise ValueError(
            f"GGUF gemma3.rope.scaling.type={scaling!r} is not supported (none, linear)"
        )
    pattern = key("attention.sliding_window_pattern", 6)
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 1:
        sliding = [bool((i + 1) % pattern) for i in range(layers)]
    elif isinstance(pattern, (list, tuple, np.ndarray)) and len(pattern) == layers:
        sliding = [bool(x) for x in pattern]  # llama.cpp's per-layer form: True = sliding
    else:
        raise ValueError(
            "GGUF gemma3.attention.sliding_window_pattern must be an integer >= 1 or one "
            f"bool per layer ({layers}), got {pattern!r}"
        )
    return Gemma3TextConfig(
        **common,
        rope_parameters={
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        layer_types=tuple("sliding_attention" if x else "full_attention" for x in sliding),
        final_logit_softcapping=key("final_logit_softcapping"),
    )


def state_dict_from_gguf(
    tensors: Mapping[str, np.ndarray], config: Gemma2Config
) -> dict[str, np.ndarray]:
    """transformers' names, with the norms' stored `1 + w` back to `w`."""
    out = rename_gguf_tensors(
        tensors, "gemma2" if config.model_type == "gemma2" else "gemma3", _BLOCK
    )
    for name, array in out.items():
        if name.endswith("norm.weight"):
            out[name] = (array - np.float32(1.0)).astype(np.float32)
    return out


def from_gguf(
    metadata: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> tuple[Gemma2Config, dict[str, np.ndarray]]:
    """`(config, transformers-named state dict)` of a gemma2 or gemma3 GGUF file."""
    config = config_from_gguf(metadata, tensors)
    return config, state_dict_from_gguf(tensors, config)
