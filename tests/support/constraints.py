"""Constraints shared by the constrained-decoding tests (tests/unit/test_grammar.py
and the CLI's, tests/integration/test_constrained_cli.py): two JSON schemas and
three regular expressions the bundled byte-level model can complete."""

from __future__ import annotations

__all__ = ["NESTED", "PERSON", "REGEXES"]

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
