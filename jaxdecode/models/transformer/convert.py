"""Checkpoints of the skeleton <-> jaxdecode parameters.

The tensor-name table follows `TransformerConfig`'s fields with transformers'
names (`model.layers.3.self_attn.q_proj.weight`, `model.norm.weight`,
`lm_head.weight`), one to one onto the Flax tree (`layers_3/self_attn/q_proj/
weight`, ...); both store projections `[out, in]`, so nothing is transposed. A
tied head is absent from the file (transformers 5 drops it) or, when present,
must match the embedding's shape.

At load, q/k/v and each gated MLP's gate/up are fused into one `[out, in]`
matrix each (`qkv_proj`, `gate_up_proj`, as Phi-3 stores them): one larger
product per step instead of three and two (`fuse_projections`; the skeleton
reads whichever layout the params hold). Saving and LoRA adapters address the
checkpoint's own names: `state_dict_from_params` and the family's
`adapter_params` split the fused matrices back (`separate_projections`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdecode.checkpoints import checked_tensors
from jaxdecode.errors import CheckpointError
from jaxdecode.models.transformer.config import TransformerConfig

__all__ = [
    "expected_shapes",
    "fuse_projections",
    "param_path",
    "params_from_state_dict",
    "separate_projections",
    "state_dict_from_params",
]

# The projections fused at load, and the name of each fused matrix.
_GROUPS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))
# The module each fusion happens in: a layer's attention and its dense MLP (a
# mixture of experts' shared expert keeps its projections).
_FUSED_IN = {"qkv_proj": "self_attn", "gate_up_proj": "mlp"}


def expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """transformers' tensor names -> shapes for `config`."""
    e, d, inner = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, e),
        "model.norm.weight": (e,),
    }
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, e)
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config.post_attn_norm:
        norms.append("pre_feedforward_layernorm")
    if config.post_ffn_norm:
        norms.append("post_feedforward_layernorm")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        shapes.update({f"{p}{n}.weight": (e,) for n in norms})
        projections = {"qkv_proj": q + 2 * kv} if config.fused_qkv else {
            "q_proj": q, "k_proj": kv, "v_proj": kv
        }  # fmt: skip
        for name, rows in projections.items():
            shapes[f"{a}{name}.weight"] = (rows, e)
            if config.qkv_bias:
                shapes[f"{a}{name}.bias"] = (rows,)
        shapes[a + "o_proj.weight"] = (e, q)
        if config.o_bias:
            shapes[a + "o_proj.bias"] = (e,)
        if config.qk_norm:
            shapes.update({a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)})
        if config.mlp_kinds[i] == "moe":
            shapes.update(_moe_shapes(config, p))
            continue
        mlp = {"gate_up_proj": 2 * inner} if config.fused_gate_up else {
            "gate_proj": inner, "up_proj": inner
        }  # fmt: skip
        mlp["down_proj"] = e
        for name, rows in mlp.items():
            shapes[f"{p}mlp.{name}.weight"] = (rows, inner if name == "down_proj" else e)
            if config.mlp_bias:
                shapes[f"{p}mlp.{name}.bias"] = (rows,)
    return shapes


def _moe_shapes(config: TransformerConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """A "moe" layer's tensors: the router, each expert's projections (stacked
    `[experts, ...]` at load), and Qwen2-MoE's shared expert and its gate."""
    e, inner = config.hidden_size, config.expert_intermediate_size
    m = f"{prefix}{config.moe_module}."
    gate, up, down = config.expert_projections
    shapes = {m + "gate.weight": (config.num_experts, e)}
    for j in range(config.num_experts):
        x = f"{m}experts.{j}."
        shapes.update({f"{x}{gate}.weight": (inner, e), f"{x}{up}.weight": (inner, e)})
        shapes[f"{x}{down}.weight"] = (e, inner)
    shared = config.shared_expert_intermediate_size
    if shared:
        s = m + "shared_expert."
        shapes.update({s + "gate_proj.weight": (shared, e), s + "up_proj.weight": (shared, e)})
        shapes[s + "down_proj.weight"] = (e, shared)
        shapes[m + "shared_expert_gate.weight"] = (1, e)
    return shapes


def _flax_slot(name: str, config: TransformerConfig) -> tuple[tuple[str, ...], int | None]:
    """A checkpoint name's Flax path and, for an expert's projection, its index in
    the stacked `[experts, ...]` leaf: `model.layers.3.block_sparse_moe.experts.
    5.w1.weight` (Mixtral's names) -> `(("layers_3", "mlp", "experts",
    "gate_proj"), 5)`."""
    parts = name.removeprefix("model.").split(".")
    moe = parts[0] == "layers" and config.mlp_kinds[int(parts[1])] == "moe"
    if moe and parts[2] == config.moe_module:
        if parts[3] == "experts":
            projection = ("gate_proj", "up_proj", "down_proj")
            kind = projection[config.expert_projections.index(parts[5])]
            return (f"layers_{parts[1]}", "mlp", "experts", kind), int(parts[4])
        return (f"layers_{parts[1]}", "mlp", *parts[3:]), None
    return param_path(name), None


def param_path(name: str) -> tuple[str, ...]:
    """`model.layers.3.mlp.up_proj.weight` -> `("layers_3", "mlp", "up_proj", "weight")`."""
    parts = name.removeprefix("model.").split(".")
    if parts[0] == "layers":
        parts = [f"layers_{parts[1]}", *parts[2:]]
    if parts[0] == "embed_tokens":
        parts[-1] = "embedding"
    return tuple(parts)


def params_from_state_dict(
    state: Mapping[str, np.ndarray],
    config: TransformerConfig,
    dtype: Any = jnp.float32,
    what: str = "a model",
) -> dict[str, Any]:
    """Checks names and shapes, then builds the Flax parameter tree.

    Args:
        state: transformers-named tensors.
        config: the skeleton's fields.
        dtype: parameter dtype.
        what: the checkpoint, for messages (e.g. "a gemma2 with num_hidden_layers=2").

    Raises:
        CheckpointError: naming the first missing, unexpected or misshapen tensor.
    """
    expected = expected_shapes(config)
    head = state.get("lm_head.weight")
    tied_shape = (config.vocab_size, config.hidden_size)
    if config.tie_embeddings and head is not None and tuple(head.shape) != tied_shape:
        raise CheckpointError(
            f"tensor lm_head.weight has shape {tuple(head.shape)}, expected "
            f"{expected['model.embed_tokens.weight']} (tied to model.embed_tokens.weight)"
        )

    def normalize(raw_name: str) -> str | None:
        if raw_name.endswith(".rotary_emb.inv_freq"):
            return None  # a buffer older checkpoints saved
        if config.tie_embeddings and raw_name == "lm_head.weight":
            return None  # tied: checked above, then unused
        return raw_name

    found = checked_tensors(state, expected, normalize, what)
    params: dict[str, Any] = {}
    stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for name, array in found.items():
        path, expert = _flax_slot(name, config)
        if expert is not None:  # stacked below, in expert order
            stacks.setdefault(path, {})[expert] = array
            continue
        _put(params, path, jnp.asarray(array, dtype=dtype))
    for path, arrays in stacks.items():
        stacked = np.stack([np.asarray(arrays[j]) for j in range(len(arrays))])
        _put(params, path, jnp.asarray(stacked, dtype=dtype))
    return fuse_projections(params)


def fuse_projections(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with each layer's separate `q_proj`, `k_proj`, `v_proj` fused
    into one `qkv_proj` (their rows stacked in that order, biases too) and its
    dense MLP's `gate_proj`, `up_proj` into one `gate_up_proj`: the layout Phi-3
    stores and the skeleton reads as one product. An adapter added later keeps
    the parts' names and applies to their slices (`lora.part_entry`); stacked
    experts and a shared expert stay as they are."""

    def walk(node: Any, name: str = "") -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v, k) for k, v in node.items()}
        for fused, parts in _GROUPS:
            if name != _FUSED_IN[fused]:
                continue
            if all(isinstance(out.get(p), Mapping) and "weight" in out[p] for p in parts):
                modules = [out.pop(p) for p in parts]
                out[fused] = {
                    leaf: jnp.concatenate([m[leaf] for m in modules], axis=0) for leaf in modules[0]
                }
        return out

    return walk(params)


def separate_projections(params: Mapping[str, Any], config: TransformerConfig) -> dict[str, Any]:
    """The inverse of `fuse_projections` where the checkpoint keeps the
    projections separate (`config.fused_qkv` / `fused_gate_up` False): each
    `qkv_proj` split into `q_proj` (`num_heads * head_dim` rows), `k_proj`,
    `v_proj` (`num_kv_heads * head_dim` each), each `gate_up_proj` into halves.
    Params already separate come back unchanged (no copy)."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    sizes = {"qkv_proj": (q, kv, kv), "gate_up_proj": None}
    native = {"qkv_proj": config.fused_qkv, "gate_up_proj": config.fused_gate_up}

    def walk(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v) for k, v in node.items()}
        for fused, parts in _GROUPS:
            if native[fused] or not isinstance(out.get(fused), Mapping):
                continue
            module = out.pop(fused)
            rows = module["weight"].shape[0]
            widths = sizes[fused] or (rows // 2, rows // 2)
            cuts = np.cumsum(widths)[:-1].tolist()
            pieces = {leaf: np.split(value, cuts, axis=0) if isinstance(value, np.ndarray)
                      else jnp.split(value, cuts, axis=0) for leaf, value in module.items()}  # fmt: skip
            for i, part in enumerate(parts):
                out[part] = {leaf: pieces[leaf][i] for leaf in module}
        return out

    return walk(params)


def _put(tree: dict[str, Any], path: tuple[str, ...], leaf: Any) -> None:
    *parents, last = path
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = leaf


def state_dict_from_params(
    params: Mapping[str, Any], config: TransformerConfig
) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state_dict` (float32, transformers' names;
    stacked experts written back one tensor per expert; projections fused at
    load split back)."""
    params = separate_projections(params, config)
    out = {}
    for name in expected_shapes(config):
        path, expert = _flax_slot(name, config)
        node: Any = params
        for p in path:
            node = node[p]
        if expert is not None:
            node = node[expert]
        out[name] = np.ascontiguousarray(np.asarray(node, dtype=np.float32))
    return out
