"""The JSON records the commands print and write (`--json`, eval's output file):
one schema per command, built from what `generate` and the engine return."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
from typing import Any

from jaxdecode.cli import common

GENERATE_SCHEMA = "jaxdecode.generate/1"


EVAL_SCHEMA = "jaxdecode.eval/1"


def output_records(
    model: str, lm, config, out, first_row: int, n_rows: int, width: int, prompt_mask=None
) -> list[dict]:
    """The records of rows `[first_row, first_row + n_rows)` of a `GenerateOutput`:
    text, tokens, token log-probabilities, beam score (None unless beam search),
    and the log-probability outputs the config asks for (`_logprob_fields`;
    `prompt_mask: [width]` marks the prompt's real tokens).

    Raises common.CLIError when the model produced non-finite log-probabilities (broken
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
            raise common.CLIError(
                f"model {model!r} produced non-finite log-probabilities (NaN or inf): "
                "its weights or logits are broken; check the checkpoint"
            )
        text_tokens = tokens[:-1] if tokens and tokens[-1] in config.eos_ids else tokens
        records.append(
            {
                "text": common.decode(lm, text_tokens),
                "tokens": tokens,
                "token_logprobs": [round(float(x), 6) for x in row_logps],
                "sequence_score": score,
                **_logprob_fields(out, row, n, prompt_mask),
            }
        )
    return records


def _logprob_fields(out, row: int, n: int, prompt_mask) -> dict[str, Any]:
    """`raw_token_logprobs`, `top_logprobs` (per generated token, `[[id, logprob],
    ...]` best first), `routed_experts` (per generated token, `[[expert, ...]
    per MoE layer]`) and `prompt_logprobs` (per real prompt token, null for the
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
    if out.routed_experts is not None:
        fields["routed_experts"] = np.asarray(out.routed_experts)[row, :n].tolist()
    if out.prompt_logprobs is not None:
        real = np.flatnonzero(np.asarray(prompt_mask) == 1)
        fields["prompt_logprobs"] = [None] + rounded(np.asarray(out.prompt_logprobs)[row, real[1:]])
        if out.prompt_top_token_ids is not None:
            ids = np.asarray(out.prompt_top_token_ids)[row, real[1:]]
            logps = np.asarray(out.prompt_top_logprobs)[row, real[1:]]
            fields["prompt_top_logprobs"] = [None] + pairs(ids, logps)
    return fields


def result_record(
    schema: str, prompt: str, seed: int | None, outputs: list[dict], **extra: Any
) -> dict:
    """One result record (the `--json` / eval schema; README, "The command line")."""
    return {"schema": schema, **extra, "prompt": prompt, "seed": seed, "outputs": outputs}


def eval_result(rec: dict, config, outputs: list[dict], args: argparse.Namespace) -> dict:
    """An eval line's record (`config`: the line's resolved config); a chat line
    (`messages`) keeps them and its rendered prompt, a token-id line its
    `prompt_ids` (its `prompt` is null), a guided line its negative prompt as given; `model` (and `adapter`) and `options` say
    what made it (`made_with`)."""
    fields = ("messages", "prompt_ids", "negative_prompt", "negative_prompt_ids")
    given = {k: rec[k] for k in fields if k in rec}
    seed = config.seed if config.do_sample else None
    record = result_record(EVAL_SCHEMA, rec.get("prompt"), seed, outputs, id=rec["id"], **given)
    return {**record, **made_with(args, config)}


def _json_plain(value: Any) -> Any:
    """`value` as JSON reads it back (tuples become lists), for comparisons; its
    `repr` where it holds a non-finite number (records are strict JSON)."""
    try:
        return json.loads(json.dumps(value, default=lambda x: x.tolist(), allow_nan=False))
    except ValueError:
        return repr(value)


def made_with(args: argparse.Namespace, config) -> dict[str, Any]:
    """What produced an eval record: `model` (a path made absolute), `adapter`
    (likewise, when `--adapter` was given) and `options`, every field of the line's
    resolved config that differs from `GenerationConfig()`'s default (its seed and
    own `max_new_tokens` included)."""
    from jaxdecode.config import GenerationConfig

    defaults = GenerationConfig()
    options = {}
    for f in dataclasses.fields(config):
        value = _json_plain(getattr(config, f.name))
        if value != _json_plain(getattr(defaults, f.name)):
            options[f.name] = value
    absolute = lambda path: os.path.abspath(path) if os.path.exists(path) else path
    adapter = getattr(args, "adapter", None)
    made = {"model": absolute(args.model), "options": options}
    return made if adapter is None else {**made, "adapter": absolute(adapter)}


def changed_options(prev: dict, made: dict[str, Any]) -> str | None:
    """How the run that wrote `prev` (an eval record) differs from `made`
    (`_made_with` of this run's line), or None when it does not."""
    from jaxdecode.config import GenerationConfig

    if not isinstance(prev.get("options"), dict) or "model" not in prev:
        return "no record of the options that made it (an older jaxdecode wrote it)"
    if prev["model"] != made["model"]:
        return f"--model {prev['model']!r} (now {made['model']!r})"
    if prev.get("adapter") != made.get("adapter"):
        return f"--adapter {prev.get('adapter')!r} (now {made.get('adapter')!r})"
    defaults, changed = GenerationConfig(), []
    for f in dataclasses.fields(GenerationConfig):
        default = _json_plain(getattr(defaults, f.name))
        old = prev["options"].get(f.name, default)
        new = made["options"].get(f.name, default)
        if old != new:
            changed.append(f"{f.name}={json.dumps(old)} (now {json.dumps(new)})")
    return ", ".join(changed) or None


def dumps(record: dict) -> str:
    # allow_nan=False: a NaN that got past output_records is an error, never invalid JSON.
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def engine_logprob_fields(result) -> dict[str, Any]:
    """`_logprob_fields` of an `EngineResult` (one row, its prompt unpadded)."""

    import numpy as np

    def row(x):
        return None if x is None else np.asarray(x)[None]

    fields = (
        "raw_token_logprobs", "top_logprobs", "top_token_ids",
        "prompt_logprobs", "prompt_top_logprobs", "prompt_top_token_ids", "routed_experts",
    )  # fmt: skip
    out = types.SimpleNamespace(**{name: row(getattr(result, name)) for name in fields})
    return _logprob_fields(out, 0, len(result.tokens), np.ones(len(result.prompt), np.int32))
