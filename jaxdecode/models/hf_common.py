"""What every family's `config.json` adapter does the same way: keys that no
family can honour, positive integer fields, rope dicts in the old and new
spellings (transformers 5's `standardize_rope_params`), and the skeleton's fields
that every family reads from the same `config.json` keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "check_positive_ints",
    "refuse_unsupported",
    "skeleton_sizes",
    "standard_rope",
    "uniform_layers",
]


def refuse_unsupported(data: Mapping[str, Any], model_type: str) -> None:
    """ValueError for config.json keys that change inference in a way no family
    reads: quantized or remote-code checkpoints, bidirectional attention, a
    partial rotary factor (for adapters without partial rotary)."""
    for key in ("quantization_config", "auto_map"):
        if data.get(key):
            raise ValueError(
                f"config.json has {key!r}: quantized or remote-code checkpoints are not supported"
            )
    if data.get("use_bidirectional_attention"):
        raise ValueError(
            f"config.json use_bidirectional_attention=True is not supported by {model_type} "
            "(causal decoding)"
        )


def check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    """ValueError naming the first of `names` that is not an integer >= 1."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{type(config).__name__}.{name} must be an integer >= 1, got {value!r}"
            )


def standard_rope(rope: Mapping[str, Any] | None, default_theta: float) -> dict[str, Any]:
    """A rope dict as transformers 5 standardizes it: `type` read as `rope_type`
    (default "default"), `rope_theta` defaulted."""
    out = dict(rope or {})
    if "type" in out:
        out.setdefault("rope_type", out.pop("type"))
    out.setdefault("rope_type", "default")
    out.setdefault("rope_theta", default_theta)
    return out


def skeleton_sizes(config: Any, *, activation: str) -> dict[str, Any]:
    """The `TransformerConfig` keywords every family reads from the same
    `config.json` keys (sizes, head counts, the RMS norm's epsilon, tied
    embeddings, the context length), plus its MLP `activation` (named differently
    by some families: Gemma 2's `hidden_activation`)."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "activation": activation,
        "norm_eps": float(config.rms_norm_eps),
        "tie_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
    }


def uniform_layers(num_layers: int, sliding_window: int | None, rope: Any) -> dict[str, Any]:
    """The `TransformerConfig` keywords of a model whose layers are all of one kind:
    sliding-window attention when `sliding_window` is set, else full; one rope
    (a frozen rope dict) for both kinds."""
    kind = "full_attention" if sliding_window is None else "sliding_attention"
    return {
        "layer_types": (kind,) * num_layers,
        "sliding_window": sliding_window,
        "rope": (("full_attention", rope), ("sliding_attention", rope)),
    }
