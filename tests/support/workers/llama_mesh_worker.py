"""Runs with 8 CPU devices (`run()`, from tests/support/workers/mesh_worker.py, which
tests/integration/test_sharding.py starts): a tiny Llama with grouped-query attention -- 8 query heads over 2 KV heads, so
the KV heads do not divide the model axis on meshes (2, 4) and (1, 8) -- decoded
with greedy and beam search on several meshes, against the single-device run.
Prints one JSON object.

Usage: python tests/support/workers/llama_mesh_worker.py  (XLA_FLAGS set by the caller)
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxdecode as jd  # noqa: E402
from jaxdecode.models.llama import LlamaConfig, init_params, llama_decoder  # noqa: E402

MESHES = [(4, 2), (2, 4), (1, 8)]


def tiny_model() -> jd.CausalLM:
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
    )
    params = init_params(cfg, jax.random.key(0))
    # Wider weights than the 0.02 init: peaked logits, so that no near-tie can
    # flip between two reduction orders.
    params = jax.tree_util.tree_map(lambda x: x * 15.0 if x.ndim == 2 else x, params)
    return jd.CausalLM(params=params, decoder=llama_decoder(cfg), config=cfg)


CONFIGS = {
    "greedy": jd.GenerationConfig(max_new_tokens=10, pad_token_id=0),
    "beam": jd.GenerationConfig(num_beams=3, max_new_tokens=8, pad_token_id=0, eos_token_id=7),
}


def run() -> dict:
    """Greedy and beam search on one device and on each mesh, and the layouts."""
    assert jax.device_count() == 8, jax.devices()
    lm = tiny_model()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 512, (8, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    out: dict = {"single": {}, "meshes": {}}
    for name, cfg in CONFIGS.items():
        out["single"][name] = np.asarray(jd.generate(lm, ids, mask, cfg).sequences).tolist()
    for d, m in MESHES:
        mesh = jd.make_mesh(d, m)
        rec: dict = {}
        for name, cfg in CONFIGS.items():
            rec[name] = np.asarray(jd.generate(lm, ids, mask, cfg, mesh=mesh).sequences).tolist()
        placed = jd.shard_params(lm.params, mesh, lm.decoder.param_specs)
        rec["k_proj_spec"] = str(placed["layers_0"]["self_attn"]["k_proj"]["weight"].sharding.spec)
        cache = lm.decoder.init_cache(8, 16, None)
        specs = jd.cache_specs(cache, mesh)
        rec["cache_spec"] = str(specs.k)
        out["meshes"][f"{d}x{m}"] = rec
    return out


def main() -> None:
    json.dump(run(), sys.stdout)


if __name__ == "__main__":
    main()
