"""llama.cpp's GGUF tensor names -> transformers', shared by the families that
read GGUF files: the names llama.cpp gives every decoder-only architecture
(`token_embd`, `blk.N.attn_q`, `blk.N.ffn_up`, ...), and a renaming loop a
family calls with its own overrides (Gemma's `ffn_norm` is the
`pre_feedforward_layernorm`, Phi-3's `ffn_up` the fused `gate_up_proj`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["BLOCK", "TOP", "gguf_value", "rename_gguf_tensors"]

# llama.cpp's per-block names -> transformers' (under `model.layers.N.`).
BLOCK: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def gguf_value(metadata: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """`metadata[key]` as a Python value (NumPy scalars unwrapped), or `default`."""
    value = metadata.get(key, default)
    if isinstance(value, np.generic):
        value = value.item()
    return value


def rename_gguf_tensors(
    tensors: Mapping[str, np.ndarray],
    arch: str,
    block: Mapping[str, str] = BLOCK,
    skip: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """The file's tensors under transformers' names (`block` maps llama.cpp's
    per-block names; `skip`: top-level tensors a family reads itself, e.g.
    Phi-3's rope factors).

    Raises:
        ValueError: for a tensor name the architecture does not use.
    """
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in block:
            out[f"model.layers.{parts[1]}.{block[parts[2]]}.{parts[3]}"] = array
        elif len(parts) == 2 and parts[0] in TOP:
            out[f"{TOP[parts[0]]}.{parts[1]}"] = array
        elif name not in skip:
            raise ValueError(f"GGUF tensor {name} is not part of a {arch}-architecture model")
    return out
