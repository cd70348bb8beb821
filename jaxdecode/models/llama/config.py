"""`LlamaConfig`: the adapter of the Llama-style families (llama, mistral, qwen2,
qwen3, gemma) onto the skeleton, read from and written to transformers'
`config.json`.

The five model types share the two-norm block (RoPE, RMSNorm, grouped-query
attention, gated MLP) and differ in a few switches, derived here from
`model_type` as transformers' classes hard-wire them and handed to the skeleton
as explicit fields by `LlamaConfig.transformer()`:

| model_type | q/k/v bias | o bias | q/k RMSNorm | norm | embedding | sliding window |
|---|---|---|---|---|---|---|
| llama | attention_bias | attention_bias | no | w * x | x | no |
| mistral | no | no | no | w * x | x | `sliding_window`, every layer |
| qwen2 | yes | no | no | w * x | x | `layer_types` (`use_sliding_window`) |
| qwen3 | attention_bias | attention_bias | yes | w * x | x | `layer_types` |
| gemma | attention_bias | attention_bias | no | (1 + w) * x | x * sqrt(hidden) | no |

Every field that changes inference is read; a value jaxdecode cannot honour is
refused with a ValueError naming the field (never silently ignored).
`pretraining_tp` is accepted whatever its value: transformers 5 no longer reads
it (it only split the matmuls of the original Megatron checkpoints).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxdecode.models.hf_common import skeleton_sizes
from jaxdecode.models.layers import ACTIVATIONS
from jaxdecode.models.rope import ROPE_TYPES as _ALL_ROPE_TYPES
from jaxdecode.models.rope import check_rope, freeze_rope
from jaxdecode.models.transformer.config import TransformerConfig

__all__ = ["LlamaConfig", "MODEL_TYPES", "ROPE_TYPES"]

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
_NAMES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
}

# The rope types these model types read (transformers' ROPE_INIT_FUNCTIONS
# without Phi-3's "longrope"), and the keys each reads.
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    k: v for k, v in _ALL_ROPE_TYPES.items() if k != "longrope"
}

# transformers' defaults per model type, for keys a config.json may omit.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        hidden_act="silu",
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "mistral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_act="silu",
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        sliding_window=4096,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        sliding_window=4096,
    ),
    "gemma": dict(
        vocab_size=256000,
        hidden_size=3072,
        intermediate_size=24576,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=256,
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
}
_DEFAULTS["qwen3"] = {**_DEFAULTS["qwen2"], "head_dim": 128}

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """The inference fields of transformers' Llama / Mistral / Qwen2 / Qwen3 /
    Gemma configs (names as in transformers; `rope_parameters` as transformers 5
    standardizes it, stored as sorted `(key, value)` pairs so the config stays
    hashable and can be a static jit argument).

    Build it with `LlamaConfig.from_hf(config_dict)` or directly; `head_dim` and
    `num_key_value_heads` default as transformers derives them.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_parameters: tuple[tuple[str, Any], ...] = (
        ("rope_theta", 10000.0),
        ("rope_type", "default"),
    )
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"LlamaConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}"
            )
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if (
            self.head_dim is None
            and isinstance(self.num_attention_heads, int)
            and self.num_attention_heads > 0
        ):
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_parameters, Mapping):
            set_("rope_parameters", tuple(sorted(self.rope_parameters.items())))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.layer_types is not None:
            set_("layer_types", tuple(self.layer_types))
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be an integer >= 1, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig.head_dim must be even (RoPE rotates pairs), got {self.head_dim}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"LlamaConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        if not isinstance(self.rms_norm_eps, (int, float)) or self.rms_norm_eps < 0:
            raise ValueError(
                f"LlamaConfig.rms_norm_eps must be a number >= 0, got {self.rms_norm_eps!r}"
            )
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool)
            or not isinstance(self.sliding_window, int)
            or self.sliding_window < 1
        ):
            raise ValueError(
                f"LlamaConfig.sliding_window must be None or an integer >= 1, got {self.sliding_window!r}"
            )
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"LlamaConfig.layer_types has {len(self.layer_types)} entries for "
                    f"num_hidden_layers={self.num_hidden_layers}"
                )
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad:
                raise ValueError(
                    f"LlamaConfig.layer_types may hold 'full_attention' and 'sliding_attention', got {bad[0]!r}"
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError(
                    "LlamaConfig.layer_types has sliding_attention layers but sliding_window is None"
                )
        self._check_rope()

    def _check_rope(self) -> None:
        check_rope(self.rope, "LlamaConfig rope_parameters", tuple(ROPE_TYPES), self.head_dim)

    # ------------------------------------------------------------------ switches
    @property
    def rope(self) -> dict[str, Any]:
        """`rope_parameters` as a dict."""
        return dict(self.rope_parameters)

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or (self.model_type != "mistral" and self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return self.model_type not in ("qwen2", "mistral") and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def norm_offset(self) -> float:
        """Gemma's RMSNorm multiplies by `(1 + weight)`."""
        return 1.0 if self.model_type == "gemma" else 0.0

    @property
    def embed_scale(self) -> float | None:
        """Gemma scales the embeddings by sqrt(hidden_size)."""
        return self.hidden_size**0.5 if self.model_type == "gemma" else None

    @property
    def uses_mlp_bias(self) -> bool:
        return self.model_type == "llama" and self.mlp_bias

    def sliding(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window if self.model_type == "mistral" else None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    # ----------------------------------------------------------------- skeleton
    def transformer(self) -> TransformerConfig:
        """These switches as the skeleton's explicit fields."""
        return TransformerConfig(
            name=_NAMES[self.model_type],
            **skeleton_sizes(self, activation=self.hidden_act),
            norm_offset=self.norm_offset,
            embed_scale=self.embed_scale is not None,
            qkv_bias=self.qkv_bias,
            o_bias=self.o_bias,
            mlp_bias=self.uses_mlp_bias,
            qk_norm=self.qk_norm,
            layer_types=tuple(
                "full_attention" if self.sliding(i) is None else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ),
            sliding_window=self.sliding_window,
            rope=tuple(
                (t, freeze_rope(self.rope)) for t in ("full_attention", "sliding_attention")
            ),
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' config class of `model_type` loads."""
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "gemma": "GemmaForCausalLM",
        }[self.model_type]
        out = dataclasses.asdict(self)
        out["rope_parameters"] = self.rope
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        if self.layer_types is None:
            out.pop("layer_types")
        else:
            out["layer_types"] = list(self.layer_types)
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = self.sliding_window is not None
        if self.model_type in ("mistral", "qwen2"):
            out.pop("attention_bias")
        if self.model_type != "llama":
            out.pop("mlp_bias")
        out["architectures"] = [arch]
        return out

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> LlamaConfig:
        """From a transformers `config.json` dict (model_type one of `MODEL_TYPES`;
        old-style `rope_scaling` / top-level `rope_theta` read as transformers 5
        standardizes them)."""
        model_type = data.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"config.json model_type must be one of {MODEL_TYPES}, got {model_type!r}"
            )
        for key in ("quantization_config", "auto_map"):
            if data.get(key):
                raise ValueError(
                    f"config.json has {key!r}: quantized or remote-code checkpoints are not supported"
                )
        if data.get("use_bidirectional_attention"):
            raise ValueError(
                "config.json use_bidirectional_attention=True is not supported (causal decoding)"
            )
        prf = data.get(
            "partial_rotary_factor",
            (data.get("rope_parameters") or {}).get("partial_rotary_factor"),
        )
        if prf not in (None, 1, 1.0):
            raise ValueError(
                f"config.json partial_rotary_factor={prf!r} is not supported by {model_type} (only 1.0)"
            )
        merged = {**_DEFAULTS[model_type], **data}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in merged.items() if k in names}
        kwargs["model_type"] = model_type
        if model_type == "gemma" and kwargs.get("hidden_act") == "gelu":
            kwargs["hidden_act"] = "gelu_pytorch_tanh"  # as transformers' GemmaConfig does
        if "hidden_activation" in data and data["hidden_activation"] not in (
            None,
            kwargs.get("hidden_act"),
        ):
            raise ValueError(
                f"config.json hidden_activation={data['hidden_activation']!r} differs from hidden_act="
                f"{kwargs.get('hidden_act')!r}; transformers 5 reads hidden_act"
            )
        if model_type in ("qwen2", "qwen3"):
            if not data.get("use_sliding_window", False):
                kwargs["sliding_window"] = None
            if kwargs.get("layer_types") is None:
                window_from = data.get("max_window_layers", 28)
                kwargs["layer_types"] = [
                    "sliding_attention"
                    if kwargs.get("sliding_window") is not None and i >= window_from
                    else "full_attention"
                    for i in range(kwargs.get("num_hidden_layers", 32))
                ]
        elif model_type in ("llama", "gemma"):
            kwargs.pop("sliding_window", None)  # not a field of these configs
            kwargs.pop("layer_types", None)
        else:
            kwargs.pop("layer_types", None)
        if model_type in ("mistral", "qwen2"):
            kwargs.pop("attention_bias", None)
        if model_type != "llama":
            kwargs.pop("mlp_bias", None)
        rope = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
        rope.pop("partial_rotary_factor", None)
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", data.get("rope_theta", 10000.0))
        if rope["rope_type"] in ("llama3", "yarn"):
            rope.setdefault(
                "original_max_position_embeddings", kwargs.get("max_position_embeddings", 2048)
            )
        kwargs["rope_parameters"] = rope
        return cls(**kwargs)
