"""Unit tests of the benchmark package `benchmarks/compare/` (no timed runs).

The end-to-end run is `tests/test_compare_hf_smoke.py`; these check the pieces
that a new model family or peer relies on: model sizes read from transformers'
own configs, the random checkpoint a spec creates, the command line's defaults,
the Markdown table and the result file names, and that the worker module
imports without JAX or torch (a peer's worker runs in an environment that may
lack either).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from compare import cli, models, tables, workloads  # noqa: E402
from compare.harness import Settings, kv_bytes_per_step  # noqa: E402
from compare.workers import TransformersWorker  # noqa: E402


def test_geometry_gpt2_matches_transformers() -> None:
    config = transformers.GPT2Config(n_layer=3, n_embd=96, n_head=6, vocab_size=500)
    g = models.geometry(config.to_dict())
    assert (g.layers, g.hidden, g.heads, g.vocab_size) == (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.vocab_size,
    )
    assert g.kv_width == config.hidden_size  # multi-head attention
    assert g.max_positions == config.n_positions


def test_geometry_llama_gqa_matches_transformers_cache() -> None:
    """Grouped-query attention: the KV width is what transformers' cache holds per position."""
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
    )
    g = models.geometry(config.to_dict())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.inference_mode():
        out = model(torch.zeros((1, 5), dtype=torch.long), use_cache=True)
    layer = out.past_key_values.layers[0]
    # keys: [batch, kv_heads, positions, head_dim]
    assert layer.keys.shape[1] * layer.keys.shape[3] == g.kv_width
    assert len(out.past_key_values.layers) == g.layers
    assert g.max_positions == 256 and g.vocab_size == 300
    # Two layers, 1 row, average 4 + 2 / 2 positions, keys and values, float32.
    expected = sum(2 * lay.keys.numel() * 4 for lay in out.past_key_values.layers)
    assert kv_bytes_per_step(g.layers, 1, 4, 2, g.kv_width, 4) == expected


def test_random_checkpoint_is_gpt2_of_the_config(tmp_path: Path) -> None:
    """The gpt2-tiny spec's checkpoint is bitwise `GPT2LMHeadModel(GPT2Config(**config))`
    after `torch.manual_seed(0)`, as the script made it before model specs existed."""
    spec = models.MODELS["gpt2-tiny"]
    threads = torch.get_num_threads()
    try:
        worker = TransformersWorker()
        assert worker.cmd_make_checkpoint(str(tmp_path / "m"), spec.name) == {"created": True}
        assert worker.cmd_make_checkpoint(str(tmp_path / "m"), spec.name) == {"created": False}
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(spec.seed)
    expected = transformers.GPT2LMHeadModel(transformers.GPT2Config(**spec.config)).state_dict()
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name].numpy(), value.numpy(), err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_parse_args_defaults() -> None:
    full = cli.parse_args([])
    assert full.model == "gpt2-small" and full.workloads == list(workloads.DEFAULT_WORKLOADS)
    assert full.model_dir == models.MODELS["gpt2-small"].default_dir()
    assert (full.prompt_len, full.new_tokens, full.runs, full.workers) == (
        32,
        128,
        3,
        "per-workload",
    )
    quick = cli.parse_args(["--quick"])
    assert quick.model == "gpt2-tiny" and quick.model_dir.name == "gpt2-tiny-random"
    assert (quick.prompt_len, quick.new_tokens, quick.runs, quick.workers) == (8, 8, 1, "shared")
    explicit = cli.parse_args(["--quick", "--model", "gpt2-small", "--runs", "2"])
    assert explicit.model == "gpt2-small" and explicit.runs == 2
    assert cli.parse_args(["--workloads", "greedy_b64"]).workloads == ["greedy_b64"]
    assert workloads.WORKLOADS["greedy_b64"].rows == 64


@pytest.mark.parametrize(
    "argv",
    [
        ["--peer", "none", "hf"],
        ["--runs", "0"],
        ["--model", "nope"],
        ["--hf-python", "/nonexistent"],
    ],
)
def test_parse_args_refuses(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(argv)


def _record(workload: str, do_sample: bool, parity: bool | None) -> dict:
    return {
        "workload": workload,
        "do_sample": do_sample,
        "jaxdecode_ms_per_step": 2.0,
        "transformers_ms_per_step": 3.0,
        "ratio": 1.5,
        "jaxdecode_tokens_per_s": 500.0,
        "transformers_tokens_per_s": 333.3,
        "jaxdecode_mbu": 0.9,
        "transformers_mbu": 0.6,
        "jaxdecode_compile_s": 2.25,
        "jaxdecode_peak_mb": 700.0,
        "transformers_peak_mb": 800.0,
        "parity": parity,
    }


def test_markdown_table() -> None:
    text = tables.markdown_table(
        [_record("greedy_b1", False, True), _record("beam4_b1", False, False)]
        + [_record("sample_b1", True, None)]
    )
    lines = text.splitlines()
    assert len(lines) == 5
    assert all(line.count("|") == 13 for line in lines)
    assert lines[2] == (
        "| greedy_b1 | 2.00 | 3.00 | 1.50 | 500 | 333 | 90% | 60% | 2.2 | 700 | 800 "
        "| tokens identical |"
    )
    assert lines[3].endswith("| differ |") and lines[4].endswith("| – |")


def test_default_json_path_keeps_the_old_names() -> None:
    def settings(model: str, quick: bool, dtype: str = "float32") -> Settings:
        args = cli.parse_args(["--model", model, "--dtype", dtype] + (["--quick"] if quick else []))
        return cli.settings_from_args(args)

    results = Path("r")
    assert tables.default_json_path(
        results, "cpu", settings("gpt2-small", False), "gpt2-small"
    ) == (results / "compare_hf_cpu_float32.json")
    path = tables.default_json_path(
        results, "gpu", settings("gpt2-tiny", True, "bfloat16"), "gpt2-small"
    )
    assert path == results / "compare_hf_gpu_bfloat16_gpt2-tiny_quick.json"


def test_workers_import_without_jax_or_torch() -> None:
    """The hf-flax and transformers workers may run in environments without jaxdecode,
    JAX or torch: the package must import none of them until a worker starts."""
    code = (
        "import sys, compare.cli, compare.workers;"
        "bad = {'jax', 'torch', 'transformers', 'jaxdecode'} & set(sys.modules);"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_gpu_script_dry_run(tmp_path: Path) -> None:
    """`benchmarks/gpu.sh --dry-run` runs its comparison on the CPU (tiny model, one
    workload, one dtype) and writes the JSON and the Markdown summary it would on a GPU."""
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        DTYPES="bfloat16",
        WORKLOADS="greedy_b64",
        BUDGET_S="500",
    )
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
        cwd=tmp_path,  # the script finds the repository itself
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = tmp_path / "compare_hf_cpu_gpt2-tiny_bfloat16_dry_run.json"
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["settings"]["dtype"] == data["settings"]["hf_dtype"] == "bfloat16"
    assert data["settings"]["hf_python"] == sys.executable
    assert data["machine"]["transformers_device"] == "cpu"
    [record] = data["records"]
    assert record["workload"] == "greedy_b64" and record["batch"] == 64
    assert record["jaxdecode_dtype"] == record["transformers_dtype"] == "bfloat16"
    assert record["jaxdecode_new_tokens_ok"] and record["transformers_new_tokens_ok"]
    summary = (tmp_path / "compare_hf_cpu_dry_run_summary.md").read_text(encoding="utf-8")
    assert "## gpt2-tiny, bfloat16" in summary and "| greedy_b64 |" in summary
    assert summary in proc.stdout  # printed at the end
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, "compare_hf_cpu_dry_run_summary.md"]
    )
