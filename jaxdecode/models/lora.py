"""LoRA adapters applied unmerged: `y = x W^T + b + scale * (x A^T) B^T`.

An adapter lives in its own subtree of a model's params, `params["lora"]`,
mirroring the paths of the projections it adapts, each ending in a
`LoraWeights`:

    params["lora"]["layers_0"]["self_attn"]["q_proj"] = LoraWeights(a, b, scale)

`a: [rank, in]` and `b: [out, rank]` are PEFT's `lora_A.weight` and
`lora_B.weight` as stored (PyTorch `Linear` layout, like `layers.Dense`'s
`[out, in]` weight); `scale` (`lora_alpha / r`, or `lora_alpha / sqrt(r)` for
rsLoRA) is static, part of the tree structure, so `jax.grad` and an optimizer
see only `a` and `b`.

How a model reads it: its `apply` passes `flax_variables(params)` to
`module.apply`, which moves the subtree into the Flax collection `"lora"`;
`layers.Dense` adds the update when that collection holds an entry at its own
path. So any model built from `layers.Dense` takes adapters with no code of its
own, and a projection without an entry pays nothing. Projections fused at load
(the skeleton's `qkv_proj` from q/k/v) keep their adapters under the parts'
names; the fused product adds each to its slice (`part_entry`).

`merge(params)` folds every update into its weight (`W + scale * B A`) and drops
the subtree: the same logits at the speed of the base model.

Several adapters in one batch (vLLM's multi-LoRA): `stack(adapters)` makes one
subtree whose entries hold every adapter, `a: [n, rank, in]`, `b: [n, out,
rank]` (ranks zero-padded to the largest, a projection an adapter leaves alone
all zeros: both exact) with one scale per adapter; `select(params, ids)` sets
each entry's per-row adapter index `rows: [batch]` (-1: the base model), and
each row gets its own adapter's update (its `a`, `b` gathered per row).

PEFT's format both ways: `from_peft` (with `check_peft_config`, which refuses
options beyond plain LoRA by name) reads an adapter, `to_peft` writes one, and
`init_adapter` makes a fresh one as PEFT's `get_peft_model` does. The reading
and writing of files is `checkpoints.read_adapter` / `write_adapter`; `CausalLM`
(`load_adapter`, `add_adapter`, `save_adapter`, `merge_and_unload`) ties them
to a model. (~460 lines: the mechanism and PEFT's format, one concept.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import pytree

Array = jax.Array

__all__ = [
    "LORA",
    "LoraWeights",
    "adapter_count",
    "check_peft_config",
    "entry",
    "flax_variables",
    "from_peft",
    "has_lora",
    "init_adapter",
    "merge",
    "part_entry",
    "partition_specs",
    "projections",
    "select",
    "split",
    "stack",
    "to_peft",
]

# The key of the adapter subtree in a params dict, and the Flax collection it becomes.
LORA = "lora"
# The name of a projection's entry inside the "lora" collection (at the projection's path).
_ENTRY = "adapter"
# A projection fused with its siblings at load -> (the fused module, its index
# in it, the number of parts). The parts after the first share one width (k and
# v: the KV heads; gate and up), so a part's rows follow from its own width.
_FUSED_PARTS = {
    "q_proj": ("qkv_proj", 0, 3),
    "k_proj": ("qkv_proj", 1, 3),
    "v_proj": ("qkv_proj", 2, 3),
    "gate_proj": ("gate_up_proj", 0, 2),
    "up_proj": ("gate_up_proj", 1, 2),
}


@pytree.dataclass
class LoraWeights:
    """One projection's low-rank update, `scale * (x @ a.T) @ b.T`; or, stacked
    (`stack`), n adapters' updates of which each row takes its own.

    Attributes:
        a: `[rank, in]`, PEFT's `lora_A.weight` (stacked: `[n, rank, in]`).
        b: `[out, rank]`, PEFT's `lora_B.weight` (stacked: `[n, out, rank]`).
        scale: `lora_alpha / rank` (rsLoRA: `lora_alpha / sqrt(rank)`), static
            (stacked: a tuple, one per adapter).
        module: the transformers module name it adapts (e.g.
            `"model.layers.0.self_attn.q_proj"`), static; set when read from a
            PEFT adapter, needed to write one (`to_peft`).
        rows: stacked only: `[batch]` int32 each prompt row's adapter (-1: none),
            set by `select`; a call over `batch * k` rows (several sequences or
            beams per prompt, consecutive) gives each prompt's rows its adapter.
    """

    a: Array
    b: Array
    scale: float | tuple[float, ...] = pytree.field(pytree_node=False, default=1.0)
    module: str | None = pytree.field(pytree_node=False, default=None)
    rows: Array | None = None

    @property
    def stacked(self) -> bool:
        """Whether this entry holds several adapters (`stack`)."""
        return self.a.ndim == 3

    def __call__(self, x: Array) -> Array:
        """The update for inputs `x: [..., in]`: `[..., out]` in `x`'s dtype,
        computed in the adapter's dtype (as PEFT casts the input to `lora_A`'s);
        stacked: `x: [rows, ..., in]`, each row with its own adapter."""
        if self.stacked:
            return self._per_row(x)
        h = jax.lax.dot_general(x.astype(self.a.dtype), self.a, (((x.ndim - 1,), (1,)), ((), ())))
        h = jax.lax.dot_general(h, self.b, (((h.ndim - 1,), (1,)), ((), ())))
        return (h * jnp.asarray(self.scale, h.dtype)).astype(x.dtype)

    def _per_row(self, x: Array) -> Array:
        """Each row's own adapter's update (its `a`, `b` gathered: vLLM's BGMV)."""
        if self.rows is None:
            raise ValueError(
                f"{self.a.shape[0]} stacked LoRA adapters need a per-row adapter index: pass "
                "adapter_ids=[...] (one per prompt, -1 for none) to generate"
            )
        rows = jnp.asarray(self.rows, jnp.int32)
        n = x.shape[0]
        if n % rows.shape[0]:
            raise ValueError(
                f"{rows.shape[0]} adapter ids for a call over {n} rows; give one per prompt"
            )
        rows = jnp.repeat(rows, n // rows.shape[0])
        pick = jnp.maximum(rows, 0)
        a, b = self.a[pick], self.b[pick]  # [rows, rank, in], [rows, out, rank]
        scale = jnp.asarray(self.scale, a.dtype)[pick] * (rows >= 0)
        flat = x.astype(a.dtype).reshape(n, -1, x.shape[-1])
        h = jnp.einsum("bti,bri->btr", flat, a)
        h = jnp.einsum("btr,bor->bto", h, b) * scale[:, None, None]
        return h.reshape(*x.shape[:-1], b.shape[1]).astype(x.dtype)

    def delta(self) -> Array:
        """The update as a dense `[out, in]` matrix, `scale * b @ a`, float32."""
        if self.stacked:
            raise ValueError(
                "stacked LoRA adapters (one per row) cannot be merged into one weight; "
                "merge one adapter"
            )
        a, b = self.a.astype(jnp.float32), self.b.astype(jnp.float32)
        return jnp.float32(self.scale) * (b @ a)


def _is_weights(node: Any) -> bool:
    return isinstance(node, LoraWeights)


def has_lora(params: Any) -> bool:
    """Whether `params` is a dict carrying an adapter subtree."""
    return isinstance(params, Mapping) and LORA in params


def split(params: Any) -> tuple[Any, Any]:
    """`(base params, adapter subtree or None)`."""
    if not has_lora(params):
        return params, None
    base = {k: v for k, v in params.items() if k != LORA}
    return base, params[LORA]


def flax_variables(params: Any) -> dict[str, Any]:
    """The variables for `module.apply`: `{"params": base}`, plus the adapter as
    the `"lora"` collection that `layers.Dense` reads, when `params` has one."""
    base, adapter = split(params)
    if adapter is None:
        return {"params": base}
    collection = jax.tree_util.tree_map(lambda w: {_ENTRY: w}, adapter, is_leaf=_is_weights)
    return {"params": base, LORA: collection}


def entry(module: Any) -> LoraWeights | None:
    """The `LoraWeights` of a linen module's own path in the `"lora"` collection
    (inside `apply`), or None."""
    if module.has_variable(LORA, _ENTRY):
        return module.get_variable(LORA, _ENTRY)
    return None


def part_entry(module: Any, name: str) -> LoraWeights | None:
    """The `LoraWeights` at `name` below a linen module's path (inside `apply`),
    or None: an adapter on one part of a product the module computes fused
    (`q_proj` of a `qkv_proj` fused at load), added to that part's slice."""
    node = module.variables.get(LORA, {}).get(name)
    return None if node is None else node.get(_ENTRY)


def merge(params: Any) -> Any:
    """`params` with every adapter update folded into its projection's
    `weight` (`W + scale * B A`, computed in float32, stored in W's dtype) and
    the adapter subtree removed; an adapter on a part of a projection fused at
    load (`q_proj` of `qkv_proj`) into that part's rows. Pure: usable inside `jit`.

    Raises:
        ValueError: when an adapter entry names no projection weight in `params`.
    """
    base, adapter = split(params)
    if adapter is None:
        return params
    out = _copy_dicts(base)
    for path, w in jax.tree_util.tree_flatten_with_path(adapter, is_leaf=_is_weights)[0]:
        names = [getattr(k, "key", getattr(k, "name", k)) for k in path]
        node, rows = out, slice(None)
        for i, name in enumerate(names):
            fused = _FUSED_PARTS.get(name) if i == len(names) - 1 else None
            if isinstance(node, dict) and name not in node and fused and fused[0] in node:
                # A part of a product fused at load: its rows of the fused weight
                # (q first, v last, k and v of one width; gate first, up last).
                node = node[fused[0]]
                total, out_dim = node["weight"].shape[0], w.b.shape[0]
                from_end = fused[2] - fused[1]  # parts from this one to the end
                start = 0 if fused[1] == 0 else total - from_end * out_dim
                rows = slice(start, start + out_dim)
                break
            if not isinstance(node, dict) or name not in node:
                raise ValueError(f"adapter entry {'/'.join(map(str, names))} has no projection")
            node = node[name]
        if "weight" not in node:
            raise ValueError(f"adapter entry {'/'.join(map(str, names))} has no weight")
        weight = node["weight"]
        merged = (weight[rows].astype(jnp.float32) + w.delta()).astype(weight.dtype)
        node["weight"] = merged if rows == slice(None) else weight.at[rows].set(merged)
    return out


def partition_specs(adapter: Any, base_specs: Any) -> Any:
    """PartitionSpecs of an adapter subtree given its base params' specs: a
    projection `weight [out, in]` split `P(o, i)` gives `b [out, r]` `P(o, None)`
    and `a [r, in]` `P(None, i)`, so `x A^T` needs the reduction `x W^T` needs
    and its output is split as the projection's."""
    from jax.sharding import PartitionSpec as P

    def spec(path: Any, w: LoraWeights) -> LoraWeights:
        node = base_specs
        for k in path:
            node = node[getattr(k, "key", getattr(k, "name", k))]
        out, inp = (tuple(node["weight"]) + (None, None))[:2]
        if w.stacked:  # the adapters' axis and the row index replicated
            rows = None if w.rows is None else P()
            a, b = P(None, None, inp), P(None, out, None)
            return LoraWeights(a=a, b=b, scale=w.scale, module=w.module, rows=rows)
        return LoraWeights(a=P(None, inp), b=P(out, None), scale=w.scale, module=w.module)

    return jax.tree_util.tree_map_with_path(spec, adapter, is_leaf=_is_weights)


def stack(adapters: list[Any]) -> Any:
    """One adapter subtree holding every adapter of `adapters` (subtrees of
    unstacked `LoraWeights`), for `select` to give each row its own: every
    projection any of them adapts gets `a: [n, r, in]`, `b: [n, out, r]` with
    `r` their largest rank (a smaller rank zero-padded, a projection an adapter
    leaves alone all zeros: both exact) and one scale per adapter.

    Raises:
        ValueError: for no adapters, an already stacked one, or two adapters whose
            entries for one projection have different shapes.
    """
    if not adapters:
        raise ValueError("stack needs at least one adapter")
    entries: dict[tuple, list[LoraWeights | None]] = {}
    for i, adapter in enumerate(adapters):
        for path, w in jax.tree_util.tree_flatten_with_path(adapter, is_leaf=_is_weights)[0]:
            if not _is_weights(w) or w.stacked:
                raise ValueError(f"adapter {i} is not one plain LoRA adapter subtree")
            key = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
            entries.setdefault(key, [None] * len(adapters))[i] = w
    tree: dict[str, Any] = {}
    for key, ws in sorted(entries.items()):
        given = [w for w in ws if w is not None]
        out_dim, in_dim = given[0].b.shape[0], given[0].a.shape[1]
        if any((w.b.shape[0], w.a.shape[1]) != (out_dim, in_dim) for w in given):
            raise ValueError(f"adapters disagree on the shape of {'/'.join(map(str, key))}")
        rank = max(w.a.shape[0] for w in given)
        pairs = [_padded(w, rank, out_dim, in_dim, given[0].a.dtype) for w in ws]
        node = tree
        for p in key[:-1]:
            node = node.setdefault(p, {})
        node[key[-1]] = LoraWeights(
            a=jnp.stack([a for a, _ in pairs]),
            b=jnp.stack([b for _, b in pairs]),
            scale=tuple(float(w.scale) if w is not None else 0.0 for w in ws),
            module=given[0].module,
        )
    return tree


def _padded(
    w: LoraWeights | None, rank: int, out_dim: int, in_dim: int, dtype: Any
) -> tuple[Array, Array]:
    """`(a [rank, in], b [out, rank])` of `w` with its rank zero-padded to `rank`
    (zeros for an adapter without this projection)."""
    if w is None:
        return jnp.zeros((rank, in_dim), dtype), jnp.zeros((out_dim, rank), dtype)
    extra = rank - w.a.shape[0]
    a = jnp.pad(w.a.astype(dtype), ((0, extra), (0, 0)))
    return a, jnp.pad(w.b.astype(dtype), ((0, 0), (0, extra)))


def select(params: Any, adapter_ids: Any) -> Any:
    """`params` whose stacked adapter (`stack`) gives row i adapter
    `adapter_ids[i]` (-1: the base model alone). Pure: `adapter_ids` may be traced.

    Raises:
        ValueError: when `params` has no stacked adapter.
    """
    base, adapter = split(params)
    leaves = jax.tree_util.tree_leaves(adapter, is_leaf=_is_weights)
    if not leaves or not all(_is_weights(w) and w.stacked for w in leaves):
        raise ValueError(
            "adapter_ids selects among stacked LoRA adapters: load several with "
            "lm.load_adapter([dir, ...]) (or lora.stack), got a model without them"
        )
    ids = jnp.asarray(adapter_ids, jnp.int32)
    chosen = jax.tree_util.tree_map(lambda w: w.replace(rows=ids), adapter, is_leaf=_is_weights)
    return {**base, LORA: chosen}


def adapter_count(params: Any) -> int | None:
    """How many adapters a stacked adapter holds (`stack`), else None."""
    _, adapter = split(params)
    leaves = jax.tree_util.tree_leaves(adapter, is_leaf=_is_weights)
    if leaves and _is_weights(leaves[0]) and leaves[0].stacked:
        return int(leaves[0].a.shape[0])
    return None


def _copy_dicts(tree: Any) -> Any:
    """`tree` with every dict copied (leaves shared), so it can be edited."""
    if isinstance(tree, Mapping):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree


# PEFT LoraConfig options that change what the adapter computes beyond
# `scale * B A x`, each with a test of its default (off) value.
_REFUSED: dict[str, Any] = {
    "use_dora": lambda v: not v,
    "lora_bias": lambda v: not v,
    "bias": lambda v: v in (None, "none"),
    "modules_to_save": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
    "layer_replication": lambda v: not v,
    "alora_invocation_tokens": lambda v: not v,
    "use_qalora": lambda v: not v,
    "target_parameters": lambda v: not v,
    "velora_config": lambda v: not v,
    "monteclora_config": lambda v: not v,
    "arrow_config": lambda v: not v,
    "kasa_config": lambda v: not v,
    "use_bdlora": lambda v: not v,
}
# Initialisations that also rewrite the base model's weights: the adapter is
# only right on top of those, not on the original checkpoint.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def check_peft_config(config: Mapping[str, Any], where: str) -> None:
    """Raises ValueError naming the first option of a PEFT `adapter_config.json`
    that jaxdecode cannot honour (not LoRA, DoRA, LoRA biases, extra trained
    modules, ...), with its value."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type {peft_type!r} is not supported; jaxdecode reads LORA")
    for name, is_default in _REFUSED.items():
        if name in config and not is_default(config[name]):
            raise ValueError(
                f"{where}: {name}={config[name]!r} is not supported; jaxdecode applies plain "
                f"LoRA adapters (unset {name}, or merge the adapter with peft first)"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{where}: init_lora_weights={init!r} also changed the base weights; convert the "
            "adapter to plain LoRA with peft (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) first"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    for name in ("alpha_pattern", "rank_pattern"):
        if not isinstance(config.get(name) or {}, Mapping):
            raise ValueError(f"{where}: {name} must be an object, got {config[name]!r}")


def _alpha(config: Mapping[str, Any], module: str) -> float:
    """`lora_alpha`, or `alpha_pattern`'s value for `module` (PEFT's rule: the
    first pattern key matching the module name's end, as a regular expression)."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(config["lora_alpha"])


def from_peft(
    config: Mapping[str, Any],
    state: Mapping[str, Any],
    params: Mapping[str, Any],
    param_path: Any,
    dtype: Any,
    where: str,
) -> dict[str, Any]:
    """The adapter subtree (`params["lora"]`) of a PEFT LoRA adapter.

    Args:
        config: `adapter_config.json` as a dict (checked with `check_peft_config`).
        state: `adapter_model.safetensors`'s tensors (`base_model.model.<module
            name>.lora_A.weight` / `.lora_B.weight`).
        params: the base model's params, whose projections the adapter targets.
        param_path: the family's `transformers tensor name -> params path`.
        dtype: the adapter weights' dtype.
        where: the adapter's directory, for messages.

    Raises:
        ValueError: naming the first unsupported option, unexpected tensor,
            module that is no projection of this model, or misshapen tensor.
    """
    check_peft_config(config, where)
    rslora = bool(config.get("use_rslora", False))
    embedding = next((k for k in state if ".lora_embedding_" in k), None)
    if embedding is not None:
        raise ValueError(
            f"{where}: tensor {embedding} adapts an embedding; jaxdecode applies LoRA "
            "to linear projections only"
        )
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        name = key.removeprefix("base_model.model.")
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{where}: unexpected tensor {key} in a LoRA adapter")
        modules.setdefault(name.removesuffix(suffix), {})[suffix[1:7]] = tensor
    if not modules:
        raise ValueError(f"{where}: the adapter holds no lora_A / lora_B tensors")
    tree: dict[str, Any] = {}
    for module in sorted(modules):
        pair = modules[module]
        for half in ("lora_A", "lora_B"):
            if half not in pair:
                raise ValueError(f"{where}: module {module} has no {half}.weight tensor")
        path = tuple(param_path(module + ".weight"))
        node: Any = params
        for p in path[:-1]:
            node = node.get(p) if isinstance(node, Mapping) else None
        if path[-1] != "weight" or not isinstance(node, Mapping) or "weight" not in node:
            raise ValueError(
                f"{where}: the adapter targets {module}, which is no linear projection of "
                "this model (an embedding, or a tied LM head?)"
            )
        out_dim, in_dim = node["weight"].shape
        a, b = pair["lora_A"], pair["lora_B"]
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_dim or b.shape != (out_dim, rank):
            raise ValueError(
                f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"the model's projection is [out={out_dim}, in={in_dim}], so they must be "
                f"[r, {in_dim}] and [{out_dim}, r]"
            )
        alpha = _alpha(config, module)
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        node = tree
        for p in path[:-2]:
            node = node.setdefault(p, {})
        node[path[-2]] = LoraWeights(
            a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), scale=float(scale), module=module
        )
    return tree


def _most_common(values: list[Any]) -> Any:
    return max(sorted(set(values), key=str), key=values.count)


def to_peft(adapter: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`(adapter_config.json as a dict, adapter_model.safetensors's tensors)` of
    an adapter subtree, which PEFT loads (`PeftModel.from_pretrained`): `r` and
    `lora_alpha` are the most common rank and `scale * rank`, a module that
    differs gets `rank_pattern` / `alpha_pattern` entries under its full name;
    tensors are float32.

    Raises:
        ValueError: for an entry without its transformers module name (`module`).
    """
    entries = jax.tree_util.tree_leaves(adapter, is_leaf=_is_weights)
    if not entries:
        raise ValueError("the adapter has no LoraWeights to write")
    if any(w.stacked for w in entries):
        raise ValueError("stacked LoRA adapters are written one at a time; save each adapter")
    for path, w in jax.tree_util.tree_flatten_with_path(adapter, is_leaf=_is_weights)[0]:
        if w.module is None:
            raise ValueError(
                f"adapter entry {jax.tree_util.keystr(path)} has no module name (LoraWeights."
                "module, the transformers module it adapts), so PEFT could not place it"
            )
    ranks = {w.module: int(w.a.shape[0]) for w in entries}
    alphas = {w.module: float(w.scale) * ranks[w.module] for w in entries}
    alphas = {m: int(v) if float(v).is_integer() else v for m, v in alphas.items()}
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    tensors = {}
    for w in entries:
        prefix = f"base_model.model.{w.module}"
        tensors[prefix + ".lora_A.weight"] = np.asarray(w.a, np.float32)
        tensors[prefix + ".lora_B.weight"] = np.asarray(w.b, np.float32)
    return config, tensors


def projections(params: Mapping[str, Any], names: Any, param_path: Any) -> dict[str, tuple]:
    """The linear projections of a model by transformers module name: `{module
    name: params path}` for every tensor name in `names` (a family's checkpoint
    names) whose params path ends in a `[out, in]` `weight`."""
    out = {}
    for name in names:
        if not name.endswith(".weight"):
            continue
        path = tuple(param_path(name))
        node: Any = params
        for p in path[:-1]:
            node = node.get(p) if isinstance(node, Mapping) else None
        if path[-1] == "weight" and isinstance(node, Mapping) and np.ndim(node["weight"]) == 2:
            out[name.removesuffix(".weight")] = path
    return out


def _targeted(module: str, target_modules: Any) -> bool:
    """PEFT's rule: a string is a regular expression the whole name must match;
    a list names modules by their last components."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def init_adapter(
    params: Mapping[str, Any],
    modules: Mapping[str, tuple],
    target_modules: Any,
    r: int,
    lora_alpha: float,
    use_rslora: bool,
    key: Array,
    dtype: Any,
) -> dict[str, Any]:
    """A fresh adapter subtree, as PEFT initialises one (`init_lora_weights=True`):
    `a` uniform in `±1/sqrt(in)` (Kaiming-uniform with `a=sqrt(5)`), `b` zero, so
    the model starts as the base model.

    Args:
        params: the base params.
        modules: `projections(...)` of the model.
        target_modules: module names (a list: matched by their last components),
            a regular expression (a string), or "all-linear" (every projection
            but the LM head).
        r: the rank.
        lora_alpha: the scale's numerator.
        use_rslora: scale `lora_alpha / sqrt(r)` instead of `lora_alpha / r`.
        key: a PRNG key for `a`.
        dtype: the adapter weights' dtype.

    Raises:
        ValueError: naming a bad `r` / `lora_alpha` / `target_modules`, or targets
            that match no projection (listing those there are).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise ValueError(f"lora_alpha must be a number, got {lora_alpha!r}")
    if target_modules == "all-linear":
        chosen = [m for m in modules if m.rsplit(".", 1)[-1] != "lm_head"]
    else:
        ok = isinstance(target_modules, str) or (
            isinstance(target_modules, (list, tuple))
            and target_modules
            and all(isinstance(t, str) for t in target_modules)
        )
        if not ok:
            raise ValueError(
                "target_modules must be a list of module names, a regular expression or "
                f"'all-linear', got {target_modules!r}"
            )
        chosen = [m for m in modules if _targeted(m, target_modules)]
    if not chosen:
        last = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise ValueError(
            f"target_modules {target_modules!r} matches no linear projection of this model; "
            f"its projections are named {last}"
        )
    scale = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
    tree: dict[str, Any] = {}
    for module, k in zip(chosen, jax.random.split(key, len(chosen)), strict=True):
        path = modules[module]
        node: Any = params
        for p in path[:-1]:
            node = node[p]
        out_dim, in_dim = node["weight"].shape
        bound = 1.0 / math.sqrt(in_dim)
        a = jax.random.uniform(k, (r, in_dim), jnp.float32, -bound, bound).astype(dtype)
        entry = LoraWeights(
            a=a, b=jnp.zeros((out_dim, r), dtype), scale=float(scale), module=module
        )
        node = tree
        for p in path[:-2]:
            node = node.setdefault(p, {})
        node[path[-2]] = entry
    return tree
