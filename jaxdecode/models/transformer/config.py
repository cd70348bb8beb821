"""`TransformerConfig`: a decoder-only transformer described as data.

The way gemma's `TransformerConfig` describes Gemma 2 (`attention_types=(LOCAL,
GLOBAL) * n, final_logit_softcap=30.0, use_post_attn_norm=True, ...`), every
architectural choice of the RoPE / RMSNorm / gated-MLP decoders is an explicit
field here; the one skeleton (`model.Transformer`) reads them and nothing
else. A family's adapter (`LlamaConfig`, `Gemma2Config`, `Phi3Config`, ...) maps
its `config.json` onto these fields with `transformer()`; a new family is a new
adapter, and a new field here only when it brings a new kind of layer.

Parameter names follow the fields (transformers' names): `q_proj`/`k_proj`/
`v_proj` or a fused `qkv_proj`; `gate_proj`/`up_proj` or a fused `gate_up_proj`;
`input_layernorm` before attention; the pre-feed-forward norm is
`post_attention_layernorm` in the two-norm block (Llama) and
`pre_feedforward_layernorm` in the four-norm block (Gemma 2/3, where
`post_attention_layernorm` normalises the attention output).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxdecode.models.layers import ACTIVATIONS
from jaxdecode.models.rope import ROPE_TYPES, check_rope

__all__ = ["LAYER_TYPES", "MLP_KINDS", "TransformerConfig"]

# Attention types per layer (transformers' `layer_types` names).
LAYER_TYPES = ("full_attention", "sliding_attention")

# Feed-forward kinds per layer: "dense" is the gated MLP, "moe" a mixture of
# experts (`models.moe.MoE`, the `num_experts` ... fields); each kind's module
# is in `model._MLPS`.
MLP_KINDS = ("dense", "moe")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Every field of the skeleton (hashable: a static jit argument).

    Attributes:
        name: the family's name, for messages (e.g. "Gemma2").
        vocab_size: rows of the embedding and the LM head.
        hidden_size: width of the residual stream.
        intermediate_size: width of the gated MLP.
        num_layers: decoder blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer).
        head_dim: width of each head.
        activation: the MLP's gate activation (an `ACTIVATIONS` name).
        norm_eps: RMSNorm epsilon.
        norm_offset: 0 (`w * x`) or 1 (Gemma's `(1 + w) * x`), for every norm.
        embed_scale: multiply the embeddings by `sqrt(hidden_size)` (in the model dtype).
        tie_embeddings: the LM head is the embedding matrix.
        qkv_bias: biases on the q/k/v projections.
        o_bias: bias on the output projection.
        mlp_bias: biases on the MLP's projections.
        qk_norm: RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3).
        post_attn_norm: a norm on the attention output before the residual add
            (Gemma 2/3's four-norm block).
        post_ffn_norm: a norm on the MLP output before the residual add.
        fused_qkv: one `qkv_proj: [(heads + 2 kv_heads) * head_dim, hidden]`
            (Phi-3) instead of three projections.
        fused_gate_up: one `gate_up_proj: [2 * intermediate, hidden]` (Phi-3).
        layer_types: per layer, "full_attention" or "sliding_attention".
        sliding_window: the window of sliding layers (a key is visible when
            `key slot > query slot - window`, transformers' overlay).
        rope: per layer type, its `rope_parameters` as sorted `(key, value)`
            pairs: `((layer_type, ((key, value), ...)), ...)` (Gemma 3: a local
            base for sliding layers, a global base and scaling for full ones).
        rotary_dim: leading dimensions of each head that rotate (partial rotary
            when below `head_dim`).
        attn_scale: multiplies the attention scores (`head_dim ** -0.5`, or
            Gemma's `query_pre_attn_scalar ** -0.5`).
        attn_softcap: scores become `cap * tanh(scores / cap)` (Gemma 2).
        final_softcap: logits become `cap * tanh(logits / cap)` (Gemma 2).
        mlp_kinds: per layer, an `MLP_KINDS` value.
        max_position_embeddings: the context length (and "dynamic" / "longrope"'s
            reference length).
        num_experts: routed experts of the "moe" layers.
        experts_per_token: experts each token is routed to (top k).
        expert_intermediate_size: each expert's MLP width (default
            `intermediate_size`, which the "dense" layers keep).
        norm_topk_prob: renormalise the k routing weights to sum to 1 (Mixtral
            always; Qwen-MoE's `norm_topk_prob`).
        shared_expert_intermediate_size: width of Qwen2-MoE's shared expert, a
            gated MLP on every token scaled by `sigmoid(shared_expert_gate(x))`
            (0: none).
        moe_module: the checkpoint's name of a "moe" layer's module
            (`mlp`; Mixtral's `block_sparse_moe`).
        expert_projections: the checkpoint's names of each expert's gate, up and
            down projections (`gate_proj`, `up_proj`, `down_proj`; Mixtral's
            `w1`, `w3`, `w2`).
    """

    name: str = "Transformer"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    activation: str = "silu"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0
    embed_scale: bool = False
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    post_attn_norm: bool = False
    post_ffn_norm: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (
        ("full_attention", (("rope_theta", 10000.0), ("rope_type", "default"))),
    )
    rotary_dim: int | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    mlp_kinds: tuple[str, ...] = ()
    max_position_embeddings: int = 2048
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    moe_module: str = "mlp"
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if not self.layer_types:
            set_("layer_types", ("full_attention",) * self.num_layers)
        if not self.mlp_kinds:
            set_("mlp_kinds", ("dense",) * self.num_layers)
        if self.rotary_dim is None:
            set_("rotary_dim", self.head_dim)
        if self.attn_scale is None:
            set_("attn_scale", self.head_dim**-0.5)
        where = f"{self.name} config"
        for key in ("layer_types", "mlp_kinds"):
            if len(getattr(self, key)) != self.num_layers:
                raise ValueError(
                    f"{where}: {key} has {len(getattr(self, key))} entries for "
                    f"{self.num_layers} layers"
                )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"{where}: layer_types may hold {LAYER_TYPES}, got {bad[0]!r}")
        bad = sorted(set(self.mlp_kinds) - set(MLP_KINDS))
        if bad:
            raise ValueError(f"{where}: mlp kind must be one of {MLP_KINDS}, got {bad[0]!r}")
        if self.expert_intermediate_size is None:
            set_("expert_intermediate_size", self.intermediate_size)
        if "moe" in self.mlp_kinds and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"{where}: moe layers need 0 < experts_per_token <= num_experts, got "
                f"experts_per_token={self.experts_per_token}, num_experts={self.num_experts}"
            )
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError(f"{where}: sliding_attention layers need a sliding_window")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"{where}: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{where}: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(
                f"{where}: rotary_dim must be even and in (0, head_dim={self.head_dim}], "
                f"got {self.rotary_dim}"
            )
        ropes = dict(self.rope)
        for layer_type in set(self.layer_types):
            if layer_type not in ropes:
                raise ValueError(f"{where}: no rope for layer type {layer_type!r}")
            check_rope(dict(ropes[layer_type]), where, tuple(ROPE_TYPES), self.rotary_dim)

    def rope_of(self, layer_type: str) -> dict[str, Any]:
        """The `rope_parameters` dict of `layer_type`'s layers."""
        return dict(dict(self.rope)[layer_type])

    @property
    def unbounded(self) -> bool:
        """True when a "dynamic" rope stretches with the input (no context limit)."""
        return any(dict(r).get("rope_type") == "dynamic" for _, r in self.rope)
