"""A mixture-of-experts feed-forward layer (Mixtral, Qwen2-MoE, Qwen3-MoE).

Each token is routed to `top_k` of `num_experts` gated MLPs: a router (a linear
map to `num_experts` logits) whose float32 softmax is cut to the top k (and, with
`norm_topk_prob`, renormalised to sum to 1); the token's output is the weighted
sum of its k experts' `down(act(gate(x)) * up(x))`. Qwen2-MoE adds a shared
expert, a dense gated MLP on every token scaled by `sigmoid(shared_expert_gate(x))`.

Only the routed experts are computed, never every expert on every token:

* **Grouped product** (`grouped`): the `tokens x k` token-expert pairs are sorted
  by expert, each expert's rows form one contiguous group, and three
  `jax.lax.ragged_dot_general` products (gate, up, down) run each group against
  its own expert's weights; the results are weighted and scatter-added back to
  their tokens. XLA lowers it to the ragged-dot instruction on TPU and GPU; on
  CPU, which has none, a scan over the experts computes each routed one's
  product (every row, masked to its group: `experts / k` times the routed work,
  but memory `rows x out` where JAX's own decomposition holds `experts x rows x
  in`), and neither copies nor reads an expert no row was routed to.
* **Gathered product** (`gathered`), for calls with at most as many pairs as
  experts (a decode step at small batch): each pair's expert weights are
  indexed and multiplied by its row, so a step reads the k routed experts'
  weights per token and not every expert's.
* **Switched product** (`switched`), the same calls on CPU when the host gave
  the program one array per expert (`expert_views`, through
  `Decoder.host_views`: views of the stack's own memory, nothing copied): each
  pair branches (`lax.switch`) to its expert's products, which read that
  expert's buffers in place (matrix-vector products up to `SWITCH_COLUMNS_AT`
  experts, `[*, 2]` ones above, which compile faster).

Why two forms for one product, on XLA:CPU (issue 26; one layer of 32 experts of
512 x 1024, top 4, variants interleaved in one process): XLA:CPU copies a slice
of a parameter into a new buffer before a product reads it, dynamic (`w[e]`,
`gathered`) or static (a `lax.switch` over `w[0]`, `w[1]`, ...), while a whole
parameter is read in place. A routed expert then costs its bytes read, written
and read again: `gathered` took ~1.7x a dense MLP of the same active width, a
decode step ~1.7-1.8x a dense model of the active size. Multiply-reduce
fusions that would read the slice in place reduce sequentially (float sums are
not reordered) or are taken by YNNPACK, which takes the copied slice too
(~2-5x); YNNPACK fuses no slice into a product. Over per-expert arrays the
copies vanish (one token: ~1.0-1.1x the dense MLP). The stacked layout stays
the model's (loading, saving, the `expert` mesh axis, the accelerators' ragged
dot); the views exist only for the host's call. Eight tokens (32 pairs over 32
experts): the gathered form 37 ms, the grouped scan 46 ms (58 ms when the scan
copied every expert).

Expert weights are stacked `[experts, out, in]`, PyTorch's per-expert layout
(`gate_proj`, `up_proj: [E, moe_hidden, hidden]`, `down_proj: [E, hidden,
moe_hidden]`), so checkpoints stack without transposes.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode.models.layers import ACTIVATIONS, Dense, GatedMLP

Array = jax.Array

__all__ = [
    "PER_EXPERT",
    "SWITCH_COLUMNS_AT",
    "MoE",
    "expert_views",
    "gathered",
    "grouped",
    "route",
    "switched",
]

# Above this many experts `switched` multiplies `[*, 2]` columns (library calls)
# rather than vectors (code generated per product): 3 products per expert and
# layer to compile, ~57 ms each under load (128 experts x 48 layers: minutes).
SWITCH_COLUMNS_AT = 64

# The `params` entry beside a layer's stacked experts that holds one array per
# expert (`expert_views`), read by `MoE` at decode steps.
PER_EXPERT = "per_expert"
_STACKED = ("gate_proj", "up_proj", "down_proj")

# ragged_dot_general: rows [M, in] grouped along M, weights [E, out, in].
_RAGGED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)


def route(logits: Array, top_k: int, norm_topk_prob: bool) -> tuple[Array, Array]:
    """The router's choice: softmax over the experts in float32, the top k.

    Args:
        logits: `[tokens, experts]` router logits.
        top_k: experts per token.
        norm_topk_prob: divide the k weights by their sum.

    Returns:
        `(weights [tokens, k] float32, experts [tokens, k] int32)`, best first.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def grouped(
    x: Array,
    weights: Array,
    experts: Array,
    gate: Array,
    up: Array,
    down: Array,
    activation: str,
) -> Array:
    """The routed experts' output by grouped (ragged) matrix products.

    Args:
        x: `[tokens, hidden]`.
        weights: `[tokens, k]` routing weights.
        experts: `[tokens, k]` int32 chosen experts.
        gate, up: `[experts, moe_hidden, hidden]`.
        down: `[experts, hidden, moe_hidden]`.
        activation: an `ACTIVATIONS` name.

    Returns:
        `[tokens, hidden]` in x's dtype.
    """
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert
    token = order // k
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    rows = x[token]

    def ragged(a: Array, w: Array) -> Array:
        w = w.astype(a.dtype)
        return jax.lax.platform_dependent(a, w, sizes, cpu=_ragged_dot_cpu, default=_ragged_dot)

    h = ACTIVATIONS[activation](ragged(rows, gate)) * ragged(rows, up)
    out = ragged(h, down) * weights.reshape(-1)[order][:, None].astype(x.dtype)
    return jnp.zeros_like(x).at[token].add(out)


def _ragged_dot(rows: Array, w: Array, sizes: Array) -> Array:
    return jax.lax.ragged_dot_general(rows, w, sizes, _RAGGED)


def _ragged_dot_cpu(rows: Array, w: Array, sizes: Array) -> Array:
    """`_ragged_dot` on XLA:CPU, which has no ragged-dot kernel: JAX's own
    decomposition materialises the rows once per expert (`[experts, rows, in]`);
    this walks the experts instead (memory `rows x out`), skipping the unrouted."""
    starts = jnp.cumsum(sizes) - sizes
    index = jnp.arange(rows.shape[0])

    def expert(out: Array, e: tuple[Array, Array, Array]) -> tuple[Array, None]:
        i, start, size = e

        def add(out: Array) -> Array:
            # Sliced inside the branch: XLA:CPU copies a dynamic slice before a
            # product, so an expert no row was routed to is neither copied nor read
            # (scanning over `w` itself copied every expert: a decode step of 8
            # rows over 32 experts cost ~4x the routed work).
            w_e = jax.lax.dynamic_index_in_dim(w, i, keepdims=False)
            mine = (index >= start) & (index < start + size)
            y = jax.lax.dot_general(rows, w_e, (((1,), (1,)), ((), ())))
            return out + jnp.where(mine[:, None], y, 0).astype(out.dtype)

        return jax.lax.cond(size > 0, add, lambda o: o, out), None

    out = jnp.zeros((rows.shape[0], w.shape[1]), rows.dtype)
    ids = jnp.arange(w.shape[0], dtype=jnp.int32)
    return jax.lax.scan(expert, out, (ids, starts, sizes))[0]


def gathered(
    x: Array,
    weights: Array,
    experts: Array,
    gate: Array,
    up: Array,
    down: Array,
    activation: str,
) -> Array:
    """As `grouped`, one token-expert pair at a time: each pair indexes its
    expert's weights and multiplies its token's row (reads only the chosen
    experts: the cheaper form when pairs are no more than experts). A loop rather
    than one gather of `[pairs, moe_hidden, hidden]` weights, which XLA:CPU
    materialises (a step at 32 experts of 512 x 1024, top 4, on a loaded 2-core
    CPU: 3.2 ms this way, 11 ms gathered and batched, 80 ms as one einsum)."""
    n, k = experts.shape
    rows = jnp.repeat(x, k, axis=0)  # [pairs, hidden], pair p = token p // k

    def pair(args: tuple[Array, Array]) -> Array:
        e, row = args
        take = lambda w: jax.lax.dynamic_index_in_dim(w, e, keepdims=False).astype(x.dtype)
        h = ACTIVATIONS[activation](take(gate) @ row) * (take(up) @ row)
        return take(down) @ h

    out = jax.lax.map(pair, (experts.reshape(-1), rows))  # [pairs, hidden]
    out = out * weights.reshape(-1, 1).astype(x.dtype)
    return out.reshape(n, k, -1).sum(axis=1)


def switched(
    x: Array,
    weights: Array,
    experts: Array,
    parts: tuple[tuple[Array, ...], tuple[Array, ...], tuple[Array, ...]],
    activation: str,
    columns: int = 1,
) -> Array:
    """As `gathered`, over one array per expert (`expert_views`): each pair
    branches (`lax.switch`) to its expert's products, which read that expert's
    own buffers in place. The stacked weights indexed by a traced expert are
    copied by XLA:CPU before every product (`gathered`); these are not.

    Args:
        x: `[tokens, hidden]`.
        weights: `[tokens, k]` routing weights.
        experts: `[tokens, k]` int32 chosen experts.
        parts: `(gate, up, down)`, each a tuple of `experts` arrays: gate and up
            `[moe_hidden, hidden]`, down `[hidden, moe_hidden]`.
        activation: an `ACTIVATIONS` name.
        columns: 1: matrix-vector products; 2: the row twice, `[*, 2]`
            products. XLA:CPU generates code for each matrix-vector product
            (3 per expert and layer) but calls a library (YNNPACK) for a
            `[*, 2]` one: 8 layers of 32 experts decoded a step in ~1.0x the
            dense model's time with 1 column and ~1.3x with 2, and one layer
            compiled in 1.8 s against 0.4 s (under load). `MoE` takes 2 above
            `SWITCH_COLUMNS_AT` experts.

    Returns:
        `[tokens, hidden]` in x's dtype.
    """
    gate, up, down = parts
    n, k = experts.shape
    rows = jnp.repeat(x, k, axis=0)  # [pairs, hidden], pair p = token p // k

    def branch(e: int) -> Any:
        def run(cols: Array) -> Array:  # [hidden] or [hidden, columns]
            g, u, d = (w[e].astype(x.dtype) for w in (gate, up, down))
            return d @ (ACTIVATIONS[activation](g @ cols) * (u @ cols))

        return run

    branches = [branch(e) for e in range(len(gate))]

    def pair(args: tuple[Array, Array]) -> Array:
        e, row = args
        if columns == 1:
            return jax.lax.switch(e, branches, row)
        return jax.lax.switch(e, branches, jnp.stack([row] * columns, axis=1))[:, 0]

    out = jax.lax.map(pair, (experts.reshape(-1), rows))  # [pairs, hidden]
    out = out * weights.reshape(-1, 1).astype(x.dtype)
    return out.reshape(n, k, -1).sum(axis=1)


def expert_views(params: Any) -> Any:
    """`params` with, beside each layer's stacked experts on one CPU device, one
    array per expert that aliases the stack's own memory (`PER_EXPERT`: nothing
    is copied), for `switched`. Called on the host, outside any program (the
    skeleton's `Decoder.host_views`: `generate`, `stream`, the engine); anything else
    comes back unchanged: traced params, other backends, arrays placed on a
    mesh, a stack whose experts would not sit at aligned offsets.

    Why: XLA:CPU copies a slice of a parameter, static or dynamic, into a new
    buffer before a product reads it, while a whole parameter is read in place.
    The stacked layout stays the model's (loading, saving, the `expert` mesh
    axis); these views are extra program inputs over the same bytes.
    """
    if not isinstance(params, dict):
        return params
    out = {key: expert_views(value) for key, value in params.items()}
    stack = params.get("experts")
    if isinstance(stack, dict) and PER_EXPERT not in stack:
        views = {name: _views(stack.get(name)) for name in _STACKED}
        if all(v is not None for v in views.values()):
            out["experts"] = {**stack, PER_EXPERT: views}
    return out


def _views(w: Any) -> tuple[Array, ...] | None:
    """One aliasing array per expert of a concrete stacked `w` on one CPU
    device, or None."""
    if not isinstance(w, jax.Array) or isinstance(w, jax.core.Tracer) or w.ndim != 3:
        return None
    if not isinstance(w.sharding, jax.sharding.SingleDeviceSharding):
        return None
    (device,) = w.devices()
    step = math.prod(w.shape[1:]) * w.dtype.itemsize
    if device.platform != "cpu" or step % 64:
        return None
    host = np.asarray(w)  # on CPU a view of the array's own buffer
    base = w.unsafe_buffer_pointer()
    if host.ctypes.data != base:
        return None
    parts = tuple(jax.device_put(host[i], device, may_alias=True) for i in range(w.shape[0]))
    if any(p.unsafe_buffer_pointer() != base + i * step for i, p in enumerate(parts)):
        return None  # copied after all: not worth a second copy of the weights
    return parts


class MoE(nn.Module):
    """Top-k routed gated-MLP experts, plus an optional sigmoid-gated shared expert.

    Parameters: `gate/weight: [experts, in]` (the router), `experts/gate_proj`,
    `experts/up_proj: [experts, hidden, in]`, `experts/down_proj: [experts, in,
    hidden]`; with `shared_hidden`, `shared_expert/{gate,up,down}_proj/weight`
    (a `GatedMLP`) and `shared_expert_gate/weight: [1, in]`.

    Attributes:
        num_experts: routed experts.
        top_k: experts per token.
        hidden: each expert's intermediate width.
        activation: the gate activation (an `ACTIVATIONS` name).
        dtype: parameter and computation dtype.
        norm_topk_prob: renormalise the k routing weights to sum to 1.
        shared_hidden: the shared expert's intermediate width (0: none).
    """

    num_experts: int
    top_k: int
    hidden: int
    activation: str
    dtype: Any = jnp.float32
    norm_topk_prob: bool = False
    shared_hidden: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """`x: [B, T, in]` -> `[B, T, in]`. The chosen experts `[B, T, top_k]`
        int32 are sown as `intermediates/routed_experts` (read them by applying
        with `mutable=["intermediates"]`)."""
        b, t, e = x.shape
        h = x.reshape(b * t, e).astype(self.dtype)
        logits = Dense(self.num_experts, self.dtype, use_bias=False, name="gate")(h)
        weights, experts = route(logits, self.top_k, self.norm_topk_prob)
        self.sow("intermediates", "routed_experts", experts.reshape(b, t, self.top_k))
        *stack, parts = _Experts((self.num_experts, self.hidden, e), self.dtype, name="experts")()
        # At most as many pairs as experts (decode steps): per pair, only the chosen
        # experts' weights (their own buffers when `expert_views` gave them);
        # otherwise the grouped product (a static choice).
        if b * t * self.top_k > self.num_experts:
            out = grouped(h, weights, experts, *stack, self.activation)
        elif parts is not None:
            columns = 1 if self.num_experts <= SWITCH_COLUMNS_AT else 2
            out = switched(h, weights, experts, parts, self.activation, columns)
        else:
            out = gathered(h, weights, experts, *stack, self.activation)
        if self.shared_hidden:
            shared = GatedMLP(self.shared_hidden, self.activation, self.dtype, name="shared_expert")
            scale = Dense(1, self.dtype, use_bias=False, name="shared_expert_gate")(h)
            out = out + jax.nn.sigmoid(scale) * shared(h)
        return out.reshape(b, t, e)


class _Experts(nn.Module):
    """The stacked expert weights (`gate_proj`, `up_proj: [E, hidden, in]`,
    `down_proj: [E, in, hidden]`) and, when `expert_views` added them, their
    per-expert views (else None)."""

    shape: tuple[int, int, int]
    dtype: Any

    @nn.compact
    def __call__(self) -> tuple[Array, Array, Array, Any]:
        init = nn.initializers.normal(0.02)
        experts, hidden, e = self.shape
        gate = self.param("gate_proj", init, (experts, hidden, e), self.dtype)
        up = self.param("up_proj", init, (experts, hidden, e), self.dtype)
        down = self.param("down_proj", init, (experts, e, hidden), self.dtype)
        parts = None
        if self.has_variable("params", PER_EXPERT):
            views = self.get_variable("params", PER_EXPERT)
            parts = tuple(tuple(views[name]) for name in _STACKED)
        return gate, up, down, parts
