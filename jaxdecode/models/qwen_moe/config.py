"""The adapter of Qwen2-MoE (`qwen2_moe`) and Qwen3-MoE (`qwen3_moe`) onto the
skeleton, read from and written to transformers' `config.json`.

Both are the two-norm Llama block whose feed-forward is, on the layers `i` with
`(i + 1) % decoder_sparse_step == 0` and `i` not in `mlp_only_layers`, a mixture
of `num_experts` gated MLPs of width `moe_intermediate_size` (the other layers:
a dense MLP of width `intermediate_size`): a float32 softmax over the router's
logits, the top `num_experts_per_tok`, renormalised only with `norm_topk_prob`.

| model_type | q/k/v bias | o bias | q/k RMSNorm | shared expert | sliding window |
|---|---|---|---|---|---|
| qwen2_moe | `qkv_bias` | no | no | `shared_expert_intermediate_size`, sigmoid gate | `layer_types` |
| qwen3_moe | `attention_bias` | `attention_bias` | yes | no | every layer |

Sliding windows apply only with `use_sliding_window`, as transformers reads
them. Every field that changes inference is read or refused with a ValueError
naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxdecode.models.hf_common import (
    refuse_unsupported,
    skeleton_sizes,
    standard_rope,
    uniform_layers,
)
from jaxdecode.models.mixtral.config import check_moe_fields, refuse_partial_rotary, rope_types
from jaxdecode.models.rope import check_rope, freeze_rope
from jaxdecode.models.transformer.config import TransformerConfig

__all__ = ["MODEL_TYPES", "QwenMoeConfig"]

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")

# transformers' defaults per model type, for keys a config.json may omit.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_experts_per_tok=4,
        num_experts=60,
        qkv_bias=True,
    ),
    "qwen3_moe": dict(
        intermediate_size=6144,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=4,
        moe_intermediate_size=768,
        num_experts_per_tok=8,
        num_experts=128,
    ),
}

_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "moe_intermediate_size",
    "num_experts",
    "num_experts_per_tok",
    "decoder_sparse_step",
)
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenMoeConfig:
    """The inference fields of transformers' `Qwen2MoeConfig` / `Qwen3MoeConfig`
    (their names and defaults; `qkv_bias` and `shared_expert_intermediate_size`
    are Qwen2-MoE's, `attention_bias` Qwen3-MoE's). `sliding_window` is None
    unless the layers use it; `layer_types` is Qwen2-MoE's (None for Qwen3-MoE,
    whose window, when set, covers every layer)."""

    model_type: str = "qwen3_moe"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_parameters: tuple[tuple[str, Any], ...] = (
        ("rope_theta", 10000.0),
        ("rope_type", "default"),
    )
    attention_bias: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    shared_expert_intermediate_size: int = 0
    num_experts_per_tok: int = 8
    num_experts: int = 128
    norm_topk_prob: bool = False
    mlp_only_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        name = "QwenMoeConfig"
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"{name}.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}"
            )
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        heads = self.num_attention_heads
        if self.head_dim is None and isinstance(heads, int) and heads > 0:
            set_("head_dim", self.hidden_size // heads)
        if isinstance(self.rope_parameters, Mapping):
            set_("rope_parameters", freeze_rope(self.rope_parameters))
        for key in ("eos_token_id", "mlp_only_layers", "layer_types"):
            if isinstance(getattr(self, key), list):
                set_(key, tuple(getattr(self, key)))
        check_moe_fields(self, _INT_FIELDS)
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"{name}.num_experts_per_tok={self.num_experts_per_tok} must be at most "
                f"num_experts={self.num_experts}"
            )
        layers = self.num_hidden_layers
        bad = [i for i in self.mlp_only_layers if not isinstance(i, int) or not 0 <= i < layers]
        if bad:
            raise ValueError(
                f"{name}.mlp_only_layers must hold layer indices in [0, {layers}), got {bad[0]!r}"
            )
        shared = self.shared_expert_intermediate_size
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            raise ValueError(
                f"{name}.shared_expert_intermediate_size must be an integer >= 0, got {shared!r}"
            )
        if self.model_type == "qwen3_moe" and (shared or self.layer_types is not None):
            raise ValueError(
                f"{name}: qwen3_moe has no shared expert or layer_types (Qwen2-MoE's fields)"
            )
        if self.layer_types is not None:
            if len(self.layer_types) != layers:
                raise ValueError(
                    f"{name}.layer_types has {len(self.layer_types)} entries for "
                    f"num_hidden_layers={layers}"
                )
            bad_types = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad_types:
                raise ValueError(
                    f"{name}.layer_types may hold 'full_attention' and 'sliding_attention', "
                    f"got {bad_types[0]!r}"
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError(
                    f"{name}.layer_types has sliding layers but sliding_window is None"
                )
        check_rope(
            dict(self.rope_parameters), f"{name} rope_parameters", rope_types(), self.head_dim
        )

    def moe_layer(self, layer: int) -> bool:
        """Whether `layer`'s feed-forward is the mixture (transformers' rule)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def transformer(self) -> TransformerConfig:
        """These fields as the skeleton's."""
        rope = freeze_rope(dict(self.rope_parameters))
        n = self.num_hidden_layers
        layers = uniform_layers(n, self.sliding_window, rope)
        if self.layer_types is not None:
            layers["layer_types"] = tuple(self.layer_types)
        qwen3 = self.model_type == "qwen3_moe"
        return TransformerConfig(
            name="Qwen3MoE" if qwen3 else "Qwen2MoE",
            **skeleton_sizes(self, activation=self.hidden_act),
            **layers,
            qkv_bias=self.attention_bias if qwen3 else self.qkv_bias,
            o_bias=qwen3 and self.attention_bias,
            qk_norm=qwen3,
            mlp_kinds=tuple("moe" if self.moe_layer(i) else "dense" for i in range(n)),
            num_experts=self.num_experts,
            experts_per_token=self.num_experts_per_tok,
            expert_intermediate_size=self.moe_intermediate_size,
            norm_topk_prob=self.norm_topk_prob,
            shared_expert_intermediate_size=self.shared_expert_intermediate_size,
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' config class of `model_type` loads."""
        out = dataclasses.asdict(self)
        out["rope_parameters"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_parameters
        }
        for key in ("eos_token_id", "mlp_only_layers", "layer_types"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        out["use_sliding_window"] = self.sliding_window is not None
        if self.model_type == "qwen2_moe":
            out.pop("attention_bias")
            if self.sliding_window is None:
                out.pop("sliding_window")
            out["architectures"] = ["Qwen2MoeForCausalLM"]
        else:
            for key in ("qkv_bias", "shared_expert_intermediate_size", "layer_types"):
                out.pop(key)
            out["architectures"] = ["Qwen3MoeForCausalLM"]
        return out

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> QwenMoeConfig:
        """From a transformers `config.json` dict, defaults, sliding windows and
        layer types as transformers' `Qwen2MoeConfig` / `Qwen3MoeConfig` derive them."""
        model_type = data.get("model_type", "qwen3_moe")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"config.json model_type must be one of {MODEL_TYPES}, got {model_type!r}"
            )
        refuse_unsupported(data, model_type)
        refuse_partial_rotary(data, model_type)
        data = {**_DEFAULTS[model_type], **data}
        if "num_local_experts" in data and model_type == "qwen3_moe":
            data["num_experts"] = data["num_local_experts"]  # transformers' attribute_map
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and k not in _ROPE_KEYS}
        kwargs["rope_parameters"] = standard_rope(
            data.get("rope_parameters") or data.get("rope_scaling"),
            data.get("rope_theta", 10000.0),
        )
        use_window = bool(data.get("use_sliding_window", False))
        window = data.get("sliding_window", 4096) if use_window else None
        kwargs["sliding_window"] = window
        kwargs["mlp_only_layers"] = tuple(data.get("mlp_only_layers") or ())
        if model_type == "qwen2_moe":
            layer_types = data.get("layer_types")
            if layer_types is None:
                window_layers = data.get("max_window_layers", 28)
                layer_types = [
                    "sliding_attention"
                    if (i + 1) % 2 and i < window_layers and use_window
                    else "full_attention"
                    for i in range(kwargs.get("num_hidden_layers", 24))
                ]
            kwargs["layer_types"] = tuple(layer_types)
            kwargs.pop("attention_bias", None)
        else:
            for key in ("qkv_bias", "shared_expert_intermediate_size", "layer_types"):
                kwargs.pop(key, None)
        return cls(**kwargs)
