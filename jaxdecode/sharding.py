"""Sharded decoding over a device mesh: data parallel and tensor parallel.

jaxdecode runs on JAX's own machinery: a `jax.sharding.Mesh` with a `data` axis
(the batch: prompt rows, their beams and their KV-cache rows) and a `model`
axis (attention heads of the KV cache and of the projections, MLP hidden
units, the vocabulary of the LM head and of the logits). `generate(...,
mesh=mesh)` places the parameters with `NamedSharding`s (once: already placed
parameters are left alone), and the compiled program constrains the prompt,
the cache and the logits with `with_sharding_constraint`; XLA's SPMD
partitioner inserts the collectives. The semantics never depend on the mesh:
top-k, top-p and the sampling draw over vocabulary-sharded logits are the
single-device results (threefry random bits are partitionable), which the
tests check token for token.

Several hosts: call `jax.distributed.initialize()` in every process, build the
global mesh over `jax.devices()`, assemble the global batch from each host's
rows with `jax.make_array_from_process_local_data`, and call `generate` with
it; see README ("Scaling out").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "AXIS_RULES",
    "DATA",
    "EXPERT",
    "MODEL",
    "make_mesh",
    "check_mesh",
    "parse_mesh",
    "path_names",
    "constrain",
    "param_shardings",
    "shard_params",
    "fit_spec",
    "logical_spec",
    "per_device_bytes",
]

DATA, MODEL = "data", "model"

# Logical axes of parameters -> the mesh axis each is split over (None:
# replicated), as MaxText maps logical axis names to mesh axes by rules. A
# family's spec function names a leaf's dimensions logically with
# `logical_spec`; the rules decide the placement.
EXPERT = "expert"  # the stacked experts of a mixture-of-experts layer
AXIS_RULES: dict[str, str | None] = {EXPERT: MODEL}

Array = jax.Array


def make_mesh(data: int = 1, model: int = 1, devices: Any = None) -> Mesh:
    """A `(data, model)` mesh over `devices` (default: all, `jax.devices()`).

    Raises:
        ValueError: when `data * model` is not the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, value in (("data", data), ("model", model)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"mesh axis {name} must be an int >= 1, got {value!r}")
    if data * model != len(devices):
        raise ValueError(
            f"mesh data={data} x model={model} = {data * model} devices, but "
            f"{len(devices)} are available; the product must equal the device count"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(data, model), (DATA, MODEL))


def check_mesh(mesh: Any) -> Mesh | None:
    """`mesh` itself when it is None or a `Mesh` with axes `("data", "model")`.

    Raises:
        ValueError: anything else (naming what was given).
    """
    if mesh is not None and (not isinstance(mesh, Mesh) or set(mesh.axis_names) != {DATA, MODEL}):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh with axes ('data', 'model') "
            f"(see jaxdecode.make_mesh), got {mesh!r}"
        )
    return mesh


def parse_mesh(text: str, devices: Any = None) -> Mesh:
    """`"data=4,model=2"` (either axis may be omitted: 1) -> `make_mesh(4, 2)`."""
    sizes = {DATA: 1, MODEL: 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in sizes:
            raise ValueError(
                f"mesh must look like 'data=4,model=2' (axes data, model), got {text!r}"
            )
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name} must be an integer, got {value!r}") from None
    return make_mesh(sizes[DATA], sizes[MODEL], devices)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` adjusted to `shape`: a mesh axis whose dimension it does not divide
    moves to the last free dimension it divides (12 heads over 8 devices: the
    64-wide head dimension instead), or is dropped (that axis replicates)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    for i, axis in enumerate(entries):
        if axis is None or shape[i] % mesh.shape[axis] == 0:
            continue
        entries[i] = None
        for j in reversed(range(len(shape))):
            if entries[j] is None and j != i and shape[j] % mesh.shape[axis] == 0:
                entries[j] = axis
                break
    return P(*entries)


def logical_spec(*axes: str | None, rules: dict[str, str | None] | None = None) -> P:
    """A `PartitionSpec` over mesh axes from logical axis names (`AXIS_RULES`
    by default): `logical_spec("expert", None, None)` is `P("model", None, None)`.
    A mesh axis name passes through unchanged."""
    rules = AXIS_RULES if rules is None else rules
    return P(*(rules.get(a, a) if a is not None else None for a in axes))


def path_names(path: tuple[Any, ...]) -> list[str]:
    """The key names of a `tree_map_with_path` path (`["h_0", "attn", "c_attn", "weight"]`),
    for families' spec functions that match parameters by name."""
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_shardings(params: Any, mesh: Mesh, specs: Callable[[Any], Any] | None = None) -> Any:
    """`NamedSharding`s for `params` from `specs(params)` (default: replicated).

    `specs` is a model family's spec function (`Decoder.param_specs`). A leaf
    whose sharded dimension does not divide by the mesh axis is split along
    another dimension that does (an embedding `[50257, 768]` over 2 devices: by
    its 768 columns instead of its vocabulary), else replicated: a placement,
    never a change of the result. A LoRA adapter (`params["lora"]`) follows
    the projection it adapts (`models.lora.partition_specs`).
    """
    from jaxdecode.models import lora  # models import this module

    base, adapter = lora.split(params)
    if specs is None:
        tree = jax.tree_util.tree_map(lambda _: P(), params)
    elif adapter is None:
        tree = specs(params)
    else:
        base_specs = specs(base)
        tree = {**base_specs, lora.LORA: lora.partition_specs(adapter, base_specs)}

    def place(leaf: Any, spec: P) -> NamedSharding:
        return NamedSharding(mesh, fit_spec(spec, np.shape(leaf), mesh))

    return jax.tree_util.tree_map(place, params, tree, is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, mesh: Mesh, specs: Callable[[Any], Any] | None = None) -> Any:
    """`params` placed on `mesh` (a no-op for leaves already placed so).

    Traced params (inside a caller's `jit`, e.g. a training step whose params are
    laid out for training: FSDP over `data`) are resharded to the decoding layout
    inside that program with `with_sharding_constraint`: XLA inserts the
    collectives (all-gathers of the FSDP shards), with no host round trip.
    """
    shardings = param_shardings(params, mesh, specs)

    def put(leaf: Any, sharding: NamedSharding) -> Any:
        if isinstance(leaf, jax.core.Tracer):
            # Gathered first: XLA's SPMD partitioner reshards a dimension split
            # over one axis onto another only through a full rematerialization
            # (and warns); gather-then-slice is the same collective, said plainly.
            whole = jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, P()))
            return jax.lax.with_sharding_constraint(whole, sharding)
        if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            return leaf
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map(put, params, shardings)


def constrain(tree: Any, mesh: Mesh | None, specs: Any) -> Any:
    """`with_sharding_constraint` of `tree` to `specs` (a PartitionSpec tree, or
    `specs(tree, mesh)`) on `mesh` (None: unchanged)."""
    if mesh is None:
        return tree
    if callable(specs):
        specs = specs(tree, mesh)
    shardings = jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )
    return jax.lax.with_sharding_constraint(tree, shardings)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree`'s arrays (its first device's shards)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            device = leaf.addressable_shards[0].device
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return total
