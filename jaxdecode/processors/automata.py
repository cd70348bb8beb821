"""Host side of constrained decoding: a constraint and a tokenizer's vocabulary
compiled to a token-level automaton (NumPy), and its device tables.

The automaton itself comes from `outlines-core` (Rust): from a regular expression
(a JSON schema becomes one with its `build_regex_from_schema`, after
`schema.prepare_schema` has checked every keyword and rewritten the schema into
forms outlines-core enforces) and the vocabulary
as the bytes each token stands for, it builds the index `state -> {token: next
state}`, refusing a regex that the vocabulary cannot spell. Here we only:

- read the vocabulary: each token id -> the bytes it adds to the text, for
  byte-level BPE tokenizers (GPT-2's `Ġ` byte alphabet, the bundled byte
  tokenizer), SentencePiece-style ones (`▁` for a space, `<0xNN>` byte
  fallback) and plain ones; special tokens are left out (EOS is handled apart);
- renumber outlines-core's states `0..S-1` (`TokenAutomaton`), join several
  automata into one table with a start state per row (`union`), and lay the
  table out for the device: `dense` (`[S, V]` int32 next state, -1 = no
  transition; one row gather masks, one element gather advances) or `sparse`
  (`[S, ceil(V/32)]` uint32 bit mask of allowed tokens + CSR transitions
  searched by bisection), chosen by size.

Compiled automata are cached per (constraint, tokenizer), so a schema used by
many requests is compiled once.

A module over ~500 lines: compiling an automaton and laying it out as dense or sparse
device tables are one concern (the layout is chosen from the compiled sizes).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxdecode.processors.schema import prepare_schema
from jaxdecode.validation import normalize_schema

__all__ = [
    "DENSE_LIMIT_BYTES",
    "MAX_BYTES",
    "TokenAutomaton",
    "Tables",
    "choice_regex",
    "clear_cache",
    "layout_bytes",
    "schema_regex",
    "state_bucket",
    "compile_choice",
    "compile_json_schema",
    "compile_regex",
    "free_automaton",
    "token_bytes",
    "union",
]

# Dense `[S, V]` int32 tables up to this size (a row gather per step is the
# cheapest mask), the sparse form above it (see the README's measurements).
DENSE_LIMIT_BYTES = 64 * 2**20
# Largest automaton (in its chosen layout) accepted by default.
MAX_BYTES = 1 * 2**30

_CACHE_SIZE = 64


@dataclasses.dataclass(frozen=True, eq=False)
class TokenAutomaton:
    """A token-level DFA over a vocabulary of `vocab` ids, states `0..S-1`.

    Attributes:
        indptr: `[S + 1]` int64, state s's transitions are `[indptr[s], indptr[s+1])`.
        tokens: `[nnz]` int32 token ids, ascending within each state.
        next: `[nnz]` int32 the state each token leads to.
        final: `[S]` bool, accepting states (EOS allowed).
        start: the initial state.
        vocab: number of token ids the tables cover (max id + 1).
        source: what it was compiled from (for messages).
        outlines_states: `[S]` outlines-core's id of each state (tests compare
            with its own answers).
    """

    indptr: np.ndarray
    tokens: np.ndarray
    next: np.ndarray
    final: np.ndarray
    start: int
    vocab: int
    source: str = ""
    outlines_states: np.ndarray | None = None

    @property
    def num_states(self) -> int:
        return int(self.final.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.tokens.shape[0])

    def allowed(self, state: int) -> np.ndarray:
        """Token ids with a transition from `state` (EOS not included)."""
        return self.tokens[self.indptr[state] : self.indptr[state + 1]]

    def step(self, state: int, token: int) -> int:
        """The next state, or -1 without a transition."""
        lo, hi = self.indptr[state], self.indptr[state + 1]
        i = lo + np.searchsorted(self.tokens[lo:hi], token)
        return int(self.next[i]) if i < hi and self.tokens[i] == token else -1


# --------------------------------------------------------------------------- #
# The vocabulary: token id -> bytes.
# --------------------------------------------------------------------------- #


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a jaxdecode `Tokenizer`, a transformers
    fast tokenizer, or a `tokenizers.Tokenizer` itself."""
    for attr in ("backend", "backend_tokenizer", "_tokenizer"):
        inner = getattr(tokenizer, attr, None)
        if inner is not None and hasattr(inner, "get_vocab"):
            return inner
    if hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "to_str"):
        return tokenizer
    raise ValueError(
        "tokenizer must be a jaxdecode Tokenizer, a transformers fast tokenizer or a "
        f"tokenizers.Tokenizer, got {type(tokenizer).__name__}"
    )


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte alphabet reversed: printable character -> byte."""
    from jaxdecode.tokenizers import byte_to_unicode

    return {c: b for b, c in byte_to_unicode().items()}


def _decoder_kinds(spec: Any) -> set[str]:
    """The decoder types of a tokenizer.json `decoder` entry (a Sequence's members)."""
    if not isinstance(spec, Mapping):
        return set()
    if spec.get("type") == "Sequence":
        return set().union(*(_decoder_kinds(d) for d in spec.get("decoders", [])))
    return {str(spec.get("type"))}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id adds to the text; None for special tokens and
    unused ids.

    Byte-level BPE (GPT-2, SmolLM2, the bundled byte tokenizer): each character
    of the token string is one byte of GPT-2's alphabet. SentencePiece-style
    (a `Metaspace` / `ByteFallback` decoder): `▁` is a space and `<0xNN>` the byte
    NN. Otherwise the token string is the text. A leading-space-stripping
    decoder is ignored: mid-text, a token adds its space.
    """
    backend = _backend(tokenizer)
    vocab = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    kinds = _decoder_kinds(json.loads(backend.to_str()).get("decoder"))
    size = max(vocab.values()) + 1 if vocab else 0
    out: list[bytes | None] = [None] * size
    byte_level = "ByteLevel" in kinds
    metaspace = bool(kinds & {"Metaspace", "ByteFallback", "Replace"})
    inverse = _byte_decoder() if byte_level else {}
    for text, i in vocab.items():
        token = added.get(i)
        if token is not None and token.special:
            continue
        if token is not None and not byte_level:
            out[i] = token.content.encode("utf-8")
        elif byte_level:
            try:
                out[i] = bytes(inverse[c] for c in text)
            except KeyError:  # an added, non-special token written as plain text
                out[i] = text.encode("utf-8")
        elif metaspace:
            m = _BYTE_FALLBACK.fullmatch(text)
            out[i] = bytes([int(m.group(1), 16)]) if m else text.replace("▁", " ").encode()
        else:
            out[i] = text.encode("utf-8")
    return out


_VOCABS: OrderedDict[int, tuple[Any, Any, int]] = OrderedDict()


def _outlines_vocabulary(tokenizer: Any) -> tuple[Any, int]:
    """`(outlines_core.Vocabulary, vocab)` of a tokenizer, cached by identity.

    outlines-core wants an EOS id outside the map: a fake one, `vocab`, whose
    transitions we drop (EOS is the processor's business, from the config)."""
    import outlines_core

    hit = _VOCABS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        _VOCABS.move_to_end(id(tokenizer))
        return hit[1], hit[2]
    pieces = token_bytes(tokenizer)
    mapping: dict[bytes, list[int]] = {}
    for i, b in enumerate(pieces):
        if b:  # empty tokens add nothing: never part of a constrained text
            mapping.setdefault(b, []).append(i)
    if not mapping:
        raise ValueError("the tokenizer has no usable (non-special) tokens")
    size = len(pieces)
    vocabulary = outlines_core.Vocabulary(size, mapping)
    _VOCABS[id(tokenizer)] = (tokenizer, vocabulary, size)
    while len(_VOCABS) > 8:
        _VOCABS.popitem(last=False)
    return vocabulary, size


# --------------------------------------------------------------------------- #
# Compiling a constraint.
# --------------------------------------------------------------------------- #

_AUTOMATA: OrderedDict[tuple[str, int], tuple[Any, TokenAutomaton]] = OrderedDict()


def clear_cache() -> None:
    """Forgets every compiled automaton and vocabulary (benchmarks time cold builds)."""
    _AUTOMATA.clear()
    _VOCABS.clear()


def compile_regex(pattern: str, tokenizer: Any) -> TokenAutomaton:
    """The token automaton of a regular expression (outlines-core's syntax: Rust
    `regex`, matched against the whole output).

    Raises:
        ValueError: the regex is invalid, or the vocabulary cannot spell it.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"regex must be a non-empty string, got {pattern!r}")
    key = (pattern, id(tokenizer))
    hit = _AUTOMATA.get(key)
    if hit is not None and hit[0] is tokenizer:
        _AUTOMATA.move_to_end(key)
        return hit[1]
    import outlines_core

    vocabulary, size = _outlines_vocabulary(tokenizer)
    try:
        index = outlines_core.Index(pattern, vocabulary)
    except ValueError as e:
        text = str(e)
        if "incompatible" in text:
            raise ValueError(
                f"the tokenizer's vocabulary cannot produce the regex {_short(pattern)}: {text}"
            ) from None
        raise ValueError(f"regex {_short(pattern)} is invalid: {text}") from None
    automaton = _from_index(index, size, eos=size, source=f"regex {_short(pattern)}")
    if not automaton.final.any():
        raise ValueError(
            f"the tokenizer's vocabulary cannot produce the regex {_short(pattern)}: no "
            "sequence of its tokens reaches the end of a match"
        )
    _AUTOMATA[key] = (tokenizer, automaton)
    while len(_AUTOMATA) > _CACHE_SIZE:
        _AUTOMATA.popitem(last=False)
    return automaton


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _from_index(index: Any, vocab: int, *, eos: int, source: str) -> TokenAutomaton:
    """outlines-core's index renumbered `0..S-1` in CSR form, EOS moves dropped,
    states that cannot reach an accepting state removed (no final state left:
    the vocabulary cannot produce any match)."""
    transitions = {
        s: {t: n for t, n in moves.items() if t != eos}
        for s, moves in index.get_transitions().items()
    }
    finals = set(index.get_final_states())
    # Keep only states from which an accepting state can be reached: a token into
    # a trap (a path the vocabulary cannot finish) is never allowed.
    alive, frontier = set(finals), list(finals)
    parents: dict[int, set[int]] = {}
    for s, moves in transitions.items():
        for n in moves.values():
            parents.setdefault(n, set()).add(s)
    while frontier:
        for p in parents.get(frontier.pop(), ()):
            if p not in alive:
                alive.add(p)
                frontier.append(p)
    start = index.get_initial_state()
    if start not in alive:
        alive = {start}
        finals = set()
    transitions = {
        s: {t: n for t, n in moves.items() if n in alive}
        for s, moves in transitions.items()
        if s in alive
    }
    ids = sorted(alive)
    number = {s: i for i, s in enumerate(ids)}
    indptr = np.zeros(len(ids) + 1, np.int64)
    toks, nxts = [], []
    for i, s in enumerate(ids):
        moves = transitions.get(s, {})
        t = np.fromiter(moves, np.int64, count=len(moves))
        t.sort()
        toks.append(t.astype(np.int32))
        nxts.append(np.fromiter((number[moves[k]] for k in t), np.int32, count=t.size))
        indptr[i + 1] = indptr[i] + t.size
    return TokenAutomaton(
        indptr=indptr,
        tokens=np.concatenate(toks) if toks else np.zeros(0, np.int32),
        next=np.concatenate(nxts) if nxts else np.zeros(0, np.int32),
        final=np.array([s in finals for s in ids], bool),
        start=number[index.get_initial_state()],
        vocab=vocab,
        source=source,
        outlines_states=np.asarray(ids, np.int64),
    )


def schema_regex(schema: Any, whitespace: str | None = None) -> str:
    """outlines-core's regular expression for a JSON schema.

    Raises:
        ValueError: the schema uses what outlines-core does not support, or is
            not a schema.
    """
    from outlines_core.json_schema import build_regex_from_schema

    text = normalize_schema(schema)
    prepared = prepare_schema(text)
    try:
        regex = build_regex_from_schema(json.dumps(prepared.schema, ensure_ascii=False), whitespace)
    except (ValueError, TypeError) as e:
        raise ValueError(f"json_schema {_short(text)} is not supported: {e}") from None
    return prepared.splice(regex)


def compile_json_schema(
    schema: Any, tokenizer: Any, whitespace: str | None = None
) -> TokenAutomaton:
    """The token automaton of a JSON schema (outputs are JSON values it validates;
    `whitespace` is the regex allowed between tokens, default outlines-core's)."""
    pattern = schema_regex(schema, whitespace)
    automaton = compile_regex(pattern, tokenizer)
    return dataclasses.replace(automaton, source=f"json_schema {_short(normalize_schema(schema))}")


# Rust regex metacharacters (and `-`, `&`, `~`, which are special in classes).
_META = set("\\.+*?()|[]{}^$#&-~")


def choice_regex(choices: Sequence[str]) -> str:
    """A regex matching exactly one of `choices` (each escaped literally)."""
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
        raise ValueError(f"choices must be a non-empty list of strings, got {choices!r}")
    for c in choices:
        if not isinstance(c, str):
            raise ValueError(f"choices must hold strings, got {c!r} in {choices!r}")
    escape = lambda s: "".join("\\" + ch if ch in _META else ch for ch in s)
    return "(" + "|".join(escape(c) for c in choices) + ")"


def compile_choice(choices: Sequence[str], tokenizer: Any) -> TokenAutomaton:
    """The token automaton accepting exactly one of `choices`."""
    automaton = compile_regex(choice_regex(choices), tokenizer)
    return dataclasses.replace(automaton, source=f"choices {_short(repr(list(choices)))}")


def free_automaton(tokenizer: Any) -> TokenAutomaton:
    """One accepting state where every usable token loops: an unconstrained row
    in a batch of constrained ones."""
    pieces = token_bytes(tokenizer)
    toks = np.array([i for i, b in enumerate(pieces) if b], np.int32)
    return TokenAutomaton(
        indptr=np.array([0, toks.size], np.int64),
        tokens=toks,
        next=np.zeros(toks.size, np.int32),
        final=np.ones(1, bool),
        start=0,
        vocab=len(pieces),
        source="no constraint",
    )


# --------------------------------------------------------------------------- #
# Several automata in one table; device layouts.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True, eq=False)
class Tables:
    """The union of automata laid out for the device (NumPy; `Grammar` holds them
    as JAX arrays).

    Attributes:
        layout: "dense" or "sparse".
        next: dense: `[S, V]` int32 next state, -1 = no transition. Sparse: None.
        bits: sparse: `[S, ceil(V/32)]` uint32, bit t%32 of word t//32 set when
            token t has a transition. Dense: None.
        indptr, tokens, targets: sparse: the CSR transitions (`[S + 1]`, `[nnz]`,
            `[nnz]` int32). Dense: None.
        final: `[S]` bool accepting states.
        starts: the start state of each automaton given to `union`.
        vocab: V.
        max_degree: the most transitions of one state (bisection depth).
    """

    layout: str
    final: np.ndarray
    starts: tuple[int, ...]
    vocab: int
    max_degree: int
    next: np.ndarray | None = None
    bits: np.ndarray | None = None
    indptr: np.ndarray | None = None
    tokens: np.ndarray | None = None
    targets: np.ndarray | None = None

    @property
    def num_states(self) -> int:
        return int(self.final.shape[0])

    @property
    def nbytes(self) -> int:
        arrays = (self.next, self.bits, self.indptr, self.tokens, self.targets, self.final)
        return sum(a.nbytes for a in arrays if a is not None)


def layout_bytes(num_states: int, vocab: int, nnz: int) -> dict[str, int]:
    """Device bytes of each layout: dense `S * V * 4`; sparse
    `S * ceil(V/32) * 4 + nnz * 8 + (S + 1) * 4` (plus `S` for the final flags)."""
    words = -(-vocab // 32)
    return {
        "dense": num_states * vocab * 4 + num_states,
        "sparse": num_states * words * 4 + nnz * 8 + (num_states + 1) * 4 + num_states,
    }


def state_bucket(n: int) -> int:
    """States padded to a power of two (at least 16): a batch of other schemas
    with as many states reuses the compiled program."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def union(
    automata: Sequence[TokenAutomaton],
    *,
    layout: str = "auto",
    dense_limit: int = DENSE_LIMIT_BYTES,
    max_bytes: int = MAX_BYTES,
    min_states: int = 0,
    min_nnz: int = 0,
    bucket_nnz: bool = False,
) -> Tables:
    """One table holding every automaton (states renumbered one after another),
    with its start state per automaton.

    Args:
        automata: the automata (same vocabulary).
        layout: "dense", "sparse" or "auto" (dense when it takes at most
            `dense_limit` bytes).
        max_bytes: ValueError above this many device bytes.
        min_states: at least this many (padded) states: a table that must keep
            the shapes of a former one.
        min_nnz, bucket_nnz: sparse layout: at least `min_nnz` transition
            entries, and their count padded to a power of two (`bucket_nnz`),
            so that tables of other constraints keep the arrays' shapes (the
            entries past the last state's are never read).
    """
    if layout not in ("auto", "dense", "sparse"):
        raise ValueError(f"layout must be 'auto', 'dense' or 'sparse', got {layout!r}")
    if not automata:
        raise ValueError("union() needs at least one automaton")
    vocab = max(a.vocab for a in automata)
    offsets = np.cumsum([0] + [a.num_states for a in automata])
    real = int(offsets[-1])
    states = max(state_bucket(real), int(min_states))
    nnz = sum(a.nnz for a in automata)
    entries = max(1 << max(nnz - 1, 0).bit_length() if bucket_nnz else nnz, int(min_nnz))
    sizes = layout_bytes(states, vocab, entries)
    chosen = (
        layout if layout != "auto" else ("dense" if sizes["dense"] <= dense_limit else "sparse")
    )
    if sizes[chosen] > max_bytes:
        what = ", ".join(a.source for a in automata[:4]) + (" ..." if len(automata) > 4 else "")
        raise ValueError(
            f"the constraint automaton ({what}) has {real} states x {vocab} tokens, "
            f"{nnz} transitions: {sizes[chosen] / 2**20:.1f} MiB in the {chosen} layout, over "
            f"the limit of {max_bytes / 2**20:.1f} MiB; simplify the constraint or raise max_bytes"
        )
    final = np.zeros(states, bool)
    starts = []
    for a, off in zip(automata, offsets, strict=False):
        final[off : off + a.num_states] = a.final
        starts.append(int(off + a.start))
    degree = max((int(np.max(np.diff(a.indptr))) for a in automata if a.num_states), default=0)
    common = dict(final=final, starts=tuple(starts), vocab=vocab, max_degree=degree)
    if chosen == "dense":
        table = np.full((states, vocab), -1, np.int32)
        for a, off in zip(automata, offsets, strict=False):
            rows = np.repeat(np.arange(a.num_states) + off, np.diff(a.indptr))
            table[rows, a.tokens] = a.next + off
        return Tables(layout="dense", next=table, **common)
    indptr = np.zeros(states + 1, np.int64)
    for a, off in zip(automata, offsets, strict=False):
        indptr[off + 1 : off + a.num_states + 1] = np.diff(a.indptr)
    indptr = np.cumsum(indptr)
    tokens = np.concatenate([a.tokens for a in automata]).astype(np.int32)
    targets = np.concatenate([a.next + off for a, off in zip(automata, offsets, strict=False)])
    words = -(-vocab // 32)
    bits = np.zeros((states, words), np.uint32)
    rows = np.repeat(np.arange(states), np.diff(indptr))
    np.bitwise_or.at(bits, (rows, tokens // 32), np.uint32(1) << (tokens % 32).astype(np.uint32))
    if indptr[-1] >= 2**31:
        raise ValueError(f"the constraint automaton has {indptr[-1]} transitions (over 2**31)")
    pad = entries - tokens.size
    return Tables(
        layout="sparse",
        bits=bits,
        indptr=indptr.astype(np.int32),
        tokens=np.concatenate([tokens, np.full(pad, -1, np.int32)]),
        targets=np.concatenate([targets.astype(np.int32), np.full(pad, -1, np.int32)]),
        **common,
    )
