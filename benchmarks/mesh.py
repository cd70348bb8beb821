"""Sharded decoding: per-device memory and throughput of `generate(..., mesh=...)`.

Decodes the same batch on every (data, model) mesh that fits the devices and
prints, per mesh: the bytes one device holds of the weights and of the KV
cache (read from the arrays' shardings), tokens/s, compile time, and whether
the tokens equal the single-device run's.

On a CPU without several devices, `--devices 8` splits the host into 8 XLA
devices (`--xla_force_host_platform_device_count`): the memory split is the
real one, the throughput only shows the cost of the collectives on a shared
CPU. On a multi-GPU or TPU host the script runs unchanged on the real devices.

    python benchmarks/mesh.py --devices 8                 # GPT-2 small, random weights
    python benchmarks/mesh.py --quick --devices 8         # tiny model, smoke run

Then the continuous-batching engine (`Engine(mesh=...)`) on meshes of 1, 2, 4 and
8 of the devices: tokens/s and the slot cache each device holds. On a lent GPU or
TPU host: `python benchmarks/mesh.py --batch 64 --prompt-len 128 --new-tokens 128
--json mesh.json` (no `--devices`: the real devices).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=0, help="split the CPU into N devices")
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="timed runs, median reported")
    p.add_argument("--json", help="write the records here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
    import jax
    import numpy as np

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import common

    import jaxdecode as jd
    from jaxdecode import generation, sharding
    from jaxdecode.models.gpt2 import init_params
    from jaxdecode.search import prefill_program

    if args.quick:
        cfg = jd.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=8)
        args.prompt_len, args.new_tokens, args.runs = 8, 8, 1
    else:
        cfg = jd.GPT2Config(n_positions=1024)  # GPT-2 small: 124 M parameters
    params = init_params(cfg, jax.random.key(0))
    lm = jd.CausalLM(params=params, decoder=jd.gpt2_decoder(cfg), config=cfg)
    n = jax.device_count()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    config = jd.GenerationConfig(max_new_tokens=args.new_tokens, pad_token_id=0)

    meshes = [(None, None)] + [(d, n // d) for d in range(n, 0, -1) if n % d == 0]
    reference = None
    records = []
    for d, m in meshes:
        mesh = None if d is None else jd.make_mesh(d, m)
        placed = (
            lm
            if mesh is None
            else lm.replace(params=jd.shard_params(lm.params, mesh, lm.decoder.param_specs))
        )
        t0 = time.perf_counter()
        out = jd.generate(placed, ids, config=config, mesh=mesh)
        out.sequences.block_until_ready()
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = jd.generate(placed, ids, config=config, mesh=mesh)
            out.sequences.block_until_ready()
            times.append(time.perf_counter() - t0)
        seconds = float(np.median(times))
        seqs = np.asarray(out.sequences)
        if reference is None:
            reference = seqs
        req = generation.prepare(placed, ids, None, config, key=jax.random.key(0), mesh=mesh)
        params = req.plan.decoder.prepared(req.params, req.plan.rows)
        _, state = jax.jit(prefill_program, static_argnums=0)(req.plan, params, *req.args()[1:])
        rec = {
            "mesh": "single device" if mesh is None else f"data={d},model={m}",
            "param_mb_per_device": sharding.per_device_bytes(placed.params) / 2**20,
            "cache_mb_per_device": sharding.per_device_bytes((state.cache.k, state.cache.v))
            / 2**20,
            "tokens_per_s": args.batch * args.new_tokens / seconds,
            "ms_per_step": seconds / args.new_tokens * 1e3,
            "compile_s": max(first - seconds, 0.0),
            "same_tokens": bool(np.array_equal(seqs, reference)),
        }
        records.append(rec)
        print(
            f"{rec['mesh']:>22}  params {rec['param_mb_per_device']:8.1f} MB/device  "
            f"cache {rec['cache_mb_per_device']:7.2f} MB/device  "
            f"{rec['tokens_per_s']:8.1f} tok/s  compile {rec['compile_s']:5.1f} s  "
            f"same tokens: {rec['same_tokens']}",
            flush=True,
        )
    engine_records = engine_meshes(args, jd, sharding, lm, ids, config, np, jax)
    if args.json:
        data = {
            "machine": {
                **common.host_info(),
                "devices": n,
                "device_kind": jax.devices()[0].device_kind,
            },
            "settings": vars(args),
            "records": records,
            "engine_records": engine_records,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        print(f"wrote {args.json}")
    same = all(r["same_tokens"] for r in records + engine_records)
    return 0 if same else 1


def engine_meshes(args, jd, sharding, lm, ids, config, np, jax) -> list[dict]:
    """The continuous-batching engine (`--batch` slots, twice as many prompts, so
    that slots are refilled) on meshes of 1, 2, 4 and 8 of the devices (those that
    exist): data only, and data x model=2; tokens/s, the slot cache each device
    holds, and whether every prompt's tokens equal the single-device engine's."""
    prompts = [row.tolist() for row in np.concatenate([ids, ids[:, ::-1]])]
    devices = jax.devices()
    shapes = [(None, None)]
    for k in (1, 2, 4, 8):
        if k <= len(devices) and args.batch % k == 0:
            shapes.append((k, 1))
        if 2 <= k <= len(devices) and args.batch % (k // 2) == 0:
            shapes.append((k // 2, 2))
    reference, records = None, []
    max_len = args.prompt_len + args.new_tokens
    for d, m in shapes:
        mesh = None if d is None else jd.make_mesh(d, m, devices[: d * m])
        placed = (
            lm
            if mesh is None
            else lm.replace(params=jd.shard_params(lm.params, mesh, lm.decoder.param_specs))
        )
        # The dense slots, as its results were measured (a pool of pages, the
        # default, is whole on every data shard: its bytes per device do not
        # fall with `data`).
        engine = jd.Engine(
            placed, slots=args.batch, max_len=max_len, config=config, mesh=mesh, page_size=None
        )
        t0 = time.perf_counter()
        engine.submit(prompts)
        first = {r.index: r.tokens.tolist() for r in engine}  # compiles
        compiled = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.submit(prompts)
        got = {r.index - len(prompts): r.tokens.tolist() for r in engine}
        seconds = time.perf_counter() - t0
        tokens = [got[i] for i in range(len(prompts))]
        if reference is None:
            reference = tokens
        rec = {
            "mesh": "single device" if mesh is None else f"data={d},model={m}",
            "devices": 1 if mesh is None else d * m,
            "cache_mb_per_device": engine.cache_bytes_per_device / 2**20,
            "tokens_per_s": sum(len(t) for t in tokens) / seconds,
            "compile_s": max(compiled - seconds, 0.0),
            "same_tokens": tokens == reference and first == got,
        }
        records.append(rec)
        print(
            f"engine {rec['mesh']:>22}  cache {rec['cache_mb_per_device']:7.2f} MB/device  "
            f"{rec['tokens_per_s']:8.1f} tok/s  compile {rec['compile_s']:5.1f} s  "
            f"same tokens: {rec['same_tokens']}",
            flush=True,
        )
    return records


if __name__ == "__main__":
    sys.exit(main())
