"""Constrained decoding on the device: a regex, a JSON schema or a list of choices
as a token automaton inside the compiled loop.

The constraint is compiled once on the host (`automata`: outlines-core builds the
token-level DFA from the regex and the tokenizer's vocabulary) and becomes the
arrays of a `Grammar` processor. Each row's automaton state is processor state
(`[batch]` int32): `apply` keeps the tokens with a transition from it (EOS only
in accepting states), `update` follows the chosen token. No host round trip per
step; beam search reorders the states by parent beam like any processor state.

Rows of one batch may carry different constraints: the automata share one table
(`union`) and each row starts in its own start state (`start: [batch]`, a
per-row leaf). A state of -1 is dead (a token without a transition was forced in,
e.g. the pad of a finished row): only EOS remains allowed there, as in any row
where no allowed token has a finite score, so a row never has nothing to choose.
A state of `FREE` (-2) is an unconstrained row: its logits pass unchanged, so
it decodes exactly as without any constraint.

`UnionTable` is the table of a growing set of constraints (the continuous-batching
engine's): constraints are appended as they arrive, so a start state never moves,
and the device arrays keep their shapes until the set outgrows them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import pytree
from jaxdecode.context import DecodeContext
from jaxdecode.processors.automata import (
    DENSE_LIMIT_BYTES,
    MAX_BYTES,
    Tables,
    TokenAutomaton,
    compile_choice,
    compile_json_schema,
    compile_regex,
    free_automaton,
    union,
)
from jaxdecode.processors.base import LogitsProcessor, vocab_mask
from jaxdecode.validation import eos_ids, normalize_schema

Array = jax.Array

__all__ = [
    "FREE",
    "Grammar",
    "UnionTable",
    "choice",
    "compile_spec",
    "from_specs",
    "from_tables",
    "grammar",
    "json_schema",
    "regex",
    "spec_key",
]

# The state of an unconstrained row in a table of constrained ones.
FREE = -2


@pytree.dataclass
class Grammar(LogitsProcessor):
    """Allows only the tokens that keep each row's output inside its constraint.

    Build it with `regex`, `json_schema`, `choice` or `grammar` (one constraint
    per row). State: `[batch]` int32 automaton states (-1: dead, `FREE` = -2:
    no constraint, the logits pass unchanged).

    Attributes:
        final: `[S]` bool accepting states (EOS allowed there).
        start: `[]` or `[batch]` int32 start state of each row (`FREE`: none).
        next: dense layout: `[S, V]` int32 next state, -1 = no transition.
        bits: sparse layout: `[S, ceil(V/32)]` uint32 allowed-token bits.
        indptr, tokens, targets: sparse layout: CSR transitions.
        eos: static EOS ids (None: taken from the config by `generate`).
        layout: static, "dense" or "sparse".
        vocab: static, token ids the table covers.
        depth: static, bisection steps of the sparse lookup.
    """

    final: Array
    start: Array
    next: Array | None = None
    bits: Array | None = None
    indptr: Array | None = None
    tokens: Array | None = None
    targets: Array | None = None
    eos: tuple[int, ...] | None = pytree.field(pytree_node=False, default=None)
    layout: str = pytree.field(pytree_node=False, default="dense")
    vocab: int = pytree.field(pytree_node=False, default=0)
    depth: int = pytree.field(pytree_node=False, default=1)

    row_fields: ClassVar[dict[str, str]] = {"start": "the constraint (regex/json_schema/choices)"}

    # ------------------------------------------------------------------ #
    def with_eos(self, eos_token_id: Any) -> Grammar:
        """The same grammar with these EOS ids (an int or a list)."""
        ids = eos_ids(eos_token_id)
        if not ids:
            raise ValueError(
                "a constraint needs eos_token_id: EOS is how a row ends once its output is complete"
            )
        return self.replace(eos=ids)

    def init(self, ctx: DecodeContext) -> Array:
        """Start states, advanced over the tokens already generated in `ctx`."""
        state = jnp.broadcast_to(self.start.astype(jnp.int32), (ctx.batch,))
        first = ctx.offset + ctx.prompt_length  # buffer column of the first generated token
        generated = ctx.generated
        rows = jnp.arange(ctx.batch)

        def body(j: Array, st: Array) -> Array:
            col = jnp.clip(first + j, 0, ctx.sequences.shape[1] - 1)
            moved = self.update(st, ctx.sequences[rows, col])
            return jnp.where(j < generated, moved, st)

        return jax.lax.fori_loop(0, jnp.max(jnp.maximum(generated, 0)), body, state)

    def update(self, state: Array, tokens: Array) -> Array:
        """Each row follows its token; EOS keeps the state (the row has ended), and
        so does a free row."""
        tokens = tokens.astype(jnp.int32)
        s = jnp.maximum(state, 0)
        t = jnp.clip(tokens, 0, self.vocab - 1)
        nxt = self.next[s, t] if self.layout == "dense" else self._bisect(s, t)
        nxt = jnp.where((state >= 0) & (tokens >= 0) & (tokens < self.vocab), nxt, -1)
        if self.eos:
            nxt = jnp.where(jnp.isin(tokens, jnp.asarray(self.eos, jnp.int32)), state, nxt)
        return jnp.where(state == FREE, FREE, nxt)

    def _bisect(self, s: Array, t: Array) -> Array:
        """Sparse lookup: the first CSR entry of state s with token >= t."""
        lo, end = self.indptr[s], self.indptr[s + 1]
        last = self.tokens.shape[0] - 1

        def body(_: int, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
            lo, hi = bounds
            mid = (lo + hi) // 2
            right = self.tokens[jnp.clip(mid, 0, last)] < t
            live = lo < hi
            return jnp.where(live & right, mid + 1, lo), jnp.where(live & ~right, mid, hi)

        lo, _ = jax.lax.fori_loop(0, self.depth, body, (lo, end))
        at = jnp.clip(lo, 0, last)
        return jnp.where((lo < end) & (self.tokens[at] == t), self.targets[at], -1)

    def allowed(self, state: Array, vocab: int) -> Array:
        """`[batch, vocab]` bool: tokens with a transition from each row's state
        (EOS not included)."""
        s = jnp.maximum(state, 0)
        if self.layout == "dense":
            mask = self.next[s] >= 0
        else:
            words = self.bits[s]  # [B, W]
            shifts = jnp.arange(32, dtype=jnp.uint32)
            mask = ((words[:, :, None] >> shifts) & 1).astype(bool).reshape(s.shape[0], -1)
        mask = mask[:, :vocab] if mask.shape[1] >= vocab else _pad_cols(mask, vocab)
        return mask & (state >= 0)[:, None]

    def apply(self, logits: Array, ctx: DecodeContext, state: Array) -> Array:
        if not self.eos:
            raise ValueError(
                "this Grammar has no EOS id: build it with eos_token_id=, or pass it to "
                "generate, which takes the config's eos_token_id"
            )
        vocab = logits.shape[-1]
        eos = vocab_mask(jnp.asarray(self.eos, jnp.int32), vocab)[None, :]
        accepting = (self.final[jnp.maximum(state, 0)] & (state >= 0))[:, None]
        allowed = (self.allowed(state, vocab) & ~eos) | (eos & accepting)
        masked = jnp.where(allowed, logits, -jnp.inf)
        # Nothing allowed survives (dead state, or other processors removed every
        # allowed token): EOS ends the row rather than a token from nowhere.
        stuck = ~jnp.any(masked > -jnp.inf, axis=-1, keepdims=True)
        forced = jnp.where(eos, jnp.where(logits > -jnp.inf, logits, 0.0), -jnp.inf)
        out = jnp.where(stuck, forced, masked)
        return jnp.where((state == FREE)[:, None], logits, out)


def _pad_cols(mask: Array, vocab: int) -> Array:
    return jnp.pad(mask, ((0, 0), (0, vocab - mask.shape[1])))


# --------------------------------------------------------------------------- #
# Factories.
# --------------------------------------------------------------------------- #


def from_tables(tables: Tables, start: Any, eos_token_id: Any = None) -> Grammar:
    """A `Grammar` over host `tables` with start state(s) `start` (`[]` or `[batch]`)."""
    dev = lambda a: None if a is None else jnp.asarray(a)
    tokens, targets = tables.tokens, tables.targets
    if tables.layout == "sparse" and tokens.size == 0:  # keep gathers in bounds
        tokens, targets = np.full(1, -1, np.int32), np.full(1, -1, np.int32)
    g = Grammar(
        final=jnp.asarray(tables.final),
        start=jnp.asarray(np.asarray(start, np.int32)),
        next=dev(tables.next),
        bits=dev(tables.bits),
        indptr=dev(tables.indptr),
        tokens=dev(tokens) if tables.layout == "sparse" else None,
        targets=dev(targets) if tables.layout == "sparse" else None,
        layout=tables.layout,
        vocab=tables.vocab,
        # Static: the dense layout does not bisect, so tables of one shape (other
        # constraints of as many padded states) share the compiled program.
        depth=max(1, int(tables.max_degree).bit_length()) if tables.layout == "sparse" else 1,
    )
    return g if eos_token_id is None else g.with_eos(eos_token_id)


def _single(
    automaton: TokenAutomaton, eos_token_id: Any, layout: str, dense_limit: int, max_bytes: int
) -> Grammar:
    tables = union([automaton], layout=layout, dense_limit=dense_limit, max_bytes=max_bytes)
    return from_tables(tables, tables.starts[0], eos_token_id)


def regex(
    pattern: str,
    tokenizer: Any,
    *,
    eos_token_id: Any = None,
    layout: str = "auto",
    dense_limit: int = DENSE_LIMIT_BYTES,
    max_bytes: int = MAX_BYTES,
) -> Grammar:
    """Outputs that match `pattern` in full (outlines-core's regex syntax).

    Args:
        pattern: the regular expression.
        tokenizer: the model's tokenizer (a jaxdecode `Tokenizer`, a transformers
            fast tokenizer or a `tokenizers.Tokenizer`).
        eos_token_id: EOS id(s), allowed in accepting states; default: the
            config's, when passed to `generate`.
        layout: "auto", "dense" or "sparse" device tables (see the README).
        dense_limit: "auto" picks dense up to this many bytes.
        max_bytes: ValueError for a larger automaton.

    >>> jd.regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", lm.tokenizer)
    """
    return _single(compile_regex(pattern, tokenizer), eos_token_id, layout, dense_limit, max_bytes)


def json_schema(
    schema: Any,
    tokenizer: Any,
    *,
    whitespace: str | None = None,
    eos_token_id: Any = None,
    layout: str = "auto",
    dense_limit: int = DENSE_LIMIT_BYTES,
    max_bytes: int = MAX_BYTES,
) -> Grammar:
    """Outputs that are JSON valid under `schema` (a dict or its JSON text).

    `whitespace`: the regex allowed between JSON tokens (default outlines-core's,
    an optional single space). Other arguments as `regex`.
    """
    automaton = compile_json_schema(schema, tokenizer, whitespace)
    return _single(automaton, eos_token_id, layout, dense_limit, max_bytes)


def choice(
    choices: Sequence[str],
    tokenizer: Any,
    *,
    eos_token_id: Any = None,
    layout: str = "auto",
    dense_limit: int = DENSE_LIMIT_BYTES,
    max_bytes: int = MAX_BYTES,
) -> Grammar:
    """Outputs equal to one of `choices` (strings, taken literally)."""
    automaton = compile_choice(choices, tokenizer)
    return _single(automaton, eos_token_id, layout, dense_limit, max_bytes)


def compile_spec(spec: tuple[str, Any] | None, tokenizer: Any) -> TokenAutomaton:
    """The automaton of one `(field, value)` constraint (`regex`, `json_schema`,
    `choices`), or of no constraint (None)."""
    if spec is None:
        return free_automaton(tokenizer)
    kind, value = spec
    if kind == "regex":
        return compile_regex(value, tokenizer)
    if kind == "json_schema":
        return compile_json_schema(value, tokenizer)
    if kind == "choices":
        return compile_choice(value, tokenizer)
    raise ValueError(f"unknown constraint {kind!r}: use regex, json_schema or choices")


def grammar(
    specs: Sequence[tuple[str, Any] | None],
    tokenizer: Any,
    *,
    eos_token_id: Any = None,
    layout: str = "auto",
    dense_limit: int = DENSE_LIMIT_BYTES,
    max_bytes: int = MAX_BYTES,
) -> Grammar:
    """One constraint per row in one table: `specs[b]` is `("regex", pattern)`,
    `("json_schema", schema)`, `("choices", [...])`, or None (row b is free: its
    logits pass unchanged, as without a constraint).

    >>> jd.grammar([("json_schema", person), ("choices", ["yes", "no"])], tok)
    """
    if isinstance(specs, (str, tuple)) or not specs:
        raise ValueError(f"specs must be a non-empty list of (field, value) or None, got {specs!r}")
    distinct: dict[Any, int] = {}
    automata: list[TokenAutomaton] = []
    rows = []
    for spec in specs:
        if spec is None:
            rows.append(None)
            continue
        key = spec_key(spec)
        if key not in distinct:
            distinct[key] = len(automata)
            automata.append(compile_spec(spec, tokenizer))
        rows.append(distinct[key])
    # Every row free: a table nobody reads (the processor is still a Grammar).
    table_of = automata or [free_automaton(tokenizer)]
    tables = union(table_of, layout=layout, dense_limit=dense_limit, max_bytes=max_bytes)
    start = np.asarray([FREE if i is None else tables.starts[i] for i in rows], np.int32)
    return from_tables(tables, start, eos_token_id)


def spec_key(spec: tuple[str, Any]) -> tuple[str, Any]:
    """A hashable key of one `(field, value)` constraint: equal constraints (a
    schema as a dict or as its text, choices as a list or a tuple) share a key."""
    kind, value = spec
    if kind == "json_schema":
        return kind, normalize_schema(value)
    return kind, _hashable(value)


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple((k, _hashable(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def from_specs(
    parsed: tuple[bool, list[tuple[str, Any] | None]], tokenizer: Any, eos_token_id: Any
) -> Grammar:
    """The `Grammar` of a config's parsed constraint (`parse_constraints`): one
    start state for every row, or one per row."""
    per_row, specs = parsed
    if per_row:
        return grammar(specs, tokenizer, eos_token_id=eos_token_id)
    tables = union([compile_spec(specs[0], tokenizer)])
    return from_tables(tables, tables.starts[0], eos_token_id)


class UnionTable:
    """The union table of a growing set of constraints, for rows that arrive over
    time (the continuous-batching engine).

    Each distinct constraint is compiled once and appended to the table, so a
    start state, and every state of a row already decoding, keeps its number
    when the table grows. The device arrays keep their shapes while the set
    fits: states padded to a power of two (at least 16), sparse transitions
    padded to a power of two, the sparse bisection depth fixed by the
    vocabulary, and a table never shrinks; a program compiled for the table is
    reused until the set outgrows its bucket.

    Args:
        tokenizer: the model's tokenizer.
        eos_token_id: EOS id(s) (allowed in accepting states).
        layout: as `union`.
        dense_limit: as `union`.
        max_bytes: as `union`.

    Raises:
        ValueError: no EOS id.
    """

    def __init__(
        self,
        tokenizer: Any,
        eos_token_id: Any,
        *,
        layout: str = "auto",
        dense_limit: int = DENSE_LIMIT_BYTES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos = eos_ids(eos_token_id)
        if not self.eos:
            raise ValueError("a constraint needs eos_token_id (a row ends with EOS once complete)")
        self._options = dict(layout=layout, dense_limit=dense_limit, max_bytes=max_bytes)
        self._index: dict[Any, int] = {}
        self._automata: list[TokenAutomaton] = []
        self.tables: Tables | None = None
        # The device arrays of the table, every row free (`start` FREE).
        self.grammar: Grammar | None = None

    def __len__(self) -> int:
        """Distinct constraints in the table."""
        return len(self._automata)

    def __contains__(self, spec: tuple[str, Any]) -> bool:
        return spec_key(spec) in self._index

    @property
    def shape(self) -> tuple[str, int, int] | None:
        """What the compiled programs depend on: (layout, states, transition
        entries), or None before the first constraint."""
        t = self.tables
        if t is None:
            return None
        return t.layout, t.num_states, 0 if t.tokens is None else int(t.tokens.size)

    @property
    def nbytes(self) -> int:
        """Device bytes of the table (0 before the first constraint)."""
        return 0 if self.tables is None else self.tables.nbytes

    def add(
        self,
        automata: Sequence[tuple[tuple[str, Any], TokenAutomaton]],
        budget: int | None = None,
    ) -> bool:
        """Appends `(spec, automaton)` pairs whose constraint is not in the table
        yet (`compile_spec` builds the automaton); rebuilds the table when there
        are any. Returns whether the table changed.

        Raises:
            ValueError: the table would exceed `max_bytes` or `budget` bytes
                (nothing changes).
        """
        new: dict[Any, TokenAutomaton] = {}
        for spec, automaton in automata:
            key = spec_key(spec)
            if key not in self._index:
                new.setdefault(key, automaton)
        if not new:
            return False
        old = self.tables
        members = self._automata + list(new.values())
        tables = union(
            members,
            **self._options,
            min_states=0 if old is None else old.num_states,
            min_nnz=0 if old is None or old.tokens is None else int(old.tokens.size),
            bucket_nnz=True,
        )
        if budget is not None and tables.nbytes > budget:
            raise ValueError(
                f"the constraint table ({len(members)} constraints, {tables.num_states} states) "
                f"needs {tables.nbytes / 2**20:.1f} MiB, over the {budget / 2**20:.1f} MiB the "
                "device has for it; give fewer distinct constraints at once"
            )
        for key in new:
            self._index[key] = len(self._automata)
            self._automata.append(new[key])
        self.tables = tables
        # Sparse: the bisection depth from the vocabulary (a state has at most
        # `vocab` moves), not from this set's largest state: the same for every table.
        grammar = from_tables(tables, FREE, self.eos)
        if tables.layout == "sparse":
            grammar = grammar.replace(depth=max(1, int(tables.vocab).bit_length()))
        self.grammar = grammar
        return True

    def start(self, spec: tuple[str, Any] | None) -> int:
        """The start state of a constraint in the table (`FREE` for None)."""
        if spec is None:
            return FREE
        return self.tables.starts[self._index[spec_key(spec)]]

    def clear(self) -> None:
        """Forgets the constraints (no row may be using the table); the next
        `add` builds a table of the same shapes or larger."""
        self._index.clear()
        self._automata.clear()
