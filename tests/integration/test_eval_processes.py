"""`jaxdecode eval` over two local `jax.distributed` processes: each serves every
other line into its own part file, process 0 merges them; a process killed
mid-run is named by process 0 and a rerun of both resumes from the parts and
ends with the one-process run's records, every line once."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

TEXTS = ["In the beginning", "And God said", "The LORD is my", "Blessed", "Let there be"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _wait(predicate, what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_eval_over_two_processes_survives_a_kill_and_equals_one_process(tmp_path):
    prompts = tmp_path / "p.jsonl"
    with open(prompts, "w") as f:
        for i in range(12):
            line = {"id": i, "prompt": TEXTS[i % 5] * (1 + i % 2)}
            line["max_new_tokens"] = (8, 24, 40)[i % 3]
            if i % 3 == 0:
                line["do_sample"] = False
            f.write(json.dumps(line) + "\n")
    cli = [sys.executable, "-m", "jaxdecode.cli", "eval", str(prompts)]
    common = ["--batch_size", "2", "--steps_per_call", "4"]
    one = tmp_path / "one.jsonl"
    res = subprocess.run(
        [*cli, "-o", str(one), *common, "--quiet"], env=ENV, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]

    out = tmp_path / "multi.jsonl"

    def start(pid: int, port: int, quiet: bool = True):
        flags = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2"]
        cmd = [*cli, "-o", str(out), *common, *flags, "--process_id", str(pid)]
        return subprocess.Popen(
            cmd + (["--quiet"] if quiet else []),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # Run 1: process 1 is killed once it has written some of its lines; process 0
    # serves its share and names the process it waits for.
    port = _free_port()
    p1, p0 = start(1, port), start(0, port)
    part0, part1 = (tmp_path / f"multi.jsonl.part-{i}" for i in (0, 1))
    _wait(lambda: part1.exists() and len(_lines(part1)) >= 1, "process 1's first lines")
    p1.send_signal(signal.SIGKILL)
    p1.communicate()
    assert len(_lines(part1)) < 6
    _wait(lambda: part0.exists() and len(_lines(part0)) == 6, "process 0's share")
    time.sleep(2)
    p0.send_signal(signal.SIGKILL)
    _, err0 = p0.communicate()
    assert re.search(r"waiting for process 1 \(.*multi\.jsonl\.part-1: \d of its 6 lines\)", err0)
    assert not out.exists()

    # Run 2: both again; each resumes its own part, process 0 merges.
    port = _free_port()
    p1, p0 = start(1, port, quiet=False), start(0, port)
    _, err1 = p1.communicate(timeout=600)
    _, err0 = p0.communicate(timeout=600)
    assert p0.returncode == 0 and p1.returncode == 0, (err0[-2000:], err1[-2000:])
    assert re.search(r"\([1-5] were already there\)", err1)  # resumed, not redone
    assert not part0.exists() and not part1.exists()
    merged, alone = _lines(out), {r["id"]: r for r in _lines(one)}
    assert [r["id"] for r in merged] == list(range(12))  # every line once, in file order
    for r in merged:
        want = alone[r["id"]]
        got_out, want_out = r.pop("outputs"), want.pop("outputs")
        assert r == want
        for a, b in zip(got_out, want_out, strict=True):
            # Other rows beside it in a batch: the last float32 digit may differ.
            np.testing.assert_allclose(a.pop("token_logprobs"), b.pop("token_logprobs"), atol=1e-5)
            assert a == b


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_processes", "2"], "--num_processes and --process_id need --coordinator_address"),
        (
            ["--coordinator_address", "127.0.0.1:1", "--num_processes", "2", "--process_id", "2"],
            r"--process_id must be in \[0, --num_processes - 1\] = \[0, 1\], got 2",
        ),
        (
            ["--coordinator_address", "127.0.0.1:1", "--distributed"],
            "give --distributed or --coordinator_address, not both",
        ),
    ],
)
def test_distributed_flags_are_checked(tmp_path, capsys, flags, message):
    from jaxdecode.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": 0, "prompt": "In"}) + "\n")
    assert main(["eval", str(prompts), "-o", str(tmp_path / "o.jsonl"), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
