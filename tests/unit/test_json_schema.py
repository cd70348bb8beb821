"""JSON-schema keywords: each one is enforced by the token automaton or refused
with a one-line error naming it (jaxdecode.processors.schema), and a schema no
value satisfies is refused.

Outputs are drawn without a model: random walks through the token automaton of
the bundled byte tokenizer (one token per byte), biased towards accepting states
so that every walk ends; each output must validate with `jsonschema`. A few
spot checks show the rewrites keep valid values (they are not just refusing
everything) and the issue's `uniqueItems` example runs through `generate`.
"""

from __future__ import annotations

import datetime
import glob
import json
import os

import jsonschema
import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxdecode as jd
from jaxdecode.processors.automata import compile_json_schema, token_bytes

(BUNDLED_TOKENIZER,) = glob.glob(
    os.path.join(os.path.dirname(jd.__file__), "bundled", "*", "tokenizer.json")
)


@pytest.fixture(scope="module")
def tok():
    return tokenizers.Tokenizer.from_file(BUNDLED_TOKENIZER)


class Walker:
    """Random outputs of an automaton: at each step, with probability 1/2 a token
    that brings the walk closer to an accepting state, else any allowed token."""

    def __init__(self, automaton, tokenizer):
        a = automaton
        self.a, self.pieces = a, token_bytes(tokenizer)
        n = a.final.size
        # Distance to an accepting state (BFS over reversed edges).
        dist = np.full(n, np.iinfo(np.int64).max, np.int64)
        dist[a.final] = 0
        frontier = list(np.flatnonzero(a.final))
        src = np.repeat(np.arange(n), np.diff(a.indptr))
        while frontier:
            nxt = []
            hit = np.isin(a.next, frontier)
            for s in np.unique(src[hit]):
                if dist[s] > dist[frontier[0]] + 1:
                    dist[s] = dist[frontier[0]] + 1
                    nxt.append(s)
            frontier = nxt
        self.dist = dist

    def sample(self, rng: np.random.Generator, stop: float = 0.3) -> str:
        a, s, out = self.a, self.a.start, b""
        for _ in range(2000):
            lo, hi = a.indptr[s], a.indptr[s + 1]
            if a.final[s] and (hi == lo or rng.random() < stop):
                return out.decode("utf-8")
            toks, nxt = a.tokens[lo:hi], a.next[lo:hi]
            closer = self.dist[nxt] < self.dist[s]
            if closer.any() and rng.random() < 0.5:
                toks, nxt = toks[closer], nxt[closer]
            i = rng.integers(len(toks))
            out += self.pieces[toks[i]]
            s = nxt[i]
        raise AssertionError(f"walk did not end: {out[:200]!r}")

    def accepts(self, text: str) -> bool:
        a, s = self.a, self.a.start
        ids = {p: i for i, p in enumerate(self.pieces) if p}
        for b in text.encode("utf-8"):
            lo, hi = a.indptr[s], a.indptr[s + 1]
            hit = np.flatnonzero(a.tokens[lo:hi] == ids[bytes([b])])
            if not hit.size:
                return False
            s = a.next[lo + hit[0]]
        return bool(a.final[s])


def validator(schema) -> jsonschema.Draft202012Validator:
    """`jsonschema`'s validator, formats checked too (they are annotations by default)."""
    cls = jsonschema.Draft202012Validator
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def outputs(schema, tokenizer, n: int = 40, seed: int = 0) -> tuple[list, Walker]:
    walker = Walker(compile_json_schema(schema, tokenizer, whitespace=r"[ ]?"), tokenizer)
    rng = np.random.default_rng(seed)
    texts = [walker.sample(rng) for _ in range(n)]
    for text in texts:
        value = json.loads(text)
        assert validator(schema).is_valid(value), (schema, text)
        if schema.get("format") in ("time", "date-time"):  # (see above) checked here
            parse = datetime.time if schema["format"] == "time" else datetime.datetime
            parse.fromisoformat(value)
    return [json.loads(t) for t in texts], walker


COLOURS = {"enum": ["red", "green", "blue"]}
# (schema, values that must be accepted, values that must not).
ENFORCED = {
    "uniqueItems-enum": (
        {"type": "object", "properties": {"tags": {"type": "array", "items": COLOURS, "uniqueItems": True}},
         "required": ["tags"]},
        [{"tags": ["red", "blue"]}, {"tags": ["blue", "green", "red"]}],
        [{"tags": ["red", "red", "red"]}],
    ),
    "uniqueItems-maxItems1": (
        {"type": "array", "items": {"type": "string", "maxLength": 3}, "uniqueItems": True, "maxItems": 1},
        [["ab"], []], [["a", "b"]],
    ),
    "contains": (
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "maxItems": 3,
         "contains": {"const": 2}, "minContains": 2},
        [[2, 2], [1, 2, 2]], [[1, 2], [0, 1, 3]],
    ),
    "not-enum": ({"type": "integer", "minimum": 0, "maximum": 9, "not": {"enum": [3, 4]}}, [0, 9, 5], [3, 4, 10]),
    "not-type": ({"not": {"type": ["string", "object", "array", "number"]}}, [None, True], ["x", 1]),
    "if-then-else": (
        {"type": "object",
         "properties": {"kind": {"enum": ["a", "b"]}, "size": {"type": "integer", "minimum": 1, "maximum": 3}},
         "required": ["kind", "size"],
         "if": {"properties": {"kind": {"const": "a"}}}, "then": {"properties": {"size": {"const": 1}}},
         "else": {"properties": {"size": {"minimum": 2}}}},
        [{"kind": "a", "size": 1}, {"kind": "b", "size": 3}], [{"kind": "a", "size": 2}, {"kind": "b", "size": 1}],
    ),
    "minProperties": (
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}, "minProperties": 1},
        [{"a": 1}, {"b": True}, {"a": 1, "b": False}], [{}],
    ),
    "maxProperties": (
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}, "maxProperties": 1},
        [{}, {"b": True}], [{"a": 1, "b": False}],
    ),
    "dependentRequired": (
        {"type": "object", "properties": {"card": {"type": "integer"}, "cvv": {"type": "integer"}},
         "dependentRequired": {"card": ["cvv"]}},
        [{}, {"cvv": 1}, {"card": 1, "cvv": 2}], [{"card": 1}],
    ),
    "dependentSchemas": (
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
         "dependentSchemas": {"a": {"properties": {"b": {"minimum": 5}}, "required": ["b"]}}},
        [{"b": 1}, {"a": 0, "b": 5}], [{"a": 0}, {"a": 0, "b": 4}],
    ),
    "required-not-in-properties": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]}, [{"b": None}], [{}],
    ),
    "patternProperties": (
        {"type": "object", "properties": {"ab": {"type": "integer"}}, "patternProperties": {"^a": {"minimum": 5}},
         "required": ["ab"]},
        [{"ab": 7}], [{"ab": 1}],
    ),
    "propertyNames": (
        {"type": "object", "properties": {"ok": {"type": "integer"}, "toolong": {"type": "integer"}},
         "propertyNames": {"maxLength": 3}},
        [{"ok": 1}, {}], [{"toolong": 1}],
    ),
    "propertyNames-enum": ({"type": "object", "propertyNames": {"enum": ["x", "y"]}, "additionalProperties": {"type": "null"}},
                           [{"x": None}, {"x": None, "y": None}], [{"z": None}]),
    "integer-range": ({"type": "integer", "minimum": -15, "exclusiveMaximum": 124}, [-15, 0, 9, 99, 123], [-16, 124, 1000]),
    "integer-min-only": ({"type": "integer", "minimum": 7}, [7, 10, 123456], [6, -1, 0]),
    "number-range": ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, [0.5, 1, 1.0, 0.001], [0, 0.0, 1.5, -0.5]),
    "number-negative": ({"type": "number", "minimum": -2, "exclusiveMaximum": 0}, [-2, -0.5, -1.25], [0, -2.5, 3]),
    "multipleOf": ({"type": "integer", "minimum": 0, "maximum": 20, "multipleOf": 5}, [0, 5, 20], [3, 25]),
    "enum-with-type": ({"type": "string", "enum": ["a", 1, "b"]}, ["a", "b"], [1]),
    "const-with-type": ({"type": "integer", "minimum": 2, "enum": [1, 2, 3]}, [2, 3], [1]),
    "anyOf-siblings": ({"type": "integer", "anyOf": [{"minimum": 10, "maximum": 12}, {"maximum": -3, "minimum": -4}]},
                       [10, 12, -3], [0, 13, -5]),
    "oneOf-disjoint": ({"oneOf": [{"type": "string", "maxLength": 2}, {"type": "integer", "minimum": 0, "maximum": 5}]},
                       ["ab", 3], [6, "abc"]),
    "oneOf-overlap-finite": ({"oneOf": [{"enum": [1, 2]}, {"enum": [2, 3]}]}, [1, 3], [2]),
    "allOf": (
        {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                   {"properties": {"a": {"minimum": 0, "maximum": 5}, "b": {"type": "boolean"}}, "required": ["b"]}]},
        [{"a": 3, "b": True}], [{"a": 6, "b": True}, {"a": 3}],
    ),
    "ref-defs": ({"$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 3}},
                  "type": "array", "items": {"$ref": "#/$defs/small"}, "maxItems": 2}, [[0, 3]], [[4]]),
    "ref-recursive": (
        {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                                               "next": {"$ref": "#/$defs/node"}}, "required": ["v"]}},
         "$ref": "#/$defs/node"},
        [{"v": 1, "next": {"v": 2}}], [{"v": 10}],
    ),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": ["x"]}], "items": False},
                    [[True, "x"]], [[True, "x", 1]]),
    "minItems-maxItems": ({"type": "array", "items": {"type": "null"}, "minItems": 1, "maxItems": 2},
                          [[None], [None, None]], [[], [None] * 3]),
    "length": ({"type": "string", "minLength": 2, "maxLength": 3}, ["ab", "abc"], ["a", "abcd"]),
    "pattern": ({"type": "string", "pattern": "^[a-c]{2}[0-9]?$"}, ["ab", "ca7"], ["a", "abc", "AB"]),
    "format-date": ({"type": "string", "format": "date"}, ["2024-01-31", "2024-02-29", "2000-02-29"],
                    ["yesterday", "2023-02-29", "1900-02-29", "2024-04-31", "0000-01-01"]),
    "format-date-time": ({"type": "string", "format": "date-time"}, ["2024-01-31T23:59:59Z"], ["2024-01-31"]),
    "format-time": ({"type": "string", "format": "time"}, ["23:59:59+01:00"], ["24:00:00Z"]),
    "format-uuid": ({"type": "string", "format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000"], ["123"]),
    "format-email": ({"type": "string", "format": "email"}, ["a.b@example.com"], ["ab"]),
    "format-ipv4": ({"type": "string", "format": "ipv4"}, ["10.0.255.1"], ["1.2.3", "256.1.1.1"]),
    "format-uri": ({"type": "string", "format": "uri"}, ["https://example.com/a/b"], []),
    "free-object": ({"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 1},
                     "minProperties": 1}, [{"x": 1}], [{}, {"x": 2}]),
    "unevaluatedProperties": ({"type": "object", "properties": {"a": {"type": "null"}}, "unevaluatedProperties": False},
                              [{"a": None}, {}], [{"b": None}]),
    "type-list": ({"type": ["integer", "null"], "minimum": 1, "maximum": 2}, [1, 2, None], [0, "x"]),
    "anyOf-branch-merge-conflict": (
        {"allOf": [{"anyOf": [{"type": "null"}, {"enum": [0, None]}]}, {"type": "number", "maximum": 5}]},
        [0], [None, 1],
    ),
    "annotations": ({"title": "T", "description": "d", "examples": [1], "default": 1, "$comment": "c",
                     "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "boolean"}, [True], [1]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ENFORCED))
def test_enforced_keywords_validate(name, tok):
    """Every output validates with jsonschema; the listed valid values are kept
    and the invalid ones are not (the keyword is enforced, not dropped).

    Values are checked inside a one-item array: at the very end of the regex,
    outlines-core's index keeps no path out of an accepting state that needs
    two more bytes (`1(\\.5)?` accepts `1`, not `1.5`), so a top-level number
    is cut at its integer part (a smaller language, still valid)."""
    schema, good, bad = ENFORCED[name]
    outputs(schema, tok)
    inner = {k: v for k, v in schema.items() if k != "$defs"}
    wrapped = {"type": "array", "prefixItems": [inner], "items": False, "minItems": 1}
    if "$defs" in schema:
        wrapped["$defs"] = schema["$defs"]
    walker = Walker(compile_json_schema(wrapped, tok, whitespace=r"[ ]?"), tok)
    check = validator(schema)
    for v in good:
        assert check.is_valid(v), v
        assert walker.accepts(json.dumps([v], separators=(",", ":"))), (name, v)
    for v in bad:
        # jsonschema checks time / date-time only with rfc3339-validator installed.
        assert not check.is_valid(v) or name in ("format-time", "format-date-time"), v
        assert not walker.accepts(json.dumps([v], separators=(",", ":"))), (name, v)


def test_the_issue_example_through_generate():
    """The issue's `{"tags": [...]}` with `uniqueItems`: sampled on the bundled
    model, several seeds, every output ends and validates (no repeated tag)."""
    lm = jd.from_pretrained("bundled")
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": COLOURS, "uniqueItems": True, "minItems": 3}
        },
        "required": ["tags"],
    }
    ids = np.repeat(np.array([lm.tokenizer.encode("Tags: ")], np.int32), 4, axis=0)
    eos = set(lm.generation_config.eos_ids)
    for seed in range(3):
        out = lm.generate(
            ids, max_new_tokens=60, do_sample=True, temperature=1.5, seed=seed, json_schema=schema
        )
        seqs, lengths = np.asarray(out.sequences), np.asarray(out.lengths)
        for row, n in zip(seqs, lengths, strict=True):
            toks = row[ids.shape[1] : ids.shape[1] + int(n)].tolist()
            assert toks and toks[-1] in eos, toks
            value = json.loads(lm.tokenizer.decode(toks[:-1]))
            jsonschema.validate(value, schema)
            assert sorted(value["tags"]) == ["blue", "green", "red"], value
    # With free strings as items (the issue's schema) it is refused, not ignored.
    schema["properties"]["tags"]["items"] = {"type": "string"}
    with pytest.raises(ValueError, match="'uniqueItems' at /properties/tags"):
        lm.generate(ids, max_new_tokens=8, json_schema=schema)


REFUSED = {
    "uniqueItems": ({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                               "uniqueItems": True}}}, "/properties/tags"),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "/"),
    "not": ({"type": "string", "not": {"const": "x"}}, "/"),
    "if": ({"type": "string", "if": {"maxLength": 2}, "then": {"pattern": "^a"}}, "/"),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, "/"),
    "minimum": ({"type": "number", "minimum": 0.5}, "/"),
    "minProperties": ({"type": "object", "minProperties": 2}, "/"),
    "maxProperties": ({"type": "object", "maxProperties": 2}, "/"),
    "propertyNames": ({"type": "object", "propertyNames": {"maxLength": 3}}, "/"),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, "/"),
    "dependentRequired": ({"type": "object", "dependentRequired": {"a": ["b"]}}, "/"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "/"),
    "pattern": ({"type": "string", "pattern": "^.+$"}, "/"),
    "format": ({"type": "string", "format": "hostname"}, "/"),
    "minItems": ({"type": "array", "prefixItems": [{"type": "null"}], "minItems": 3}, "/"),
    "$ref": ({"$ref": "https://example.com/s.json"}, "/"),
    "minLenght": ({"type": "string", "minLenght": 3}, "/"),
    "$dynamicRef": ({"$dynamicRef": "#x"}, "/"),
}  # fmt: skip


@pytest.mark.parametrize("keyword", list(REFUSED))
def test_unenforceable_keywords_are_refused(keyword):
    """One line naming the keyword and where it is, at config time (before a
    model is loaded or anything traced)."""
    schema, where = REFUSED[keyword]
    with pytest.raises(ValueError) as e:
        jd.GenerationConfig(json_schema=schema).validate()
    msg = str(e.value)
    assert "\n" not in msg and f"'{keyword}'" in msg and f" at {where} " in msg, msg


UNSATISFIABLE = {
    "false": False,
    "items-range": {"type": "array", "minItems": 3, "maxItems": 1},
    "empty-enum": {"enum": []},
    "enum-vs-type": {"type": "string", "enum": [1, 2]},
    "required-closed": {"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False},
    "range": {"type": "integer", "minimum": 5, "maximum": 4},
    "no-integer": {"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 5},
    "length": {"type": "string", "minLength": 4, "maxLength": 2},
    "allOf-types": {"allOf": [{"type": "string"}, {"type": "integer"}]},
    "required-false": {"type": "object", "properties": {"a": False}, "required": ["a"]},
    "anyOf-none": {"anyOf": [{"type": "string", "minLength": 3, "maxLength": 1}, {"enum": []}]},
    "not-everything": {"not": {}},
    "unique-too-few": {"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True, "minItems": 3},
    "properties-count": {"type": "object", "properties": {"a": {}}, "minProperties": 2, "additionalProperties": False},
}  # fmt: skip


@pytest.mark.parametrize("name", list(UNSATISFIABLE))
def test_unsatisfiable_schemas_are_refused(name):
    schema = UNSATISFIABLE[name]
    with pytest.raises(ValueError, match="json_schema") as e:
        jd.GenerationConfig(
            json_schema=schema if schema is not False else {"allOf": [False]}
        ).validate()
    assert "\n" not in str(e.value)


# Random schemas built from the supported keywords.
_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda lo, n: {"type": "integer", "minimum": lo, "maximum": lo + n},
              st.integers(-300, 300), st.integers(0, 400)),
    st.builds(lambda lo, x: {"type": "number", "minimum": lo, "exclusiveMaximum": lo + x},
              st.integers(-20, 20), st.integers(1, 30)),
    st.builds(lambda lo, n: {"type": "string", "minLength": lo, "maxLength": lo + n},
              st.integers(0, 3), st.integers(0, 3)),
    st.builds(lambda v: {"enum": v}, st.lists(st.one_of(st.integers(-5, 5), st.sampled_from(["a", "b", None, True])),
                                              min_size=1, max_size=4)),
)  # fmt: skip


def _extend(inner):
    return st.one_of(
        st.builds(lambda s, lo, n, u: {"type": "array", "items": s, "minItems": lo, "maxItems": lo + n,
                                       **({"uniqueItems": True} if u else {})},
                  inner, st.integers(0, 2), st.integers(0, 2), st.booleans()),
        st.builds(lambda props, req, mn: {"type": "object", "properties": props,
                                          "required": [k for k in props if k in req],
                                          **({"minProperties": mn} if mn else {})},
                  st.dictionaries(st.sampled_from("abc"), inner, min_size=1, max_size=3),
                  st.sets(st.sampled_from("abc")), st.integers(0, 2)),
        st.builds(lambda xs: {"anyOf": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda s: {"not": {"type": "string"}, **s}, inner),
        st.builds(lambda xs: {"oneOf": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda a, b: {"allOf": [a, b]}, inner, inner),
        st.builds(lambda s, c: {"type": "array", "items": s, "maxItems": 2, "contains": c},
                  inner, inner),
        st.builds(lambda s, c, t: {**s, "if": c, "then": t}, inner, inner, inner),
    )  # fmt: skip


SCHEMAS = st.recursive(_leaf, _extend, max_leaves=6)


def _small_values(n: int = 3000) -> list:
    """Small JSON values over the strategies' alphabet (a witness search)."""
    rng = np.random.default_rng(0)
    scalars = [
        None,
        True,
        False,
        0,
        1,
        2,
        3,
        -1,
        -5,
        5,
        0.5,
        1.5,
        -0.5,
        100,
        -300,
        "",
        "a",
        "ab",
        "abcd",
    ]

    def value(depth: int = 0):
        r = rng.random()
        if depth < 2 and r < 0.25:
            return [value(depth + 1) for _ in range(rng.integers(0, 4))]
        if depth < 2 and r < 0.5:
            keys = rng.permutation(list("abc"))[: rng.integers(0, 4)]
            return {str(k): value(depth + 1) for k in keys}
        return scalars[rng.integers(len(scalars))]

    return [value() for _ in range(n)]


SMALL_VALUES = _small_values()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_outputs_of_supported_schemas_validate(schema, seed, tok):
    """Property: a schema built from supported keywords is either refused (one
    line naming a keyword, or unsatisfiable: then no small value satisfies it)
    or every output validates."""
    try:
        jd.GenerationConfig(json_schema=schema).validate()
    except ValueError as e:
        assert "\n" not in str(e)
        if "no value satisfies" in str(e):
            check = validator(schema)
            witnesses = [v for v in SMALL_VALUES if check.is_valid(v)][:1]
            assert not witnesses, (schema, witnesses)
        return
    outputs(schema, tok, n=8, seed=seed)


def test_top_level_numbers_reach_every_length(tok):
    """At the very end of the regex outlines-core's index keeps a path out of an
    accepting state only for the alternative listed first: ranges and enums are
    written longest first, so `12` and `123` stay reachable after `1`."""
    for schema, good, bad in [
        (
            {"type": "integer", "minimum": -15, "maximum": 123},
            ["1", "12", "123", "-15"],
            ["124", "-16"],
        ),
        ({"enum": [1, 12, 123]}, ["1", "12", "123"], ["2"]),
    ]:
        walker = Walker(compile_json_schema(schema, tok), tok)
        assert all(walker.accepts(t) for t in good), schema
        assert not any(walker.accepts(t) for t in bad), schema


@pytest.mark.parametrize(
    "schema, where",
    [
        ({"type": "string", "maxLength": -1}, "/maxLength"),
        ({"type": "object", "required": "a"}, "/required"),
        ({"properties": {"x": {"minimum": "5"}}}, "/properties/x/minimum"),
        ({"type": "array", "items": [{"type": "null"}]}, "/items"),  # draft 7's tuple form
    ],
)
def test_malformed_schemas_name_the_place(schema, where):
    with pytest.raises(ValueError, match=f"json_schema: {where} is not valid JSON Schema"):
        jd.GenerationConfig(json_schema=schema).validate()
