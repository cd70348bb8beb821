"""`jaxdecode eval`: a JSONL file of prompts, on the continuous-batching engine
or in static batches; resumable (records are fsynced as they finish, and a rerun
skips the prompts already in the output file).

Several processes (`--coordinator_address/--num_processes/--process_id`,
`--distributed`): each serves its share of the lines into its own part file and
process 0 merges them (`_merge_parts`).

A module over ~500 lines: reading and checking the prompts file, resuming, the
two ways of serving it (engine, static batches) and the processes' shares are
one command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import os
import sys
import time
import zlib
from typing import Any

from jaxdecode.cli import common, flags
from jaxdecode.cli import records as record_io  # `records` is the prompt lines here

_MAX_REPORTED = 20  # bad lines named in one error
_PAGE_FLAGS = ("kv_pages", "prefill_chunk")  # sizes of the engine's paged cache
PAGE_SIZE = 16  # the engine's pages when --page_size is not given (0: the dense slots)


def _bad_lines(path: str, errors: list[tuple[int, str]]) -> common.CLIError:
    """One error naming every bad line (up to _MAX_REPORTED), in line order."""
    errors = [msg for _, msg in sorted(errors)]
    more = f"; ... and {len(errors) - _MAX_REPORTED} more" if len(errors) > _MAX_REPORTED else ""
    what = "a bad line" if len(errors) == 1 else f"{len(errors)} bad lines"
    return common.CLIError(
        f"{path} has {what}, nothing was generated: " + "; ".join(errors[:_MAX_REPORTED]) + more
    )


def _read_prompts(path: str) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """The well-formed prompt records, each with its line number `_line`, and one
    error per malformed line."""
    from jaxdecode.config import GenerationConfig

    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    records, errors = [], []
    text = common.read_text(path)
    if not text.strip():
        raise common.CLIError(f"{path} is empty: give one prompt per line (JSON)")
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
            allowed = names | set(_PROMPT_FIELDS) | set(_NEGATIVE_FIELDS) | {"id"}
            unknown = sorted(set(rec) - allowed)
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


# The ways an eval line gives its prompt: text, a chat, or token ids.
_PROMPT_FIELDS = ("prompt", "messages", "prompt_ids")
_NO_PROMPT = (
    "each line must be an object with a string 'prompt', a list 'messages' or a list 'prompt_ids'"
)


# Classifier-free guidance's negative prompt of a line: text or token ids.
_NEGATIVE_FIELDS = ("negative_prompt", "negative_prompt_ids")


def _negative_problem(rec: dict) -> str | None:
    """Why a line's negative prompt is malformed: at most one of a non-empty string
    `negative_prompt` or a non-empty list of token ids `negative_prompt_ids`."""
    given = [k for k in _NEGATIVE_FIELDS if k in rec]
    if len(given) > 1:
        return "give one of 'negative_prompt' or 'negative_prompt_ids', not both"
    if "negative_prompt_ids" in rec:
        ids = rec["negative_prompt_ids"]
        ok = isinstance(ids, list) and ids
        ok = ok and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        if not ok:
            return (
                "'negative_prompt_ids' must be a non-empty list of token ids (integers >= 0), "
                f"got {ids!r}"
            )
    if "negative_prompt" in rec:
        text = rec["negative_prompt"]
        if not isinstance(text, str) or not text:
            return f"'negative_prompt' must be a non-empty string, got {text!r}"
    return None


def _prompt_problem(rec: Any) -> str | None:
    """Why an eval line holds no prompt: it needs one of a string `prompt`, a chat
    as `messages` (a list of {"role", "content"} objects) or token ids as
    `prompt_ids` (vLLM's `prompt_token_ids`: a non-empty list of integers >= 0)."""
    if not isinstance(rec, dict):
        return _NO_PROMPT
    negative = _negative_problem(rec)
    if negative:
        return negative
    given = [k for k in _PROMPT_FIELDS if k in rec]
    if len(given) > 1:
        return f"give one of 'prompt', 'messages' or 'prompt_ids', not {' and '.join(given)}"
    if "prompt_ids" in rec:
        ids = rec["prompt_ids"]
        ok = isinstance(ids, list) and ids
        ok = ok and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        if not ok:
            return (
                f"'prompt_ids' must be a non-empty list of token ids (integers >= 0), got {ids!r}"
            )
        return None
    if "messages" in rec:
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
        return _NO_PROMPT
    return None


def _check_paths(prompts_path: str, out_path: str) -> None:
    """Refuses an OUT that is the prompts file (by path or inode) or cannot be
    written, before anything is loaded."""
    if not os.path.isfile(prompts_path):
        raise common.CLIError(f"prompts file not found: {prompts_path}")
    if os.path.isdir(out_path):
        raise common.CLIError(f"-o {out_path} is a directory; give a file")
    if os.path.exists(out_path) and os.path.samefile(prompts_path, out_path):
        raise common.CLIError(
            f"-o {out_path} is the prompts file; give another file for the results"
        )
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise common.CLIError(f"-o {out_path}: directory {parent} does not exist")


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
            ok = (
                isinstance(rec, dict) and rec.get("schema") == record_io.EVAL_SCHEMA and "id" in rec
            )
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise common.CLIError(
                f'{out_path}:{n} is not a jaxdecode eval result (no "schema": '
                f'"{record_io.EVAL_SCHEMA}"): {line[:60]!r}; give another -o'
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
    skip = (*_PROMPT_FIELDS, *_NEGATIVE_FIELDS, "id", "_line", "_text", "_negative")
    line = {k: v for k, v in rec.items() if k not in skip}
    overrides = {**base, **line}
    if "max_length" in line and "max_new_tokens" not in line:
        overrides.pop("max_new_tokens", None)
    try:
        overrides = common.check_overrides(overrides)
    except common.CLIError as e:
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
    negative = [k for k in _NEGATIVE_FIELDS if k in rec]
    if negative and not config.guided():
        raise ValueError(
            f"{negative[0]} is the negative prompt of classifier-free guidance: set "
            f"guidance_scale (!= 1) on the line or with --guidance_scale, got "
            f"guidance_scale={config.guidance_scale!r}"
        )
    if config.do_sample:
        config = config.replace(seed=_prompt_seed(rec, base_seed))
        config.validate()
    return config


def _with_negative(lm, rec: dict, chat: bool, system: str | None) -> dict:
    """The line with its negative prompt's token ids (`_negative`) when it gives
    one: `negative_prompt_ids` as given, or `negative_prompt` tokenized (with
    `--chat` rendered as the user's turn, like the prompt).

    Raises ValueError naming the field."""
    if "negative_prompt_ids" in rec:
        ids = rec["negative_prompt_ids"]
        if max(ids) >= lm.vocab_size:
            raise ValueError(
                f"negative_prompt_ids holds {max(ids)}, outside the vocabulary "
                f"[0, {lm.vocab_size - 1}]"
            )
        return {**rec, "_negative": ids}
    if "negative_prompt" not in rec:
        return rec
    if lm.tokenizer is None:
        raise ValueError("negative_prompt needs the model's tokenizer (the model has none)")
    text = rec["negative_prompt"]
    if chat:
        try:
            text = common.chat_text(lm, text, system)
        except common.CLIError as e:
            raise ValueError(str(e)) from None
    ids = common.prompt_ids(lm, text, chat)
    if not ids:
        raise ValueError(f"negative_prompt {rec['negative_prompt']!r} has no tokens")
    return {**rec, "_negative": list(ids)}


def _check_constraint(lm, config) -> None:
    """A line's regex / json_schema / choices: one constraint, compiled now (cached)
    so that a bad one is reported with the other bad lines, before generating;
    it and stop_strings need the model's tokenizer."""
    from jaxdecode.processors.grammar import compile_spec

    if config.stop_strings and lm.tokenizer is None:
        raise ValueError("stop_strings needs the model's tokenizer (the model has none)")
    parsed = config.constraints()
    if parsed is None:
        return
    if lm.tokenizer is None:
        raise ValueError(
            "regex / json_schema / choices need the model's tokenizer (the model has none)"
        )
    if parsed[0]:
        raise ValueError("a line's regex / json_schema / choices is one constraint, not a list")
    compile_spec(parsed[1][0], lm.tokenizer)


def _group_key(config, bucket: int) -> tuple:
    """What must be equal for prompts to share a static batch: the prompt bucket,
    `jaxdecode.rows.group_key` (one length per batch) and whether any row is
    constrained."""
    from jaxdecode.rows import group_key

    constrained = config.constraints() is not None
    return bucket, group_key(config, lengths_per_row=False), constrained, config.guided()


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
    out_file.write("".join(record_io.dumps(r) + "\n" for r in results))
    out_file.flush()
    os.fsync(out_file.fileno())
    progress.add(len(results), sum(len(o["tokens"]) for r in results for o in r["outputs"]))


def _engine_serves(config) -> bool:
    """Whether the continuous-batching engine gives this prompt's record: one
    sequence (greedy or sampling; output constraints and every log-probability
    field included). Beam search, several sequences, speculative decoding and
    classifier-free guidance run static batches."""
    return (
        config.num_beams == 1
        and config.num_return_sequences == 1
        and config.prompt_lookup_num_tokens is None  # speculative decoding: generate()
        and not config.guided()  # the unconditional rows: generate()
    )


def _eval_engine(args: argparse.Namespace, lm, mesh, items: list, write) -> None:
    """Continuous batching (`jaxdecode.Engine`, `compact_tail` from 8 slots): one engine per
    group of prompts that may share slots (`engine.group_key`: prompts with
    different output constraints do), `--batch_size` slots (split over the
    mesh's data axis with `--mesh`); the records of each decode call's finished
    prompts are written (and fsynced) at once."""
    import numpy as np

    from jaxdecode.generation import bucket_length
    from jaxdecode.rows import group_key
    from jaxdecode.serving import Engine

    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(group_key(item[2], lengths_per_row=True), []).append(item)
    for number, group in enumerate(groups.values()):
        if number:
            common.release_memory()
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
                mesh=mesh,
                **_page_options(args),
            )
            engine.submit([e for _, e, _ in group], [c for _, _, c in group])
        except ValueError as e:
            raise common.CLIError(f"prompt id {group[0][0]['id']!r}: {e}") from None
        while engine.pending:
            lines = []
            for r in engine.step():
                rec, _, cfg = group[r.index]
                tokens = [int(t) for t in r.tokens]
                row_logps = np.asarray(r.token_logprobs, np.float64)
                if not np.all(np.isfinite(row_logps)):
                    raise common.CLIError(
                        f"model {args.model!r} produced non-finite log-probabilities (NaN or "
                        "inf): its weights or logits are broken; check the checkpoint"
                    )
                text = tokens[:-1] if tokens and tokens[-1] in cfg.eos_ids else tokens
                output = {
                    "text": common.decode(lm, text),
                    "tokens": tokens,
                    "token_logprobs": [round(float(x), 6) for x in row_logps],
                    "sequence_score": None,
                    **record_io.engine_logprob_fields(r),
                }
                lines.append(record_io.eval_result(rec, cfg, [output], args))
            write(lines)
        del engine


def _page_size(args: argparse.Namespace) -> int | None:
    """The engine's page size: `--page_size`, 16 when not given, None for 0
    (the dense slot cache)."""
    if args.page_size is None:
        return PAGE_SIZE
    return args.page_size or None


def _page_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine's paged-cache arguments from `--page_size` and friends."""
    if _page_size(args) is None:
        return {"page_size": None}
    return dict(
        page_size=_page_size(args),
        kv_pages=args.kv_pages,
        prefix_cache=args.prefix_cache,
        prefill_chunk=args.prefill_chunk,
    )


def _check_page_flags(args: argparse.Namespace) -> None:
    """One-line errors for the paged-cache flags, before the model is loaded."""
    if args.page_size is not None and args.page_size < 0:
        raise common.CLIError(
            f"--page_size must be >= 0 (0: the engine's dense slot cache), got {args.page_size}"
        )
    given = [f"--{f} {getattr(args, f)}" for f in ("page_size", *_PAGE_FLAGS)]
    given = [g for g in given if not g.endswith(" None")]
    given += [] if args.prefix_cache else ["--no-prefix_cache"]
    if args.page_size == 0:
        for flag in given[1:]:
            raise common.CLIError(
                f"{flag.split()[0]} needs the engine's paged cache: drop --page_size 0 "
                "(the dense slot cache)"
            )
        return
    for flag, on in (
        ("--static-batching", args.static_batching),
        ("--assistant_model", args.assistant_model is not None),
    ):
        if on and given:
            raise common.CLIError(
                f"{given[0]} is the engine's cache, and {flag} runs every "
                "line in static batches; drop one of them"
            )


def _check_paged_model(args: argparse.Namespace, lm) -> None:
    """An explicit `--page_size N` needs a model with a paged cache (by
    default, a model without one keeps the dense slots)."""
    if lm.decoder.init_paged is not None:
        return
    for flag in ("page_size", *_PAGE_FLAGS):
        if getattr(args, flag):
            raise common.CLIError(
                f"--{flag} {getattr(args, flag)}: the model {args.model!r} has no paged cache "
                f"(an adapted model may not); drop --{flag} (it keeps the dense slot cache)"
            )


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
            ids, mask = common.left_pad([e for _, e, _ in padded], config.pad_id)
            # Each row's own negative prompt (default: its prompt's last token, as
            # generate's), unpadded: each row is guided as on its own.
            negative = (
                [r.get("_negative", e[-1:]) for r, e, _ in padded] if config.guided() else None
            )
            try:
                out = jaxdecode.generate(
                    lm,
                    ids,
                    mask,
                    config,
                    key=keys,
                    mesh=mesh,
                    assistant_model=assistant,
                    negative_prompt_ids=negative,
                )
            except ValueError as e:
                raise common.CLIError(f"prompt id {batch[0][0]['id']!r}: {e}") from None
            r_per = config.num_return_sequences
            lines = []
            for i, (rec, _, cfg) in enumerate(batch):
                outputs = record_io.output_records(
                    args.model, lm, cfg, out, i * r_per, r_per, ids.shape[1], mask[i]
                )
                lines.append(record_io.eval_result(rec, cfg, outputs, args))
            write(lines)


def _check_line_memory(args: argparse.Namespace, lm, mesh, item: tuple, on_engine: bool) -> None:
    """ValueError when one line alone cannot fit: on the engine, `--batch_size`
    slots of its bucket plus its `max_new_tokens`; in static batches, a batch of
    `--batch_size` such prompts (generate's own check)."""
    from jaxdecode.generation import bucket_length, check_memory
    from jaxdecode.serving import slot_memory

    _, encoded, config = item
    if on_engine:
        width = bucket_length(len(encoded), "pow2") + config.max_new_tokens
        devices = 1 if mesh is None else mesh.devices.size
        data = 1 if mesh is None else mesh.shape["data"]
        pool = None
        ps = _page_size(args)
        paged = lm.decoder.with_cache(config.quantized_cache()).init_paged is not None
        if ps is not None and paged:
            # The pool `Engine` allocates for this line alone.
            need = -(-(len(encoded) + config.max_new_tokens) // ps)
            if args.kv_pages is not None and need > args.kv_pages:
                raise ValueError(
                    f"--kv_pages {args.kv_pages} is too small: its {len(encoded)} tokens plus "
                    f"max_new_tokens={config.max_new_tokens} need {need} pages of "
                    f"--page_size {ps}"
                )
            pool = (args.kv_pages or args.batch_size * -(-width // ps), ps)
        slot_memory(
            lm.decoder, config, args.batch_size, width, devices=devices, pool=pool, data=data
        )
    else:
        check_memory(lm.decoder, config, args.batch_size, len(encoded), mesh=mesh)


def _check_mesh_slots(args: argparse.Namespace, mesh, on_engine: bool) -> None:
    """On a mesh the engine's `--batch_size` slots split evenly over the data axis."""
    if mesh is None or not on_engine:
        return
    data = mesh.shape["data"]
    if args.batch_size % data:
        raise common.CLIError(
            f"--batch_size {args.batch_size} must be a multiple of --mesh's data axis ({data}): "
            "the engine's slots split evenly over it (or give --static-batching)"
        )


def _render_chats(lm, records: list, chat: bool, system: str | None) -> tuple[list, list]:
    """Each record with the text its tokens come from (`_text`): a `messages` line
    rendered with the model's chat template (its `prompt` is that text), and with
    `--chat` a `prompt` line as the user's turn (its `prompt` stays as given, as in
    `generate --json --chat`). Returns (records, one error per line that fails)."""
    out, errors = [], []
    for r in records:
        try:
            if "prompt_ids" in r:
                pass  # already tokens: no template
            elif "messages" in r:
                text = lm.apply_chat_template(r["messages"], add_generation_prompt=True)
                r = {**r, "prompt": text, "_text": text}
            elif chat:
                r = {**r, "_text": common.chat_text(lm, r["prompt"], system)}
        except (ValueError, common.CLIError) as e:
            errors.append((r["_line"], f"line {r['_line']} (id {r['id']!r}): {e}"))
            continue
        out.append(r)
    return out, errors


def cmd_eval(args: argparse.Namespace) -> int:
    """A function over ~80 lines: the command's steps in order (read, check,
    resume, render, serve, report); each step is a call."""
    for flag in ("batch_size", "steps_per_call", "prefill_rows", *_PAGE_FLAGS):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise common.CLIError(f"--{flag} must be >= 1, got {value}")
    _check_page_flags(args)
    if args.system is not None and not args.chat:
        raise common.CLIError("--system needs --chat (it is the chat's system message)")
    _check_paths(args.prompts_file, args.output)
    share = _distributed(args)  # (this process, processes) or None
    part = args.output if share is None else f"{args.output}.part-{share[0]}"
    records, errors = _read_prompts(args.prompts_file)
    # Token-id lines need no tokenizer; a file of them only runs a model without one.
    text_lines = [r["_line"] for r in records if "prompt_ids" not in r]
    why = f" for line {text_lines[0]}'s text prompt" if text_lines else None
    lm = common.load_model(args, why)
    _check_paged_model(args, lm)
    mesh, lm = common.mesh_and_model(args, lm)
    assistant = common.load_assistant(args)
    base_overrides = flags.config_overrides(args)
    common.make_config(lm, base_overrides)  # command-line options fail fast, before any prompt
    base_seed = base_overrides.pop("seed", 0)
    done = _done_results(args.output)
    if share is not None:  # the merged OUT of an earlier run, and this process's part
        done.update(_done_results(part))
    # Chat lines become their rendered prompt before anything else looks at them.
    records, chat_errors = _render_chats(lm, records, args.chat, args.system)
    errors += chat_errors
    for r in records:
        prev = done.get(json.dumps(r["id"]))
        keys = ("prompt", "prompt_ids", *_NEGATIVE_FIELDS)
        if prev is not None and any(prev.get(k) != r.get(k) for k in keys):
            raise common.CLIError(
                f"{args.output} has a result for id {r['id']!r} with another prompt than "
                f"line {r['_line']} of {args.prompts_file}; give another -o"
            )
    mine = {json.dumps(r["id"]) for i, r in enumerate(records) if _owner(i, share) == 0}
    todo = [r for r in records if json.dumps(r["id"]) not in done and json.dumps(r["id"]) in mine]

    # Every prompt and option is checked before the first generation; a result
    # already in OUT must have been made with this run's options.
    planned = []
    for r in records:
        if "prompt_ids" in r:
            encoded = r["prompt_ids"]
            if max(encoded) >= lm.vocab_size:
                msg = f"prompt_ids holds {max(encoded)}, outside the vocabulary [0, {lm.vocab_size - 1}]"
                errors.append((r["_line"], f"line {r['_line']} (id {r['id']!r}): {msg}"))
                continue
        else:
            # `_text` is rendered by the chat template: it writes its own BOS.
            encoded = common.prompt_ids(lm, r.get("_text", r["prompt"]), chat="_text" in r)
        if not encoded:
            errors.append((r["_line"], f"line {r['_line']} (id {r['id']!r}): prompt is empty"))
            continue
        try:
            r = _with_negative(lm, r, args.chat, args.system)
        except ValueError as e:
            errors.append((r["_line"], f"line {r['_line']} (id {r['id']!r}): {e}"))
            continue
        try:
            config = _eval_config(lm, base_overrides, r, len(encoded), base_seed)
        except ValueError as e:
            errors.append((r["_line"], f"line {r['_line']} (id {r['id']!r}): {e}"))
            continue
        prev = done.get(json.dumps(r["id"]))
        if prev is None:
            if json.dumps(r["id"]) in mine:  # another process's line: checked, not served
                planned.append((r, encoded, config))
            continue
        changed = record_io.changed_options(prev, record_io.made_with(args, config))
        if changed:
            raise common.CLIError(
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
    # A draft model (--assistant_model) speculates: generate(), static batches.
    use_engine = not args.static_batching and assistant is None
    for item in planned:
        on_engine = use_engine and _engine_serves(item[2])
        try:
            _check_line_memory(args, lm, mesh, item, on_engine)
        except ValueError as e:
            r = item[0]
            errors.append((r["_line"], f"line {r['_line']} (id {r['id']!r}): {e}"))
        (engine_items if on_engine else static_items).append(item)
    if errors:
        raise _bad_lines(args.prompts_file, errors)
    _check_mesh_slots(args, mesh, bool(engine_items))

    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="prompt", disable=args.quiet, file=sys.stderr)
    progress = _Progress(bar)
    try:
        out_file = open(part, "a", encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise common.CLIError(f"cannot write to {part}: {e.strerror}") from None
    try:
        with out_file:
            write = functools.partial(_write_lines, out_file, progress)
            _eval_engine(args, lm, mesh, engine_items, write)
            _eval_static(args, lm, mesh, static_items, write, assistant)
    finally:
        bar.close()
    if not args.quiet:
        print(
            f"wrote {len(todo)} results to {part} ({len(done)} were already there)",
            file=sys.stderr,
        )
    if share is not None:
        _merge_parts(args, records, share)
    return 0


def _owner(index: int, share: tuple[int, int] | None) -> int:
    """0 when line `index` (in file order) is this process's to serve, else the
    process offset: with `share = (I, N)` process I serves lines I, I + N, ..."""
    if share is None:
        return 0
    return (index - share[0]) % share[1]


def _distributed(args: argparse.Namespace) -> tuple[int, int] | None:
    """`--coordinator_address/--num_processes/--process_id` or `--distributed`:
    `jax.distributed.initialize` (before anything else touches JAX) and `(this
    process, processes)`; None for a one-process run."""
    addr, n, pid = args.coordinator_address, args.num_processes, args.process_id
    if not args.distributed and addr is None:
        if n is not None or pid is not None:
            raise common.CLIError("--num_processes and --process_id need --coordinator_address")
        return None
    if args.distributed and addr is not None:
        raise common.CLIError("give --distributed or --coordinator_address, not both")
    if addr is not None:
        if n is None or pid is None:
            raise common.CLIError("--coordinator_address needs --num_processes and --process_id")
        if n < 1 or not 0 <= pid < n:
            raise common.CLIError(
                f"--process_id must be in [0, --num_processes - 1] = [0, {n - 1}], got {pid}"
            )
    import jax

    try:
        if addr is None:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(addr, num_processes=n, process_id=pid)
    except (RuntimeError, ValueError) as e:
        raise common.CLIError(f"jax.distributed.initialize failed: {e}") from None
    return jax.process_index(), jax.process_count()


def _merge_parts(args: argparse.Namespace, records: list, share: tuple[int, int]) -> None:
    """Process 0 waits until every process's part holds its share (naming, once, the
    processes it waits for: a process that died is the one named when JAX's
    coordination service ends the run), then writes OUT from them, every line once
    in file order (atomically), and removes the parts; every process then leaves
    `jax.distributed` (a barrier)."""
    import jax

    pid, n = share
    if pid == 0:
        got = _done_results(args.output)
        told = False
        while True:
            lacking = {}
            for j in range(n):
                part = f"{args.output}.part-{j}"
                got.update(_done_results(part))
                want = [r for i, r in enumerate(records) if _owner(i, (j, n)) == 0]
                short = sum(json.dumps(r["id"]) not in got for r in want)
                if short:
                    lacking[j] = (
                        f"process {j} ({part}: {len(want) - short} of its {len(want)} lines)"
                    )
            if not lacking:
                break
            if not told:
                print(f"jaxdecode: waiting for {', '.join(lacking.values())}", file=sys.stderr)
                told = True
            time.sleep(0.5)
        tmp = f"{args.output}.merging"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(record_io.dumps(got[json.dumps(r["id"])]) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.output)
        for j in range(n):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{args.output}.part-{j}")
    jax.distributed.shutdown()
