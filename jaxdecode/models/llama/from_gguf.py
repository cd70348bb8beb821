"""llama-, qwen2- and qwen3-architecture GGUF files -> `LlamaConfig` and a
transformers-named state dict.

llama.cpp's converter renames tensors (`blk.3.attn_q.weight`), stores the config
as `<arch>.*` metadata, and for the llama architecture permutes the rows of the
Q and K projections (it rotates interleaved pairs, transformers rotates halves):
within each head the rows `[0, d/2, 1, d/2 + 1, ...]`. Undoing that permutation
gives back the checkpoint's own tensors (bitwise for unquantized files). Qwen2
and Qwen3 rotate halves in llama.cpp too (NEOX), so their rows are stored as
transformers has them; Qwen2 always has q/k/v biases, Qwen3 has per-head q/k
norms (`attn_q_norm`, `attn_k_norm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdecode.models.gguf_names import gguf_value, rename_gguf_tensors
from jaxdecode.models.llama.config import LlamaConfig

__all__ = ["ARCHITECTURES", "config_from_gguf", "state_dict_from_gguf", "unpermute_rotary_rows"]

ARCHITECTURES = ("llama", "qwen2", "qwen3")


def config_from_gguf(metadata: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> LlamaConfig:
    """A `LlamaConfig` from `<arch>.*` metadata (and whether `output.weight` exists:
    without it the LM head is tied to the embedding; whether the attention has
    biases).

    Raises:
        ValueError: for metadata that changes inference and is not supported
            (partial rotary dimensions, rope scaling types other than none /
            linear, llama 3 `rope_freqs` factors, MoE experts).
    """
    arch = gguf_value(metadata, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF general.architecture must be one of {ARCHITECTURES}, got {arch!r}")
    key = lambda name, default=None: gguf_value(metadata, f"{arch}.{name}", default)
    hidden, heads = key("embedding_length"), key("attention.head_count")
    if not isinstance(heads, int):
        raise ValueError(f"GGUF {arch}.attention.head_count must be one integer, got {heads!r}")
    head_dim = key("attention.key_length", hidden // heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"GGUF {arch}.attention.value_length != key_length is not supported")
    rot = key("rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ValueError(
            f"GGUF {arch}.rope.dimension_count={rot} differs from head_dim={head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    if key("expert_count", 0):
        raise ValueError(f"GGUF {arch}.expert_count > 0 (mixture of experts) is not supported")
    if "rope_freqs.weight" in tensors:
        raise ValueError("GGUF rope_freqs (llama 3 rope factors) is not supported")
    rope: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(key("rope.freq_base", 10000.0)),
    }
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif scaling not in ("none", None):
        raise ValueError(
            f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported (none, linear)"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size", len(tokens) if tokens is not None else None)
    eos = gguf_value(metadata, "tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        model_type=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=key("context_length", 2048),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_parameters=rope,
        # qwen2's q/k/v biases are hard-wired (not a config field).
        **({} if arch == "qwen2" else {"attention_bias": "blk.0.attn_q.bias" in tensors}),
        bos_token_id=gguf_value(metadata, "tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        pad_token_id=gguf_value(metadata, "tokenizer.ggml.padding_token_id"),
    )


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation of `weight: [heads * d, ...]`:
    within each head, row `2 i + j` of the file is row `j * d/2 + i` of the
    checkpoint."""
    d = weight.shape[0] // heads
    w = weight.reshape(heads, d // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(weight.shape))


def state_dict_from_gguf(
    tensors: Mapping[str, np.ndarray], config: LlamaConfig
) -> dict[str, np.ndarray]:
    """transformers' names and layout for the file's tensors.

    Raises:
        ValueError: for a tensor name llama.cpp's architecture does not use.
    """
    out = rename_gguf_tensors(tensors, config.model_type)
    if config.model_type == "llama":
        for i in range(config.num_hidden_layers):
            for proj, heads in (
                ("q_proj", config.num_attention_heads),
                ("k_proj", config.num_key_value_heads),
            ):
                name = f"model.layers.{i}.self_attn.{proj}.weight"
                if name in out:
                    out[name] = unpermute_rotary_rows(out[name], heads)
    return out


def from_gguf(
    metadata: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> tuple[Any, dict[str, np.ndarray]]:
    """`(config, transformers-named state dict)` of a llama, qwen2 or qwen3 GGUF
    file (a Mixtral one, with `llama.expert_count` > 0, read by `models.mixtral.gguf`)."""
    if gguf_value(metadata, "llama.expert_count", 0):
        from jaxdecode.models.mixtral.gguf import from_gguf as mixtral_from_gguf

        return mixtral_from_gguf(metadata, tensors)
    config = config_from_gguf(metadata, tensors)
    return config, state_dict_from_gguf(tensors, config)
