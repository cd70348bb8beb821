"""Where a mixture-of-experts decode step spends its time: one MoE feed-forward
layer computed several ways, against a dense MLP of the active width, all
interleaved in one process (a loaded machine slows every variant alike; compare
them with each other, never with another run's numbers).

Variants, each `[tokens, hidden]` -> `[tokens, hidden]` after the same router:

* `dense`: one gated MLP of width `top_k * expert_width` (the bytes a routed
  token reads, read once);
* `gathered`: `models.moe.gathered`, a loop over token-expert pairs indexing
  each pair's expert (what a decode step runs while pairs <= experts);
* `grouped`: `models.moe.grouped`, the grouped product (on XLA:CPU a scan over
  the routed experts);
* `take_einsum`: every pair's weights gathered at once (`w[experts]`), then
  batched products;
* `switch`: `lax.switch` over experts per pair, each branch with a static slice
  of the stack (XLA:CPU copies a static slice too);
* `switched`: `models.moe.switched` over one array per expert (what a decode step
  runs on CPU with the host's `expert_views`: each expert read in place).

Reported: the best time of each over `--repeats` interleaved rounds, and its
ratio to `dense`, for each `--tokens` count.

    python benchmarks/moe_layer.py --tokens 1 8 32
    python benchmarks/moe_layer.py --tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import host_info, report  # noqa: E402


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--expert_width", type=int, default=512)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="a tiny smoke run")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.tiny:
        a.hidden, a.experts, a.expert_width, a.top_k = 64, 8, 32, 2
        a.tokens, a.repeats = [1, 4], 3
    return a


def _variants(a: argparse.Namespace):
    import jax
    import jax.numpy as jnp

    from jaxdecode.models.moe import gathered, grouped, route, switched

    k, act = a.top_k, jax.nn.silu

    def take_einsum(x, w, e, gate, up, down):
        flat, rows = e.reshape(-1), jnp.repeat(x, k, axis=0)
        h = act(jnp.einsum("ph,pwh->pw", rows, gate[flat]))
        h = h * jnp.einsum("ph,pwh->pw", rows, up[flat])
        out = jnp.einsum("pw,phw->ph", h, down[flat]) * w.reshape(-1, 1)
        return out.reshape(x.shape[0], k, -1).sum(1)

    def switch(x, w, e, gate, up, down):
        rows = jnp.repeat(x, k, axis=0)

        def branch(i):
            return lambda row: down[i] @ (act(gate[i] @ row) * (up[i] @ row))

        branches = [branch(i) for i in range(gate.shape[0])]
        pairs = [jax.lax.switch(e.reshape(-1)[p], branches, rows[p]) for p in range(rows.shape[0])]
        out = jnp.stack(pairs) * w.reshape(-1, 1)
        return out.reshape(x.shape[0], k, -1).sum(1)

    def routed(compute):
        def fn(x, router, gate, up, down):
            w, e = route(x @ router.T, k, True)
            if compute in (gathered, grouped):
                return compute(x, w, e, gate, up, down, "silu")
            return compute(x, w, e, gate, up, down)

        return jax.jit(fn)

    def dense(x, router, gate, up, down):  # gate, up: [k * width, hidden]
        w, _ = route(x @ router.T, k, True)  # the same router work
        return (act(x @ gate.T) * (x @ up.T)) @ down.T * w.sum(-1, keepdims=True)

    def per_expert(x, router, parts):
        w, e = route(x @ router.T, k, True)
        return switched(x, w, e, parts, "silu")

    moe = {name: routed(f) for name, f in (("gathered", gathered), ("grouped", grouped))}
    moe.update(take_einsum=routed(take_einsum), switch=routed(switch))
    return jax.jit(dense), moe, jax.jit(per_expert)


def main(argv: list[str] | None = None) -> None:
    import jax
    import jax.numpy as jnp

    a = _args(argv)
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(0, 0.02, shape).astype(np.float32))

    h, e, width = a.hidden, a.experts, a.expert_width
    router = normal(e, h)
    stack = (normal(e, width, h), normal(e, width, h), normal(e, h, width))
    dense_w = (normal(a.top_k * width, h), normal(a.top_k * width, h), normal(h, a.top_k * width))
    # One array per expert aliasing the stack, as the host gives them to a program.
    from jaxdecode.models.moe import PER_EXPERT, expert_views

    names = ("gate_proj", "up_proj", "down_proj")
    views = expert_views({"experts": dict(zip(names, stack, strict=True))})["experts"]
    parts = tuple(tuple(views[PER_EXPERT][n]) for n in names)
    dense, moe, per_expert = _variants(a)
    result: dict = {"host": host_info(), "args": vars(a), "ms": {}}
    for tokens in a.tokens:
        x = normal(tokens, h)
        calls = {"dense": lambda x=x: dense(x, router, *dense_w)}
        calls.update({n: (lambda f=f, x=x: f(x, router, *stack)) for n, f in moe.items()})
        calls["switched"] = lambda x=x: per_expert(x, router, parts)
        outs = {n: np.asarray(jax.block_until_ready(c())) for n, c in calls.items()}
        for n in list(moe) + ["switched"]:
            np.testing.assert_allclose(outs[n], outs["gathered"], rtol=1e-4, atol=1e-5)
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(a.repeats):
            for n, c in calls.items():
                t0 = time.perf_counter()
                jax.block_until_ready(c())
                best[n] = min(best[n], time.perf_counter() - t0)
        result["ms"][str(tokens)] = {
            n: {"ms": round(1000 * t, 3), "over_dense": round(t / best["dense"], 2)}
            for n, t in best.items()
        }
    report(result, a.json)


if __name__ == "__main__":
    main()
