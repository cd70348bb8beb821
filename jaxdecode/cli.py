"""The `jaxdecode` command: generate text, or evaluate a JSONL file of prompts.

    jaxdecode generate "In the beginning" --max_new_tokens 60 --do_sample --top_p 0.9
    jaxdecode eval prompts.jsonl -o out.jsonl --batch_size 32
    jaxdecode detect texts.jsonl --watermarking_config '{"bias": 2.0}'

Every `GenerationConfig` field is a flag under its transformers name (dashes work
too: `--max-new-tokens`). Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import secrets
import sys
import time
import types
import typing
import zlib
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- #
# GenerationConfig fields as flags, derived from the dataclass's field types.
# --------------------------------------------------------------------------- #

_SKIP = {"return_dict_in_generate"}  # the CLI always has the whole output


def _bool_or(choices: tuple[str, ...]):
    """An argparse type for `bool | Literal[...]` (early_stopping: true/false/never)."""

    def parse(text: str) -> bool | str:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        if low in choices:
            return low
        raise argparse.ArgumentTypeError(
            f"must be true, false or {' or '.join(choices)}, got {text!r}"
        )

    return parse


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"must be JSON ({e})") from None


def _union_args(tp: Any) -> tuple[Any, ...]:
    """The members of a union type (None dropped); a non-union is its own member."""
    args = (
        typing.get_args(tp)
        if isinstance(tp, types.UnionType) or (typing.get_origin(tp) is typing.Union)
        else (tp,)
    )
    return tuple(a for a in args if a is not type(None))


def _flag_kind(field: dataclasses.Field, tp: Any) -> str:
    """How a `GenerationConfig` field is given on the command line, from its type:
    "bool" (--x/--no-x), "bool_or_choice", "choice" (Literal), "scalar" (int,
    float, or a per-row number: one value for every row), "tuple" (that many
    values), "ids" (int | Sequence[int]: one or more ints), "strings" (str |
    Sequence[str]: one or more strings), else "json"."""
    args = _union_args(tp)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if args == (bool,):
        return "bool"
    if bool in args and literals:
        return "bool_or_choice"
    if literals and len(args) == 1:
        return "choice"
    if field.metadata.get("per_row") or args in ((int,), (float,)):
        return "scalar"
    if set(args) == {str, Sequence[str]}:
        return "strings"
    if str in args:
        return "text"  # one string (a regex); per-row lists come from eval lines
    if Sequence[str] in args:
        return "texts"
    if len(args) == 1 and typing.get_origin(args[0]) is tuple:
        return "tuple"
    if set(args) == {int, Sequence[int]}:
        return "ids"
    return "json"


def _flag_kwargs(field: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """argparse keywords for one `GenerationConfig` field (see `_flag_kind`)."""
    kind, args = _flag_kind(field, tp), _union_args(tp)
    literal = next((a for a in args if typing.get_origin(a) is typing.Literal), None)
    if kind == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if kind == "bool_or_choice":
        choices = tuple(typing.get_args(literal))
        return {"type": _bool_or(choices), "metavar": "{true,false," + ",".join(choices) + "}"}
    if kind == "choice":
        return {"choices": typing.get_args(literal)}
    if kind == "scalar":
        return {"type": args[0]}
    if kind == "tuple":
        members = typing.get_args(args[0])
        return {
            "type": float if float in members else int,
            "nargs": len(members),
            "metavar": tuple(t.__name__.upper() for t in members),
        }
    if kind == "ids":
        return {"type": int, "nargs": "+"}
    if kind == "strings":
        return {"type": str, "nargs": "+", "metavar": "TEXT"}
    if kind == "text":
        return {"type": str}
    if kind == "texts":
        return {"type": str, "nargs": "+"}
    return {"type": _json_value, "metavar": "JSON"}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from jaxdecode.config import FIELD_TYPES, GenerationConfig

    group = parser.add_argument_group("generation options (transformers names)")
    for f in dataclasses.fields(GenerationConfig):
        if f.name in _SKIP:
            continue
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        group.add_argument(
            *flags, dest=f.name, default=None, **_flag_kwargs(f, FIELD_TYPES[f.name])
        )


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The fields given on the command line, in `GenerationConfig`'s types."""
    from jaxdecode.config import FIELD_TYPES, GenerationConfig

    out: dict[str, Any] = {}
    for f in dataclasses.fields(GenerationConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        kind = _flag_kind(f, FIELD_TYPES[f.name])
        if kind == "tuple":
            members = typing.get_args(_union_args(FIELD_TYPES[f.name])[0])
            value = tuple(t(v) for t, v in zip(members, value, strict=True))
        elif kind == "ids" and len(value) == 1:
            value = value[0]  # `--eos_token_id 5`: one id
        out[f.name] = value
    return out


# --------------------------------------------------------------------------- #
# Shared helpers.
# --------------------------------------------------------------------------- #

GENERATE_SCHEMA = "jaxdecode.generate/1"
EVAL_SCHEMA = "jaxdecode.eval/1"


def _load_model(name: str, max_positions: int | None = None):
    import jaxdecode

    try:
        limit = "config" if max_positions is None else max_positions
        lm = jaxdecode.from_pretrained(name, max_positions=limit)
    except ValueError as e:
        raise CLIError(f"cannot load model {name!r}: {e}") from None
    if lm.tokenizer is None:
        raise CLIError(
            f"model {name!r} has no tokenizer (tokenizer.json or vocab.json + merges.txt)"
        )
    return lm


def _load_assistant(args: argparse.Namespace):
    """`--assistant_model PATH`: the draft model for speculative decoding, or None."""
    path = getattr(args, "assistant_model", None)
    if path is None:
        return None
    import jaxdecode

    try:
        return jaxdecode.from_pretrained(path)
    except ValueError as e:
        raise CLIError(f"cannot load --assistant_model {path!r}: {e}") from None


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


_NOT_PRINTED = ("output_scores", "output_logits")


def _check_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Options the CLI cannot honour are refused; `max_length` given without
    `max_new_tokens` replaces the model's default `max_new_tokens` (which would
    otherwise take precedence, as in transformers)."""
    for name in _NOT_PRINTED:
        if overrides.get(name):
            raise CLIError(
                f"{name} is not printed by the command line (a [steps, vocab] table per "
                "output); --json gives each token's log-probability (token_logprobs), "
                f"Python's jaxdecode.generate({name}=True) the full table"
            )
    if "max_length" in overrides and "max_new_tokens" not in overrides:
        overrides = {**overrides, "max_new_tokens": None}
    return overrides


def _make_config(lm, overrides: dict[str, Any]):
    try:
        config = lm.generation_config.replace(
            **_check_overrides(overrides), output_scores=False, output_logits=False
        )
        return config.validate(vocab_size=lm.vocab_size)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _encode_batch(lm, prompts: Sequence[str], pad_id: int):
    """Left-padded ids and mask for a list of prompts."""
    encoded = [lm.tokenizer.encode(p) for p in prompts]
    empty = [i for i, e in enumerate(encoded) if not e]
    if empty:
        raise CLIError(f"prompt {empty[0] + 1} is empty; give at least one character")
    return _left_pad(encoded, pad_id)


def _left_pad(encoded: Sequence[Sequence[int]], pad_id: int):
    import numpy as np

    width = max(len(e) for e in encoded)
    ids = np.full((len(encoded), width), pad_id, np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = e
        mask[i, width - len(e) :] = 1
    return ids, mask


def _outputs(
    model: str, lm, config, out, first_row: int, n_rows: int, width: int, prompt_mask=None
) -> list[dict]:
    """The records of rows `[first_row, first_row + n_rows)` of a `GenerateOutput`:
    text, tokens, token log-probabilities, beam score (None unless beam search),
    and the log-probability outputs the config asks for (`_logprob_fields`;
    `prompt_mask: [width]` marks the prompt's real tokens).

    Raises CLIError when the model produced non-finite log-probabilities (broken
    weights): NaN must never reach the output."""
    import numpy as np

    seqs, lengths = np.asarray(out.sequences), np.asarray(out.lengths)
    logps = np.asarray(out.token_logprobs)
    beam = None if out.sequences_scores is None else np.asarray(out.sequences_scores)
    records = []
    for row in range(first_row, first_row + n_rows):
        n = int(lengths[row])
        tokens = [int(t) for t in seqs[row, width : width + n]]
        row_logps = logps[row, :n].astype(np.float64)
        score = None if beam is None else float(beam[row])
        if not np.all(np.isfinite(row_logps)) or (score is not None and not np.isfinite(score)):
            raise CLIError(
                f"model {model!r} produced non-finite log-probabilities (NaN or inf): "
                "its weights or logits are broken; check the checkpoint"
            )
        text_tokens = tokens[:-1] if tokens and tokens[-1] in config.eos_ids else tokens
        records.append(
            {
                "text": lm.tokenizer.decode(text_tokens),
                "tokens": tokens,
                "token_logprobs": [round(float(x), 6) for x in row_logps],
                "sequence_score": score,
                **_logprob_fields(out, row, n, prompt_mask),
            }
        )
    return records


def _logprob_fields(out, row: int, n: int, prompt_mask) -> dict[str, Any]:
    """`raw_token_logprobs`, `top_logprobs` (per generated token, `[[id, logprob],
    ...]` best first) and `prompt_logprobs` (per real prompt token, null for the
    first) / `prompt_top_logprobs` of one output row, when present."""
    import numpy as np

    def rounded(values) -> list[float]:
        return [round(float(x), 6) for x in values]

    def pairs(ids, logps) -> list[list[list]]:
        return [
            [[int(t), round(float(lp), 6)] for t, lp in zip(i, p, strict=True)]
            for i, p in zip(ids, logps, strict=True)
        ]

    fields: dict[str, Any] = {}
    if out.raw_token_logprobs is not None:
        fields["raw_token_logprobs"] = rounded(np.asarray(out.raw_token_logprobs)[row, :n])
    if out.top_token_ids is not None:
        fields["top_logprobs"] = pairs(
            np.asarray(out.top_token_ids)[row, :n], np.asarray(out.top_logprobs)[row, :n]
        )
    if out.prompt_logprobs is not None:
        real = np.flatnonzero(np.asarray(prompt_mask) == 1)
        fields["prompt_logprobs"] = [None] + rounded(np.asarray(out.prompt_logprobs)[row, real[1:]])
        if out.prompt_top_token_ids is not None:
            ids = np.asarray(out.prompt_top_token_ids)[row, real[1:]]
            logps = np.asarray(out.prompt_top_logprobs)[row, real[1:]]
            fields["prompt_top_logprobs"] = [None] + pairs(ids, logps)
    return fields


def _result(schema: str, prompt: str, seed: int | None, outputs: list[dict], **extra: Any) -> dict:
    """One result record (the `--json` / eval schema; README, "The command line")."""
    return {"schema": schema, **extra, "prompt": prompt, "seed": seed, "outputs": outputs}


def _eval_result(rec: dict, config, outputs: list[dict], model: str) -> dict:
    """An eval line's record (`config`: the line's resolved config); a chat line
    (`messages`) keeps them and its rendered prompt; `model` and `options` say what
    made it (`_made_with`)."""
    chat = {"messages": rec["messages"]} if "messages" in rec else {}
    seed = config.seed if config.do_sample else None
    record = _result(EVAL_SCHEMA, rec["prompt"], seed, outputs, id=rec["id"], **chat)
    return {**record, **_made_with(model, config)}


def _json_plain(value: Any) -> Any:
    """`value` as JSON reads it back (tuples become lists), for comparisons; its
    `repr` where it holds a non-finite number (records are strict JSON)."""
    try:
        return json.loads(json.dumps(value, default=lambda x: x.tolist(), allow_nan=False))
    except ValueError:
        return repr(value)


def _made_with(model: str, config) -> dict[str, Any]:
    """What produced an eval record: `model` (a path made absolute) and `options`,
    every field of the line's resolved config that differs from
    `GenerationConfig()`'s default (its seed and own `max_new_tokens` included)."""
    from jaxdecode.config import GenerationConfig

    defaults = GenerationConfig()
    options = {}
    for f in dataclasses.fields(config):
        value = _json_plain(getattr(config, f.name))
        if value != _json_plain(getattr(defaults, f.name)):
            options[f.name] = value
    model = os.path.abspath(model) if os.path.exists(model) else model
    return {"model": model, "options": options}


def _changed_options(prev: dict, made: dict[str, Any]) -> str | None:
    """How the run that wrote `prev` (an eval record) differs from `made`
    (`_made_with` of this run's line), or None when it does not."""
    from jaxdecode.config import GenerationConfig

    if not isinstance(prev.get("options"), dict) or "model" not in prev:
        return "no record of the options that made it (an older jaxdecode wrote it)"
    if prev["model"] != made["model"]:
        return f"--model {prev['model']!r} (now {made['model']!r})"
    defaults, changed = GenerationConfig(), []
    for f in dataclasses.fields(GenerationConfig):
        default = _json_plain(getattr(defaults, f.name))
        old = prev["options"].get(f.name, default)
        new = made["options"].get(f.name, default)
        if old != new:
            changed.append(f"{f.name}={json.dumps(old)} (now {json.dumps(new)})")
    return ", ".join(changed) or None


def _dumps(record: dict) -> str:
    # allow_nan=False: a NaN that got past _outputs is an error, never invalid JSON.
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def _sampling_seed(config) -> tuple[Any, bool]:
    """(config with a seed when sampling, whether the CLI drew the seed itself)."""
    if config.do_sample and config.seed is None:
        return config.replace(seed=secrets.randbits(31)), True
    return config, False


def _tell_seed(config, drawn: bool) -> None:
    """A seed the CLI drew itself goes to stderr, so that the run can be repeated."""
    if drawn:
        seed = config.seed
        print(f"jaxdecode: sampled with seed {seed} (repeat with --seed {seed})", file=sys.stderr)


# --------------------------------------------------------------------------- #
# jaxdecode generate
# --------------------------------------------------------------------------- #


def _cmd_generate(args: argparse.Namespace) -> int:
    import jaxdecode

    if not args.prompts:
        raise CLIError("give at least one PROMPT")
    if args.stream and args.json:
        raise CLIError(
            "--stream prints text as it is produced and --json whole records: give one of them"
        )
    if args.system is not None and not args.chat:
        raise CLIError("--system needs --chat (it is the chat's system message)")
    lm = _load_model(args.model, args.max_positions)
    mesh, lm = _mesh_and_model(args, lm)
    config = _make_config(lm, _config_overrides(args))
    assistant = _load_assistant(args)
    texts = [_chat_text(lm, p, args.system) for p in args.prompts] if args.chat else args.prompts
    ids, mask = _encode_batch(lm, texts, config.pad_id)
    config, drawn = _sampling_seed(config)
    seed = config.seed if config.do_sample else None

    asked = [
        name
        for name, on in (
            ("output_raw_logprobs", config.output_raw_logprobs),
            ("logprobs", config.logprobs is not None),
            ("prompt_logprobs", config.prompt_logprobs is not None),
        )
        if on
    ]
    if asked and not args.json:
        raise CLIError(f"{', '.join(asked)}: printed in the --json records only; add --json")
    if args.stream:
        if assistant is not None or mesh is not None:
            raise CLIError(
                "--stream decodes one token per call on one device; --assistant_model and "
                "--mesh need generate without --stream"
            )
        # With --chat the answer alone is printed, as without --stream.
        _stream(lm, ids, mask, config, args.prompts, echo=not args.chat, verbose=args.verbose)
        _tell_seed(config, drawn)
        return 0
    try:
        if args.verbose:
            from jaxdecode.generation import generate_timed

            out, timings = generate_timed(
                lm, ids, mask, config, mesh=mesh, assistant_model=assistant
            )
        else:
            out = jaxdecode.generate(lm, ids, mask, config, mesh=mesh, assistant_model=assistant)
    except ValueError as e:
        raise CLIError(str(e)) from None
    _tell_seed(config, drawn)
    if args.verbose:
        print(
            f"jaxdecode: compile {timings.compile_s:.2f} s, weights {timings.prepare_s:.3f} s, "
            f"prefill {timings.prefill_s:.3f} s ({ids.shape[0]} x {ids.shape[1]} tokens), "
            f"decode {timings.tokens} tokens in "
            f"{timings.decode_s:.3f} s ({timings.tokens_per_s:.1f} tokens/s, "
            f"{timings.steps} steps)",
            file=sys.stderr,
        )
    r = config.num_return_sequences
    for i, prompt in enumerate(args.prompts):
        outputs = _outputs(args.model, lm, config, out, i * r, r, ids.shape[1], mask[i])
        if args.json:
            print(_dumps(_result(GENERATE_SCHEMA, prompt, seed, outputs)))
        else:
            for j, o in enumerate(outputs):
                if i or j:
                    print("---")
                print(o["text"] if args.chat else prompt + o["text"])
    return 0


def _chat_text(lm, prompt: str, system: str | None) -> str:
    """`prompt` as the user's turn of a chat, rendered with the model's chat template."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    try:
        return lm.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as e:
        raise CLIError(f"--chat: {e}") from None


class _StreamClock:
    """`--stream --verbose`: the time to the first token (compilation and prefill
    included), then the decoding rate of the tokens after it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start

    def tick(self) -> None:
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last

    def report(self, tokens: int) -> None:
        if self.first is None:
            return
        rest = self.last - self.first
        rate = f"{(tokens - 1) / rest:.1f} tokens/s" if tokens > 1 and rest > 0 else "n/a"
        print(
            f"jaxdecode: first token after {self.first - self.start:.2f} s (compile + prefill), "
            f"then {max(tokens - 1, 0)} tokens in {rest:.3f} s ({rate})",
            file=sys.stderr,
        )


def _stream(
    lm, ids, mask, config, prompts: list[str], echo: bool = True, verbose: bool = False
) -> None:
    """Prints the continuation of `prompts[0]` token by token (after the prompt
    itself when `echo`); every option is checked before anything is printed."""
    import jaxdecode

    if config.num_beams > 1:
        raise CLIError("--stream works with greedy search and sampling, not with --num_beams > 1")
    if len(prompts) > 1 or config.num_return_sequences > 1:
        raise CLIError(
            "--stream prints one continuation: give one prompt and num_return_sequences 1"
        )
    try:
        steps = jaxdecode.stream(lm, ids, mask, config)  # validates: raises before any output
    except ValueError as e:
        raise CLIError(str(e)) from None
    out_tokens: list[int] = []
    if echo:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    emitted = ""
    clock = _StreamClock() if verbose else None
    try:
        for step in steps:
            if clock is not None:
                clock.tick()
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
    sys.stdout.flush()
    if clock is not None:
        clock.report(len(out_tokens))


# --------------------------------------------------------------------------- #
# jaxdecode eval
# --------------------------------------------------------------------------- #

_MAX_REPORTED = 20  # bad lines named in one error


def _bad_lines(path: str, errors: list[tuple[int, str]]) -> CLIError:
    """One error naming every bad line (up to _MAX_REPORTED), in line order."""
    errors = [msg for _, msg in sorted(errors)]
    more = f"; ... and {len(errors) - _MAX_REPORTED} more" if len(errors) > _MAX_REPORTED else ""
    what = "a bad line" if len(errors) == 1 else f"{len(errors)} bad lines"
    return CLIError(
        f"{path} has {what}, nothing was generated: " + "; ".join(errors[:_MAX_REPORTED]) + more
    )


def _read_prompts(path: str) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """The well-formed prompt records, each with its line number `_line`, and one
    error per malformed line."""
    from jaxdecode.config import GenerationConfig

    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    records, errors = [], []
    text = _read_text(path)
    if not text.strip():
        raise CLIError(f"{path} is empty: give one prompt per line (JSON)")
    # Universal newlines (\r\n, \r), as a text-mode file reads them.
    with io.StringIO(text, newline=None) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append((n, f"line {n}, column {e.colno}: not valid JSON ({e.msg})"))
                continue
            if isinstance(rec, str):
                rec = {"prompt": rec}
            problem = _prompt_problem(rec)
            if problem:
                errors.append((n, f"line {n}: {problem}"))
                continue
            rec.setdefault("id", n)
            unknown = sorted(set(rec) - names - {"prompt", "messages", "id"})
            if unknown:
                msg = f"unknown field {unknown[0]!r} (not a GenerationConfig option)"
                errors.append((n, f"line {n} (id {rec['id']!r}): {msg}"))
                continue
            records.append({**rec, "_line": n})
    seen: dict[str, int] = {}
    for r in records:
        key = json.dumps(r["id"])
        if key in seen:
            msg = f"duplicate id {r['id']!r} (also line {seen[key]}); ids must be unique"
            errors.append((r["_line"], f"line {r['_line']}: {msg}"))
        seen.setdefault(key, r["_line"])
    return records, errors


# Byte-order marks: UTF-16 is what Windows PowerShell's `>` writes.
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def _read_text(path: str) -> str:
    """A prompts file's text: UTF-8, or UTF-8/16/32 with a byte-order mark (read
    as what the mark says).

    Raises:
        CLIError: for a file that cannot be read or is not UTF-8 text, naming the
            line and column of the first bad byte.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}") from None
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        name = encoding.upper().removesuffix("-SIG")
        if name == "UTF-8":  # one byte per column up to the bad one: say where it is
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            where = f"byte {data[e.start : e.start + 1]!r} at line {line}, column {column}"
        else:
            where = f"at byte offset {e.start}"
        raise CLIError(
            f"{path} is not {name} text: {where} ({e.reason}); save it as UTF-8 (in "
            "PowerShell: Out-File -Encoding utf8)"
        ) from None


def _prompt_problem(rec: Any) -> str | None:
    """Why an eval line holds no prompt: it needs a string `prompt` or a chat as
    `messages` (a list of {"role", "content"} objects), not both."""
    if not isinstance(rec, dict):
        return "each line must be an object with a string 'prompt' or a list 'messages'"
    has_prompt, has_messages = "prompt" in rec, "messages" in rec
    if has_prompt and has_messages:
        return "give 'prompt' or 'messages', not both"
    if has_messages:
        messages = rec["messages"]
        ok = isinstance(messages, list) and messages
        ok = ok and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            return "'messages' must be a non-empty list of objects with string 'role' and 'content'"
        return None
    if not isinstance(rec.get("prompt"), str):
        return "each line must be an object with a string 'prompt' or a list 'messages'"
    return None


def _check_paths(prompts_path: str, out_path: str) -> None:
    """Refuses an OUT that is the prompts file (by path or inode) or cannot be
    written, before anything is loaded."""
    if not os.path.isfile(prompts_path):
        raise CLIError(f"prompts file not found: {prompts_path}")
    if os.path.isdir(out_path):
        raise CLIError(f"-o {out_path} is a directory; give a file")
    if os.path.exists(out_path) and os.path.samefile(prompts_path, out_path):
        raise CLIError(f"-o {out_path} is the prompts file; give another file for the results")
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise CLIError(f"-o {out_path}: directory {parent} does not exist")


def _done_results(out_path: str) -> dict[str, dict]:
    """Results already in OUT, by id. Only jaxdecode eval records count (their
    `schema`); any other line means OUT is not ours, and nothing is touched. A
    partial last line (a killed write) is cut off, so appending continues on a
    clean line."""
    done: dict[str, dict] = {}
    if not os.path.exists(out_path):
        return done
    with open(out_path, "rb") as f:
        data = f.read()
    good = data.rfind(b"\n") + 1
    for n, line in enumerate(data[:good].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and rec.get("schema") == EVAL_SCHEMA and "id" in rec
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise CLIError(
                f'{out_path}:{n} is not a jaxdecode eval result (no "schema": '
                f'"{EVAL_SCHEMA}"): {line[:60]!r}; give another -o'
            )
        done[json.dumps(rec["id"])] = rec
    if good < len(data):
        with open(out_path, "rb+") as f:
            f.truncate(good)
    return done


def _prompt_seed(rec: dict[str, Any], base_seed: int) -> int:
    """A prompt's seed: its own `seed`, else one derived from --seed and its id
    (stable across runs, so a resumed run samples what the whole run would)."""
    if "seed" in rec:
        return rec["seed"]
    return zlib.crc32(json.dumps([base_seed, rec["id"]]).encode()) % 2**31


def _eval_config(lm, base: dict[str, Any], rec: dict[str, Any], n_tokens: int, base_seed: int):
    """The prompt's validated config (seed resolved; `max_length` turned into the
    prompt's own `max_new_tokens`, as `generate` on that prompt alone would use).

    Raises ValueError naming the field."""
    line = {k: v for k, v in rec.items() if k not in ("prompt", "messages", "id", "_line", "_text")}
    overrides = {**base, **line}
    if "max_length" in line and "max_new_tokens" not in line:
        overrides.pop("max_new_tokens", None)
    try:
        overrides = _check_overrides(overrides)
    except CLIError as e:
        raise ValueError(str(e)) from None
    config = lm.generation_config.replace(**overrides, output_scores=False, output_logits=False)
    config.validate(vocab_size=lm.vocab_size)
    total = config.resolve_max_length(n_tokens)
    if total - n_tokens < 1:
        raise ValueError(
            f"max_length={config.max_length} leaves no room after the {n_tokens}-token prompt"
        )
    lm.decoder.check_length(total, total - n_tokens)
    config = config.replace(max_new_tokens=total - n_tokens, max_length=None)
    _check_constraint(lm, config)
    if config.do_sample:
        config = config.replace(seed=_prompt_seed(rec, base_seed))
        config.validate()
    return config


def _check_constraint(lm, config) -> None:
    """A line's regex / json_schema / choices: one constraint, compiled now (cached)
    so that a bad one is reported with the other bad lines, before generating."""
    from jaxdecode.processors.grammar import compile_spec

    parsed = config.constraints()
    if parsed is None:
        return
    if parsed[0]:
        raise ValueError("a line's regex / json_schema / choices is one constraint, not a list")
    compile_spec(parsed[1][0], lm.tokenizer)


def _group_key(config, bucket: int) -> tuple:
    """What must be equal for prompts to share a static batch: the prompt bucket,
    `jaxdecode.rows.group_key` (one length per batch) and whether any row is
    constrained."""
    from jaxdecode.rows import group_key

    return bucket, group_key(config, lengths_per_row=False), config.constraints() is not None


def _batch_config(configs: list, arrayed: tuple[str, ...]):
    """One config and key for a batch of prompts that share a group: per-row fields
    as `[batch]` arrays (always arrays, so every batch of the group has the same
    shapes: one compiled program) and, when sampling, one key per prompt,
    `jax.random.key(seed)`, so that each prompt draws what it draws alone."""
    import jax
    import jax.numpy as jnp

    from jaxdecode.config import CONSTRAINT_FIELDS
    from jaxdecode.rows import row_values

    values = row_values(configs, arrayed)
    # Constraints: one list per field, each row's entry in its own field (one table).
    for name in CONSTRAINT_FIELDS:
        rows = [getattr(c, name) for c in configs]
        values[name] = tuple(rows) if any(r is not None for r in rows) else None
    config = configs[0].replace(**values, seed=None)
    if not config.do_sample:
        return config, None
    return config, jnp.stack([jax.random.key(c.seed) for c in configs])


class _Progress:
    """The progress bar's counts: prompts and tokens per second since the start."""

    def __init__(self, bar) -> None:
        self.bar, self.tokens, self.t0 = bar, 0, time.time()

    def add(self, prompts: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(prompts)
        elapsed = max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix(
            tok_s=f"{self.tokens / elapsed:.0f}", prompt_s=f"{self.bar.n / elapsed:.1f}"
        )


def _write_lines(out_file, progress: _Progress, results: list[dict]) -> None:
    """Appends result records and fsyncs them before anything else runs: a run
    killed afterwards has them all, and a rerun skips their ids."""
    if not results:
        return
    out_file.write("".join(_dumps(r) + "\n" for r in results))
    out_file.flush()
    os.fsync(out_file.fileno())
    progress.add(len(results), sum(len(o["tokens"]) for r in results for o in r["outputs"]))


def _engine_serves(config) -> bool:
    """Whether the continuous-batching engine gives this prompt's record: one
    sequence (greedy or sampling; output constraints and every log-probability
    field included). Beam search, several sequences and speculative decoding run
    static batches."""
    return (
        config.num_beams == 1
        and config.num_return_sequences == 1
        and config.prompt_lookup_num_tokens is None  # speculative decoding: generate()
    )


def _engine_logprob_fields(result) -> dict[str, Any]:
    """`_logprob_fields` of an `EngineResult` (one row, its prompt unpadded)."""
    import types

    import numpy as np

    def row(x):
        return None if x is None else np.asarray(x)[None]

    fields = (
        "raw_token_logprobs", "top_logprobs", "top_token_ids",
        "prompt_logprobs", "prompt_top_logprobs", "prompt_top_token_ids",
    )  # fmt: skip
    out = types.SimpleNamespace(**{name: row(getattr(result, name)) for name in fields})
    return _logprob_fields(out, 0, len(result.tokens), np.ones(len(result.prompt), np.int32))


def _eval_engine(args: argparse.Namespace, lm, items: list, write) -> None:
    """Continuous batching (`jaxdecode.Engine`, `compact_tail` from 8 slots): one engine per
    group of prompts that may share slots (`engine.group_key`: prompts with
    different output constraints do), `--batch_size` slots; the records of each
    decode call's finished prompts are written (and fsynced) at once."""
    import numpy as np

    from jaxdecode.engine import Engine
    from jaxdecode.generation import bucket_length
    from jaxdecode.rows import group_key

    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(group_key(item[2], lengths_per_row=True), []).append(item)
    for group in groups.values():
        max_len = max(bucket_length(len(e), "pow2") + c.max_new_tokens for _, e, c in group)
        try:
            engine = Engine(
                lm,
                slots=args.batch_size,
                max_len=max_len,
                config=group[0][2],
                steps_per_call=args.steps_per_call,
                prefill_rows=args.prefill_rows,
                # Below 8 slots the smaller programs cost more to compile than they save.
                compact_tail=args.batch_size >= 8,
            )
            engine.submit([e for _, e, _ in group], [c for _, _, c in group])
        except ValueError as e:
            raise CLIError(f"prompt id {group[0][0]['id']!r}: {e}") from None
        while engine.pending:
            lines = []
            for r in engine.step():
                rec, _, cfg = group[r.index]
                tokens = [int(t) for t in r.tokens]
                row_logps = np.asarray(r.token_logprobs, np.float64)
                if not np.all(np.isfinite(row_logps)):
                    raise CLIError(
                        f"model {args.model!r} produced non-finite log-probabilities (NaN or "
                        "inf): its weights or logits are broken; check the checkpoint"
                    )
                text = tokens[:-1] if tokens and tokens[-1] in cfg.eos_ids else tokens
                output = {
                    "text": lm.tokenizer.decode(text),
                    "tokens": tokens,
                    "token_logprobs": [round(float(x), 6) for x in row_logps],
                    "sequence_score": None,
                    **_engine_logprob_fields(r),
                }
                lines.append(_eval_result(rec, cfg, [output], args.model))
            write(lines)
        del engine


def _eval_static(args: argparse.Namespace, lm, mesh, items: list, write, assistant=None) -> None:
    """Static batches (`--static-batching`, and the prompts the engine does not
    serve): prompts of one group (`_group_key`) share a batch of `--batch_size`
    rows, which ends when its longest row does."""
    import jaxdecode
    from jaxdecode.rows import arrayed_fields

    # Groups share one compiled program: same bucket and static options.
    groups: dict[tuple, list] = {}
    for item in items:
        bucket = jaxdecode.bucket_length(len(item[1]), "pow2")
        groups.setdefault(_group_key(item[2], bucket), []).append(item)
    for group in groups.values():
        arrayed = arrayed_fields(group[0][2], args.batch_size)
        for start in range(0, len(group), args.batch_size):
            batch = group[start : start + args.batch_size]
            # Pad the last batch to the full size: one program per group.
            padded = batch + [batch[-1]] * (args.batch_size - len(batch))
            config, keys = _batch_config([c for _, _, c in padded], arrayed)
            ids, mask = _left_pad([e for _, e, _ in padded], config.pad_id)
            try:
                out = jaxdecode.generate(
                    lm, ids, mask, config, key=keys, mesh=mesh, assistant_model=assistant
                )
            except ValueError as e:
                raise CLIError(f"prompt id {batch[0][0]['id']!r}: {e}") from None
            r_per = config.num_return_sequences
            lines = []
            for i, (rec, _, cfg) in enumerate(batch):
                outputs = _outputs(
                    args.model, lm, cfg, out, i * r_per, r_per, ids.shape[1], mask[i]
                )
                lines.append(_eval_result(rec, cfg, outputs, args.model))
            write(lines)


def _check_line_memory(args: argparse.Namespace, lm, mesh, item: tuple, on_engine: bool) -> None:
    """ValueError when one line alone cannot fit: on the engine, `--batch_size`
    slots of its bucket plus its `max_new_tokens`; in static batches, a batch of
    `--batch_size` such prompts (generate's own check)."""
    from jaxdecode.engine import slot_memory
    from jaxdecode.generation import bucket_length, check_memory

    _, encoded, config = item
    if on_engine:
        width = bucket_length(len(encoded), "pow2") + config.max_new_tokens
        slot_memory(lm.decoder, config, args.batch_size, width)
    else:
        check_memory(lm.decoder, config, args.batch_size, len(encoded), mesh=mesh)


def _render_chats(lm, records: list, chat: bool, system: str | None) -> tuple[list, list]:
    """Each record with the text its tokens come from (`_text`): a `messages` line
    rendered with the model's chat template (its `prompt` is that text), and with
    `--chat` a `prompt` line as the user's turn (its `prompt` stays as given, as in
    `generate --json --chat`). Returns (records, one error per line that fails)."""
    out, errors = [], []
    for r in records:
        try:
            if "messages" in r:
                text = lm.apply_chat_template(r["messages"], add_generation_prompt=True)
                r = {**r, "prompt": text, "_text": text}
            elif chat:
                r = {**r, "_text": _chat_text(lm, r["prompt"], system)}
        except (ValueError, CLIError) as e:
            errors.append((r["_line"], f"line {r['_line']} (id {r['id']!r}): {e}"))
            continue
        out.append(r)
    return out, errors


def _cmd_eval(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "steps_per_call", "prefill_rows"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CLIError(f"--{flag} must be >= 1, got {value}")
    if args.system is not None and not args.chat:
        raise CLIError("--system needs --chat (it is the chat's system message)")
    _check_paths(args.prompts_file, args.output)
    records, errors = _read_prompts(args.prompts_file)
    lm = _load_model(args.model, args.max_positions)
    mesh, lm = _mesh_and_model(args, lm)
    assistant = _load_assistant(args)
    base_overrides = _config_overrides(args)
    _make_config(lm, base_overrides)  # command-line options fail fast, before any prompt
    base_seed = base_overrides.pop("seed", 0)
    done = _done_results(args.output)
    # Chat lines become their rendered prompt before anything else looks at them.
    records, chat_errors = _render_chats(lm, records, args.chat, args.system)
    errors += chat_errors
    for r in records:
        prev = done.get(json.dumps(r["id"]))
        if prev is not None and prev.get("prompt") != r["prompt"]:
            raise CLIError(
                f"{args.output} has a result for id {r['id']!r} with another prompt than "
                f"line {r['_line']} of {args.prompts_file}; give another -o"
            )
    todo = [r for r in records if json.dumps(r["id"]) not in done]

    # Every prompt and option is checked before the first generation; a result
    # already in OUT must have been made with this run's options.
    planned = []
    for r in records:
        encoded = lm.tokenizer.encode(r.get("_text", r["prompt"]))
        if not encoded:
            errors.append((r["_line"], f"line {r['_line']} (id {r['id']!r}): prompt is empty"))
            continue
        try:
            config = _eval_config(lm, base_overrides, r, len(encoded), base_seed)
        except ValueError as e:
            errors.append((r["_line"], f"line {r['_line']} (id {r['id']!r}): {e}"))
            continue
        prev = done.get(json.dumps(r["id"]))
        if prev is None:
            planned.append((r, encoded, config))
            continue
        changed = _changed_options(prev, _made_with(args.model, config))
        if changed:
            raise CLIError(
                f"{args.output} has a result for id {r['id']!r} (line {r['_line']}) made with "
                f"other options: {changed}; rerun with the same options to resume, or give "
                "another -o"
            )
    if errors:
        raise _bad_lines(args.prompts_file, errors)

    # The engine takes what it can serve; the rest runs in static batches. Each
    # line must fit in memory alone (its bucket and max_new_tokens), checked
    # before anything compiles.
    static_items, engine_items = [], []
    for item in planned:
        # A draft model (--assistant_model) speculates: generate(), static batches.
        use_engine = not args.static_batching and mesh is None and assistant is None
        on_engine = use_engine and _engine_serves(item[2])
        try:
            _check_line_memory(args, lm, mesh, item, on_engine)
        except ValueError as e:
            r = item[0]
            errors.append((r["_line"], f"line {r['_line']} (id {r['id']!r}): {e}"))
        (engine_items if on_engine else static_items).append(item)
    if errors:
        raise _bad_lines(args.prompts_file, errors)

    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="prompt", disable=args.quiet, file=sys.stderr)
    progress = _Progress(bar)
    try:
        out_file = open(args.output, "a", encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise CLIError(f"cannot write to {args.output}: {e.strerror}") from None
    try:
        with out_file:
            write = functools.partial(_write_lines, out_file, progress)
            _eval_engine(args, lm, engine_items, write)
            _eval_static(args, lm, mesh, static_items, write, assistant)
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


def _detect_texts(path: str) -> list[tuple[Any, str]]:
    """`(id, text)` per line of a JSONL file: a JSON string, or an object with
    "text" (and optionally "id"; default: the line number)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{number}: not JSON ({e})") from None
        if isinstance(rec, str):
            rec = {"text": rec}
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise CLIError(f'{path}:{number}: a line is a JSON string or an object with "text"')
        out.append((rec.get("id", number), rec["text"]))
    return out


def _cmd_detect(args: argparse.Namespace) -> int:
    """Scores each text for a watermark: one JSON object per line on stdout."""
    import numpy as np

    import jaxdecode

    if args.watermarking_config is None:
        raise CLIError("detect needs --watermarking_config (the one used to generate)")
    try:
        config = jaxdecode.GenerationConfig(watermarking_config=args.watermarking_config)
        config.validate()
    except ValueError as e:
        raise CLIError(str(e)) from None
    texts = _detect_texts(args.texts_file)
    lm = _load_model(args.model, args.max_positions)
    for rid, text in texts:
        ids = [lm.tokenizer.encode(text)]
        try:
            result = jaxdecode.watermark_detect(
                ids,
                config.watermarking_config,
                vocab_size=lm.vocab_size,
                z_threshold=args.z_threshold,
                ignore_repeated_ngrams=args.ignore_repeated_ngrams,
                eos_token_id=lm.generation_config.eos_ids[0]
                if lm.generation_config.eos_ids
                else None,
            )
        except ValueError as e:
            print(json.dumps({"id": rid, "error": str(e)}))
            continue
        fields = {
            k: np.asarray(v)[0].item()
            for k, v in dataclasses.asdict(result).items()
            if k not in ("g_values", "mask")
        }
        print(json.dumps({"id": rid, **fields}))
    return 0


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
    if args.system is not None and not args.chat:
        raise CLIError("--system needs --chat (it is the chat's system message)")
    lm = _load_model(args.model, args.max_positions)
    overrides = _config_overrides(args)
    if "max_length" not in overrides:
        overrides.setdefault("max_new_tokens", args.steps)
    config = _make_config(lm, overrides)
    # With --chat, the prompt is the user's turn and the answer alone is printed (as generate).
    text = _chat_text(lm, args.prompt, args.system) if args.chat else args.prompt
    ids, mask = _encode_batch(lm, [text], config.pad_id)
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
            prompt_text=text,
        )
    except OSError as e:
        raise CLIError(f"cannot write to {args.output}: {e}") from None
    seq = np.asarray(tr.output.sequences)[0, ids.shape[1] :][: int(tr.output.lengths[0])]
    seq = [int(t) for t in seq if not (args.chat and int(t) in config.eos_ids)]
    answer = lm.tokenizer.decode(seq)
    print(answer if args.chat else args.prompt + answer)
    print(f"wrote {len(written) - 1} pictures and {written[-1]}")
    return 0


# --------------------------------------------------------------------------- #
# Entry point.
# --------------------------------------------------------------------------- #


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
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
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
        help=f"one JSON object per prompt (schema {GENERATE_SCHEMA!r}; see the README)",
    )
    _add_assistant(gen)
    _add_config_flags(gen)

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
        help="shard over a device mesh, e.g. data=4,model=2 (rows over data; weights, "
        "KV-cache heads and vocabulary over model; product = device count)",
    )
    _add_assistant(ev)
    _add_config_flags(ev)

    det = sub.add_parser(
        "detect",
        help="score texts (a JSONL file) for a watermark: z-score and p-value, or SynthID's",
    )
    det.add_argument("texts_file", metavar="TEXTS.jsonl")
    _add_common(det)
    det.add_argument(
        "--watermarking_config",
        "--watermarking-config",
        type=_json_value,
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
    _add_config_flags(ex)
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
                return _cmd_generate(args)
            if args.command == "eval":
                return _cmd_eval(args)
            if args.command == "explain":
                return _cmd_explain(args)
            if args.command == "detect":
                return _cmd_detect(args)
            parser.print_help()
            return 2
        except CLIError as e:
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


if __name__ == "__main__":
    sys.exit(main())
