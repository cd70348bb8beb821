"""Constraints shared by the constrained-decoding tests (tests/unit/test_grammar.py,
tests/integration/test_grammar_generate.py and the CLI's,
tests/integration/test_constrained_cli.py): two JSON schemas and three regular
expressions the bundled byte-level model can complete, and the prompt and output
helpers of the first two."""

from __future__ import annotations

import numpy as np

__all__ = ["NESTED", "PERSON", "REGEXES", "decoded_rows", "prompt_rows"]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "maxDigits": 3},
        "kind": {"enum": ["cat", 'say "hi"', "back\\slash", 3.5, None]},
    },
    "required": ["name", "age", "kind"],
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "maxDigits": 4},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "point": {
            "type": "object",
            "properties": {"x": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["x", "ok"],
        },
    },
    "required": ["id", "tags", "point"],
}
REGEXES = [r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(yes|no|maybe)!?", r"[a-z]{1,6}( [a-z]{1,6}){0,2}\."]


def decoded_rows(lm, out, prompt_len):
    """(text, ended with EOS) of every row."""
    seqs, lengths = np.asarray(out.sequences), np.asarray(out.lengths)
    eos = set(lm.generation_config.eos_ids)
    rows = []
    for row, n in zip(seqs, lengths, strict=True):
        toks = row[prompt_len : prompt_len + int(n)].tolist()
        ended = bool(toks) and toks[-1] in eos
        rows.append((lm.tokenizer.decode(toks[:-1] if ended else toks), ended))
    return rows


def prompt_rows(lm, text, rows=1):
    """`text`'s tokens as `[rows, n]` int32 (the same prompt on every row)."""
    return np.repeat(np.array([lm.tokenizer.encode(text)], np.int32), rows, axis=0)
