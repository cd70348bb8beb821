"""Where a batch-1 decode step of SmolLM2-135M spends its time, and the ceiling
XLA:CPU allows: the step's thunks by kind (`jax.profiler`), against a program
of the same weight products alone and the read-bandwidth floor.

Three programs over the real SmolLM2-135M-Instruct weights (`--tiny`: the
random 2-layer Llama of `fused.py`, a smoke run), each `--steps` tokens in one
jitted `fori_loop`, batch 1:

* "model": the decoder's step (`Decoder.apply` on one token, the KV cache
  carried, argmax feeding the next token): what `generate`'s loop runs per
  step, without the processors' bookkeeping.
* "products": the same weight products alone, in the params' layout as loaded
  (`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj` per layer, then the tied
  LM head, here a DotThunk where the step fuses it with the final norm),
  chained through a residual add: no norms, rotary, cache or attention.
  What XLA:CPU reaches with these products bounds what changes to the rest
  of the step can reach.
* the floor: the weight bytes per step / the read bandwidth of one jitted
  vector x matrix product over 256 MB (`fused.read_bandwidth_gbs`).

Wall clock: the two programs alternate, the order rotating every repeat; each
figure is the median (and the best) of `--repeats` calls / `--steps`. On a
loaded machine only ratios within one run mean anything: the JSON records the
load average. Breakdown: `--calls` calls of "model" under `jax.profiler`, the
events of XLA's worker threads grouped by kind (`dot.N`: a DotThunk, Eigen's
matrix-vector product; `*dot_fusion`: a product XLA fused with its producers
and emits itself; `ynn_fusion`: YNNPACK, the attention products; the rest:
small loop fusions), each kind's per-step time summed as each instruction's
minimum over the calls times its count (the uncontended estimate) and as its
median. Thunk counts per step come from the compiled program's loop body.

    python benchmarks/decode_profile.py --json benchmarks/results/decode_profile_cpu.json
    python benchmarks/decode_profile.py --tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import host_info, load_avg, report  # noqa: E402
from fused import load_model, read_bandwidth_gbs  # noqa: E402


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="decode steps per call")
    p.add_argument("--max_len", type=int, default=96, help="cache slots (fused.py: 32 + 64)")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per program")
    p.add_argument("--calls", type=int, default=4, help="profiled calls of the model step")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--tiny", action="store_true", help="a random 2-layer model (smoke run)")
    a = p.parse_args(argv)
    if a.tiny:
        a.steps, a.max_len, a.repeats, a.calls = 2, 16, 2, 1
    return a


def _matvec(x: Any, w: Any) -> Any:
    """`x @ w.T` for `w: [out, in]`, as `layers.Dense` computes it."""
    import jax

    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def _layer_products(layer: dict) -> list[tuple[str, Any]]:
    """`(name, weight [out, in])` of one layer's products in the order a step
    computes them (fused or separate, whichever the params hold)."""
    attn, mlp = layer["self_attn"], layer["mlp"]
    first = ["qkv_proj"] if "qkv_proj" in attn else ["q_proj", "k_proj", "v_proj"]
    up = ["gate_up_proj"] if "gate_up_proj" in mlp else ["gate_proj", "up_proj"]
    return (
        [(n, attn[n]["weight"]) for n in first]
        + [("o_proj", attn["o_proj"]["weight"])]
        + [(n, mlp[n]["weight"]) for n in up]
        + [("down_proj", mlp["down_proj"]["weight"])]
    )


def model_program(lm: Any, steps: int, max_len: int):
    """Jitted `(params, token [1]) -> token [1]`: `steps` decoder steps."""
    import jax
    import jax.numpy as jnp

    dec = lm.decoder

    def run(params, token):
        cache = dec.init_cache(1, max_len, jnp.float32)

        def step(i, carry):
            token, cache = carry
            pos = jnp.full((1, 1), i, jnp.int32)
            logits, cache = dec.apply(
                params, token[:, None], pos, cache, jnp.ones((1, 1), jnp.int32)
            )
            return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, steps, step, (token, cache))[0]

    return jax.jit(run)


def products_program(lm: Any, steps: int):
    """Jitted `(params, token [1]) -> token [1]`: the step's weight products
    alone, chained (each product reads the previous output's first `in`
    columns, the residual adds the hidden-width ones), then the LM head."""
    import jax
    import jax.numpy as jnp

    cfg = lm.config.transformer()
    layers = cfg.num_layers
    hidden = cfg.hidden_size

    def run(params, token):
        def step(i, token):
            emb = params["embed_tokens"]["embedding"]
            x = emb[token][:, None, :]  # [1, 1, hidden]
            for layer in range(layers):
                y = x
                for _, w in _layer_products(params[f"layers_{layer}"]):
                    width = w.shape[1]
                    inp = y[..., :width] if y.shape[-1] >= width else jnp.resize(y, (1, 1, width))
                    y = _matvec(inp, w)
                    if y.shape[-1] == hidden:
                        x = x + y
                        y = x
            head = params["lm_head"]["weight"] if "lm_head" in params else emb
            logits = _matvec(x, head)
            return jnp.argmax(logits[:, 0], -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, step, token)

    return jax.jit(run)


SMALL = "small fusions (norms, rotary, softmax, residual, indices)"


def _kind(name: str) -> str:
    if re.fullmatch(r"dot(\.\d+)?", name):
        return "product: DotThunk (Eigen matrix-vector)"
    if "dot_fusion" in name:
        return "product: fused loop (LM head)"
    if name.startswith("ynn_fusion"):
        return "attention products (YNNPACK)"
    if "dynamic-update-slice" in name:
        return "KV cache write (in place)"
    return SMALL


def profile(fn: Any, args: tuple, calls: int, steps: int) -> dict[str, Any]:
    """Per kind of thunk: instructions, events per step, and ms per step as the
    sum of each instruction's min (and median) duration x its count."""
    import jax

    jax.block_until_ready(fn(*args))
    where = tempfile.mkdtemp(prefix="decode_profile_")
    try:
        with jax.profiler.trace(where):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        path = glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    events: dict[str, list[int]] = collections.defaultdict(list)
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for e in line.events:
                # Executor and loop events contain the thunks' own.
                if e.name.startswith(("ThunkExecutor", "ThreadpoolListener", "end:", "while")):
                    continue
                events[e.name].append(e.duration_ns)
    n = calls * steps

    def add(into: dict[str, float], ds: list[int]) -> None:
        into["instructions"] = into.get("instructions", 0) + 1
        into["per_step"] = into.get("per_step", 0.0) + len(ds) / n
        into["min_ms"] = into.get("min_ms", 0.0) + min(ds) * len(ds) / n / 1e6
        into["median_ms"] = into.get("median_ms", 0.0) + statistics.median(ds) * len(ds) / n / 1e6

    kinds: dict[str, dict[str, float]] = {}
    small: dict[str, dict[str, float]] = {}
    for name, ds in events.items():
        kind = _kind(name)
        add(kinds.setdefault(kind, {}), ds)
        if kind == SMALL:
            add(small.setdefault(re.sub(r"\.\d+$", "", name), {}), ds)
    by_min = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1]["min_ms"]))
    return {
        "kinds": by_min(kinds),
        "small_fusions_top": dict(list(by_min(small).items())[:10]),
        "total_min_ms": sum(k["min_ms"] for k in kinds.values()),
        "total_median_ms": sum(k["median_ms"] for k in kinds.values()),
    }


def loop_thunks(fn: Any, args: tuple) -> dict[str, int]:
    """Instructions of the compiled loop body that run as thunks, by opcode
    (bitcasts, tuples, constants and parameters are free)."""
    text = fn.lower(*args).compile().as_text()
    body = re.search(r"body=%?([\w.\-]+)", text)
    if body is None:
        return {}
    start = text.index(f"%{body.group(1)} ")
    block = text[start : text.index("\n}", start)]
    counts: collections.Counter[str] = collections.Counter()
    for line in block.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%\S+ = .*? ([a-z\-]+)\(", line)
        if m and m.group(1) not in (
            "bitcast",
            "get-tuple-element",
            "tuple",
            "constant",
            "parameter",
        ):
            counts[m.group(1) + ("/ynn" if "__ynn" in line else "")] += 1
    return dict(counts)


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    import jax
    import jax.numpy as jnp

    load_before = load_avg()
    lm = load_model(a.tiny)
    params = lm.params
    token = jnp.zeros((1,), jnp.int32)
    programs = {
        "model": model_program(lm, a.steps, a.max_len),
        "products": products_program(lm, a.steps),
    }
    thunks = {name: loop_thunks(fn, (params, token)) for name, fn in programs.items()}
    for fn in programs.values():
        jax.block_until_ready(fn(params, token))
    times: dict[str, list[float]] = {name: [] for name in programs}
    order = list(programs)
    for i in range(a.repeats):
        for name in order[i % 2 :] + order[: i % 2]:
            start = time.perf_counter()
            jax.block_until_ready(programs[name](params, token))
            times[name].append(time.perf_counter() - start)
    breakdown = profile(programs["model"], (params, token), a.calls, a.steps)
    bandwidth = read_bandwidth_gbs(16 if a.tiny else 256)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    floor_ms = 1000 * weight_bytes / (bandwidth * 1e9)
    ms = {
        n: {
            "median": 1000 * statistics.median(t) / a.steps,
            "best": 1000 * min(t) / a.steps,
        }
        for n, t in times.items()
    }
    result = {
        "model": "tiny-llama" if a.tiny else "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
        "batch": 1,
        "steps": a.steps,
        "max_len": a.max_len,
        "repeats": a.repeats,
        "ms_per_step": ms,
        "read_bandwidth_gbs": bandwidth,
        "weight_bytes": weight_bytes,
        "floor_ms_per_step": floor_ms,
        "fraction_of_floor": {n: floor_ms / v["median"] for n, v in ms.items()},
        "model_over_products": ms["model"]["median"] / ms["products"]["median"],
        "loop_thunks_per_step": thunks,
        "model_breakdown_ms_per_step": breakdown,
        "load_avg_before": load_before,
        "load_avg_after": load_avg(),
        "host": host_info(),
    }
    report(result, a.json)


if __name__ == "__main__":
    main()
