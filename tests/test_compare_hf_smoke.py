"""Smoke test of `benchmarks/compare_hf.py`: a tiny run end to end, then the JSON.

The script creates a 2-layer random GPT-2 (vocab 1000) in a temporary directory,
decodes 8 tokens after an 8-token prompt with jaxdecode and transformers, and
writes one record per workload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_hf.py"
WORKLOADS = ("greedy_b1", "beam4_b1", "sample_b1")


def test_compare_hf_quick(tmp_path: Path) -> None:
    out = tmp_path / "compare_hf.json"
    model_dir = tmp_path / "m"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--json",
            str(out),
            "--model-dir",
            str(model_dir),
            "--workloads",
            *WORKLOADS,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "jd ms/step" in proc.stdout
    assert (model_dir / "config.json").is_file()

    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["benchmark"] == "compare_hf"
    machine = data["machine"]
    for field in ("cpu_model", "cpu_count", "date", "jax", "torch", "transformers"):
        assert field in machine, field
    assert machine["jax_backend"] == "cpu"
    assert machine["transformers_device"] == "cpu"
    assert data["bandwidth"]["bandwidth_gbs"] > 0
    assert data["model"]["n_layer"] == 2 and data["model"]["vocab_size"] == 1000

    records = data["records"]
    assert [r["workload"] for r in records] == list(WORKLOADS)
    for r in records:
        assert r["prompt_len"] == 8 and r["new_tokens"] == 8 and r["runs"] == 1
        for lib in ("jaxdecode", "transformers"):
            for field in ("ms_per_step", "tokens_per_s", "peak_mb", "mbu", "weight_bytes"):
                assert r[f"{lib}_{field}"] > 0, (r["workload"], lib, field)
            # EOS is off: every library generated exactly new_tokens tokens.
            assert r[f"{lib}_new_tokens_ok"] is True, (r["workload"], lib)
            assert f"{lib}_decode_ms_per_step" in r
            assert r[f"{lib}_kv_bytes_per_step"] > 0
        assert r["jaxdecode_compile_s"] > 0
        assert r["jaxdecode_weight_bytes"] == r["transformers_weight_bytes"]
        assert abs(r["ratio"] - r["transformers_ms_per_step"] / r["jaxdecode_ms_per_step"]) < 1e-9
        expected_mbu = (r["jaxdecode_weight_bytes"] + r["jaxdecode_kv_bytes_per_step"]) / (
            r["jaxdecode_ms_per_step"] / 1e3 * data["bandwidth"]["bandwidth_gbs"] * 1e9
        )
        assert abs(r["jaxdecode_mbu"] - expected_mbu) < 1e-9 * expected_mbu

    by_name = {r["workload"]: r for r in records}
    # Greedy and beam search: token-for-token the same as transformers.
    assert by_name["greedy_b1"]["parity"] is True
    assert by_name["beam4_b1"]["parity"] is True
    assert by_name["sample_b1"]["parity"] is None
    beam = by_name["beam4_b1"]
    # KV bytes: 2 * layers * (batch * beams) * (prompt + new / 2) * n_embd * 4 bytes.
    assert beam["jaxdecode_kv_bytes_per_step"] == 2 * 2 * 4 * (8 + 4) * 64 * 4
