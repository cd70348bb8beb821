"""What every family's `config.json` adapter checks the same way: keys that no
family can honour, positive integer fields, and rope dicts in the old and new
spellings (transformers 5's `standardize_rope_params`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["check_positive_ints", "refuse_unsupported", "standard_rope"]


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
