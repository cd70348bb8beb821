"""Per-step cost of the logits processor chain plus the chooser, jaxdecode vs transformers.

For every workload and batch size the same float32 random logits (fixed seed) go
through

* jaxdecode: one jitted `step(chain, logits, ctx, keys) -> tokens`, the chain passed
  as a pytree argument; compiled once (first call, reported separately), then
  timed call by call with `block_until_ready`;
* transformers: the matching `LogitsProcessorList` in torch on CPU, then
  `torch.multinomial(softmax, 1)` or `argmax`, timed the same way (default
  `torch` threads, `torch.inference_mode`).

Workloads:

* `sample_topk_topp`: temperature(0.7) -> top_k(50) -> top_p(0.9) -> sample,
  jaxdecode with the "exact" and with the "fast" top-k / top-p methods;
* `sample_topp`: temperature(0.7) -> top_p(0.9) -> sample, exact and fast;
* `greedy_penalties`: repetition_penalty(1.2) -> no_repeat_ngram_size(3) -> argmax
  over a 128-token history (the `DecodeContext` is built once, outside the timed
  region, as the decode loop keeps it incrementally).

Outside the timed region every record is also checked against transformers: the
`-inf` masks of the processed logits (sampling workloads) or the chosen tokens
(greedy). `--breakdown` additionally times each processor and the chooser alone.

Usage:
    python benchmarks/processors.py                      # full run, writes the JSON
    python benchmarks/processors.py --batch 1 8 --iters 50
    python benchmarks/processors.py --quick --json /tmp/p.json   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from common import cpu_model as _cpu_model
from common import load_avg as _load_avg
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import jaxdecode as jd

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "processors_cpu.json"
WORKLOADS = ("sample_topk_topp", "sample_topp", "greedy_penalties")
TEMPERATURE = 0.7
TOP_K = 50
TOP_P = 0.9
REPETITION_PENALTY = 1.2
NGRAM_SIZE = 3
HISTORY = 128


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run measures.

    Attributes:
        batches: batch sizes B.
        vocab: vocabulary size V.
        iters: timed iterations per measurement (the median is reported).
        warmup: untimed calls after the first (compiling) one.
        history: tokens of history in the decode context / `input_ids`.
        seed: seed of the logits, the history and both PRNGs.
        breakdown: also time each processor and the chooser alone.
    """

    batches: tuple[int, ...]
    vocab: int
    iters: int
    warmup: int
    history: int
    seed: int
    breakdown: bool


# --------------------------------------------------------------------------- #
# Inputs.
# --------------------------------------------------------------------------- #


def make_logits(batch: int, vocab: int, seed: int) -> np.ndarray:
    """Standard-normal float32 logits `[batch, vocab]`.

    Args:
        batch: rows.
        vocab: vocabulary size.
        seed: generator seed.

    Returns:
        The logits as a numpy array.
    """
    return np.random.default_rng(seed).standard_normal((batch, vocab), dtype=np.float32)


def make_history(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """A `[batch, length]` int64 token history whose second half repeats the first.

    The repetition makes the current 2-token suffix occur earlier in the history,
    so no-repeat-ngram bans at least one token per row (the path is exercised, not
    skipped by an all-False match).

    Args:
        batch: rows.
        length: tokens per row (>= 2).
        vocab: ids are drawn from `[0, vocab)`.
        seed: generator seed.

    Returns:
        The token ids as a numpy array.
    """
    rng = np.random.default_rng(seed + 1)
    half = (length + 1) // 2
    head = rng.integers(0, vocab, (batch, half), dtype=np.int64)
    return np.concatenate([head, head], axis=1)[:, :length]


# --------------------------------------------------------------------------- #
# The two implementations of each workload.
# --------------------------------------------------------------------------- #


def jax_chain(workload: str, method: str | None) -> jd.Chain:
    """The jaxdecode chain of `workload`.

    Args:
        workload: one of `WORKLOADS`.
        method: "exact" or "fast" for the sampling workloads, None for greedy.

    Returns:
        The processor chain.
    """
    if workload == "sample_topk_topp":
        return jd.chain(
            jd.temperature(TEMPERATURE),
            jd.top_k(TOP_K, method=method),
            jd.top_p(TOP_P, method=method),
        )
    if workload == "sample_topp":
        return jd.chain(jd.temperature(TEMPERATURE), jd.top_p(TOP_P, method=method))
    if workload == "greedy_penalties":
        return jd.chain(
            jd.repetition_penalty(REPETITION_PENALTY), jd.no_repeat_ngram_size(NGRAM_SIZE)
        )
    raise ValueError(f"unknown workload {workload!r}")


def hf_processors(workload: str) -> LogitsProcessorList:
    """The transformers processors of `workload`.

    Args:
        workload: one of `WORKLOADS`.

    Returns:
        The `LogitsProcessorList`.
    """
    if workload == "sample_topk_topp":
        return LogitsProcessorList(
            [TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P)]
        )
    if workload == "sample_topp":
        return LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE), TopPLogitsWarper(TOP_P)])
    if workload == "greedy_penalties":
        return LogitsProcessorList(
            [
                RepetitionPenaltyLogitsProcessor(REPETITION_PENALTY),
                NoRepeatNGramLogitsProcessor(NGRAM_SIZE),
            ]
        )
    raise ValueError(f"unknown workload {workload!r}")


def _choose(logits: jax.Array, keys: jax.Array | None) -> jax.Array:
    """Greedy when there are no keys (a static pytree structure), else sampling."""
    return jd.greedy(logits) if keys is None else jd.categorical(keys, logits)


@jax.jit
def step(
    chain: jd.Chain, logits: jax.Array, ctx: jd.DecodeContext, state: Any, keys: jax.Array | None
) -> jax.Array:
    """One decoding step's processing: the chain, then the chooser.

    Args:
        chain: the processor chain (a pytree: its numbers are traced).
        logits: `[batch, vocab]` float32.
        ctx: the decode context.
        state: the chain's state (`chain.init(ctx)`, built once, as the loops do).
        keys: `[batch]` PRNG keys to sample, or None for greedy.

    Returns:
        `[batch]` int32 tokens.
    """
    return _choose(chain(logits, ctx, state), keys)


@jax.jit
def _process(
    chain: jd.LogitsProcessor, logits: jax.Array, ctx: jd.DecodeContext, state: Any = None
) -> jax.Array:
    return chain(logits, ctx, state)


@jax.jit
def _choose_only(logits: jax.Array, keys: jax.Array | None) -> jax.Array:
    return _choose(logits, keys)


def hf_step(
    processors: LogitsProcessorList, input_ids: torch.Tensor, scores: torch.Tensor, sample: bool
) -> torch.Tensor:
    """transformers' processing of one step, as its sampling / greedy loop does it.

    Args:
        processors: the processors.
        input_ids: `[batch, length]` history.
        scores: `[batch, vocab]` float32 logits.
        sample: draw with `torch.multinomial(softmax, 1)`, else `argmax`.

    Returns:
        `[batch]` int64 tokens.
    """
    scores = processors(input_ids, scores)
    if sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)


# --------------------------------------------------------------------------- #
# Timing.
# --------------------------------------------------------------------------- #


def time_calls(fn: Callable[[], Any], iters: int) -> list[float]:
    """Wall time of `iters` calls of `fn`, one by one, in milliseconds.

    Args:
        fn: a call that returns only when its work is done (blocks on the result).
        iters: number of timed calls.

    Returns:
        The per-call times.
    """
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_jax(fn: Callable[[], jax.Array], settings: Settings) -> tuple[float, list[float]]:
    """First call (trace + compile + one run) in seconds, then the ms of each timed call.

    Args:
        fn: the jitted call to time.
        settings: iterations and warm-up.

    Returns:
        `(first_call_s, times_ms)`.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    for _ in range(settings.warmup):
        jax.block_until_ready(fn())
    return first, time_calls(lambda: jax.block_until_ready(fn()), settings.iters)


def time_torch(fn: Callable[[], torch.Tensor], settings: Settings) -> list[float]:
    """The ms of each timed call of a torch call, after `settings.warmup + 1` untimed ones.

    Args:
        fn: the call to time.
        settings: iterations and warm-up.

    Returns:
        The per-call times.
    """
    with torch.inference_mode():
        for _ in range(settings.warmup + 1):
            fn()
        return time_calls(fn, settings.iters)


# --------------------------------------------------------------------------- #
# One workload at one batch size.
# --------------------------------------------------------------------------- #


def _mask_mismatch(ours: jax.Array, ref: torch.Tensor) -> int:
    """Entries where exactly one of the two processed logits is `-inf`."""
    return int(np.sum(np.isneginf(np.asarray(ours)) != np.isneginf(ref.numpy())))


def bench_one(workload: str, batch: int, settings: Settings) -> list[dict[str, Any]]:
    """Times `workload` at batch size `batch`: every jaxdecode method and transformers.

    Args:
        workload: one of `WORKLOADS`.
        batch: batch size.
        settings: sizes, iterations, seed.

    Returns:
        One record per jaxdecode method (transformers' time is shared).
    """
    vocab = settings.vocab
    sample = workload.startswith("sample")
    methods: tuple[str | None, ...] = ("exact", "fast") if sample else (None,)

    logits_np = make_logits(batch, vocab, settings.seed)
    history = make_history(batch, settings.history, vocab, settings.seed)
    logits = jnp.asarray(logits_np)
    keys = jax.random.split(jax.random.key(settings.seed), batch) if sample else None

    # transformers: one measurement, shared by the jaxdecode methods.
    processors = hf_processors(workload)
    scores = torch.from_numpy(logits_np.copy())
    input_ids = torch.from_numpy(history)
    torch.manual_seed(settings.seed)
    hf_times = time_torch(lambda: hf_step(processors, input_ids, scores, sample), settings)
    hf_ms = statistics.median(hf_times)
    with torch.inference_mode():
        hf_scores = processors(input_ids, scores.clone())
        hf_tokens = torch.argmax(hf_scores, dim=-1).numpy()
    hf_stages = _hf_breakdown(processors, input_ids, scores, sample, settings)

    records = []
    for method in methods:
        chain = jax_chain(workload, method)
        ctx = jd.DecodeContext.from_ids(history, vocab_size=vocab)
        state = jax.block_until_ready(jax.jit(chain.init)(ctx))
        compile_s, jd_times = time_jax(
            lambda c=chain, x=ctx, s=state: step(c, logits, x, s, keys), settings
        )
        jd_ms = statistics.median(jd_times)

        processed = _process(chain, logits, ctx, state)
        check: dict[str, Any] = {"mask_mismatch": _mask_mismatch(processed, hf_scores)}
        if not sample:
            tokens = np.asarray(step(chain, logits, ctx, state, keys))
            check["tokens_match"] = bool(np.array_equal(tokens, hf_tokens))
        record: dict[str, Any] = {
            "workload": workload,
            "batch": batch,
            "vocab": vocab,
            "method": method,
            "jaxdecode_ms": jd_ms,
            "transformers_ms": hf_ms,
            "ratio": hf_ms / jd_ms,
            "jaxdecode_min_ms": min(jd_times),
            "transformers_min_ms": min(hf_times),
            "compile_s": compile_s,
            "iters": settings.iters,
            "check": check,
        }
        if settings.breakdown:
            record["breakdown"] = {
                "jaxdecode_ms": _jax_breakdown(chain, logits, ctx, keys, settings),
                "transformers_ms": hf_stages,
            }
        records.append(record)
    return records


def _stage_name(processor: Any) -> str:
    return type(processor).__name__


def _jax_breakdown(
    chain: jd.Chain,
    logits: jax.Array,
    ctx: jd.DecodeContext,
    keys: jax.Array | None,
    settings: Settings,
) -> dict[str, float]:
    """Median ms of each processor alone (on the raw logits) and of the chooser alone."""
    out = {}
    for proc in chain.processors:
        state = jax.block_until_ready(jax.jit(proc.init)(ctx))
        _, times = time_jax(lambda p=proc, s=state: _process(p, logits, ctx, s), settings)
        out[_stage_name(proc)] = statistics.median(times)
    _, times = time_jax(lambda: _choose_only(logits, keys), settings)
    out["chooser"] = statistics.median(times)
    return out


def _hf_breakdown(
    processors: LogitsProcessorList,
    input_ids: torch.Tensor,
    scores: torch.Tensor,
    sample: bool,
    settings: Settings,
) -> dict[str, float] | None:
    """Median ms of each transformers processor alone and of the chooser alone."""
    if not settings.breakdown:
        return None
    out = {}
    for proc in processors:
        times = time_torch(lambda p=proc: p(input_ids, scores), settings)
        out[_stage_name(proc)] = statistics.median(times)
    if sample:
        choose = lambda: torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
    else:
        choose = lambda: torch.argmax(scores, dim=-1)
    out["chooser"] = statistics.median(time_torch(choose, settings))
    return out


# --------------------------------------------------------------------------- #
# Reporting.
# --------------------------------------------------------------------------- #


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were taken.

    Returns:
        Processor, core count, library versions, backend, date and the current
        1/5/15-minute load average (other work on the machine skews the times).
    """
    return {
        "processor": platform.processor(),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_avg": _load_avg(),
    }


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The records as a fixed-width text table.

    Args:
        records: as returned by `bench_one`.

    Returns:
        The table, one line per record, with a header.
    """
    header = (
        f"{'workload':<18} {'B':>3} {'method':<6} {'jaxdecode ms/step':>17} "
        f"{'transformers ms/step':>20} {'ratio':>6} {'compile s':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(
            f"{r['workload']:<18} {r['batch']:>3} {r['method'] or '-':<6} "
            f"{r['jaxdecode_ms']:>17.3f} {r['transformers_ms']:>20.3f} "
            f"{r['ratio']:>6.2f} {r['compile_s']:>9.2f}"
        )
    return "\n".join(lines)


def format_breakdown(records: Sequence[dict[str, Any]]) -> str:
    """The per-stage times of the records that have them, one line per record.

    Args:
        records: as returned by `bench_one` with `breakdown` on.

    Returns:
        The text, empty when no record has a breakdown.
    """
    lines = []
    for r in records:
        if "breakdown" not in r:
            continue
        name = f"{r['workload']} B={r['batch']} {r['method'] or '-'}"
        for lib, stages in r["breakdown"].items():
            parts = ", ".join(f"{k} {v:.3f}" for k, v in stages.items())
            lines.append(f"{name:<30} {lib:<15} {parts}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line.

    Args:
        argv: arguments (default: `sys.argv[1:]`).

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="batch sizes")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary size")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls after compiling")
    parser.add_argument("--history", type=int, default=HISTORY, help="tokens of history")
    parser.add_argument("--seed", type=int, default=0, help="seed of logits, history, PRNGs")
    parser.add_argument(
        "--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), help="what to run"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time each processor and the chooser alone"
    )
    parser.add_argument(
        "--platform", default="cpu", help="JAX platform (default cpu; torch always runs on CPU)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for a smoke test (B=2, V=1000, 16 history tokens, 3 iterations)",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write records")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.vocab, args.iters, args.warmup, args.history = [2], 1000, 3, 1, 16
    if min(args.batch) < 1 or args.vocab < TOP_K or args.iters < 1 or args.history < NGRAM_SIZE:
        parser.error(f"need batch >= 1, vocab >= {TOP_K}, iters >= 1, history >= {NGRAM_SIZE}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints the table and writes the JSON.

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status (0).
    """
    args = parse_args(argv)
    jax.config.update("jax_platforms", args.platform)
    settings = Settings(
        batches=tuple(args.batch),
        vocab=args.vocab,
        iters=args.iters,
        warmup=args.warmup,
        history=args.history,
        seed=args.seed,
        breakdown=args.breakdown,
    )
    load_before = _load_avg()
    records: list[dict[str, Any]] = []
    for workload in args.workloads:
        for batch in settings.batches:
            records.extend(bench_one(workload, batch, settings))
    print(format_table(records))
    if settings.breakdown:
        print("\nper stage, median ms (each stage alone on the raw logits):")
        print(format_breakdown(records))

    machine = machine_info()
    machine["load_avg_before"], machine["load_avg_after"] = load_before, machine.pop("load_avg")
    print(f"\nload average (1, 5, 15 min): before {load_before}, after {machine['load_avg_after']}")
    result = {
        "benchmark": "processors",
        "machine": machine,
        "settings": dataclasses.asdict(settings) | {"workloads": list(args.workloads)},
        "notes": (
            "ms are medians (min_ms: minima) of per-call wall times; ratio = transformers_ms / jaxdecode_ms; "
            "compile_s is the first jaxdecode call (trace + compile + one step); "
            "transformers_ms is one measurement shared by the exact and fast records; "
            "check.mask_mismatch counts entries whose -inf status differs from transformers."
        ),
        "records": records,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
