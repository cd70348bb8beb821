"""Both ends of the pipe between the benchmark and its worker processes.

Every library runs in its own process (`python -m compare.workers KIND`, see
`workers.py`), so that the libraries never share a heap or thread pools and each
one's memory is measured alone. The parent sends one JSON object per line,
`{"cmd": NAME, **kwargs}`; the worker calls its method `cmd_NAME(**kwargs)` and
answers one JSON line, `{"ok": true, **reply}` or `{"ok": false, "error": traceback}`.
The first line a worker writes is `{"ok": true, "ready": KIND}` (or the error of
its imports).

Standard library only, apart from `common` (the benchmarks' shared helpers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from common import current_rss_mb, peak_rss_mb, reset_peak_rss

__all__ = ["BENCH_DIR", "ROOT", "Worker", "WorkerProcess"]

BENCH_DIR = Path(__file__).resolve().parents[1]
ROOT = BENCH_DIR.parent


class Worker:
    """Base of the worker processes: memory bookkeeping and the command loop.

    A library's worker sets `self.call` in its `cmd_setup` (generate with
    `max_new_tokens=n`, outputs ready when it returns) and overrides the hooks
    `first_call`, `reset_device_peak` and `device_peak_mb` where it can do better
    than the host-only defaults.
    """

    def __init__(self) -> None:
        self.rss_before: float | None = None
        self.peak_scope = "process"
        self.call: Callable[[int], Any] | None = None  # generate(max_new_tokens=n), set up

    def first_call(self, fn: Callable[[], Any]) -> tuple[Any, float, dict[str, float] | None]:
        """Runs `fn` once; returns (output, wall seconds, compile seconds by phase or None)."""
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start, None

    def reset_device_peak(self) -> None:
        """Resets the device's peak-memory mark where the library can (no device here)."""

    def device_peak_mb(self) -> tuple[float | None, str | None]:
        """The device's peak memory in MiB and its scope ("workload", "process"), or Nones."""
        return None, None

    def cmd_setup_one(self) -> dict[str, Any]:
        """First call of the one-new-token generate (compiles it where there is a compiler)."""
        _, first, phases = self.first_call(lambda: self.call(1))
        return {
            "first_call_s": first,
            "compile_s": None if phases is None else sum(phases.values()),
        }

    def cmd_run(self, new_tokens: int) -> dict[str, Any]:
        """One timed generate call (outputs ready when it returns)."""
        start = time.perf_counter()
        self.call(new_tokens)
        return {"seconds": time.perf_counter() - start}

    def cmd_begin_workload(self) -> dict[str, Any]:
        """Resets the peak-RSS mark (and the device peak where the library can)."""
        self.peak_scope = "workload" if reset_peak_rss() else "process"
        self.rss_before = current_rss_mb()
        self.reset_device_peak()
        return {}

    def cmd_memory(self) -> dict[str, Any]:
        """Peak memory since `begin_workload`."""
        device_peak, device_scope = self.device_peak_mb()
        return {
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": self.rss_before,
            "peak_scope": self.peak_scope,
            "device_peak_mb": device_peak,
            "device_peak_scope": device_scope,
        }

    def serve(self, proto: TextIO) -> None:
        """Answers commands from stdin until "exit" or end of input."""
        for line in sys.stdin:
            request = json.loads(line)
            cmd = request.pop("cmd")
            if cmd == "exit":
                break
            try:
                reply = {"ok": True, **getattr(self, "cmd_" + cmd)(**request)}
            except Exception:
                reply = {"ok": False, "error": traceback.format_exc()}
            proto.write(json.dumps(reply) + "\n")
            proto.flush()


class WorkerProcess:
    """The parent's handle on one worker process.

    Args:
        kind: the library ("jd", "hf", "hf-flax"; see `workers.WORKER_KINDS`).
        python: the interpreter to run it with (a peer may live in its own
            virtual environment); it needs NumPy and the library, not jaxdecode.
    """

    def __init__(self, kind: str, python: str = sys.executable) -> None:
        env = dict(os.environ)
        # Two JAX processes may share a GPU with torch: allocate on demand.
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # `compare` and `common` live in benchmarks/; the working directory (the
        # repository root, first on sys.path with -m) provides this checkout's jaxdecode.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p
        )
        self.kind = kind
        self.proc = subprocess.Popen(
            [python, "-m", "compare.workers", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self._ready = False

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the {self.kind} worker exited (status {code}); see its stderr")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"the {self.kind} worker failed:\n{reply['error']}")
        return reply

    def call(self, cmd: str, **payload: Any) -> dict[str, Any]:
        """Sends one command and waits for its reply.

        Args:
            cmd: the command (a `cmd_*` method of the worker).
            **payload: its keyword arguments (JSON-serialisable).

        Returns:
            The reply.
        """
        if not self._ready:
            self._read()
            self._ready = True
        self.proc.stdin.write(json.dumps({"cmd": cmd, **payload}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Asks the worker to exit and waits for it."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
