"""The adapter of Mixtral (`mixtral`, transformers' `MixtralForCausalLM`) onto
the skeleton, read from and written to transformers' `config.json`.

Mixtral is the two-norm Llama block (no biases) whose feed-forward is, on every
layer, a mixture of `num_local_experts` gated MLPs of width `intermediate_size`:
a float32 softmax over the router's logits, the top `num_experts_per_tok`,
renormalised to sum to 1 (`TransformerConfig.norm_topk_prob`). The checkpoint
names the block `block_sparse_moe` and each expert's projections `w1` (gate),
`w3` (up) and `w2` (down); jaxdecode stacks them `[experts, ...]` at load and
writes them back under those names. `sliding_window`, when set, applies to every
layer. `router_jitter_noise` only acts in training and is accepted whatever its
value. Every other field that changes inference is read or refused with a
ValueError naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxdecode.models.hf_common import (
    check_positive_ints,
    refuse_unsupported,
    skeleton_sizes,
    standard_rope,
    uniform_layers,
)
from jaxdecode.models.layers import ACTIVATIONS
from jaxdecode.models.rope import ROPE_TYPES, check_rope, freeze_rope
from jaxdecode.models.transformer.config import TransformerConfig

__all__ = ["MixtralConfig"]

_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "num_local_experts",
    "num_experts_per_tok",
)
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")


def rope_types() -> tuple[str, ...]:
    """The rope types the Llama-style MoE families read (all but Phi-3's longrope)."""
    return tuple(t for t in ROPE_TYPES if t != "longrope")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixtralConfig:
    """The inference fields of transformers' `MixtralConfig` (its names and
    defaults); `rope_parameters` as sorted `(key, value)` pairs (hashable)."""

    model_type: str = "mixtral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_parameters: tuple[tuple[str, Any], ...] = (
        ("rope_theta", 1000000.0),
        ("rope_type", "default"),
    )
    sliding_window: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.model_type != "mixtral":
            raise ValueError(f"MixtralConfig.model_type must be 'mixtral', got {self.model_type!r}")
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        heads = self.num_attention_heads
        if self.head_dim is None and isinstance(heads, int) and heads > 0:
            set_("head_dim", self.hidden_size // heads)
        if isinstance(self.rope_parameters, Mapping):
            set_("rope_parameters", freeze_rope(self.rope_parameters))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        check_moe_fields(self, _INT_FIELDS)
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"MixtralConfig.num_experts_per_tok={self.num_experts_per_tok} must be at most "
                f"num_local_experts={self.num_local_experts}"
            )
        check_rope(
            dict(self.rope_parameters), "MixtralConfig rope_parameters", rope_types(), self.head_dim
        )

    def transformer(self) -> TransformerConfig:
        """These fields as the skeleton's."""
        rope = freeze_rope(dict(self.rope_parameters))
        return TransformerConfig(
            name="Mixtral",
            **skeleton_sizes(self, activation=self.hidden_act),
            **uniform_layers(self.num_hidden_layers, self.sliding_window, rope),
            mlp_kinds=("moe",) * self.num_hidden_layers,
            num_experts=self.num_local_experts,
            experts_per_token=self.num_experts_per_tok,
            norm_topk_prob=True,
            moe_module="block_sparse_moe",
            expert_projections=("w1", "w3", "w2"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' `MixtralConfig` loads."""
        out = dataclasses.asdict(self)
        out["rope_parameters"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_parameters
        }
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out["architectures"] = ["MixtralForCausalLM"]
        return out

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> MixtralConfig:
        """From a transformers `config.json` dict (`rope_scaling` / top-level
        `rope_theta` read as transformers 5 standardizes them)."""
        model_type = data.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ValueError(f"config.json model_type must be 'mixtral', got {model_type!r}")
        refuse_unsupported(data, model_type)
        refuse_partial_rotary(data, model_type)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and k not in _ROPE_KEYS}
        kwargs["rope_parameters"] = standard_rope(
            data.get("rope_parameters") or data.get("rope_scaling"),
            data.get("rope_theta", 1000000.0),
        )
        return cls(**kwargs)


def refuse_partial_rotary(data: Mapping[str, Any], model_type: str) -> None:
    """ValueError for a `partial_rotary_factor` other than 1 (these families rotate
    every dimension)."""
    prf = data.get(
        "partial_rotary_factor", (data.get("rope_parameters") or {}).get("partial_rotary_factor")
    )
    if prf not in (None, 1, 1.0):
        raise ValueError(
            f"config.json partial_rotary_factor={prf!r} is not supported by {model_type} (only 1.0)"
        )


def check_moe_fields(config: Any, int_fields: tuple[str, ...]) -> None:
    """The checks the MoE adapters share: positive integer fields, the activation,
    grouped heads, an even head width, a positive or absent sliding window."""
    name = type(config).__name__
    check_positive_ints(config, int_fields)
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"{name}.hidden_act must be one of {sorted(ACTIVATIONS)}, got {config.hidden_act!r}"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"{name}.num_attention_heads={config.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={config.num_key_value_heads}"
        )
    if config.head_dim % 2:
        raise ValueError(
            f"{name}.head_dim must be even (RoPE rotates pairs), got {config.head_dim}"
        )
    window = config.sliding_window
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(f"{name}.sliding_window must be None or an integer >= 1, got {window!r}")
