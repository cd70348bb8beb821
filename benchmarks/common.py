"""Helpers shared by the benchmark scripts: machine facts and process memory.

Standard library only, so that any interpreter can import it (the workers of the
`compare` package may run in virtual environments without jaxdecode: transformers
4.57's Flax generate, or CUDA torch apart from JAX's CUDA libraries in `gpu.sh`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
from typing import Any

__all__ = [
    "cpu_model",
    "current_rss_mb",
    "host_info",
    "load_avg",
    "peak_rss_mb",
    "report",
    "reset_peak_rss",
    "utc_now",
]


def cpu_model() -> str | None:
    """The CPU model name from `/proc/cpuinfo`, or None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def load_avg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or None where unavailable."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def host_info() -> dict[str, Any]:
    """Facts about the host that need no numerical library.

    Returns:
        Processor, CPU model, core count, platform, Python version, date and the
        current load average (other work on the machine skews timings).
    """
    return {
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": utc_now(),
        "load_avg": load_avg(),
    }


def _status_kb(field: str) -> int | None:
    """A `kB` field of `/proc/self/status` (e.g. "VmRSS", "VmHWM"), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_mb() -> float | None:
    """This process's resident set size in MiB (Linux), or None."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Resets this process's peak-RSS mark to its current RSS.

    Linux (>= 4.0) resets `VmHWM` when "5" is written to `/proc/self/clear_refs`.

    Returns:
        True if the mark was reset; False where that is not possible (the peak
        then covers the whole life of the process).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    `VmHWM` (since the last `reset_peak_rss`) where available, else
    `getrusage(RUSAGE_SELF).ru_maxrss` (the whole life of the process; KiB on
    Linux, bytes on macOS).
    """
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def report(result: dict[str, Any], path: str | None) -> None:
    """Prints a benchmark's result as JSON and writes it to `path` (if given)."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
