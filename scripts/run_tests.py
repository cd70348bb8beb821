"""Runs the test suite one file per process, N files at a time, and reports each.

    python scripts/run_tests.py            # every tier, 2 files at a time
    python scripts/run_tests.py --tier unit   # tests/unit only (the fast tier)
    python scripts/run_tests.py -j 4 tests/parity/test_llama.py tests/integration/test_gguf.py
    python scripts/run_tests.py --no-skips # CI: a skipped test fails the run

Why not `pytest -n 2`: an xdist worker lives for the whole suite and compiles
thousands of XLA programs; twice in long runs a worker crashed inside XLA's
compiler (a segfault after ~20 minutes of compiling) and pytest-xdist then waited
forever for the lost worker's tests, so CI hit its time limit instead of failing.
A fresh process per file keeps every file's compilations to itself, a crash fails
exactly one file (with its log), and a file that hangs is killed after
`--timeout` seconds. Plain `python -m pytest` still works for development.

The unit tier's files are short (seconds to a minute each) and a process's start
(Python, JAX and jaxdecode imported: ~2.5 CPU seconds) was a tenth of the tier, so
its files run `--unit-batch` (4) to a process: one line per batch, the batch's
files joined by `+`; a crash fails that batch. The other tiers stay one per process.

The tiers (`tests/<tier>/test_*.py`): `unit` (fake or tiny models, no live
reference), `parity` (live transformers / peft on the same weights), `integration`
(the CLI, the engine end to end, meshes and processes, GGUF files, the examples and
the docs). Shared helpers are the `tests/support` package.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Started first so that the long files do not end up alone at the end.
SLOW_FIRST = (
    "test_cli.py",
    "test_gguf.py",
    "test_llama.py",
    "test_grammar.py",
    "test_grammar_generate.py",
    "test_generate_hf.py",
    "test_processors_hf.py",
    "test_config.py",
    "test_sharding.py",
    "test_docs.py",
    "test_processor_properties.py",
)
TIERS = ("unit", "parity", "integration")
SUMMARY = re.compile(r"^(?:=+ )?(\d+ (?:passed|failed|error).*?) in [0-9.]+s", re.MULTILINE)


def run_file(
    paths: list[Path], timeout: float, logs: Path, extra: list[str]
) -> tuple[str, int, float, float]:
    """Runs test files (one, or a batch of unit files) in their own pytest process.

    Returns:
        (summary line, exit code, wall seconds, CPU seconds of the process tree);
        CPU seconds / cores is what the file costs on an otherwise idle machine.
    """
    log = logs / (log_name(paths) + ".log")
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--durations=10", *extra, *map(str, paths)], cwd=ROOT, stdout=out, stderr=out
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    cpu = usage.ru_utime + usage.ru_stime
    found = SUMMARY.findall(log.read_text(errors="replace"))
    if rc < 0 and seconds >= timeout:
        summary = f"killed after {timeout:.0f} s"
    elif rc < 0:
        summary = f"crashed (signal {-rc})"
    else:
        summary = found[-1] if found else f"exit {rc}"
    return summary, rc, seconds, cpu


def log_name(paths: list[Path]) -> str:
    """`test_a` for one file, `test_a+test_b` for a batch."""
    return "+".join(p.stem for p in paths)


def batches(files: list[Path], unit_batch: int) -> list[list[Path]]:
    """The files in run order, the unit tier's `unit_batch` to a process (each
    batch taking every k-th unit file, so that the slow ones spread over them)."""
    unit = [f for f in files if f.parent.name == "unit"]
    count = -(-len(unit) // unit_batch)
    groups = [unit[i::count] for i in range(count)]
    return groups + [[f] for f in files if f.parent.name != "unit"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="test files (default: every tier's)")
    parser.add_argument(
        "--tier", choices=TIERS, default=None, help="only this tier's files (default: all)"
    )
    parser.add_argument("-j", "--jobs", type=int, default=2, help="files run at once")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per process")
    parser.add_argument(
        "--unit-batch", type=int, default=4, help="unit-tier files per process (1: one each)"
    )
    parser.add_argument("--no-skips", action="store_true", help="a skipped test fails the run")
    parser.add_argument("--logs", default=".test-logs", help="one log per file here")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments (one string)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.unit_batch < 1:
        parser.error(f"--unit-batch must be >= 1, got {args.unit_batch}")

    tiers = [args.tier] if args.tier else list(TIERS)
    found = [p for t in tiers for p in sorted((ROOT / "tests" / t).glob("test_*.py"))]
    files = [Path(f).resolve() for f in args.files] or found
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    files.sort(key=lambda p: (rank.get(p.name, len(rank)), p.name))
    groups = batches(files, args.unit_batch)
    logs = ROOT / args.logs
    logs.mkdir(exist_ok=True)
    env_note = f"{len(files)} files in {len(groups)} processes, {args.jobs} at a time"
    print(f"run_tests: {env_note}, logs in {logs}", flush=True)

    start = time.monotonic()
    results: dict[str, tuple[str, int, float, float]] = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            pool.submit(run_file, g, args.timeout, logs, args.pytest_args.split()): g
            for g in groups
        }
        for future in concurrent.futures.as_completed(futures):
            name = log_name(futures[future])
            results[name] = summary, rc, seconds, cpu = future.result()
            mark = "ok  " if rc == 0 else "FAIL"
            line = f"{mark} {seconds:6.1f} s wall {cpu:6.1f} s CPU  {name:30s} {summary}"
            print(line, flush=True)

    failed = [name for name, r in results.items() if r[1] != 0]
    skipped = [name for name, r in results.items() if "skipped" in r[0]]
    cpu_total = sum(r[3] for r in results.values())
    for name in failed:
        text = (logs / (name + ".log")).read_text(errors="replace")
        print(f"\n----- {name} (last 60 lines of {name}.log) -----")
        print("\n".join(text.splitlines()[-60:]))
    total = time.monotonic() - start
    print(
        f"\nrun_tests: {len(groups) - len(failed)}/{len(groups)} processes"
        f" ({len(files)} files) passed in {total:.0f} s ({cpu_total:.0f} CPU seconds)"
    )
    if failed:
        print("run_tests: failed: " + " ".join(failed))
        return 1
    if args.no_skips and skipped:
        print("run_tests: skipped tests (parity tests must run): " + " ".join(skipped))
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
