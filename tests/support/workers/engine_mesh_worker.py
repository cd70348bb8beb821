"""Runs in its own process with 4 CPU devices (tests/integration/test_engine_mesh.py starts
it): the continuous-batching engine on a data=2 x model=2 mesh against the
single-device engine and `generate`, for a tiny GPT-2 and a tiny Llama with
grouped-query attention, 24 mixed prompts each (greedy and sampled with seeds,
lengths 1-20, max_new_tokens 3-10); then, in the same process (one start of
JAX for both), eval_mesh_worker.py's `jaxdecode eval --mesh` ("eval"). Prints
one JSON object.

Usage: python tests/support/workers/engine_mesh_worker.py DIR  (XLA_FLAGS set by the caller)
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxdecode as jd  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from eval_mesh_worker import run as eval_runs  # noqa: E402
from llama_mesh_worker import tiny_model as tiny_llama  # noqa: E402
from mesh_worker import tiny_model as tiny_gpt2  # noqa: E402

BASE = {"pad_token_id": 0, "eos_token_id": 7}
SAMPLE = {"do_sample": True, "top_k": 40, "top_p": 0.8, "temperature": 0.9}


def workload(n: int = 24):
    rng = np.random.default_rng(1)
    prompts, configs = [], []
    for i in range(n):
        prompts.append(rng.integers(1, 512, int(rng.integers(1, 21))).tolist())
        options = {**BASE, "max_new_tokens": int(rng.choice([3, 6, 10]))}
        if i % 2:
            options.update(SAMPLE, seed=1000 + i)
        configs.append(options)
    return prompts, configs


def by_generate(lm, prompts, configs):
    """Each prompt's tokens from `generate`: one left-padded batch per strategy with
    each prompt's own key (`jax.random.key(seed)`, as the engine makes it), cut to
    its own `max_new_tokens` (rows are independent: a row's first tokens do not
    depend on how many follow or on the rows beside it)."""
    out: list = [None] * len(prompts)
    for sample in (False, True):
        rows = [i for i, c in enumerate(configs) if c.get("do_sample", False) == sample]
        width = max(len(prompts[i]) for i in rows)
        ids = np.zeros((len(rows), width), np.int32)
        mask = np.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]) :] = prompts[i]
            mask[r, width - len(prompts[i]) :] = 1
        most = max(configs[i]["max_new_tokens"] for i in rows)
        options = {**BASE, **(SAMPLE if sample else {}), "max_new_tokens": most}
        keys = jax.vmap(jax.random.key)(np.asarray([configs[i].get("seed", 0) for i in rows]))
        res = jd.generate(lm, ids, mask, jd.GenerationConfig(**options), key=keys)
        seqs, lengths = np.asarray(res.sequences), np.asarray(res.lengths)
        for r, i in enumerate(rows):
            n = min(int(lengths[r]), configs[i]["max_new_tokens"])
            out[i] = seqs[r, width : width + n].tolist()
    return out


def run(lm, prompts, configs, mesh, **kw):
    # One prompt bucket (24 columns): one prefill program per engine. The dense
    # slots (pages: `paged_runs`; eval on the mesh runs on pages, the default).
    results = jd.generate_many(
        lm, prompts, configs, slots=4, steps_per_call=4, prompt_buckets=24, mesh=mesh,
        page_size=None, **kw,
    )  # fmt: skip
    return [r.tokens.tolist() for r in results], [r.token_logprobs.tolist() for r in results]


def paged_workload(n: int = 12):
    """`n` prompts sharing a 13-token system prompt (three full pages of 4),
    greedy and sampled with seeds."""
    rng = np.random.default_rng(2)
    head = rng.integers(1, 512, 13).tolist()
    prompts, configs = [], []
    for i in range(n):
        prompts.append(head + rng.integers(1, 512, int(rng.integers(1, 9))).tolist())
        options = {"max_new_tokens": int(rng.choice([3, 6, 10]))}
        if i % 2:
            options["seed"] = 2000 + i
        configs.append(options)
    return prompts, configs


def serve_pages(lm, prompts, configs, mesh, strategies=(False, True), compact=False, **kw):
    """The paged engine (pages of 4, chunks of 8), one engine per strategy
    (greedy, sampled): tokens and log-probabilities in prompt order (None for
    the strategies not run) and prompt tokens taken from the prefix cache."""
    tokens, logps = [None] * len(prompts), [None] * len(prompts)
    prefix = 0
    for sample in strategies:
        rows = [i for i, c in enumerate(configs) if ("seed" in c) == sample]
        config = jd.GenerationConfig(**BASE, **(SAMPLE if sample else {}), **kw)
        engine = jd.Engine(
            lm, slots=4, max_len=48, config=config, steps_per_call=4, prompt_buckets=24,
            mesh=mesh, page_size=4, prefill_chunk=8, compact_tail=compact,
        )  # fmt: skip
        engine.submit([prompts[i] for i in rows], [configs[i] for i in rows])
        for r in engine:
            tokens[rows[r.index]] = r.tokens.tolist()
            logps[rows[r.index]] = r.token_logprobs.tolist()
        prefix += engine.stats.prefix_tokens
    return {"tokens": tokens, "logps": logps, "prefix": prefix}


def paged_runs(lm, mesh) -> dict:
    """The paged engine on the mesh against one device: a float pool greedy
    and sampled (on the mesh with `compact_tail`), an 8-bit quantized pool
    sampled, with prefix hits and chunks; the pool's and the tables' layout;
    the decode program exported for TPU and GPU on the mesh."""
    prompts, configs = paged_workload()
    out: dict = {}
    int8 = {"cache_implementation": "quantized", "cache_config": {"nbits": 8}}
    for name, kw, strategies in (("float", {}, (False, True)), ("int8", int8, (True,))):
        one = serve_pages(lm, prompts, configs, None, strategies, **kw)
        on_mesh = serve_pages(lm, prompts, configs, mesh, strategies, name == "float", **kw)
        both = zip(one["logps"], on_mesh["logps"], strict=True)
        pairs = [(a, b) for a, b in both if a is not None]
        out[name] = {
            "one": one["tokens"], "mesh": on_mesh["tokens"], "prefix": on_mesh["prefix"],
            "one_prefix": one["prefix"], "rows": len(pairs),
            "logp_diff": max(float(np.max(np.abs(np.subtract(a, b)))) for a, b in pairs),
        }  # fmt: skip
    for name, kw in (("float", {}), ("int8", int8)):
        engine = jd.Engine(
            lm, slots=4, max_len=32, config=jd.GenerationConfig(**BASE, **kw), mesh=mesh,
            page_size=4,
        )  # fmt: skip
        cache = engine.state.dec.cache
        cache = getattr(cache, "codes", cache)  # a quantized pool: its code pages
        out[name]["specs"] = [str(cache.k.sharding.spec), str(cache.table.sharding.spec)]
    exported = engine.export(("tpu", "cuda"), max_prompt=4)
    out["export_devices"] = exported["decode"].nr_devices
    return out


def main() -> None:
    assert jax.device_count() == 4, jax.devices()
    mesh = jd.make_mesh(data=2, model=2)
    prompts, configs = workload()
    out: dict = {"prompts": len(prompts)}
    for name, lm in (("gpt2", tiny_gpt2()), ("llama", tiny_llama())):
        one_tokens, one_logps = run(lm, prompts, configs, None)
        mesh_tokens, mesh_logps = run(lm, prompts, configs, mesh)
        # The tail compacted into states of 1 slot (fewer than the data axis: replicated).
        tail = run(lm, prompts, configs, mesh, compact_tail=True)[0] if name == "gpt2" else None
        engine = jd.Engine(
            lm, slots=4, max_len=48, config=jd.GenerationConfig(**BASE), mesh=mesh, page_size=None
        )
        out[name] = {
            "generate": by_generate(lm, prompts, configs),
            "one": one_tokens,
            "mesh": mesh_tokens,
            "compact_tail": tail,
            "logp_diff": max(
                float(np.max(np.abs(np.subtract(a, b)), initial=0.0))
                for a, b in zip(one_logps, mesh_logps, strict=True)
            ),
            "cache_spec": str(engine.state.dec.cache.k.sharding.spec),
            "logits_spec": str(engine.state.dec.logits.sharding.spec),
            "max_new_spec": str(engine.state.max_new.sharding.spec),
        }
    # The decode program on the mesh lowers for TPU and GPU (4 devices).
    engine = jd.Engine(
        tiny_gpt2(), slots=4, max_len=32, config=jd.GenerationConfig(**BASE), mesh=mesh,
        page_size=None,
    )  # fmt: skip
    exported = engine.export(("tpu", "cuda"), max_prompt=4)
    out["export_devices"] = {name: e.nr_devices for name, e in exported.items()}
    out["pages"] = paged_runs(tiny_llama(), mesh)
    try:
        jd.Engine(tiny_gpt2(), slots=3, max_len=16, mesh=mesh)
        out["odd_slots"] = None
    except ValueError as e:
        out["odd_slots"] = str(e)
    out["eval"] = eval_runs(sys.argv[1])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
