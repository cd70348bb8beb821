"""End-to-end decoding speed of jaxdecode against Hugging Face transformers.

The command line of `benchmarks/compare_hf.py`: options, the run, the tables
printed and the JSON written. What is measured and how: see the package
docstring (`compare/__init__.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common

from .harness import LIB_NAMES, PEERS, RunResult, Settings, run_benchmark
from .models import MODELS
from .protocol import BENCH_DIR, ROOT
from .tables import (
    default_json_path,
    format_decode_table,
    format_table,
    markdown_table,
    result_document,
)
from .workloads import DEFAULT_WORKLOADS, WORKLOADS

__all__ = [
    "DEFAULT_MODEL",
    "QUICK_MODEL",
    "build_parser",
    "main",
    "parse_args",
    "settings_from_args",
]

RESULTS = BENCH_DIR / "results"
DEFAULT_MODEL = "gpt2-small"
QUICK_MODEL = "gpt2-tiny"
DEFAULT_FLAX_PYTHON = ROOT / ".venv-hfflax" / "bin" / "python"
FLAX_VENV_HELP = (
    "python -m venv .venv-hfflax && "
    '.venv-hfflax/bin/pip install "transformers==4.57.*" flax jax torch==2.13.0'
)


def build_parser() -> argparse.ArgumentParser:
    """The options (one flat `add_argument` per option, hence the length)."""
    parser = argparse.ArgumentParser(
        prog="compare_hf.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        choices=list(MODELS),
        default=None,
        help=f"checkpoint to decode (default {DEFAULT_MODEL}; --quick: {QUICK_MODEL}): "
        + "; ".join(f"{m.name}: {m.summary}" for m in MODELS.values()),
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="checkpoint directory, created once if missing (default "
        f"{MODELS[DEFAULT_MODEL].default_dir()}; --quick: {MODELS[QUICK_MODEL].default_dir()})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: 2 layers, n_embd 64, vocab 1000, prompt 8, 8 new tokens, 1 run, "
        "64 MiB bandwidth array, shared workers",
    )
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (128)")
    parser.add_argument(
        "--runs", type=int, default=None, help="timed runs per library, median reported (3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and sampling")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=list(WORKLOADS),
        default=list(DEFAULT_WORKLOADS),
        help=f"what to run (default: {' '.join(DEFAULT_WORKLOADS)})",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="jaxdecode weights and KV cache",
    )
    parser.add_argument(
        "--hf-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="transformers (and hf-flax) weights",
    )
    parser.add_argument(
        "--hf-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="transformers device (auto: cuda when available)",
    )
    parser.add_argument(
        "--peer",
        nargs="+",
        choices=(*PEERS, "none"),
        default=["hf"],
        help="libraries compared with jaxdecode: hf (transformers 5, PyTorch), hf-flax "
        "(transformers 4.57 Flax generate, own venv), none",
    )
    parser.add_argument(
        "--hf-python",
        type=Path,
        default=None,
        help="python that runs the transformers worker (default: this one); e.g. a "
        "virtual environment with CUDA torch kept apart from JAX's CUDA libraries",
    )
    parser.add_argument(
        "--hf-flax-python",
        type=Path,
        default=DEFAULT_FLAX_PYTHON,
        help=f"python of the hf-flax virtual environment (create it with: {FLAX_VENV_HELP})",
    )
    parser.add_argument(
        "--sampling-method",
        choices=("exact", "fast"),
        default="exact",
        help="jaxdecode top_k_method / top_p_method of the sampling workloads",
    )
    parser.add_argument(
        "--no-prefill",
        dest="prefill",
        action="store_false",
        help="skip the one-token runs (no decode ms/step)",
    )
    parser.add_argument(
        "--workers",
        choices=("per-workload", "shared"),
        default=None,
        help="fresh library processes per workload (default; cleanest memory figures) or one "
        "set for the whole run (default with --quick)",
    )
    parser.add_argument(
        "--bw-mb", type=int, default=None, help="MiB copied to measure the bandwidth (1024)"
    )
    parser.add_argument(
        "--pause-s",
        type=float,
        default=0.2,
        help="idle seconds before each timed call, so that the other library's threads, "
        "which may spin-wait after a call, are asleep",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the records (default benchmarks/results/"
        "compare_hf_<platform>_<dtype>[_<model>].json; the model only when not the default)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write the tables as Markdown (README style) to this file",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line.

    Args:
        argv: arguments (default: `sys.argv[1:]`).

    Returns:
        The parsed options, `--quick`'s defaults filled in.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    # --quick changes the defaults; options given explicitly win.
    sizes = dict(prompt_len=8, new_tokens=8, runs=1, bw_mb=64, workers="shared")
    if not args.quick:
        sizes = dict(prompt_len=32, new_tokens=128, runs=3, bw_mb=1024, workers="per-workload")
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.model is None:
        args.model = QUICK_MODEL if args.quick else DEFAULT_MODEL
    if args.model_dir is None:
        args.model_dir = MODELS[args.model].default_dir()
    if args.hf_python is None:
        args.hf_python = Path(sys.executable)
    if args.prompt_len < 1 or args.new_tokens < 1 or args.runs < 1 or args.bw_mb < 1:
        parser.error("need --prompt-len, --new-tokens, --runs and --bw-mb >= 1")
    if "none" in args.peer and len(args.peer) > 1:
        parser.error("--peer none excludes the other peers")
    if "hf" in args.peer and not args.hf_python.is_file():
        parser.error(f"--hf-python {args.hf_python}: no such file")
    return args


def _resolve_peers(args: argparse.Namespace) -> tuple[str, ...]:
    peers = tuple(dict.fromkeys(p for p in args.peer if p != "none"))
    if "hf-flax" in peers and not args.hf_flax_python.is_file():
        print(
            f"hf-flax peer skipped: no python at {args.hf_flax_python}.\n"
            "The Flax generate of transformers 4.57 needs its own virtual environment "
            "(transformers 5 has no Flax); from the repository root:\n"
            f"    {FLAX_VENV_HELP}\n"
            "then pass --hf-flax-python .venv-hfflax/bin/python (the default path).",
            file=sys.stderr,
        )
        peers = tuple(p for p in peers if p != "hf-flax")
    return peers


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The run's `Settings` from parsed options."""
    return Settings(
        model_dir=str(args.model_dir.resolve()),
        workloads=tuple(args.workloads),
        peers=_resolve_peers(args),
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        runs=args.runs,
        seed=args.seed,
        dtype=args.dtype,
        hf_dtype=args.hf_dtype,
        hf_device=args.hf_device,
        sampling_method=args.sampling_method,
        prefill=args.prefill,
        workers=args.workers,
        bw_mb=args.bw_mb,
        pause_s=args.pause_s,
        quick=args.quick,
        hf_flax_python=str(args.hf_flax_python),
        model=args.model,
        hf_python=str(args.hf_python),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints the tables and writes the JSON.

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status (0).
    """
    args = parse_args(argv)
    settings = settings_from_args(args)
    load_before = common.load_avg()
    path = args.json

    def write(result: RunResult) -> dict[str, Any]:
        nonlocal path
        document = result_document(result, settings, load_before)
        if path is None:
            platform = document["machine"].get("jax_backend", "cpu")
            path = default_json_path(RESULTS, platform, settings, DEFAULT_MODEL)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        return document

    # The JSON is rewritten after every workload: a run stopped early (a time
    # limit on a borrowed GPU) keeps what it finished.
    result = run_benchmark(settings, on_record=write)
    records = result.records

    print()
    peer_prefixes = [LIB_NAMES[p] for p in settings.peers]
    if "hf" in settings.peers or not settings.peers:
        print(format_table(records, "transformers"))
    if "hf-flax" in settings.peers:
        print()
        print(format_table(records, "hf_flax"))
    if settings.prefill and settings.new_tokens > 1:
        print()
        print(format_decode_table(records, ["jaxdecode", *peer_prefixes]))

    document = write(result)
    after = document["machine"]["load_avg_after"]
    print(f"\nload average (1, 5, 15 min): before {load_before}, after {after}")
    print(f"wrote {path}")
    if args.markdown is not None:
        tables = []
        if "hf" in settings.peers or not settings.peers:
            tables.append(markdown_table(records, "transformers"))
        if "hf-flax" in settings.peers:
            tables.append(markdown_table(records, "hf_flax"))
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n\n".join(tables) + "\n", encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0
