"""The examples run end to end (as subprocesses, the way a user runs them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_and_sample_runs_and_learns():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_and_sample.py"),
            "--steps",
            "30",
            "--sample-every",
            "10",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    losses = [float(x) for x in re.findall(r"^step\s+\d+\s+loss\s+([0-9.]+)$", out, re.M)]
    assert len(losses) >= 2, out
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    samples = re.findall(r"^\s+sample @ step (\d+): ", out, re.M)
    # Steps 0, 10, 20 (every 10) and 29 (the last), one line per prompt.
    assert {int(s) for s in samples} == {0, 10, 20, 29}, out
