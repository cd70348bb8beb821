"""Adapters of Gemma 2 (`gemma2`) and Gemma 3's text model (`gemma3_text`) onto
the skeleton, read from and written to transformers' `config.json`.

Both use the four-norm block (`post_attention_layernorm` on the attention
output, `pre_feedforward_layernorm` / `post_feedforward_layernorm` around the
MLP), `(1 + w)` RMSNorms, embeddings times sqrt(hidden), GeGLU
(`hidden_activation`), an attention scale of `query_pre_attn_scalar ** -0.5`
and sliding-window layers beside global ones (`layer_types`; by default
Gemma 2 alternates sliding and global, Gemma 3 has one global layer in every
`sliding_window_pattern` = 6). Gemma 2 soft-caps the attention scores
(`attn_logit_softcapping`) and the logits (`final_logit_softcapping`); Gemma 3
adds q/k RMSNorms and a rope per layer type (`rope_parameters` keyed
`sliding_attention` / `full_attention`: a local base of 10,000 and a global base
of 1,000,000 with the checkpoint's scaling). Every field that changes inference
is read or refused with a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxdecode.models.hf_common import (
    check_positive_ints,
    refuse_unsupported,
    skeleton_sizes,
    standard_rope,
)
from jaxdecode.models.layers import ACTIVATIONS
from jaxdecode.models.llama.config import ROPE_TYPES
from jaxdecode.models.rope import check_rope, freeze_rope
from jaxdecode.models.transformer.config import LAYER_TYPES, TransformerConfig

__all__ = ["Gemma2Config", "Gemma3TextConfig", "MODEL_TYPES"]

MODEL_TYPES = ("gemma2", "gemma3_text")

_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
# Legacy top-level keys transformers folds into the rope dicts.
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq")


def _rope_for(rope: dict[str, Any], max_positions: int) -> dict[str, Any]:
    if rope["rope_type"] in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", max_positions)
    return rope


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma2Config:
    """The inference fields of transformers' `Gemma2Config` (its names and
    defaults). `rope_parameters` is stored as sorted `(key, value)` pairs so the
    config stays hashable; `layer_types` defaults as transformers derives it.
    """

    _ARCH: ClassVar[str] = "Gemma2ForCausalLM"
    _NAME: ClassVar[str] = "Gemma2"

    model_type: str = "gemma2"
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    rope_parameters: tuple[tuple[str, Any], ...] = (
        ("rope_theta", 10000.0),
        ("rope_type", "default"),
    )
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        name = type(self).__name__
        if self.model_type != self._default_model_type():
            raise ValueError(
                f"{name}.model_type must be {self._default_model_type()!r}, got {self.model_type!r}"
            )
        if isinstance(self.rope_parameters, Mapping):
            set_("rope_parameters", self._freeze(self.rope_parameters))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.layer_types is None and isinstance(self.num_hidden_layers, int):
            set_("layer_types", self._default_layer_types())
        elif self.layer_types is not None:
            set_("layer_types", tuple(self.layer_types))
        check_positive_ints(self, _INT_FIELDS)
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(
                f"{name}.hidden_activation must be one of {sorted(ACTIVATIONS)}, "
                f"got {self.hidden_activation!r}"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"{name}.layer_types has {len(self.layer_types)} entries for "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"{name}.layer_types may hold {LAYER_TYPES}, got {bad[0]!r}")
        window = self.sliding_window
        if "sliding_attention" in self.layer_types and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ValueError(
                f"{name}.sliding_window must be an integer >= 1 (the model has sliding layers), "
                f"got {window!r}"
            )
        for key in ("query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping"):
            value = getattr(self, key)
            optional = key != "query_pre_attn_scalar"
            if (value is None and optional) or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            ):
                continue
            raise ValueError(f"{name}.{key} must be a number > 0, got {value!r}")
        self._check_rope()

    # ----------------------------------------------------- what Gemma 3 changes
    @classmethod
    def _default_model_type(cls) -> str:
        return cls.__dataclass_fields__["model_type"].default

    def _default_layer_types(self) -> tuple[str, ...]:
        """Gemma 2: sliding, global, sliding, ... (transformers' default)."""
        return tuple(
            "sliding_attention" if (i + 1) % 2 else "full_attention"
            for i in range(self.num_hidden_layers)
        )

    @staticmethod
    def _freeze(rope: Mapping[str, Any]) -> tuple[Any, ...]:
        return freeze_rope(rope)

    def _check_rope(self) -> None:
        check_rope(
            dict(self.rope_parameters),
            f"{type(self).__name__} rope_parameters",
            tuple(ROPE_TYPES),
            self.head_dim,
        )

    def _ropes(self) -> dict[str, tuple[Any, ...]]:
        """layer type -> rope pairs."""
        return {t: self.rope_parameters for t in LAYER_TYPES}

    @property
    def _qk_norm(self) -> bool:
        return False

    @classmethod
    def _rope_from_hf(cls, data: Mapping[str, Any], max_positions: int) -> Any:
        rope = standard_rope(
            data.get("rope_parameters") or data.get("rope_scaling"),
            data.get("rope_theta", 10000.0),
        )
        if "partial_rotary_factor" in rope or "partial_rotary_factor" in data:
            prf = rope.pop("partial_rotary_factor", data.get("partial_rotary_factor"))
            if prf not in (None, 1, 1.0):
                raise ValueError(
                    f"config.json partial_rotary_factor={prf!r} is not supported by "
                    f"{cls._default_model_type()} (only 1.0)"
                )
        return _rope_for(rope, max_positions)

    # ------------------------------------------------------------------ skeleton
    def transformer(self) -> TransformerConfig:
        """These fields as the skeleton's."""
        return TransformerConfig(
            name=self._NAME,
            **skeleton_sizes(self, activation=self.hidden_activation),
            norm_offset=1.0,
            embed_scale=True,
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            qk_norm=self._qk_norm,
            post_attn_norm=True,
            post_ffn_norm=True,
            layer_types=self.layer_types,
            sliding_window=self.sliding_window,
            rope=tuple(sorted(self._ropes().items())),
            attn_scale=float(self.query_pre_attn_scalar) ** -0.5,
            attn_softcap=self.attn_logit_softcapping,
            final_softcap=self.final_logit_softcapping,
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' config class loads."""
        out = dataclasses.asdict(self)
        out["rope_parameters"] = self._rope_json()
        out["layer_types"] = list(self.layer_types)
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out["architectures"] = [self._ARCH]
        return out

    def _rope_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_parameters}

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> Gemma2Config:
        """From a transformers `config.json` dict (old-style `rope_scaling` /
        top-level `rope_theta` read as transformers 5 standardizes them)."""
        model_type = data.get("model_type", cls._default_model_type())
        if model_type != cls._default_model_type():
            raise ValueError(
                f"config.json model_type must be {cls._default_model_type()!r}, got {model_type!r}"
            )
        refuse_unsupported(data, model_type)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and k not in _ROPE_KEYS}
        max_positions = kwargs.get(
            "max_position_embeddings", cls.__dataclass_fields__["max_position_embeddings"].default
        )
        kwargs["rope_parameters"] = cls._rope_from_hf(data, max_positions)
        if cls._reads_pattern and data.get("layer_types") is None:
            kwargs["layer_types"] = cls._pattern(
                data.get("sliding_window_pattern", 6),
                kwargs.get(
                    "num_hidden_layers", cls.__dataclass_fields__["num_hidden_layers"].default
                ),
            )
        return cls(**kwargs)

    # Gemma 2's layer types alternate; transformers' Gemma2Config has no
    # sliding_window_pattern (a stray key changes nothing there, nor here).
    _reads_pattern: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3TextConfig(Gemma2Config):
    """The inference fields of transformers' `Gemma3TextConfig` (its names and
    defaults): Gemma 2's, q/k norms, no soft-caps by default, and
    `rope_parameters` per layer type, stored as
    `(("full_attention", pairs), ("sliding_attention", pairs))`."""

    _ARCH: ClassVar[str] = "Gemma3ForCausalLM"
    _NAME: ClassVar[str] = "Gemma3"
    _reads_pattern: ClassVar[bool] = True

    model_type: str = "gemma3_text"
    vocab_size: int = 262_208
    max_position_embeddings: int = 131_072
    rope_parameters: tuple[tuple[str, Any], ...] = (
        ("full_attention", (("rope_theta", 1_000_000.0), ("rope_type", "default"))),
        ("sliding_attention", (("rope_theta", 10_000.0), ("rope_type", "default"))),
    )
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attn_logit_softcapping is not None:
            # transformers' Gemma3Attention stores it but never applies it, while
            # a reader of the field would expect Gemma 2's capping: ambiguous.
            raise ValueError(
                f"Gemma3TextConfig.attn_logit_softcapping={self.attn_logit_softcapping!r} is not "
                "supported (transformers' Gemma 3 ignores it; Gemma 3 checkpoints set null)"
            )

    def _default_layer_types(self) -> tuple[str, ...]:
        return self._pattern(6, self.num_hidden_layers)

    @classmethod
    def _pattern(cls, pattern: Any, layers: int) -> tuple[str, ...]:
        """transformers' BC rule: every `pattern`-th layer global, the rest sliding."""
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise ValueError(
                f"config.json sliding_window_pattern must be an integer >= 1, got {pattern!r}"
            )
        return tuple(
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
        )

    @staticmethod
    def _freeze(rope: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(sorted((t, freeze_rope(r)) for t, r in rope.items()))

    def _check_rope(self) -> None:
        ropes = dict(self.rope_parameters)
        if sorted(ropes) != sorted(LAYER_TYPES):
            raise ValueError(
                f"Gemma3TextConfig rope_parameters must hold one rope per layer type "
                f"{sorted(LAYER_TYPES)}, got {sorted(ropes)}"
            )
        for layer_type, rope in ropes.items():
            check_rope(
                dict(rope),
                f"Gemma3TextConfig rope_parameters[{layer_type!r}]",
                tuple(ROPE_TYPES),
                self.head_dim,
            )

    def _ropes(self) -> dict[str, tuple[Any, ...]]:
        return dict(self.rope_parameters)

    @property
    def _qk_norm(self) -> bool:
        return True

    def _rope_json(self) -> dict[str, Any]:
        return {
            t: {k: list(v) if isinstance(v, tuple) else v for k, v in r}
            for t, r in self.rope_parameters
        }

    @classmethod
    def _rope_from_hf(cls, data: Mapping[str, Any], max_positions: int) -> Any:
        """transformers' `Gemma3TextConfig.convert_rope_params_to_dict`: a rope per
        layer type; legacy `rope_scaling` applies to the global layers,
        `rope_theta` is the global base, `rope_local_base_freq` the local one."""
        given = data.get("rope_parameters")
        if given is not None and not set(given) <= set(LAYER_TYPES):
            raise ValueError(
                "config.json rope_parameters of gemma3_text must be keyed by layer type "
                f"{sorted(LAYER_TYPES)}, got keys {sorted(given)}"
            )
        ropes = {t: dict((given or {}).get(t) or {"rope_type": "default"}) for t in LAYER_TYPES}
        if data.get("rope_scaling"):
            ropes["full_attention"].update(data["rope_scaling"])
        ropes["full_attention"].setdefault("rope_theta", data.get("rope_theta", 1_000_000.0))
        ropes["sliding_attention"].setdefault(
            "rope_theta", data.get("rope_local_base_freq", 10_000.0)
        )
        for t in LAYER_TYPES:
            rope = standard_rope(ropes[t], 10_000.0)
            prf = rope.pop("partial_rotary_factor", None)
            if prf not in (None, 1, 1.0):
                raise ValueError(
                    f"config.json partial_rotary_factor={prf!r} is not supported by gemma3_text"
                )
            ropes[t] = _rope_for(rope, max_positions)
        return ropes
