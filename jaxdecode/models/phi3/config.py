"""The adapter of Phi-3 (`phi3`, transformers' `Phi3ForCausalLM`) onto the
skeleton, read from and written to transformers' `config.json`.

Phi-3 is the two-norm Llama block with fused projections (`qkv_proj: [(heads +
2 kv_heads) * head_dim, hidden]`, `gate_up_proj: [2 * intermediate, hidden]`,
gate rows first), partial rotary (`partial_rotary_factor`), LongRoPE
(`rope_type` "longrope", legacy "su" / "yarn": short factors up to
`original_max_position_embeddings`, long factors past it, chosen inside the
program from the call's largest position as transformers does) and an optional
sliding window on every layer. Every field that changes inference is read or
refused with a ValueError naming it.
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
from jaxdecode.models.rope import check_rope, freeze_rope
from jaxdecode.models.transformer.config import TransformerConfig

__all__ = ["Phi3Config"]

# transformers' Phi3Config.validate_rope: these two only.
ROPE_TYPES = ("default", "longrope")

_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "original_max_position_embeddings",
)
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phi3Config:
    """The inference fields of transformers' `Phi3Config` (its names and
    defaults). `rope_parameters` holds `partial_rotary_factor` as transformers 5
    standardizes it, stored as sorted `(key, value)` pairs (factor lists as
    tuples) so the config stays hashable; `head_dim` defaults to
    `hidden_size // num_attention_heads`.
    """

    model_type: str = "phi3"
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_parameters: tuple[tuple[str, Any], ...] = (
        ("partial_rotary_factor", 1.0),
        ("rope_theta", 10000.0),
        ("rope_type", "default"),
    )
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 32000
    pad_token_id: int | None = 32000

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.model_type != "phi3":
            raise ValueError(f"Phi3Config.model_type must be 'phi3', got {self.model_type!r}")
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        heads = self.num_attention_heads
        if self.head_dim is None and isinstance(heads, int) and heads > 0:
            set_("head_dim", self.hidden_size // heads)
        rope = dict(self.rope_parameters)
        if rope.get("rope_type") == "longrope":
            # transformers gives the top-level field priority over the dict's.
            rope["original_max_position_embeddings"] = self.original_max_position_embeddings
        set_("rope_parameters", freeze_rope(rope))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        check_positive_ints(self, _INT_FIELDS)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"Phi3Config.hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Phi3Config.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        window = self.sliding_window
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ValueError(
                f"Phi3Config.sliding_window must be None or an integer >= 1, got {window!r}"
            )
        prf = self.rope.get("partial_rotary_factor", 1.0)
        rotary = int(self.head_dim * prf) if isinstance(prf, (int, float)) else 0
        if not 0 < rotary <= self.head_dim or rotary % 2:
            raise ValueError(
                f"Phi3Config partial_rotary_factor={prf!r} must give an even number of rotary "
                f"dimensions in (0, head_dim={self.head_dim}], got {rotary}"
            )
        rope = {k: v for k, v in self.rope.items() if k != "partial_rotary_factor"}
        check_rope(rope, "Phi3Config rope_parameters", ROPE_TYPES, rotary)

    @property
    def rope(self) -> dict[str, Any]:
        """`rope_parameters` as a dict."""
        return dict(self.rope_parameters)

    @property
    def rotary_dim(self) -> int:
        """`int(head_dim * partial_rotary_factor)`, as transformers computes it."""
        return int(self.head_dim * self.rope.get("partial_rotary_factor", 1.0))

    def transformer(self) -> TransformerConfig:
        """These fields as the skeleton's."""
        rope = freeze_rope({k: v for k, v in self.rope.items() if k != "partial_rotary_factor"})
        return TransformerConfig(
            name="Phi3",
            **skeleton_sizes(self, activation=self.hidden_act),
            **uniform_layers(self.num_hidden_layers, self.sliding_window, rope),
            fused_qkv=True,
            fused_gate_up=True,
            rotary_dim=self.rotary_dim,
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' `Phi3Config` loads."""
        out = dataclasses.asdict(self)
        out["rope_parameters"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_parameters
        }
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out["architectures"] = ["Phi3ForCausalLM"]
        return out

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> Phi3Config:
        """From a transformers `config.json` dict, with `rope_scaling` / top-level
        `rope_theta` / `partial_rotary_factor` and the legacy rope types "su" and
        "yarn" (both LongRoPE) read as transformers' `Phi3Config` reads them."""
        model_type = data.get("model_type", "phi3")
        if model_type != "phi3":
            raise ValueError(f"config.json model_type must be 'phi3', got {model_type!r}")
        refuse_unsupported(data, model_type)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and k not in _ROPE_KEYS}
        rope = standard_rope(
            data.get("rope_scaling") or data.get("rope_parameters"),
            data.get("rope_theta", 10000.0),
        )
        rope.setdefault("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
        if rope["rope_type"] in ("su", "yarn"):
            rope["rope_type"] = "longrope"
        kwargs["rope_parameters"] = rope
        return cls(**kwargs)
