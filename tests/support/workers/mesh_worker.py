"""Runs in its own process with 8 CPU devices (tests/integration/test_sharding.py starts it):
sharded generate on every mesh against the single-device run, and the bytes
each device holds. Prints one JSON object.

Usage: python tests/support/workers/mesh_worker.py  (XLA_FLAGS set by the caller)
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxdecode as jd  # noqa: E402
from jaxdecode import generation, sharding  # noqa: E402
from jaxdecode.models.gpt2 import init_params  # noqa: E402
from jaxdecode.search import prefill_program  # noqa: E402

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]


def tiny_model() -> jd.CausalLM:
    cfg = jd.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=8, n_inner=256)
    params = init_params(cfg, jax.random.key(0))
    # Wider weights than GPT-2's 0.02: peaked logits, so that no near-tie can
    # flip between two reduction orders.
    params = jax.tree_util.tree_map(lambda x: x * 15.0 if x.ndim == 2 else x, params)
    return jd.CausalLM(params=params, decoder=jd.gpt2_decoder(cfg), config=cfg)


CONFIGS = {
    "greedy": jd.GenerationConfig(max_new_tokens=12, pad_token_id=0),
    "beam": jd.GenerationConfig(num_beams=3, max_new_tokens=10, pad_token_id=0, eos_token_id=7),
    "sample": jd.GenerationConfig(
        do_sample=True, top_k=40, top_p=0.8, temperature=0.9, max_new_tokens=12, pad_token_id=0
    ),
}


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    lm = tiny_model()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 512, (8, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    key = jax.random.key(3)
    out: dict = {"single": {}, "meshes": {}}
    for name, cfg in CONFIGS.items():
        r = jd.generate(lm, ids, mask, cfg, key=key)
        out["single"][name] = np.asarray(r.sequences).tolist()
    for d, m in MESHES:
        mesh = jd.make_mesh(d, m)
        rec: dict = {}
        for name, cfg in CONFIGS.items():
            r = jd.generate(lm, ids, mask, cfg, key=key, mesh=mesh)
            rec[name] = np.asarray(r.sequences).tolist()
        params = jd.shard_params(lm.params, mesh, lm.decoder.param_specs)
        rec["param_bytes"] = sharding.per_device_bytes(params)
        # The cache the program builds: generate's own prefill, on this mesh.
        req = generation.prepare(lm, ids, mask, CONFIGS["greedy"], key=key, mesh=mesh)
        prefill = jax.jit(prefill_program, static_argnums=0)
        params = req.plan.decoder.prepared(req.params, req.plan.rows)
        _, state = prefill(req.plan, params, *req.args()[1:])
        rec["cache_bytes"] = sharding.per_device_bytes((state.cache.k, state.cache.v))
        rec["cache_spec"] = str(state.cache.k.sharding.spec)
        rec["logits_spec"] = str(state.logits.sharding.spec)
        out["meshes"][f"{d}x{m}"] = rec
    out["param_bytes_total"] = int(sum(x.nbytes for x in jax.tree_util.tree_leaves(lm.params)))
    out["cache_bytes_total"] = int(state.cache.k.nbytes + state.cache.v.nbytes)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
