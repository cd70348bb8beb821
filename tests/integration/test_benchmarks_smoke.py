"""Smoke tests of the scripts in `benchmarks/`: each runs end to end at a tiny
size, then its JSON is checked.

The scripts run in this process (`main(argv)`): one import of JAX, torch and
transformers for the file (~11 CPU seconds a process otherwise); only
`benchmarks/mesh.py`, which must set `XLA_FLAGS` before JAX starts, runs in a
subprocess."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def run_benchmark(script: str, *args: str) -> None:
    """Runs `benchmarks/<script>`'s `main(argv)` in this process; an exception
    (or a non-zero status returned) fails the test."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other by name
    module = importlib.import_module(Path(script).stem)
    status = module.main(list(args))
    assert status in (None, 0) or isinstance(status, dict), status


def test_processors_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "processors.json"
    run_benchmark("processors.py", "--quick", "--json", str(out))
    assert "jaxdecode ms/step" in capsys.readouterr().out

    data = json.loads(out.read_text(encoding="utf-8"))
    machine = data["machine"]
    for field in ("processor", "cpu_count", "jax", "torch", "transformers", "date"):
        assert field in machine, field

    records = data["records"]
    got = {(r["workload"], r["batch"], r["method"]) for r in records}
    assert got == {
        ("sample_topk_topp", 2, "exact"),
        ("sample_topk_topp", 2, "fast"),
        ("sample_topp", 2, "exact"),
        ("sample_topp", 2, "fast"),
        ("greedy_penalties", 2, None),
    }
    assert len(records) == len(got)
    for r in records:
        assert r["vocab"] == 1000
        for field in ("jaxdecode_ms", "transformers_ms", "ratio", "compile_s"):
            assert r[field] > 0, (r, field)
        assert abs(r["ratio"] - r["transformers_ms"] / r["jaxdecode_ms"]) < 1e-9
        # The same processing as transformers: exact methods and greedy match it.
        if r["method"] != "fast":
            assert r["check"]["mask_mismatch"] == 0, r
    greedy = next(r for r in records if r["workload"] == "greedy_penalties")
    assert greedy["check"]["tokens_match"] is True


def test_mesh_benchmark_quick(tmp_path: Path) -> None:
    """benchmarks/mesh.py on 8 CPU devices with a tiny model: every mesh decodes
    the single-device tokens, and the per-device cache shrinks 8-fold; the engine
    too, on meshes of 1, 2, 4 and 8 devices."""
    out = tmp_path / "mesh.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "mesh.py"), "--quick", "--devices", "8"]
        + ["--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["machine"]["devices"] == 8
    records = {r["mesh"]: r for r in data["records"]}
    assert set(records) == {
        "single device",
        "data=8,model=1",
        "data=4,model=2",
        "data=2,model=4",
        "data=1,model=8",
    }
    assert all(r["same_tokens"] for r in records.values())
    single = records["single device"]["cache_mb_per_device"]
    for name in ("data=8,model=1", "data=1,model=8"):
        assert abs(records[name]["cache_mb_per_device"] * 8 - single) < 1e-9
    # The engine on meshes of 1, 2, 4 and 8 devices: every prompt's tokens are one
    # device's, and each device holds a shard of the slot cache (K/V split; the
    # per-slot mask and write index follow the slots only).
    engine = {r["mesh"]: r for r in data["engine_records"]}
    assert {r["devices"] for r in engine.values()} == {1, 2, 4, 8}
    assert all(r["same_tokens"] for r in engine.values())
    one = engine["single device"]["cache_mb_per_device"]
    assert engine["data=2,model=2"]["cache_mb_per_device"] < one / 3
    assert engine["data=8,model=1"]["cache_mb_per_device"] < one / 6


def test_rollout_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "rollout.json"
    run_benchmark("rollout.py", "--quick", "--json", str(out))
    data = json.loads(out.read_text(encoding="utf-8"))
    results = data["results"]
    assert set(results) == {
        "jaxdecode shared",
        "jaxdecode repeated",
        "jaxdecode shared, fast top-p",
        "transformers",
    }
    assert results["jaxdecode shared"]["same_tokens_as_repeated"] is True
    assert results["jaxdecode shared"]["rows_that_differ"] == 0


def test_engine_benchmark_quick(tmp_path: Path) -> None:
    """benchmarks/engine.py on a tiny rigged model: the three contenders give the
    same tokens for every prompt, and outputs end at EOS or at max_new_tokens."""
    out = tmp_path / "engine.json"
    args = [
        "--quick", "--json", str(out), "--prompts", "12", "--max-new-tokens", "16",
        "--max-prompt", "24", "--last-eos", "20", "--gap", "4", "--slots", "4",
        "--layers", "1", "--width", "32", "--heads", "2", "--vocab", "128",
        "--torch-threads", "1",
    ]  # fmt: skip
    run_benchmark("engine.py", *args)
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data["runs"]) == {"engine", "static", "transformers"}
    assert data["same_tokens_in_all"] == 12
    lengths = data["output_lengths"]
    assert 0 < lengths["at_max_new_tokens"] < 12, lengths
    assert data["eos_positions"][-1] == 20
    assert 0 < data["runs"]["engine"]["occupancy"] <= 1


def test_engine_pages_benchmark_quick(tmp_path: Path) -> None:
    """benchmarks/engine.py --pages-check on a tiny random Llama: the samples of
    one prompt take its pages from the prefix cache, and a shared system prompt
    cuts the prefill work."""
    out = tmp_path / "pages.json"
    args = [
        "--quick", "--json", str(out), "--llama", "--page-size", "4", "--pages-check",
        "--prompts", "6", "--shared-prompt", "40", "--system-prompt", "32",
        "--max-new-tokens", "4", "--slots", "4", "--steps-per-call", "4",
        "--layers", "1", "--width", "32", "--heads", "2", "--vocab", "64",
    ]  # fmt: skip
    run_benchmark("engine.py", *args)
    data = json.loads(out.read_text(encoding="utf-8"))["pages_check"]
    group = data["samples_of_one_prompt"]
    assert group["prefix_tokens"] == 15 * 36 and group["ratio"] < 2
    assert data["shared_system_prompt"]["ratio"] > 1.5


def test_grammar_benchmark_quick(tmp_path: Path) -> None:
    """benchmarks/grammar.py on a tiny model: builds, per-step rows and the
    transformers + outlines-core peer, whose greedy runs must agree run to run
    (a host processor reused across runs would carry its rows' states over)."""
    out = tmp_path / "grammar.json"
    run_benchmark("grammar.py", "--quick", "--json", str(out))
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data["build"]) == {"person", "order"}
    assert [row["batch"] for row in data["per_step"]] == [1]
    (peer,) = data["peer"]
    assert peer["tokens"] > 1


def test_moe_benchmark_tiny(tmp_path: Path) -> None:
    """benchmarks/moe.py --tiny: MoE, its dense twin of the active size and
    transformers each decode; the JSON holds the three ms/step and the ratios."""
    out = tmp_path / "moe.json"
    run_benchmark("moe.py", "--tiny", "--json", str(out))
    result = json.loads(out.read_text())
    for key in (
        "jaxdecode_moe_ms_per_step",
        "jaxdecode_dense_ms_per_step",
        "jaxdecode_moe_stacked_ms_per_step",
    ):
        assert result[key] > 0, key
    assert result["transformers_moe_ms_per_step"] > 0
    assert result["moe_params_total"] > result["moe_params_active"] > 0


def test_moe_layer_benchmark_tiny(tmp_path: Path) -> None:
    """benchmarks/moe_layer.py --tiny: every variant of one MoE layer (checked
    equal to the gathered one in the script) and the dense MLP are timed."""
    out = tmp_path / "moe_layer.json"
    run_benchmark("moe_layer.py", "--tiny", "--json", str(out))
    result = json.loads(out.read_text())
    variants = {"dense", "gathered", "grouped", "take_einsum", "switch", "switched"}
    for tokens in ("1", "4"):
        assert set(result["ms"][tokens]) == variants
        assert all(v["ms"] > 0 for v in result["ms"][tokens].values())


def test_kv_quant_benchmark_tiny(tmp_path: Path) -> None:
    """benchmarks/kv_quant.py on SmolLM2 at a tiny size: both caches run, the
    engine's quantized cache is at most 0.3x the float one, and the report names
    how many prompts kept their greedy tokens."""
    out = tmp_path / "kv_quant.json"
    args = ["--max-new-tokens", "4", "--repeat", "1", "--trials", "1", "--slots", "2",
            "--max-len", "96"]  # fmt: skip
    run_benchmark("kv_quant.py", *args, "--json", str(out))
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data["engine"]) == {"float32", "int8"}
    assert data["cache_ratio"] <= 0.3
    assert len(data["prompts"]) == 4 and data["unchanged"].endswith("of 4")


def test_fused_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "fused.json"
    run_benchmark("fused.py", "--tiny", "--json", str(out))
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["same_tokens"]
    assert set(data["decode_ms_per_step"]) == set(data["compile_s"]) == {"fused", "separate"}
    assert "qkv_proj" in data["layouts"]["fused"] and "q_proj" in data["layouts"]["separate"]


def test_decode_profile_benchmark_tiny(tmp_path: Path) -> None:
    """benchmarks/decode_profile.py --tiny: both programs timed, the model
    step's thunks profiled by kind: its 9 weight products (2 layers x qkv, o,
    gate_up, down, and the LM head) as DotThunks once per step."""
    out = tmp_path / "profile.json"
    run_benchmark("decode_profile.py", "--tiny", "--json", str(out))
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data["ms_per_step"]) == {"model", "products"}
    assert data["loop_thunks_per_step"]["products"]["dot"] == 9
    kinds = data["model_breakdown_ms_per_step"]["kinds"]
    products = kinds["product: DotThunk (Eigen matrix-vector)"]
    assert products["instructions"] == 9 and products["per_step"] == 9
    assert data["model_breakdown_ms_per_step"]["total_min_ms"] > 0
