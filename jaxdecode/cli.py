"""The `jaxdecode` command: generate text, or evaluate a JSONL file of prompts.

    jaxdecode generate "In the beginning" --max_new_tokens 60 --do_sample --top_p 0.9
    jaxdecode eval prompts.jsonl -o out.jsonl --batch_size 32

Every `GenerationConfig` field is a flag under its transformers name (dashes work
too: `--max-new-tokens`). Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- #
# GenerationConfig fields as flags.
# --------------------------------------------------------------------------- #

_JSON_FIELDS = {"bad_words_ids", "sequence_bias"}
_INT_LIST_FIELDS = {
    "eos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
}
_CHOICES = {
    "repetition_penalty_form": ("hf", "ctrl"),
    "top_k_method": ("exact", "fast"),
    "top_p_method": ("exact", "fast"),
}
_INT_FIELDS = {
    "max_length",
    "max_new_tokens",
    "min_length",
    "min_new_tokens",
    "num_beams",
    "top_k",
    "no_repeat_ngram_size",
    "num_return_sequences",
    "pad_token_id",
    "bos_token_id",
    "forced_bos_token_id",
    "seed",
}
_SKIP = {"return_dict_in_generate"}


def _early_stopping(text: str) -> bool | str:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    if low == "never":
        return "never"
    raise argparse.ArgumentTypeError(f"must be true, false or never, got {text!r}")


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"must be JSON ({e})") from None


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from jaxdecode.config import GenerationConfig

    group = parser.add_argument_group("generation options (transformers names)")
    for f in dataclasses.fields(GenerationConfig):
        name = f.name
        if name in _SKIP:
            continue
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        kw: dict[str, Any] = {"dest": name, "default": None}
        if f.type in ("bool", bool) or isinstance(f.default, bool) and name != "early_stopping":
            kw["action"] = argparse.BooleanOptionalAction
        elif name == "early_stopping":
            kw["type"] = _early_stopping
            kw["metavar"] = "{true,false,never}"
        elif name in _JSON_FIELDS:
            kw["type"] = _json_value
            kw["metavar"] = "JSON"
        elif name in _INT_LIST_FIELDS:
            kw["type"] = int
            kw["nargs"] = "+"
        elif name == "exponential_decay_length_penalty":
            kw["type"] = float
            kw["nargs"] = 2
            kw["metavar"] = ("START", "FACTOR")
        elif name in _CHOICES:
            kw["choices"] = _CHOICES[name]
        elif name in _INT_FIELDS:
            kw["type"] = int
        else:
            kw["type"] = float
        group.add_argument(*flags, **kw)


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from jaxdecode.config import GenerationConfig

    out: dict[str, Any] = {}
    for f in dataclasses.fields(GenerationConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name in _INT_LIST_FIELDS and len(value) == 1:
            value = value[0]
        if f.name == "exponential_decay_length_penalty":
            value = (int(value[0]), float(value[1]))
        out[f.name] = value
    return out


# --------------------------------------------------------------------------- #
# Shared helpers.
# --------------------------------------------------------------------------- #


def _load_model(name: str):
    import jaxdecode

    try:
        lm = jaxdecode.from_pretrained(name)
    except ValueError as e:
        raise CLIError(f"cannot load model {name!r}: {e}") from None
    if lm.tokenizer is None:
        raise CLIError(
            f"model {name!r} has no tokenizer (tokenizer.json or vocab.json + merges.txt)"
        )
    return lm


def _mesh_and_model(args: argparse.Namespace, lm):
    """`--mesh data=4,model=2`: the mesh, and the model with its weights placed on it
    once (instead of at every batch)."""
    if not getattr(args, "mesh", None):
        return None, lm
    from jaxdecode.sharding import parse_mesh, shard_params

    try:
        mesh = parse_mesh(args.mesh)
    except ValueError as e:
        raise CLIError(f"--mesh: {e}") from None
    return mesh, lm.replace(params=shard_params(lm.params, mesh, lm.decoder.param_specs))


def _make_config(lm, overrides: dict[str, Any]):
    try:
        config = lm.generation_config.replace(**overrides)
        return config.validate(vocab_size=lm.vocab_size)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _encode_batch(lm, prompts: Sequence[str], pad_id: int):
    """Left-padded ids and mask for a list of prompts."""
    import numpy as np

    encoded = [lm.tokenizer.encode(p) for p in prompts]
    empty = [i for i, e in enumerate(encoded) if not e]
    if empty:
        raise CLIError(f"prompt {empty[0] + 1} is empty; give at least one character")
    width = max(len(e) for e in encoded)
    ids = np.full((len(encoded), width), pad_id, np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = e
        mask[i, width - len(e) :] = 1
    return ids, mask


def _completion(lm, config, row, prompt_width: int, length: int) -> tuple[list[int], str]:
    tokens = [int(t) for t in row[prompt_width : prompt_width + int(length)]]
    text_tokens = tokens[:-1] if tokens and tokens[-1] in config.eos_ids else tokens
    return tokens, lm.tokenizer.decode(text_tokens)


# --------------------------------------------------------------------------- #
# jaxdecode generate
# --------------------------------------------------------------------------- #


def _cmd_generate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    import jaxdecode

    if not args.prompts:
        raise CLIError("give at least one PROMPT")
    lm = _load_model(args.model)
    mesh, lm = _mesh_and_model(args, lm)
    overrides = _config_overrides(args)
    config = _make_config(lm, overrides)
    ids, mask = _encode_batch(lm, args.prompts, config.pad_id)
    key = jax.random.key(config.seed if config.seed is not None else int(time.time_ns() % 2**31))
    rows_per_prompt = config.num_return_sequences
    prompts = [p for p in args.prompts for _ in range(rows_per_prompt)]

    if args.stream:
        if config.num_beams > 1:
            raise CLIError(
                "--stream works with greedy search and sampling, not with --num_beams > 1"
            )
        if len(prompts) > 1:
            raise CLIError(
                "--stream prints one continuation: give one prompt and num_return_sequences 1"
            )
        out_tokens: list[int] = []
        sys.stdout.write(args.prompts[0])
        sys.stdout.flush()
        emitted = ""
        try:
            for step in jaxdecode.stream(lm, ids, mask, config, key=key):
                if not step.active[0]:
                    break
                tok = int(step.tokens[0])
                if tok in config.eos_ids:
                    break
                out_tokens.append(tok)
                text = lm.tokenizer.decode(out_tokens)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    sys.stdout.write(text[len(emitted) :])
                    sys.stdout.flush()
                    emitted = text
        except ValueError as e:
            raise CLIError(str(e)) from None
        sys.stdout.write(lm.tokenizer.decode(out_tokens)[len(emitted) :] + "\n")
        return 0

    try:
        out = jaxdecode.generate(lm, ids, mask, config, key=key, mesh=mesh)
    except ValueError as e:
        raise CLIError(str(e)) from None
    seqs = np.asarray(out.sequences)
    lengths = np.asarray(out.lengths)
    logps = np.asarray(out.token_logprobs)
    results = []
    for i, prompt in enumerate(prompts):
        tokens, text = _completion(lm, config, seqs[i], ids.shape[1], lengths[i])
        record = {
            "prompt": prompt,
            "text": text,
            "tokens": tokens,
            "token_logprobs": [round(float(x), 6) for x in logps[i, : len(tokens)]],
        }
        if out.sequences_scores is not None:
            record["sequence_score"] = float(np.asarray(out.sequences_scores)[i])
        results.append(record)
    if args.json:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
    else:
        for i, r in enumerate(results):
            if i:
                print("---")
            print(r["prompt"] + r["text"])
    return 0


# --------------------------------------------------------------------------- #
# jaxdecode eval
# --------------------------------------------------------------------------- #


def _read_prompts(path: str) -> list[dict[str, Any]]:
    from jaxdecode.config import GenerationConfig

    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    if not os.path.isfile(path):
        raise CLIError(f"prompts file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(rec, str):
                rec = {"prompt": rec}
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise CLIError(f"{path}:{n}: each line must be an object with a string 'prompt'")
            unknown = sorted(set(rec) - names - {"prompt", "id"})
            if unknown:
                raise CLIError(
                    f"{path}:{n}: unknown field {unknown[0]!r} (not a GenerationConfig option)"
                )
            rec.setdefault("id", n)
            records.append(rec)
    ids = [r["id"] for r in records]
    if len(set(map(json.dumps, ids))) != len(ids):
        raise CLIError(f"{path}: duplicate 'id' values; ids must be unique for resuming")
    return records


def _done_ids(out_path: str) -> set[str]:
    """Ids already in OUT. A partial last line (a killed write) is cut off, so
    appending continues on a clean line."""
    done: set[str] = set()
    if not os.path.exists(out_path):
        return done
    with open(out_path, "rb+") as f:
        data = f.read()
        good = data.rfind(b"\n") + 1
        if good < len(data):
            f.truncate(good)
        for line in data[:good].splitlines():
            if line.strip():
                try:
                    done.add(json.dumps(json.loads(line)["id"]))
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                    raise CLIError(
                        f"{out_path} has a line that is not a result: {line[:60]!r}"
                    ) from None
    return done


def _cmd_eval(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    import jaxdecode

    records = _read_prompts(args.prompts_file)
    lm = _load_model(args.model)
    mesh, lm = _mesh_and_model(args, lm)
    base_overrides = _config_overrides(args)
    _make_config(lm, base_overrides)  # command-line options fail fast, before any prompt
    if args.batch_size < 1:
        raise CLIError(f"--batch_size must be >= 1, got {args.batch_size}")
    done = _done_ids(args.output)
    todo = [r for r in records if json.dumps(r["id"]) not in done]
    # Group by bucketed prompt length and by per-prompt options, so each batch
    # shares one compiled program and a stream of prompts compiles a handful of times.
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in todo:
        opts = {k: v for k, v in r.items() if k not in ("prompt", "id")}
        length = len(lm.tokenizer.encode(r["prompt"]))
        if length == 0:
            raise CLIError(f"prompt id {r['id']!r} is empty")
        bucket = jaxdecode.bucket_length(length, "pow2")
        groups.setdefault((bucket, json.dumps(opts, sort_keys=True)), []).append(r)

    # Validate every group's options before anything is written.
    configs = {}
    for gkey, group in groups.items():
        try:
            configs[gkey] = _make_config(lm, {**base_overrides, **json.loads(gkey[1])})
        except CLIError as e:
            raise CLIError(f"prompt id {group[0]['id']!r}: {e}") from None
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="prompt", disable=args.quiet, file=sys.stderr)
    n_tokens, t0 = 0, time.time()
    try:
        with open(args.output, "a", encoding="utf-8") as out_file:
            for gkey, group in sorted(groups.items()):
                config = configs[gkey]
                seed = config.seed if config.seed is not None else 0
                for start in range(0, len(group), args.batch_size):
                    batch = group[start : start + args.batch_size]
                    real = len(batch)
                    # Pad the last batch to the full size: one program per bucket.
                    prompts = [r["prompt"] for r in batch] + [batch[-1]["prompt"]] * (
                        args.batch_size - real
                    )
                    ids, mask = _encode_batch(lm, prompts, config.pad_id)
                    # The key depends on the batch's first id only: a resumed run samples
                    # what the uninterrupted run would have.
                    salt = zlib.crc32(json.dumps(batch[0]["id"]).encode()) % 2**31
                    key = jax.random.fold_in(jax.random.key(seed), salt)
                    try:
                        out = jaxdecode.generate(lm, ids, mask, config, key=key, mesh=mesh)
                    except ValueError as e:
                        raise CLIError(f"prompt id {batch[0]['id']!r}: {e}") from None
                    seqs, lengths = np.asarray(out.sequences), np.asarray(out.lengths)
                    r_per = config.num_return_sequences
                    lines = []
                    for i, rec in enumerate(batch):
                        texts, toks = [], []
                        for j in range(r_per):
                            row = i * r_per + j
                            tokens, text = _completion(
                                lm, config, seqs[row], ids.shape[1], lengths[row]
                            )
                            texts.append(text)
                            toks.append(tokens)
                            n_tokens += len(tokens)
                        result = {"id": rec["id"], "prompt": rec["prompt"]}
                        if r_per == 1:
                            result.update(text=texts[0], tokens=toks[0])
                        else:
                            result.update(texts=texts, tokens=toks)
                        lines.append(json.dumps(result, ensure_ascii=False) + "\n")
                    out_file.write("".join(lines))
                    out_file.flush()
                    os.fsync(out_file.fileno())
                    bar.update(real)
                    elapsed = max(time.time() - t0, 1e-9)
                    bar.set_postfix(
                        tok_s=f"{n_tokens / elapsed:.0f}", prompt_s=f"{bar.n / elapsed:.1f}"
                    )
    finally:
        bar.close()
    if not args.quiet:
        print(
            f"wrote {len(todo)} results to {args.output} ({len(done)} were already there)",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------- #
# jaxdecode explain
# --------------------------------------------------------------------------- #


def _cmd_explain(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from jaxdecode import explain
    from jaxdecode.trace import trace

    try:
        explain._pyplot()
    except ImportError as e:  # matplotlib is an optional extra
        raise CLIError(str(e)) from None
    if args.steps < 1 or args.top < 1:
        raise CLIError(f"--steps and --top must be >= 1, got {args.steps} and {args.top}")
    lm = _load_model(args.model)
    overrides = _config_overrides(args)
    if "max_length" not in overrides:
        overrides.setdefault("max_new_tokens", args.steps)
    config = _make_config(lm, overrides)
    ids, mask = _encode_batch(lm, [args.prompt], config.pad_id)
    key = jax.random.key(config.seed if config.seed is not None else 0)
    try:
        tr = trace(lm, ids, config, attention_mask=mask, key=key)
    except ValueError as e:
        raise CLIError(str(e)) from None
    decode = lambda t: lm.tokenizer.decode([t])
    try:
        written = explain.write_report(
            tr,
            args.output,
            decode=decode,
            steps=args.steps,
            m=args.top,
            title=f"jaxdecode explain: {args.prompt!r}",
        )
    except OSError as e:
        raise CLIError(f"cannot write to {args.output}: {e}") from None
    seq = np.asarray(tr.output.sequences)[0, ids.shape[1] :][: int(tr.output.lengths[0])]
    print(args.prompt + lm.tokenizer.decode([int(t) for t in seq]))
    print(f"wrote {len(written) - 1} pictures and {written[-1]}")
    return 0


# --------------------------------------------------------------------------- #
# Entry point.
# --------------------------------------------------------------------------- #


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxdecode", description="Decode text with JAX language models.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    gen = sub.add_parser(
        "generate", help="generate continuations of one or more prompts (one batch)"
    )
    gen.add_argument("prompts", nargs="*", metavar="PROMPT")
    gen.add_argument(
        "--model", default="bundled", help="'bundled' (default), a local HF directory or a hub id"
    )
    gen.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    gen.add_argument(
        "--mesh",
        metavar="data=D,model=M",
        help="shard over a device mesh, e.g. data=4,model=2 (rows over data; weights, "
        "KV-cache heads and vocabulary over model; product = device count)",
    )
    gen.add_argument(
        "--json", action="store_true", help="one JSON object per output (tokens, text, scores)"
    )
    _add_config_flags(gen)

    ev = sub.add_parser("eval", help="batch generation over a JSONL file of prompts (resumable)")
    ev.add_argument("prompts_file", metavar="PROMPTS.jsonl")
    ev.add_argument("-o", "--output", required=True, metavar="OUT.jsonl")
    ev.add_argument("--model", default="bundled")
    ev.add_argument("--batch_size", "--batch-size", type=int, default=16)
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument(
        "--mesh",
        metavar="data=D,model=M",
        help="shard over a device mesh, e.g. data=4,model=2 (rows over data; weights, "
        "KV-cache heads and vocabulary over model; product = device count)",
    )
    _add_config_flags(ev)

    ex = sub.add_parser(
        "explain",
        help="draw what each decoding parameter does to the next-token distribution",
    )
    ex.add_argument("prompt", metavar="PROMPT")
    ex.add_argument("-o", "--output", required=True, metavar="DIR")
    ex.add_argument("--model", default="bundled")
    ex.add_argument("--steps", type=int, default=6, help="steps drawn (6)")
    ex.add_argument("--top", type=int, default=10, help="tokens per bar chart (10)")
    _add_config_flags(ex)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit code (2 for user errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "explain":
            return _cmd_explain(args)
        parser.print_help()
        return 2
    except CLIError as e:
        print(f"jaxdecode: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxdecode: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
