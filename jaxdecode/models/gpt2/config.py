"""`GPT2Config`: the fields of transformers' `GPT2Config` that change inference."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxdecode.models.layers import ACTIVATIONS

__all__ = ["GPT2Config"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """The `GPT2Config` fields that change inference (names as in transformers)."""

    model_type: ClassVar[str] = "gpt2"

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be an integer >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config.n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(
                f"GPT2Config.n_inner must be None or an integer >= 1, got {self.n_inner!r}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"GPT2Config.activation_function must be one of {sorted(ACTIVATIONS)}, "
                f"got {self.activation_function!r}"
            )
        if not self.tie_word_embeddings:
            raise ValueError(
                "GPT2Config.tie_word_embeddings=False is not supported (GPT-2 ties its LM head)"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> GPT2Config:
        """From a transformers `config.json` dict (unknown keys ignored)."""
        model_type = data.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json model_type must be 'gpt2', got {model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key, alias in (
            ("n_embd", "hidden_size"),
            ("n_layer", "num_hidden_layers"),
            ("n_head", "num_attention_heads"),
            ("n_positions", "max_position_embeddings"),
        ):
            if key not in kwargs and alias in data:
                kwargs[key] = data[alias]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that `transformers.GPT2Config` loads."""
        out = dataclasses.asdict(self)
        out.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        return out
