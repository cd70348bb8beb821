"""JSON schemas made safe for outlines-core: every keyword at every level is either
enforced by the regex outlines-core builds, rewritten here into a form it enforces,
or refused with a one-line error naming the keyword and its JSON path.

outlines-core 0.2's `build_regex_from_schema` reads one keyword family per node,
in a fixed order (`properties` > `allOf` > `anyOf` > `oneOf` > `prefixItems` >
`enum` > `const` > `$ref` > `type`), and silently drops the rest: numeric bounds,
`uniqueItems`, `contains`, `not`, `if`/`then`/`else`, `minProperties` beside
`properties`, `dependent*`, `patternProperties`, `propertyNames`, a `type` beside
`enum`, a `pattern` beside `minLength`, the siblings of `anyOf`; `allOf` is
concatenated (never valid JSON) and `oneOf` is read as `anyOf`. `prepare_schema`
walks the schema and returns an equivalent one (or a sound subset: every output
still validates) in the canonical forms outlines-core reads correctly:

- `{"enum": [...]}` (values checked against every sibling keyword with
  `jsonschema`, so `type`, `not`, `if`/`then`, ... beside an enum are exact);
- `{"anyOf": [...]}` (siblings distributed into the branches; `allOf` merged;
  `oneOf` only where its branches are provably disjoint);
- one JSON type per node (`string` with one of length / `pattern` / `format`;
  `integer` / `number` ranges as a regex of our own, spliced in through a
  placeholder; arrays by `items` + `minItems` / `maxItems` or `prefixItems`;
  objects by `properties` + `required` (closed) or free-form);
- a keyword only checkable on a finite domain (`uniqueItems`, `contains`,
  `not`, `if`/`then`/`else`, `multipleOf`, ...) is enforced by listing the node's
  values (at most `ENUM_LIMIT`) and keeping those `jsonschema` accepts.

`$ref`s are inlined (local `#/...` pointers, recursion unrolled `REF_DEPTH`
levels: deeper optional branches are dropped, as outlines-core does).

What is written is always a subset of what the schema allows (closed objects,
`prefixItems` at their length, recursion cut), so every output validates; an
`_Unsat` that comes from such a cut says so (`exact=False`) rather than claiming
that no value exists. The module is long (one walker over every keyword of
JSON Schema 2020-12, and the range / format regexes it splices in) because the
keywords interact: splitting it would spread one decision table over files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["ENUM_LIMIT", "REF_DEPTH", "PreparedSchema", "prepare_schema"]

# Most values a node is expanded into (finite domains, object variants).
ENUM_LIMIT = 512
# `$ref` recursion unrolled to this depth (outlines-core's default is 3).
REF_DEPTH = 3

# Keywords that never constrain a value.
_ANNOTATIONS = {
    "title", "description", "examples", "default", "$comment", "$schema", "$id",
    "$anchor", "$dynamicAnchor", "$vocabulary", "deprecated", "readOnly", "writeOnly",
    "contentEncoding", "contentMediaType", "contentSchema", "format_annotation",
    "discriminator",  # OpenAPI / pydantic: an annotation beside oneOf
}  # fmt: skip
_DEFS = {"$defs", "definitions"}
# outlines-core's own digit bounds (not JSON Schema; they only restrict).
_DIGITS = {
    "minDigits", "maxDigits", "minDigitsInteger", "maxDigitsInteger", "minDigitsFraction",
    "maxDigitsFraction", "minDigitsExponent", "maxDigitsExponent",
}  # fmt: skip
_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
# Keywords by the type they apply to (a node without `type` takes the types
# whose keywords it uses; none: any value).
_BY_TYPE = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
    | _DIGITS,
    "array": {
        "items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains",
        "minContains", "maxContains", "unevaluatedItems",
    },
    "object": {
        "properties", "required", "additionalProperties", "patternProperties",
        "minProperties", "maxProperties", "dependentRequired", "dependentSchemas",
        "propertyNames", "unevaluatedProperties",
    },
}  # fmt: skip
_GENERIC = {"type", "enum", "const", "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref"}
_KNOWN = _ANNOTATIONS | _DEFS | _GENERIC | set().union(*_BY_TYPE.values())
# Enforced only by listing the node's values (or a rewrite where one exists).
_FINITE_ONLY = (
    "not",
    "if",
    "then",
    "else",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
)
# What listing the values can enforce (beside the finite-only keywords).
_LISTED = (*_FINITE_ONLY, "multipleOf", "dependentSchemas", "oneOf")
# Any value. Not `{}`: outlines-core writes that as a bare `a|b|...`, which
# breaks out of the group around it when nested.
_ANY = {"anyOf": [{"type": t} for t in ("null", "boolean", "number", "string", "array", "object")]}
# Formats, as our own regexes (between the quotes): outlines-core's let through
# Unicode digits (`\d`), impossible dates (02-31), a quote or backslash (email,
# uri, time); these give only values `jsonschema`'s format checkers accept.
_YEAR = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DAY = "(?:0[1-9]|1[0-9]|2[0-8])"
_DATE = (
    f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:{_DAY}|29|3[01])|(?:0[469]|11)-(?:{_DAY}|29|30)"
    f"|02-{_DAY})|{_LEAP}-02-29)"
)
_TIME = (
    "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,6})?"
    "(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
_LABEL = "[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}T{_TIME}",
    "uuid": "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "email": f"[a-z0-9_+-]+(?:\\.[a-z0-9_+-]+)*@(?:{_LABEL}\\.)+[a-z]{{2,6}}",
    "uri": f"https?://(?:{_LABEL}\\.)+[a-z]{{2,6}}(?:/[A-Za-z0-9._~-]*)*",
    "ipv4": f"{_OCTET}(?:\\.{_OCTET}){{3}}",
}


class _Unsat(Exception):
    """No value satisfies the node (the reason says why); `exact=False`: none of
    the values jaxdecode writes for it does (objects closed to their listed
    properties, recursion cut at `REF_DEPTH`, a type inferred from keywords)."""

    def __init__(self, reason: str, exact: bool = True):
        super().__init__(reason)
        self.exact = exact


class _Refuse(ValueError):
    """A keyword the automaton cannot enforce."""


@dataclasses.dataclass(frozen=True)
class PreparedSchema:
    """A schema in outlines-core's safe forms, and the regexes of its placeholders.

    Attributes:
        schema: the rewritten schema (a dict; no `$ref`).
        placeholders: `{string: regex}`: outlines-core turns the JSON string
            `"string"` into its escaped literal, which `regex` replaces.
    """

    schema: dict
    placeholders: dict[str, str]

    def splice(self, regex: str) -> str:
        """outlines-core's regex for `schema` with the placeholders' regexes in."""
        for key, sub in self.placeholders.items():
            regex = regex.replace(f'"{key}"', f"(?:{sub})")
        return regex


def prepare_schema(schema: Mapping | str) -> PreparedSchema:
    """Check and rewrite a JSON schema for outlines-core (see the module docstring).

    Args:
        schema: a JSON schema, a dict or its JSON text (`normalize_schema`'s).

    Returns:
        The rewritten schema and its placeholder regexes (cached by the text).

    Raises:
        ValueError: a keyword the automaton cannot enforce (one line naming it
            and its JSON path), or a schema that no value satisfies.
    """
    if not isinstance(schema, str):
        schema = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    return _prepare(schema)


@functools.lru_cache(maxsize=64)
def _prepare(text: str) -> PreparedSchema:
    schema = json.loads(text)
    if not isinstance(schema, Mapping):
        raise ValueError(f"json_schema must be a JSON object, got {schema!r}")
    import jsonschema

    try:  # malformed keyword values (`"maxLength": -1`, `"required": "a"`) first
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"/{p}" for p in e.absolute_path) or "/"
        raise ValueError(
            f"json_schema: {where} is not valid JSON Schema: {_short(e.message)}"
        ) from None
    walker = _Walker(schema)
    try:
        out = walker.walk(schema, "", ())
    except _Unsat as e:
        if e.exact:
            raise ValueError(f"json_schema: no value satisfies it ({e})") from None
        raise ValueError(
            f"json_schema: jaxdecode cannot write a value that satisfies it ({e}): it writes "
            "objects with their listed properties only, recursion to depth "
            f"{REF_DEPTH}, and a type inferred from the keywords when none is given"
        ) from None
    except RecursionError:
        raise ValueError("json_schema: nested too deeply to check") from None
    return PreparedSchema(out, walker.placeholders)


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _pointer(path: str) -> str:
    return path or "/"


def _key(value: Any) -> str:
    """A value's identity as JSON Schema sees it (1 == 1.0, true != 1)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, list):
        return "[" + ",".join(_key(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_key(value[k])}" for k in sorted(value)) + "}"
    return json.dumps(value)


def _exact(canon: list) -> bool:
    """The canonical nodes write every value of their schemas (no closed object or
    cut tuple among them)."""
    text = json.dumps(canon)
    return '"properties"' not in text and '"prefixItems"' not in text


def _enum(values: list) -> dict:
    """An enum node, longest values first (at the very end of the regex,
    outlines-core's index reaches `12` from `12|1` but not from `1|12`). Values
    holding objects become closed-object nodes: outlines-core writes an object
    constant's keys unescaped (a `.` in a key would match any character)."""
    values = sorted(values, key=lambda v: -len(json.dumps(v)))
    plain = [v for v in values if not _has_object(v)]
    nodes = [_constant(v) for v in values if _has_object(v)]
    if not nodes:
        return {"enum": plain}
    nodes = ([{"enum": plain}] if plain else []) + nodes
    return nodes[0] if len(nodes) == 1 else {"anyOf": nodes}


def _has_object(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_object(v) for v in value)
    return isinstance(value, dict)


def _constant(value: Any) -> dict:
    """The canonical node of exactly `value`."""
    if isinstance(value, dict):
        for name in value:
            _check_name(name, "")
        props = {k: _constant(v) for k, v in value.items()}
        return {"type": "object", "properties": props, "required": list(value)}
    if isinstance(value, list) and _has_object(value):
        return {"prefixItems": [_constant(v) for v in value]}
    return {"enum": [value]}


def _check_name(name: str, path: str) -> None:
    """outlines-core writes a property name between quotes as is: one that JSON
    must escape would make invalid JSON."""
    if any(ord(c) < 0x20 or c in '"\\' for c in name):
        raise _Refuse(
            f"json_schema: property name {name!r} at {_pointer(path)} is not supported: it "
            "holds a quote, a backslash or a control character"
        )


def _dedupe(values: list) -> list:
    seen, out = set(), []
    for v in values:
        if _key(v) not in seen:
            seen.add(_key(v))
            out.append(v)
    return out


class _Walker:
    """One schema's walk: `walk(node, path, refs)` returns a node's canonical form
    (`refs`: the `$ref`s on the way, for the recursion depth)."""

    def __init__(self, root: Mapping):
        import jsonschema

        self.root = root
        self.validator = jsonschema.Draft202012Validator(root)
        self.placeholders: dict[str, str] = {}
        self.domains: dict[str, list | None] = {}  # placeholder -> its values if few
        self.placeholder_kinds: dict[str, str] = {}
        # Deterministic (the regex is a cache key), unlikely in any schema.
        self.nonce = hashlib.sha1(json.dumps(root).encode()).hexdigest()[:8]

    # ------------------------------------------------------------------ helpers
    def valid(self, value: Any, node: Any) -> bool:
        return self.validator.evolve(schema=node).is_valid(value)

    def refuse(self, keyword: str, path: str, why: str) -> _Refuse:
        return _Refuse(
            f"json_schema: keyword {keyword!r} at {_pointer(path)} is not supported: {why}"
        )

    def placeholder(self, regex: str, domain: list | None, kind: str = "number") -> dict:
        key = f"jdph{self.nonce}x{len(self.placeholders)}"
        self.placeholders[key] = regex
        self.domains[key] = domain
        self.placeholder_kinds[key] = kind
        return {"const": key}

    def resolve(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise self.refuse("$ref", path, f"only local '#/...' references, got {ref!r}")
        node: Any = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, Mapping) and part in node:
                node = node[part]
            else:
                raise self.refuse("$ref", path, f"{ref!r} points at nothing")
        return node

    # --------------------------------------------------------------- the walk
    def walk(self, node: Any, path: str, refs: tuple) -> dict:
        """The canonical form of `node` (raises `_Unsat`, `_Refuse`)."""
        if node is True:
            return dict(_ANY)
        if node is False:
            raise _Unsat(f"the schema at {_pointer(path)} is false")
        if not isinstance(node, Mapping):
            raise ValueError(
                f"json_schema: {_pointer(path)} must be a schema (an object), got {node!r}"
            )
        for k in node:
            if k not in _KNOWN:
                raise _Refuse(
                    f"json_schema: keyword {k!r} at {_pointer(path)} is not a JSON Schema "
                    "keyword jaxdecode knows (a typo?); remove it"
                )
        node = {k: v for k, v in node.items() if k not in _ANNOTATIONS and k not in _DEFS}
        if "not" in node and (node["not"] is True or node["not"] == {}):
            raise _Unsat(f"not at {_pointer(path)} excludes every value")
        if "$ref" in node:
            ref = node.pop("$ref")
            if refs.count(ref) >= REF_DEPTH:
                raise _Unsat(f"$ref {ref!r} recursion deeper than {REF_DEPTH}", exact=False)
            target = self.resolve(ref, path)
            refs = (*refs, ref)
            node = self.merge(target, node, path) if node else target
            return self.walk(node, path, refs)
        if "allOf" in node:
            parts = node.pop("allOf")
            if not isinstance(parts, list) or not parts:
                raise ValueError(f"json_schema: allOf at {_pointer(path)} must be a non-empty list")
            for part in parts:
                node = self.merge(node, part, path)
            return self.walk(node, path, refs)
        for kw in ("anyOf", "oneOf"):
            if kw in node:
                return self.branches(node, kw, path, refs)
        if "const" in node or "enum" in node:
            return self.enum(node, path)
        try:
            return self.typed(node, path, refs)
        except _Refuse as refusal:
            # A keyword checkable on a finite domain: list the values.
            if not any(k in node for k in _LISTED):
                raise
            values, exact = self.enumerate(node, path, refs)
            if values is None:
                raise refusal from None
            kept = [v for v in values if self.valid(v, node)]
            if not kept:
                raise _Unsat(
                    f"no value of {_pointer(path)} passes all its keywords", exact
                ) from None
            return _enum(kept)

    def merge(self, a: Any, b: Any, path: str) -> dict:
        """`allOf: [a, b]` as one raw schema (walked afterwards).

        A function over ~80 lines: one case per keyword that allOf must combine.
        """
        if a is False or b is False:
            return {"not": {}}
        a = {} if a is True else dict(a)
        b = {} if b is True else dict(b)
        if "$ref" in a and "$ref" in b and a["$ref"] != b["$ref"]:
            ref = b.pop("$ref")
            b = self.merge(self.resolve(ref, path), b, path)
        out = dict(a)
        for k, v in b.items():
            if k not in out:
                out[k] = v
                continue
            w = out[k]
            if (
                k in _ANNOTATIONS
                or k in _DEFS
                or w == v
                or k in ("properties", "additionalProperties")
            ):
                continue
            if k == "type":
                ta = [w] if isinstance(w, str) else list(w)
                tb = [v] if isinstance(v, str) else list(v)
                both = [
                    t
                    for t in _TYPES
                    if (t in ta or (t == "integer" and "number" in ta))
                    and (t in tb or (t == "integer" and "number" in tb))
                ]
                if not both:
                    raise _Unsat(f"allOf at {_pointer(path)} asks for types {w} and {v}")
                out[k] = both
            elif k in (
                "minLength",
                "minItems",
                "minProperties",
                "minimum",
                "exclusiveMinimum",
                "minContains",
            ):
                out[k] = max(w, v)
            elif k in (
                "maxLength",
                "maxItems",
                "maxProperties",
                "maximum",
                "exclusiveMaximum",
                "maxContains",
            ):
                out[k] = min(w, v)
            elif k == "required":
                out[k] = list(dict.fromkeys([*w, *v]))
            elif k == "enum":
                out[k] = [x for x in w if self.valid(x, {"enum": v})]
            elif k == "const":
                both = [x for x in out.get("enum", [w]) if _key(x) == _key(w) == _key(v)]
                out["enum"] = both
                del out["const"]
            elif k == "uniqueItems":
                out[k] = w or v
            elif k in ("items", "propertyNames", "unevaluatedItems", "unevaluatedProperties"):
                out[k] = {"allOf": [w, v]}
            elif k == "not":
                out[k] = {"anyOf": [w, v]}
            elif k == "anyOf":
                if len(w) * len(v) > ENUM_LIMIT:
                    raise self.refuse(k, path, "allOf of two anyOfs expands into too many branches")
                out[k] = [{"allOf": [x, y]} for x in w for y in v]
            elif k == "allOf":
                out[k] = [*w, *v]
            elif k == "dependentRequired":
                out[k] = {
                    p: list(dict.fromkeys([*w.get(p, []), *v.get(p, [])])) for p in {**w, **v}
                }
            elif k == "dependentSchemas":
                out[k] = {p: {"allOf": [w.get(p, True), v.get(p, True)]} for p in {**w, **v}}
            else:
                raise self.refuse(
                    k, path, "allOf gives it two different values, which cannot be merged"
                )
        if "properties" in a or "properties" in b:
            # A name listed on one side meets the other side's additionalProperties
            # (unless that side lists it too, or one of its patterns matches it).
            def side(x: dict, name: str) -> Any:
                if name in x.get("properties", {}):
                    return x["properties"][name]
                if any(re.search(p, name) for p in x.get("patternProperties", {})):
                    return True
                return x.get("additionalProperties", True)

            names = list(dict.fromkeys([*a.get("properties", {}), *b.get("properties", {})]))
            out["properties"] = {n: {"allOf": [side(a, n), side(b, n)]} for n in names}
        if "additionalProperties" in a and "additionalProperties" in b:
            out["additionalProperties"] = {
                "allOf": [a["additionalProperties"], b["additionalProperties"]]
            }
        return out

    def branches(self, node: dict, kw: str, path: str, refs: tuple) -> dict:
        options = node.pop(kw)
        if not isinstance(options, list) or not options:
            raise ValueError(f"json_schema: {kw} at {_pointer(path)} must be a non-empty list")
        canon, exact = [], True
        for i, option in enumerate(options):
            try:  # (merging may already show the branch unsatisfiable)
                merged = self.merge(node, option, path) if node else option
                canon.append(self.walk(merged, f"{path}/{kw}/{i}", refs))
            except _Unsat as e:
                exact &= e.exact
        if not canon:
            raise _Unsat(f"no branch of {kw} at {_pointer(path)} can be satisfied", exact)
        if kw == "oneOf" and not all(
            self.disjoint(x, y) for x, y in itertools.combinations(canon, 2)
        ):
            values = self.enumerate_canon({"anyOf": canon}, {})
            exact = exact and _exact(canon)
            if values is None:
                raise self.refuse(
                    "oneOf",
                    path,
                    "its branches may overlap (a value matching two fails oneOf); "
                    "use anyOf, or make them disjoint (other types, or a required property whose "
                    "enum/const differs)",
                )
            kept = [v for v in values if self.valid(v, {kw: options, **node})]
            if not kept:
                raise _Unsat(
                    f"no value matches exactly one branch of oneOf at {_pointer(path)}", exact
                )
            return _enum(kept)
        return canon[0] if len(canon) == 1 else {"anyOf": canon}

    def kinds(self, canon: dict) -> set[str]:
        """The JSON kinds a canonical node may produce."""
        if "enum" in canon:
            return {_kind(v) for v in canon["enum"]}
        if "const" in canon:
            return {self.placeholder_kinds[canon["const"]]}
        if "anyOf" in canon:
            return set().union(*(self.kinds(c) for c in canon["anyOf"]))
        if "prefixItems" in canon:
            return {"array"}
        if "properties" in canon:
            return {"object"}
        t = canon.get("type")
        if t is None:
            return set(_KINDS)
        return {"number" if t == "integer" else t}

    def disjoint(self, x: dict, y: dict) -> bool:
        if not self.kinds(x) & self.kinds(y):
            return True
        if "enum" in x and "enum" in y:
            return not {_key(v) for v in x["enum"]} & {_key(v) for v in y["enum"]}
        if "properties" in x and "properties" in y:
            for name in set(x.get("required", [])) & set(y.get("required", [])):
                if self.disjoint(x["properties"][name], y["properties"][name]):
                    return True
        return False

    def enum(self, node: dict, path: str) -> dict:
        values = list(node.get("enum", []))
        if "enum" in node and not isinstance(node["enum"], list):
            raise ValueError(f"json_schema: enum at {_pointer(path)} must be a list")
        if "const" in node:
            values = [node["const"]]
        kept = _dedupe([v for v in values if self.valid(v, node)])
        if not kept:
            raise _Unsat(
                f"no value of the enum/const at {_pointer(path)} passes its other keywords"
            )
        return _enum(kept)

    # ----------------------------------------------------------- typed nodes
    def types(self, node: dict, path: str) -> list[str]:
        t = node.get("type")
        if t is None:
            used = [k for k, kws in _BY_TYPE.items() if kws & set(node)]
            if not used:
                return []
            types = [x for k in used for x in (("integer", "number") if k == "number" else (k,))]
            return [x for x in _TYPES if x in types and x != "integer"]
        types = [t] if isinstance(t, str) else t
        if not isinstance(types, list) or not types or any(x not in _TYPES for x in types):
            raise ValueError(
                f"json_schema: type at {_pointer(path)} must be one of {_TYPES} or a list of them, got {t!r}"
            )
        return [x for x in _TYPES if x in types and not (x == "integer" and "number" in types)]

    def typed(self, node: dict, path: str, refs: tuple) -> dict:
        neg = node.get("not")
        if isinstance(neg, Mapping) and set(neg) - _ANNOTATIONS == {"type"}:
            # `not: {type: ...}`: the other types.
            banned = set(self.types(dict(neg), f"{path}/not"))
            if "number" in banned:
                banned.add("integer")
            keep = [t for t in (self.types(node, path) or list(_TYPES)) if t not in banned]
            if not keep and "number" in self.types(node, path) and "integer" not in banned:
                keep = ["integer"]
            if not keep:
                raise _Unsat(f"not at {_pointer(path)} excludes every type")
            node = {**{k: v for k, v in node.items() if k != "not"}, "type": keep}
        for kw in _FINITE_ONLY:
            if kw in node and not self.trivial(node, kw):
                raise self.refuse(
                    kw,
                    path,
                    "the automaton checks it by listing the node's values, and there "
                    f"are more than {ENUM_LIMIT}; bound them (enum items, maxItems, integer "
                    "minimum and maximum) or remove it",
                )
        types = self.types(node, path)
        if not types:
            return dict(_ANY)
        out, exact = [], "type" in node
        for t in types:
            try:
                out.append(getattr(self, f"t_{t}")(node, path, refs))
            except _Unsat as e:
                exact &= e.exact
                last = e
        if not out:
            if len(types) == 1:
                raise _Unsat(str(last), exact)
            raise _Unsat(f"no type of {_pointer(path)} can be satisfied", exact)
        return out[0] if len(out) == 1 else {"anyOf": out}

    def trivial(self, node: dict, kw: str) -> bool:
        """`kw` holds for every value the rest of the node allows."""
        if kw in ("then", "else"):
            return "if" not in node  # without `if` they are ignored by the spec
        if kw == "uniqueItems":
            return node[kw] is False or node.get("maxItems", 2) <= 1
        if kw in ("minContains", "maxContains"):
            return "contains" not in node
        if kw == "if":
            return "then" not in node and "else" not in node
        return False

    def t_null(self, node: dict, path: str, refs: tuple) -> dict:
        return {"type": "null"}

    def t_boolean(self, node: dict, path: str, refs: tuple) -> dict:
        return {"type": "boolean"}

    def t_string(self, node: dict, path: str, refs: tuple) -> dict:
        lo, hi = node.get("minLength", 0), node.get("maxLength")
        if hi is not None and lo > hi:
            raise _Unsat(f"minLength {lo} > maxLength {hi} at {_pointer(path)}")
        has_len = "minLength" in node or "maxLength" in node
        if "pattern" in node and has_len:
            raise self.refuse(
                "pattern",
                path,
                "outlines-core cannot combine a pattern with "
                "minLength/maxLength; put the length into the pattern",
            )
        if "format" in node and (has_len or "pattern" in node):
            raise self.refuse(
                "format", path, "it cannot be combined with pattern/minLength/maxLength"
            )
        out = {"type": "string"}
        if has_len:
            out.update({k: node[k] for k in ("minLength", "maxLength") if k in node})
        elif "pattern" in node:
            out["pattern"] = "^(?:" + _safe_pattern(node["pattern"], self, path) + ")$"
        elif "format" in node:
            if node["format"] not in _FORMATS:
                raise self.refuse(
                    "format", path, f"{node['format']!r} is not one of {sorted(_FORMATS)}"
                )
            return self.placeholder(f'"{_FORMATS[node["format"]]}"', None, "string")
        return out

    def t_integer(self, node: dict, path: str, refs: tuple) -> dict:
        return self.numeric(node, path, integer=True)

    def t_number(self, node: dict, path: str, refs: tuple) -> dict:
        return self.numeric(node, path, integer=False)

    def numeric(self, node: dict, path: str, integer: bool) -> dict:
        lo, lo_x, hi, hi_x = _bounds(node, path, self)
        digits = {k: node[k] for k in _DIGITS if k in node}
        step = node.get("multipleOf")
        if step is not None and (not isinstance(step, (int, float)) or step <= 0):
            raise ValueError(
                f"json_schema: multipleOf at {_pointer(path)} must be > 0, got {step!r}"
            )
        if step is not None and float(step).is_integer() and (integer or step == 1):
            integer, step = True, (None if step == 1 else int(step))
        if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_x or hi_x))):
            raise _Unsat(f"the range at {_pointer(path)} is empty")
        if lo is None and hi is None and step is None:
            return {"type": "integer" if integer else "number", **digits}
        if digits:
            raise self.refuse(
                sorted(digits)[0], path, "digit bounds cannot be combined with a range"
            )
        if integer:
            a = None if lo is None else (math.floor(lo) + 1 if lo_x else math.ceil(lo))
            b = None if hi is None else (math.ceil(hi) - 1 if hi_x else math.floor(hi))
            if a is not None and b is not None and a > b:
                raise _Unsat(f"the range at {_pointer(path)} holds no integer")
            domain = None
            if a is not None and b is not None and b - a < 100 * ENUM_LIMIT:
                domain = [v for v in range(a, b + 1) if step is None or v % step == 0]
                if not domain:
                    raise _Unsat(f"no multiple of {step} in the range at {_pointer(path)}")
                if step is not None:
                    if len(domain) > ENUM_LIMIT:
                        raise self.refuse(
                            "multipleOf", path, f"more than {ENUM_LIMIT} multiples in the range"
                        )
                    return _enum(domain)
            if step is not None:
                raise self.refuse(
                    "multipleOf", path, "a multiple is enforced only for a bounded integer range"
                )
            return self.placeholder(
                _int_range(a, b), domain if domain and len(domain) <= ENUM_LIMIT else None
            )
        if step is not None:
            raise self.refuse(
                "multipleOf", path, "only an integer multipleOf of an integer is enforced"
            )
        for name, v in (("minimum/exclusiveMinimum", lo), ("maximum/exclusiveMaximum", hi)):
            if v is not None and not float(v).is_integer():
                raise self.refuse(
                    name.split("/")[0],
                    path,
                    f"a number's bounds must be whole numbers, got {v!r} (or use type integer)",
                )
        return self.placeholder(
            _real_range(
                None if lo is None else int(lo), lo_x, None if hi is None else int(hi), hi_x
            ),
            None,
        )

    def t_array(self, node: dict, path: str, refs: tuple) -> dict:
        lo, hi = node.get("minItems", 0), node.get("maxItems")
        if hi is not None and lo > hi:
            raise _Unsat(f"minItems {lo} > maxItems {hi} at {_pointer(path)}")
        items = node.get("items", node.get("unevaluatedItems", True))
        if "prefixItems" in node:
            # outlines-core emits exactly the prefix (a valid length, here).
            prefix = node["prefixItems"]
            n = len(prefix) if hi is None else min(len(prefix), hi)
            if lo > n:
                if items is False:
                    raise _Unsat(
                        f"minItems {lo} > the {len(prefix)} prefixItems at {_pointer(path)}"
                    )
                raise self.refuse(
                    "minItems", path, "an array longer than its prefixItems is not supported"
                )
            out = []
            for i, s in enumerate(prefix[:n]):
                try:
                    out.append(self.walk(s, f"{path}/prefixItems/{i}", refs))
                except _Unsat:
                    if i < lo:
                        raise
                    break
            return {"prefixItems": out} if out else {"type": "array", "maxItems": 0}
        try:
            item = self.walk(items, f"{path}/items", refs)
        except _Unsat:
            if lo > 0:
                raise
            return {"type": "array", "maxItems": 0}
        out = {"type": "array", "items": item}
        if "minItems" in node:
            out["minItems"] = lo
        if hi is not None:
            out["maxItems"] = hi
        return out

    def t_object(self, node: dict, path: str, refs: tuple) -> dict:
        """Objects: free-form (any names) or closed (the listed properties); counts
        and dependencies expanded into one closed variant per allowed set of
        present properties. Long: each object keyword's rules sit together.

        A function over ~80 lines: one case per object keyword, and they
        interact (required, properties, additionalProperties, min/max
        properties).
        """
        lo, hi = node.get("minProperties", 0), node.get("maxProperties")
        if hi is not None and lo > hi:
            raise _Unsat(f"minProperties {lo} > maxProperties {hi} at {_pointer(path)}")
        required = list(dict.fromkeys(node.get("required", [])))
        props = dict(node.get("properties", {}))
        ap = node.get("additionalProperties", node.get("unevaluatedProperties", True))
        patterns = node.get("patternProperties", {})
        names = node.get("propertyNames")
        if (
            names is not None
            and isinstance(names, Mapping)
            and ("enum" in names or "const" in names)
            and not props
        ):
            allowed = names.get("enum", [names.get("const")])
            props = {n: ap for n in allowed if isinstance(n, str)}
            ap = False
        if not props and not required and ap is not False:
            if patterns:
                raise self.refuse(
                    "patternProperties",
                    path,
                    "free-form property names cannot be matched to patterns",
                )
            if names is not None:
                raise self.refuse(
                    "propertyNames",
                    path,
                    "free-form property names are not checked; list the names in properties or an enum",
                )
            if lo > 1:
                raise self.refuse(
                    "minProperties", path, "free-form names may repeat; list the properties"
                )
            if hi not in (None, 0):
                raise self.refuse(
                    "maxProperties", path, "free-form objects are not counted; list the properties"
                )
            for kw in ("dependentRequired", "dependentSchemas"):
                if node.get(kw):
                    raise self.refuse(kw, path, "it needs listed properties")
            out = {"type": "object"}
            if ap is not True:
                out["additionalProperties"] = self.walk(ap, f"{path}/additionalProperties", refs)
            if lo:
                out["minProperties"] = lo
            if hi == 0:
                out["maxProperties"] = 0
            return out
        # Closed form: outlines-core emits the listed properties only, in order.
        for r in required:
            if r not in props:
                matched = [s for p, s in patterns.items() if re.search(p, r)]
                if not matched and ap is False:
                    raise _Unsat(
                        f"required property {r!r} at {_pointer(path)} is not allowed (additionalProperties is false)"
                    )
                props[r] = {"allOf": matched} if matched else ap
        schemas, raw = {}, {}
        for name, s in props.items():
            _check_name(name, path)
            extra = [ps for p, ps in patterns.items() if re.search(p, name)]
            if extra:
                s = {"allOf": [s, *extra]}
            if names is not None and not self.valid(name, names):
                s = False
            raw[name] = s
            try:
                schemas[name] = self.walk(s, f"{path}/properties/{name}", refs)
            except _Unsat:
                if name in required:
                    raise
        if lo > len(schemas) and ap is not False:
            raise self.refuse(
                "minProperties",
                path,
                f"it asks for more than the {len(schemas)} "
                "listed properties, and jaxdecode writes only listed ones",
            )
        optional = [n for n in schemas if n not in required]
        dep_req = node.get("dependentRequired", {})
        dep_sch = node.get("dependentSchemas", {})
        counts = lo > len(required) or (hi is not None and hi < len(schemas))
        deps = any(k in schemas and not set(v) <= set(required) for k, v in dep_req.items())
        if not (counts or deps or any(k in schemas for k in dep_sch)):
            return {
                "type": "object",
                "properties": schemas,
                "required": [n for n in schemas if n in required],
            }
        # Expand into the sets of present properties that the counts and
        # dependencies allow, each a closed object with all its properties required.
        if 2 ** len(optional) > ENUM_LIMIT:
            kw = (
                "dependentSchemas"
                if dep_sch
                else "dependentRequired"
                if deps
                else "minProperties"
                if lo
                else "maxProperties"
            )
            raise self.refuse(
                kw,
                path,
                f"it needs one variant per set of the {len(optional)} optional properties (over {ENUM_LIMIT})",
            )
        variants, exact = [], ap is False
        for mask in range(2 ** len(optional)):
            present = set(required) | {n for i, n in enumerate(optional) if mask >> i & 1}
            if len(present) < lo or (hi is not None and len(present) > hi):
                continue
            if any(k in present and not set(v) <= present for k, v in dep_req.items()):
                continue
            order = [n for n in schemas if n in present]
            variant = {
                "type": "object",
                "properties": {n: raw[n] for n in order},
                "required": order,
                "additionalProperties": False,
            }
            try:
                for k, s in dep_sch.items():
                    if k in present:
                        variant = self.merge(variant, s, path)
                v = self.walk(variant, path, refs)
            except _Unsat as e:
                exact &= e.exact
                continue
            variants.append(v)
        if not variants:
            raise _Unsat(
                f"no set of listed properties at {_pointer(path)} meets its counts and dependencies",
                exact,
            )
        if sum(len(json.dumps(v)) for v in variants) > 200_000:
            raise self.refuse(
                "dependentRequired" if deps else "minProperties", path, "its expansion is too large"
            )
        return variants[0] if len(variants) == 1 else {"anyOf": variants}

    # ----------------------------------------------------------- enumeration
    def enumerate(self, node: dict, path: str, refs: tuple) -> tuple[list | None, bool]:
        """The values of `node` without its finite-only keywords, if at most
        `ENUM_LIMIT` (else None), and whether they are all of them (`exact`)."""
        base = {k: v for k, v in node.items() if k not in _LISTED}
        if "multipleOf" in node and not set(self.types(node, path)) & {"integer", "number"}:
            base["type"] = "integer"
        try:
            canon = self.walk(base, path, refs)
        except (_Refuse, _Unsat):
            return None, False
        cap = "unique" if node.get("uniqueItems") is True else None
        return self.enumerate_canon(canon, {"cap": cap}), _exact([canon]) and "type" in node

    def enumerate_canon(self, canon: dict, opts: dict) -> list | None:
        out = self._values(canon, opts)
        return None if out is None or len(out) > ENUM_LIMIT else _dedupe(out)

    def _values(self, c: dict, opts: dict) -> list | None:
        if "enum" in c:
            return list(c["enum"])
        if "const" in c:
            return self.domains.get(c["const"])
        if "anyOf" in c:
            out = []
            for b in c["anyOf"]:
                v = self._values(b, {})
                if v is None:
                    return None
                out += v
            return out if len(out) <= ENUM_LIMIT else None
        if "prefixItems" in c:
            parts = [self._values(p, {}) for p in c["prefixItems"]]
            if any(p is None for p in parts) or math.prod(len(p) for p in parts) > ENUM_LIMIT:
                return None
            return [list(t) for t in itertools.product(*parts)]
        if "properties" in c:
            parts = []
            for n, s in c["properties"].items():
                v = self._values(s, {})
                if v is None:
                    return None
                parts.append([(n, x) for x in v] + ([] if n in c.get("required", []) else [None]))
            if math.prod(len(p) for p in parts) > ENUM_LIMIT:
                return None
            return [dict(kv for kv in t if kv is not None) for t in itertools.product(*parts)]
        t = c.get("type")
        if t == "null":
            return [None]
        if t == "boolean":
            return [True, False]
        if t == "string" and c.get("maxLength") == 0:
            return [""]
        if t == "object" and c.get("maxProperties") == 0:
            return [{}]
        if t == "array":
            hi = c.get("maxItems")
            if hi == 0:
                return [[]]
            item = self._values(c.get("items", {}), {})
            if item is None:
                return None
            item = _dedupe(item)
            if opts.get("cap") == "unique":
                hi = len(item) if hi is None else min(hi, len(item))
            if hi is None:
                return None
            out = []
            for n in range(c.get("minItems", 0), hi + 1):
                if opts.get("cap") == "unique":
                    seqs = itertools.permutations(item, n)
                else:
                    if len(item) ** n > ENUM_LIMIT:
                        return None
                    seqs = itertools.product(item, repeat=n)
                for s in seqs:
                    out.append(list(s))
                    if len(out) > ENUM_LIMIT:
                        return None
            return out
        return None


_KINDS = ("null", "boolean", "number", "string", "array", "object")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _bounds(node: dict, path: str, walker: _Walker):
    """`(lo, lo_exclusive, hi, hi_exclusive)`, the tightest of the four keywords."""
    lo = hi = None
    lo_x = hi_x = False
    for kw, excl in (("minimum", False), ("exclusiveMinimum", True)):
        v = node.get(kw)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"json_schema: {kw} at {_pointer(path)} must be a number, got {v!r}")
        if lo is None or v > lo or (v == lo and excl):
            lo, lo_x = v, excl
    for kw, excl in (("maximum", False), ("exclusiveMaximum", True)):
        v = node.get(kw)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"json_schema: {kw} at {_pointer(path)} must be a number, got {v!r}")
        if hi is None or v < hi or (v == hi and excl):
            hi, hi_x = v, excl
    return lo, lo_x, hi, hi_x


def _fixed(lo: str, hi: str) -> str:
    """Digit strings of one length between `lo` and `hi` (inclusive)."""
    if not lo:
        return ""
    if lo[0] == hi[0]:
        return lo[0] + _fixed(lo[1:], hi[1:])
    n = len(lo) - 1
    if lo[1:] == "0" * n and hi[1:] == "9" * n:
        return f"[{lo[0]}-{hi[0]}]" + (f"[0-9]{{{n}}}" if n else "")
    parts = [lo[0] + _fixed(lo[1:], "9" * n)]
    if int(lo[0]) + 1 <= int(hi[0]) - 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}]" + (f"[0-9]{{{n}}}" if n else ""))
    parts.append(hi[0] + _fixed("0" * n, hi[1:]))
    return "(?:" + "|".join(parts) + ")"


def _nonneg(a: int, b: int | None) -> str:
    """Canonical decimal integers in `[a, b]` (`b` None: unbounded), `a >= 0`."""
    # Most digits first: outlines-core's DFA is leftmost-first, so an alternative
    # that ends the whole regex early would cut off the longer ones after it.
    parts = []
    top = len(str(a)) if b is None else len(str(b))
    if b is None:
        parts.append(f"[1-9][0-9]{{{top},}}")
    for n in range(top, len(str(a)) - 1, -1):
        lo = max(a, 10 ** (n - 1) if n > 1 else 0)
        hi = 10**n - 1 if b is None else min(b, 10**n - 1)
        if lo <= hi:
            parts.append(_fixed(str(lo).zfill(n), str(hi).zfill(n)))
    return "(?:" + "|".join(parts) + ")"


def _int_range(a: int | None, b: int | None) -> str:
    """JSON integers in `[a, b]` (None: unbounded)."""
    parts = []
    if b is None or b >= 0:
        parts.append(_nonneg(max(a, 0) if a is not None else 0, b))
    if a is None or a < 0:
        parts.append("-" + _nonneg(max(1, -b) if b is not None else 1, None if a is None else -a))
    return "|".join(parts)


def _magnitudes(a: int, a_x: bool, b: int | None, b_x: bool) -> str | None:
    """Non-negative decimals `d(.d+)?` between `a` and `b` (whole, `b` None:
    unbounded; `*_x`: exclusive), no exponent. None: empty."""
    parts = []
    frac, nonzero, zeros = r"(?:\.[0-9]+)?", r"\.[0-9]*[1-9][0-9]*", r"(?:\.0+)?"
    if b is not None and a == b:
        return None if a_x or b_x else _nonneg(a, a) + zeros
    # The longer alternatives first (leftmost-first DFA, see `_nonneg`).
    if b is not None and not b_x:
        parts.append(_nonneg(b, b) + zeros)
    first = a + 1 if a_x else a
    last = None if b is None else b - 1
    if last is None or first <= last:
        parts.append(_nonneg(first, last) + frac)
    if a_x:
        parts.append(_nonneg(a, a) + nonzero)
    return "|".join(parts) if parts else None


def _real_range(lo: int | None, lo_x: bool, hi: int | None, hi_x: bool) -> str:
    """JSON numbers (no exponent) in the range between whole bounds."""
    parts = []
    if hi is None or hi > 0 or (hi == 0 and not hi_x):
        a, a_x = (0, False) if lo is None or lo < 0 else (lo, lo_x)
        m = _magnitudes(a, a_x, hi, hi_x)
        if m:
            parts.append(m)
    if lo is None or lo < 0:
        a, a_x = (0, False) if hi is None or hi > 0 else (-hi, hi_x)
        m = _magnitudes(a, a_x, None if lo is None else -lo, lo_x)
        if m:
            parts.append(f"-(?:{m})")
    return "|".join(parts)


# Bytes a JSON string holds only escaped: control characters, quote, backslash.
_FORBIDDEN = frozenset([*range(0x20), ord('"'), ord("\\")])


@functools.lru_cache(maxsize=1)
def _byte_vocabulary() -> Any:
    """outlines-core's vocabulary of the 256 single bytes (EOS id 256)."""
    import outlines_core

    return outlines_core.Vocabulary(256, {bytes([b]): [b] for b in range(256)})


def _escapes(core: str) -> bool | None:
    """Can the regex `core` (Rust syntax, as outlines-core reads it) match a byte
    JSON must escape? None: it matches nothing (or does not parse)."""
    import outlines_core

    try:
        # A sentinel after it: at the very end of a regex the index drops some
        # paths out of accepting states (see `_nonneg`).
        index = outlines_core.Index(f"(?:{core})~", _byte_vocabulary())
    except (ValueError, TypeError):
        return None
    return any(_FORBIDDEN.intersection(t) for t in index.get_transitions().values())


def _safe_pattern(pattern: Any, walker: _Walker, path: str) -> str:
    """`pattern` without its `^`/`$` anchors (outputs match it in full, a subset
    of JSON Schema's search), refused where it could produce a character that
    must be escaped in JSON (the regex is spliced between the quotes raw)."""
    if not isinstance(pattern, str):
        raise ValueError(
            f"json_schema: pattern at {_pointer(path)} must be a string, got {pattern!r}"
        )
    core = pattern[1:] if pattern.startswith("^") else pattern
    if core.endswith("$") and not core.endswith("\\$"):
        core = core[:-1]
    escapes = _escapes(core)
    if escapes is None:
        raise walker.refuse(
            "pattern", path, f"{pattern!r} does not parse as a Rust regex or matches nothing"
        )
    if escapes:
        raise walker.refuse(
            "pattern",
            path,
            f"{pattern!r} can match a quote, a backslash or a control "
            "character, which JSON escapes; use classes that exclude them, not '.' or [^...]",
        )
    return core
