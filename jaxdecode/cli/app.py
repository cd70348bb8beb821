"""The `jaxdecode` entry point: the parser, the persistent compilation cache,
one-line errors and warnings, and the exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Sequence

from jaxdecode.cli import common, detect, evaluate, explain, flags, generate, records

CACHE_ENV = "JAXDECODE_COMPILATION_CACHE"


_OFF = ("", "0", "off", "false", "no", "none")


def compilation_cache_dir(environ: typing.Mapping[str, str] | None = None) -> str | None:
    """Where the CLI keeps JAX's persistent compilation cache, or None when off.

    `$JAXDECODE_COMPILATION_CACHE` (a directory, or `off`), else
    `$XDG_CACHE_HOME/jaxdecode/jax`, else `~/.cache/jaxdecode/jax`.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else os.path.expanduser(value)
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxdecode", "jax")


def _enable_compilation_cache(args: argparse.Namespace) -> None:
    """Turns on JAX's persistent compilation cache for this process (the CLI only,
    never on `import jaxdecode`): a second run reads its programs from disk instead
    of compiling them. A JAX_COMPILATION_CACHE_DIR set by the user wins."""
    if getattr(args, "no_compilation_cache", False) or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    directory = compilation_cache_dir()
    if directory is None:
        return
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        print(f"jaxdecode: no compilation cache ({directory}: {e.strerror})", file=sys.stderr)
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, however quick to compile: a CLI run is a handful of programs,
    # and the small ones add up to seconds too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _add_assistant(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--assistant_model",
        "--assistant-model",
        metavar="PATH",
        help="draft model for speculative decoding (a checkpoint like --model, with the same "
        "vocabulary; --num_assistant_tokens per round); --prompt_lookup_num_tokens K "
        "speculates without one",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="bundled", help="'bundled' (default), a local HF directory or a hub id"
    )
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="a PEFT LoRA adapter for --model (adapter_config.json + "
        "adapter_model.safetensors, or a hub id), applied unmerged",
    )
    parser.add_argument(
        "--max_positions",
        type=int,
        default=None,
        help="context length to enforce (prompt + new tokens) instead of the checkpoint's "
        "(max_position_embeddings, GGUF context_length): for a RoPE model known to handle "
        "longer inputs, e.g. with rope scaling; GPT-2 cannot go past n_positions",
    )
    parser.add_argument(
        "--no-compilation-cache",
        "--no_compilation_cache",
        dest="no_compilation_cache",
        action="store_true",
        help=f"do not read or write JAX's persistent compilation cache ({CACHE_ENV}=off too)",
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise common.CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    """The `jaxdecode` parser: `generate`, `eval` and `explain`, each with every
    `GenerationConfig` field as a flag.

    A function over ~80 lines: one `add_argument` per flag of three commands,
    read top to bottom.
    """
    parser = _Parser(prog="jaxdecode", description="Decode text with JAX language models.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    gen = sub.add_parser(
        "generate", help="generate continuations of one or more prompts (one batch)"
    )
    gen.add_argument("prompts", nargs="*", metavar="PROMPT")
    _add_common(gen)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="each PROMPT is a user message, rendered with the model's chat template",
    )
    gen.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")
    gen.add_argument(
        "--verbose",
        action="store_true",
        help="a timing summary on stderr: compile, prefill and decoding (tokens/s); with "
        "--stream, the time to the first token and the rate after it",
    )
    gen.add_argument(
        "--mesh",
        metavar="data=D,model=M",
        help="shard over a device mesh, e.g. data=4,model=2 (rows over data; weights, "
        "KV-cache heads and vocabulary over model; product = device count)",
    )
    gen.add_argument(
        "--json",
        action="store_true",
        help=f"one JSON object per prompt (schema {records.GENERATE_SCHEMA!r}; see the README)",
    )
    _add_assistant(gen)
    flags.add_config_flags(gen)

    ev = sub.add_parser("eval", help="batch generation over a JSONL file of prompts (resumable)")
    ev.add_argument("prompts_file", metavar="PROMPTS.jsonl")
    ev.add_argument("-o", "--output", required=True, metavar="OUT.jsonl")
    _add_common(ev)
    ev.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=16,
        help="rows decoded together: the engine's slots, or a static batch (16)",
    )
    ev.add_argument(
        "--static-batching",
        "--static_batching",
        dest="static_batching",
        action="store_true",
        help="static batches (a batch ends when its longest row does) instead of the "
        "continuous-batching engine, for comparison",
    )
    ev.add_argument(
        "--steps_per_call",
        "--steps-per-call",
        type=int,
        default=16,
        help="engine: decoding steps per call of its program, between two visits of the host (16)",
    )
    ev.add_argument(
        "--prefill_rows",
        "--prefill-rows",
        type=int,
        default=None,
        help="engine: prompts prefilled together (default min(batch_size, 8))",
    )
    pages = ev.add_argument_group(
        "engine: paged KV cache (a pool of pages, admitted by free pages; see the engine guide)"
    )
    pages.add_argument(
        "--page_size",
        "--page-size",
        type=int,
        default=None,
        metavar="N",
        help="keep the engine's cache in pages of N tokens (default 16; 0: the dense slot cache)",
    )
    pages.add_argument(
        "--kv_pages",
        "--kv-pages",
        type=int,
        default=None,
        metavar="N",
        help="pages in the pool (default: batch_size * ceil(max_len / page_size))",
    )
    pages.add_argument(
        "--prefix_cache",
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the pages of prompt prefixes seen before (default: on)",
    )
    pages.add_argument(
        "--prefill_chunk",
        "--prefill-chunk",
        type=int,
        default=None,
        metavar="N",
        help="prefill long prompts in chunks of at most N tokens between decode steps",
    )
    ev.add_argument(
        "--chat",
        action="store_true",
        help="each line's prompt is a user message, rendered with the model's chat "
        'template (lines with "messages" are always rendered)',
    )
    ev.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument(
        "--mesh",
        metavar="data=D,model=M",
        help="shard over a device mesh, e.g. data=4,model=2 (the engine's slots over data, "
        "a multiple of it; weights, KV-cache heads and vocabulary over model; product = "
        "device count)",
    )
    dist = ev.add_argument_group(
        "several processes (jax.distributed): each serves every N-th line with its own "
        "devices into OUT.part-I; process 0 merges the parts into OUT once all are written"
    )
    dist.add_argument("--coordinator_address", metavar="HOST:PORT", help="process 0's address")
    dist.add_argument("--num_processes", type=int, metavar="N", help="processes in the run")
    dist.add_argument("--process_id", type=int, metavar="I", help="this process, 0 to N-1")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() with no arguments (TPU pods, SLURM, ...: the "
        "coordinator and process ids come from the environment)",
    )
    _add_assistant(ev)
    flags.add_config_flags(ev)

    det = sub.add_parser(
        "detect",
        help="score texts (a JSONL file) for a watermark: z-score and p-value, or SynthID's",
    )
    det.add_argument("texts_file", metavar="TEXTS.jsonl")
    _add_common(det)
    det.add_argument(
        "--watermarking_config",
        "--watermarking-config",
        type=flags.json_value,
        metavar="JSON",
        help="the watermarking_config used to generate (Kirchenbauer or SynthID fields)",
    )
    det.add_argument(
        "--z_threshold", "--z-threshold", type=float, default=3.0, help="prediction: z > this (3)"
    )
    det.add_argument(
        "--ignore_repeated_ngrams",
        "--ignore-repeated-ngrams",
        action="store_true",
        help="count each distinct n-gram once",
    )

    ex = sub.add_parser(
        "explain",
        help="draw what each decoding parameter does to the next-token distribution",
    )
    ex.add_argument("prompt", metavar="PROMPT")
    ex.add_argument("-o", "--output", required=True, metavar="DIR")
    _add_common(ex)
    ex.add_argument("--steps", type=int, default=6, help="steps drawn (6)")
    ex.add_argument("--top", type=int, default=10, help="tokens per bar chart (10)")
    ex.add_argument(
        "--chat",
        action="store_true",
        help="PROMPT is a user message, rendered with the model's chat template",
    )
    ex.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")
    flags.add_config_flags(ex)
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the command line: one line, no source path."""
    text = " ".join(str(message).split())
    print(f"jaxdecode: warning: {text}", file=sys.stderr)


# What a shell reports for a command killed by SIGPIPE (128 + 13), as `yes | head` does.
BROKEN_PIPE_EXIT = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit code (2 for user errors, 141 when the
    reader of stdout went away, 130 on Ctrl-C)."""
    import warnings

    parser = build_parser()
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        try:
            args = parser.parse_args(argv)
            _enable_compilation_cache(args)
            if args.command == "generate":
                return generate.cmd_generate(args)
            if args.command == "eval":
                return evaluate.cmd_eval(args)
            if args.command == "explain":
                return explain.cmd_explain(args)
            if args.command == "detect":
                return detect.cmd_detect(args)
            parser.print_help()
            return 2
        except common.CLIError as e:
            text = str(e).replace("\n", " ")  # one line, whatever a library message holds
            print(f"jaxdecode: error: {text}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("jaxdecode: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # `jaxdecode generate --stream ... | head`: the reader has what it wanted. Quiet,
            # as Unix tools are; stdout goes to devnull so that the interpreter's final
            # flush does not fail again.
            _silence_stdout()
            return BROKEN_PIPE_EXIT


def _silence_stdout() -> None:
    """Points stdout's file descriptor at /dev/null (Python's recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real descriptor (captured in-process)
        pass
