"""End-to-end decoding speed of jaxdecode against Hugging Face transformers.

The command line of `benchmarks/compare_hf.py`: options, the run, the tables
printed and the JSON written. What is measured and how: see the package
docstring (`compare/__init__.py`).

`--models A B ...` runs the models one after another (each its own run: its own
workers, its own JSON, `compare_hf_<platform>_<dtype>_<model>.json` by default;
with `--json PATH` and several models, `PATH` gets `_<model>` before its suffix).
A size option not given explicitly takes the model's own full-run default
(`ModelSpec.sizes`, e.g. fewer new tokens for the 1B-class shape), else the
global one; `--quick` uses the quick sizes for every model.
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
    format_targets_table,
    markdown_table,
    markdown_targets_table,
    result_document,
)
from .workloads import DEFAULT_WORKLOADS, WORKLOADS

__all__ = [
    "DEFAULT_MODEL",
    "FULL_SIZES",
    "QUICK_MODEL",
    "QUICK_SIZES",
    "build_parser",
    "json_path_for",
    "main",
    "parse_args",
    "settings_from_args",
]

RESULTS = BENCH_DIR / "results"
DEFAULT_MODEL = "gpt2-small"
QUICK_MODEL = "gpt2-tiny"
DEFAULT_FLAX_PYTHON = ROOT / ".venv-hfflax" / "bin" / "python"
# Sizes of a full run and of --quick (explicit options win; a model's `sizes` over FULL_SIZES).
FULL_SIZES = dict(prompt_len=32, new_tokens=128, runs=3, bw_mb=1024, workers="per-workload")
QUICK_SIZES = dict(prompt_len=8, new_tokens=8, runs=1, bw_mb=64, workers="shared")
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
        "--models",
        "--model",
        dest="models",
        nargs="+",
        metavar="MODEL",
        choices=list(MODELS),
        default=None,
        help=f"checkpoints to decode, one run each (default {DEFAULT_MODEL}; --quick: "
        f"{QUICK_MODEL}): " + "; ".join(f"{m.name}: {m.summary}" for m in MODELS.values()),
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="checkpoint directory (one model only), created once if missing (default "
        "benchmarks/.cache/<model>-random; a GGUF model: its package's directory)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: model {QUICK_MODEL} unless --models says otherwise (2 layers, width "
        "64, vocab 1000; llama-tiny the same for Llama), prompt 8, 8 new tokens, 1 run, "
        "64 MiB bandwidth array, shared workers",
    )
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (32)")
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="generated tokens (128; llama-1b-shape: 32)",
    )
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
    # --quick changes the defaults; options given explicitly win (and override a
    # model's own sizes: `explicit` remembers which were given).
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    args.explicit = sorted(name for name in sizes if getattr(args, name) is not None)
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.models is None:
        args.models = [QUICK_MODEL if args.quick else DEFAULT_MODEL]
    args.models = list(dict.fromkeys(args.models))
    if args.model_dir is not None and len(args.models) > 1:
        parser.error("--model-dir takes one model; give each model's run its own command")
    if args.hf_python is None:
        args.hf_python = Path(sys.executable)
    if args.prompt_len < 1 or args.new_tokens < 1 or args.runs < 1 or args.bw_mb < 1:
        parser.error("need --prompt-len, --new-tokens, --runs and --bw-mb >= 1")
    if "none" in args.peer and len(args.peer) > 1:
        parser.error("--peer none excludes the other peers")
    if "hf" in args.peer and not args.hf_python.is_file():
        parser.error(f"--hf-python {args.hf_python}: no such file")
    for name in args.models:
        sizes = MODELS[name].sizes
        if any(value < 1 for value in sizes.values()):
            parser.error(f"model {name}: sizes must be >= 1, got {dict(sizes)}")
        if MODELS[name].is_gguf and "hf-flax" in args.peer:
            parser.error(f"--peer hf-flax cannot load {name} (a GGUF file)")
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


def settings_from_args(args: argparse.Namespace, model: str | None = None) -> Settings:
    """The `Settings` of one model's run from parsed options.

    Args:
        args: as `parse_args` returns them.
        model: which of `args.models` (default: the first).

    Returns:
        The settings: the model's own sizes (`ModelSpec.sizes`) for a full run
        where no option was given explicitly.
    """
    model = model or args.models[0]
    spec = MODELS[model]
    sizes = {name: getattr(args, name) for name in ("prompt_len", "new_tokens", "runs")}
    if not args.quick:
        sizes |= {k: v for k, v in spec.sizes.items() if k not in args.explicit}
    model_dir = args.model_dir if args.model_dir is not None else spec.default_dir()
    return Settings(
        model_dir=str(model_dir.resolve()),
        workloads=tuple(args.workloads),
        peers=_resolve_peers(args),
        prompt_len=sizes["prompt_len"],
        new_tokens=sizes["new_tokens"],
        runs=sizes["runs"],
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
        model=model,
        hf_python=str(args.hf_python),
    )


def json_path_for(path: Path, model: str, several: bool) -> Path:
    """`--json PATH` for one model's run: PATH itself, or with `_<model>` before its
    suffix when the command runs several models."""
    return path.with_name(f"{path.stem}_{model}{path.suffix}") if several else path


def _run_model(args: argparse.Namespace, model: str) -> tuple[list[str], Path]:
    """One model's run: prints its tables, writes its JSON.

    Returns:
        Its Markdown tables (for `--markdown`) and the JSON's path.
    """
    settings = settings_from_args(args, model)
    several = len(args.models) > 1
    if several:
        print(f"\n=== {model}: {MODELS[model].summary} ===", flush=True)
    load_before = common.load_avg()
    path = None if args.json is None else json_path_for(args.json, model, several)

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
    if any(r["targets"] for r in records):
        print()
        print(format_targets_table(records))

    document = write(result)
    after = document["machine"]["load_avg_after"]
    print(f"\nload average (1, 5, 15 min): before {load_before}, after {after}")
    print(f"wrote {path}")
    tables = []
    if "hf" in settings.peers or not settings.peers:
        tables.append(markdown_table(records, "transformers"))
    if "hf-flax" in settings.peers:
        tables.append(markdown_table(records, "hf_flax"))
    if any(r["targets"] for r in records):
        tables.append(markdown_targets_table(records))
    if several:
        head = f"### {model}, {settings.dtype} ({MODELS[model].summary})"
        tables.insert(0, head)
    return tables, path


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark for each model, prints the tables and writes the JSON.

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status (0).
    """
    args = parse_args(argv)
    tables: list[str] = []
    for model in args.models:
        model_tables, _ = _run_model(args, model)
        tables.extend(model_tables)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n\n".join(tables) + "\n", encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0
