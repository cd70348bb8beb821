"""Runs in its own process with 8 CPU devices (tests/integration/test_sharding.py starts it):
sharded generate on every mesh against the single-device run, and the bytes
each device holds ("gpt2"); the GQA Llama of llama_mesh_worker.py ("llama");
`jaxdecode eval` on a mesh and on one device, in this process ("cli"). One
process for the three (each process costs a start of JAX and its compilations).
Prints one JSON object.

Usage: python tests/support/workers/mesh_worker.py DIR  (XLA_FLAGS set by the caller)
"""

from __future__ import annotations

import contextlib
import io
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


def run() -> dict:
    """Greedy, beam and sampled generate on one device and on each mesh, and
    the bytes of the weights and of the cache each device holds."""
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
    return out


def cli_runs(tmp: str) -> dict:
    """`jaxdecode eval` (the bundled model, 4 prompts, greedy) on a data=4 x
    model=2 mesh and on one device: each one's records and exit code; and the
    exit code and stderr of a mesh that does not fit the 8 devices."""
    from jaxdecode.cli import main as cli

    prompts = os.path.join(tmp, "p.jsonl")
    with open(prompts, "w") as f:
        for i, text in enumerate(["In the beginning", "And God said", "The LORD is", "Blessed"]):
            f.write(json.dumps({"id": i, "prompt": text}) + "\n")
    out: dict = {}
    for name, extra in (("mesh", ["--mesh", "data=4,model=2"]), ("single", [])):
        path = os.path.join(tmp, f"{name}.jsonl")
        argv = ["eval", prompts, "-o", path, "--batch_size", "4", "--max_new_tokens", "12"]
        code = cli(argv + ["--no-do_sample", "--quiet", *extra])
        with open(path) as f:
            out[name] = {"code": code, "records": [json.loads(line) for line in f]}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli(["eval", prompts, "-o", os.path.join(tmp, "x"), "--mesh", "data=3"])
        except SystemExit as e:  # argparse's refusal of the option
            code = e.code
    out["odd"] = {"code": code, "stderr": err.getvalue()}
    return out


def main() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from llama_mesh_worker import run as llama_run

    out = {"gpt2": run(), "llama": llama_run(), "cli": cli_runs(sys.argv[1])}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
