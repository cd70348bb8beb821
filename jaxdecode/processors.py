"""Logits processors: small, pure, composable, in the style of optax.

Each processor is a frozen dataclass pytree. Its numeric hyper-parameters are
pytree *leaves* (a scalar, or one value per row `[batch]`), so a jitted function
that takes a processor as an argument does not recompile when a value changes.
Fields that set a shape or choose code (an n-gram size, `min_tokens_to_keep`, a
method) are static. Every processor maps `(logits [batch, vocab], ctx) -> logits`
and reads the history from a `DecodeContext`.

>>> chain(repetition_penalty(1.2), temperature(0.7), top_k(50), top_p(0.9))

Semantics follow Hugging Face transformers 5 (see the README for the order that
`logits_processor` uses and for the few deliberate differences).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdecode import sampling
from jaxdecode.context import DecodeContext

Array = jax.Array

__all__ = [
    "LogitsProcessor",
    "Chain",
    "chain",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "sequence_bias",
    "bad_words_ids",
    "no_repeat_ngram_size",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "exponential_decay_length_penalty",
    "remove_invalid_values",
    "renormalize_logits",
]

NEG_INF = -jnp.inf


# --------------------------------------------------------------------------- #
# Validation helpers: run on concrete values before anything is traced.
# --------------------------------------------------------------------------- #


def _is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _check_range(
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
) -> None:
    """Raises ValueError naming `name` when a concrete `value` leaves the range."""
    if not _is_concrete(value):
        return  # traced inside a user's jit: validated by whoever made it concrete
    arr = np.asarray(value)
    if arr.ndim > 1:
        raise ValueError(
            f"{name} must be a scalar or one value per row [batch], got shape {arr.shape}"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if integer and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    bad = ~np.isfinite(arr.astype(np.float64))
    if lo is not None:
        bad |= (arr <= lo) if lo_open else (arr < lo)
    if hi is not None:
        bad |= (arr >= hi) if hi_open else (arr > hi)
    if np.any(bad):
        left = "-inf" if lo is None else f"{lo}"
        right = "inf" if hi is None else f"{hi}"
        interval = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _float_leaf(name: str, value: Any, **bounds: Any) -> Array:
    _check_range(name, value, **bounds)
    return jnp.asarray(value, jnp.float32)


def _int_leaf(name: str, value: Any, **bounds: Any) -> Array:
    _check_range(name, value, integer=True, **bounds)
    return jnp.asarray(value, jnp.int32)


def _token_ids(name: str, ids: Any, *, allow_empty: bool = False) -> Array:
    """A 1-D int32 array of token ids (validated non-negative integers)."""
    if isinstance(ids, (int, np.integer)):
        ids = [int(ids)]
    if not _is_concrete(ids):
        return jnp.asarray(ids, jnp.int32).reshape(-1)
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} must be a non-empty list of token ids, got {ids!r}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1 or np.any(arr < 0)):
        raise ValueError(f"{name} must be a list of token ids (integers >= 0), got {ids!r}")
    return jnp.asarray(arr.reshape(-1), jnp.int32)


def _static_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _row(value: Array, dtype: Any = jnp.float32) -> Array:
    """`[]` stays `[]`, `[batch]` becomes `[batch, 1]` to broadcast over the vocabulary."""
    return sampling._per_row(jnp.asarray(value, dtype))


def _divide(x: Array, divisor: Array) -> Array:
    """`x / divisor` rounded as a true division.

    XLA rewrites `x / broadcast(d)` into `x * (1 / d)`, which differs from
    transformers' division in the last bit for ~10% of entries; the barrier keeps
    the divisor opaque so the division stays a division.
    """
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(divisor, x.shape))


def _vocab_mask(ids: Array, vocab: int) -> Array:
    """`[vocab]` bool, True at `ids` (ids outside the vocabulary are ignored)."""
    return jnp.zeros((vocab,), bool).at[ids].set(True, mode="drop")


def _require(ctx: DecodeContext, field: str, who: str) -> Array:
    value = getattr(ctx, field)
    if value is None:
        raise ValueError(
            f"{who} needs DecodeContext.{field}; build the context with "
            f"track_{'seen' if field == 'seen' else 'counts'}=True"
        )
    return value


# --------------------------------------------------------------------------- #
# Base class and composition.
# --------------------------------------------------------------------------- #


class LogitsProcessor:
    """Base of all processors: `__call__(logits [batch, vocab], ctx) -> logits`.

    `requires` names the `DecodeContext` tallies a processor reads, so the loop
    only keeps the ones a chain needs.
    """

    requires: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:  # pragma: no cover
        raise NotImplementedError


@struct.dataclass
class Chain(LogitsProcessor):
    """Applies processors left to right. Build it with `chain(...)`."""

    processors: tuple[LogitsProcessor, ...] = ()

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        out: frozenset[str] = frozenset()
        for p in self.processors:
            out |= p.requires
        return out

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        for p in self.processors:
            logits = p(logits, ctx)
        return logits

    def stages(self, logits: Array, ctx: DecodeContext) -> list[Array]:
        """The scores after each processor, in order (the last is `__call__`'s).

        What `jaxdecode.trace` records; the same calls as `__call__`.
        """
        out = []
        for p in self.processors:
            logits = p(logits, ctx)
            out.append(logits)
        return out


def stage_names(processor: LogitsProcessor) -> list[str]:
    """Names of the stages `processor_stages` returns (the processors' classes)."""
    procs = processor.processors if isinstance(processor, Chain) else (processor,)
    return [type(p).__name__ for p in procs]


def processor_stages(processor: LogitsProcessor, logits: Array, ctx: DecodeContext) -> list[Array]:
    """`processor.stages(...)` for a `Chain`, `[processor(...)]` for one processor."""
    if isinstance(processor, Chain):
        return processor.stages(logits, ctx)
    return [processor(logits, ctx)]


def chain(*processors: LogitsProcessor) -> Chain:
    """Composes processors; nested chains are flattened.

    >>> chain(temperature(0.7), top_p(0.9))
    """
    flat: list[LogitsProcessor] = []
    for p in processors:
        if isinstance(p, Chain):
            flat.extend(p.processors)
        elif isinstance(p, LogitsProcessor):
            flat.append(p)
        else:
            raise ValueError(f"chain() takes LogitsProcessor objects, got {type(p).__name__}")
    return Chain(processors=tuple(flat))


# --------------------------------------------------------------------------- #
# Warpers (applied only when sampling, in generate).
# --------------------------------------------------------------------------- #


@struct.dataclass
class Temperature(LogitsProcessor):
    """Divides logits by the temperature (scalar or per row)."""

    temperature: Array

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        return _divide(logits, _row(self.temperature, logits.dtype))


def temperature(value: Any) -> Temperature:
    """`logits / value`, value > 0 (scalar or `[batch]`)."""
    return Temperature(temperature=_float_leaf("temperature", value, lo=0.0, lo_open=True))


@struct.dataclass
class TopK(LogitsProcessor):
    """Keeps the `k` largest logits per row (ties at the boundary all kept)."""

    k: Array
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)
    method: str = struct.field(pytree_node=False, default="exact")
    max_k: int = struct.field(pytree_node=False, default=0)

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        vocab = logits.shape[-1]
        k = jnp.clip(jnp.maximum(jnp.asarray(self.k), self.min_tokens_to_keep), 1, vocab)
        if self.method == "fast":
            remove = sampling.top_k_mask_fast(logits, k, self.max_k)
        else:
            remove = sampling.top_k_mask(logits, k)
        return jnp.where(remove, NEG_INF, logits)


def _check_method(name: str, method: str) -> str:
    if method not in ("exact", "fast"):
        raise ValueError(f"{name} must be 'exact' or 'fast', got {method!r}")
    return method


def top_k(
    k: Any, *, min_tokens_to_keep: int = 1, method: str = "exact", max_k: int | None = None
) -> TopK:
    """Top-k filtering.

    Args:
        k: tokens to keep, integer >= 1 (scalar or `[batch]`), traced.
        min_tokens_to_keep: static lower bound on k (transformers uses 1, or
            1 + number of EOS ids in beam sampling).
        method: "exact" (full sort) or "fast" (`lax.top_k` with a static cap
            `max_k`; same result whenever `k <= max_k`).
        max_k: the fast method's cap; defaults to max(64, the next power of two
            >= k) so nearby values of k share one compilation.
    """
    leaf = _int_leaf("top_k", k, lo=1)
    min_keep = _static_int("min_tokens_to_keep", min_tokens_to_keep, 1)
    method = _check_method("top_k_method", method)
    cap = 0
    if method == "fast":
        if max_k is None:
            if not _is_concrete(k):
                raise ValueError("top_k with method='fast' and a traced k needs a static max_k")
            biggest = max(int(np.max(np.asarray(k))), min_keep)
            cap = max(64, 1 << (biggest - 1).bit_length())
        else:
            cap = _static_int("max_k", max_k, 1)
            if _is_concrete(k) and int(np.max(np.asarray(k))) > cap:
                raise ValueError(f"top_k must be <= max_k={cap} with method='fast', got {k!r}")
    return TopK(k=leaf, min_tokens_to_keep=min_keep, method=method, max_k=cap)


@struct.dataclass
class TopP(LogitsProcessor):
    """Nucleus filtering: keeps the smallest top set with probability mass >= p."""

    p: Array
    cutoff: Array  # 1 - p, rounded from float64 as transformers does
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)
    method: str = struct.field(pytree_node=False, default="exact")

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        if self.method == "fast":
            remove = sampling.top_p_mask_fast(logits, self.p, self.min_tokens_to_keep)
        else:
            remove = sampling.top_p_mask(logits, self.p, self.min_tokens_to_keep, self.cutoff)
        return jnp.where(remove, NEG_INF, logits)


def top_p(p: Any, *, min_tokens_to_keep: int = 1, method: str = "exact") -> TopP:
    """Top-p (nucleus) filtering, p in (0, 1] (scalar or `[batch]`).

    method: "exact" (sort, transformers' arithmetic) or "fast" (sort-free
    bisection; see `jaxdecode.sampling.top_p_mask_fast` for where they differ).
    """
    leaf = _float_leaf("top_p", p, lo=0.0, hi=1.0, lo_open=True)
    if _is_concrete(p):
        cutoff = jnp.asarray(1.0 - np.asarray(p, np.float64), jnp.float32)
    else:
        cutoff = 1.0 - leaf
    return TopP(
        p=leaf,
        cutoff=cutoff,
        min_tokens_to_keep=_static_int("min_tokens_to_keep", min_tokens_to_keep, 1),
        method=_check_method("top_p_method", method),
    )


@struct.dataclass
class MinP(LogitsProcessor):
    """Removes tokens whose probability is below `min_p * max probability`."""

    min_p: Array
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        probs = jax.nn.softmax(logits, axis=-1)
        scaled = _row(self.min_p, probs.dtype) * jnp.max(probs, axis=-1, keepdims=True)
        remove = (probs < scaled) & ~sampling.keep_top_mask(probs, self.min_tokens_to_keep)
        return jnp.where(remove, NEG_INF, logits)


def min_p(value: Any, *, min_tokens_to_keep: int = 1) -> MinP:
    """Min-p filtering, value in [0, 1] (scalar or `[batch]`)."""
    return MinP(
        min_p=_float_leaf("min_p", value, lo=0.0, hi=1.0),
        min_tokens_to_keep=_static_int("min_tokens_to_keep", min_tokens_to_keep, 1),
    )


@struct.dataclass
class TypicalP(LogitsProcessor):
    """Locally typical sampling: keeps tokens whose surprisal is close to the entropy."""

    mass: Array
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        plogp = jnp.exp(logp) * logp
        entropy = -jnp.sum(jnp.where(jnp.isnan(plogp), 0.0, plogp), axis=-1, keepdims=True)
        shifted = jnp.abs(-logp - entropy)
        order = jnp.argsort(shifted, axis=-1, stable=True)
        shifted_sorted = jnp.take_along_axis(shifted, order, axis=-1)
        logits_sorted = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(logits_sorted, axis=-1), axis=-1)
        last = jnp.sum(cumulative < _row(self.mass, cumulative.dtype), axis=-1, keepdims=True)
        last = jnp.minimum(last, vocab - 1)
        remove_sorted = shifted_sorted > jnp.take_along_axis(shifted_sorted, last, axis=-1)
        remove_sorted = remove_sorted & (jnp.arange(vocab)[None, :] >= self.min_tokens_to_keep)
        rows = jnp.arange(logits.shape[0])[:, None]
        remove = jnp.zeros(logits.shape, bool).at[rows, order].set(remove_sorted)
        return jnp.where(remove, NEG_INF, logits)


def typical_p(mass: Any, *, min_tokens_to_keep: int = 1) -> TypicalP:
    """Typical decoding with probability mass in (0, 1) (scalar or `[batch]`)."""
    return TypicalP(
        mass=_float_leaf("typical_p", mass, lo=0.0, hi=1.0, lo_open=True, hi_open=True),
        min_tokens_to_keep=_static_int("min_tokens_to_keep", min_tokens_to_keep, 1),
    )


def _cutoff(logits: Array, threshold: Array, min_tokens_to_keep: int) -> Array:
    probs = jax.nn.softmax(logits, axis=-1)
    remove = (probs < threshold) & (logits < sampling.nth_largest(logits, min_tokens_to_keep))
    return jnp.where(remove, NEG_INF, logits)


@struct.dataclass
class EpsilonCutoff(LogitsProcessor):
    """Removes tokens with probability below epsilon."""

    epsilon: Array
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        return _cutoff(logits, _row(self.epsilon, logits.dtype), self.min_tokens_to_keep)


def epsilon_cutoff(epsilon: Any, *, min_tokens_to_keep: int = 1) -> EpsilonCutoff:
    """Epsilon sampling, epsilon in (0, 1) (scalar or `[batch]`)."""
    return EpsilonCutoff(
        epsilon=_float_leaf("epsilon_cutoff", epsilon, lo=0.0, hi=1.0, lo_open=True, hi_open=True),
        min_tokens_to_keep=_static_int("min_tokens_to_keep", min_tokens_to_keep, 1),
    )


@struct.dataclass
class EtaCutoff(LogitsProcessor):
    """Eta sampling: cutoff `min(eps, sqrt(eps) * exp(-entropy))`."""

    epsilon: Array
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        # Entropy as torch.distributions.Categorical computes it: log-probs clamped to
        # the lowest finite float so that removed (-inf) tokens add 0, not NaN.
        logp = jax.nn.log_softmax(logits, axis=-1)
        logp = jnp.maximum(logp, jnp.finfo(logp.dtype).min)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1, keepdims=True)
        eps = _row(self.epsilon, logits.dtype)
        eta = jnp.minimum(eps, jnp.sqrt(eps) * jnp.exp(-entropy))
        return _cutoff(logits, eta, self.min_tokens_to_keep)


def eta_cutoff(epsilon: Any, *, min_tokens_to_keep: int = 1) -> EtaCutoff:
    """Eta sampling, epsilon in (0, 1) (scalar or `[batch]`)."""
    return EtaCutoff(
        epsilon=_float_leaf("eta_cutoff", epsilon, lo=0.0, hi=1.0, lo_open=True, hi_open=True),
        min_tokens_to_keep=_static_int("min_tokens_to_keep", min_tokens_to_keep, 1),
    )


# --------------------------------------------------------------------------- #
# Penalties.
# --------------------------------------------------------------------------- #


@struct.dataclass
class RepetitionPenalty(LogitsProcessor):
    """Penalises every token already present (prompt included, left padding not)."""

    penalty: Array
    form: str = struct.field(pytree_node=False, default="hf")
    requires: ClassVar[frozenset[str]] = frozenset({"seen"})

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        seen = _require(ctx, "seen", "repetition_penalty")
        theta = _row(self.penalty, logits.dtype)
        if self.form == "ctrl":
            penalised = _divide(logits, theta)
        else:
            penalised = jnp.where(logits < 0, logits * theta, _divide(logits, theta))
        return jnp.where(seen, penalised, logits)


def repetition_penalty(penalty: Any, *, form: str = "hf") -> RepetitionPenalty:
    """Repetition penalty, penalty > 0 (1.0 = none), applied once per distinct token.

    Args:
        penalty: scalar or `[batch]`.
        form: "hf" (default): `x * penalty` if `x < 0` else `x / penalty`, which
            always lowers a seen token's probability for penalty > 1.
            "ctrl": the CTRL paper's `x / penalty` for every seen token, which
            *raises* negative logits for penalty > 1.
    """
    if form not in ("hf", "ctrl"):
        raise ValueError(f"repetition_penalty_form must be 'hf' or 'ctrl', got {form!r}")
    return RepetitionPenalty(
        penalty=_float_leaf("repetition_penalty", penalty, lo=0.0, lo_open=True), form=form
    )


@struct.dataclass
class FrequencyPresencePenalty(LogitsProcessor):
    """OpenAI/vLLM penalties over *generated* tokens: `x -= f * count + p * (count > 0)`."""

    frequency: Array
    presence: Array
    requires: ClassVar[frozenset[str]] = frozenset({"token_counts"})

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        counts = _require(ctx, "token_counts", "frequency/presence penalty")
        counts = counts.astype(logits.dtype)
        penalty = _row(self.frequency, logits.dtype) * counts + _row(
            self.presence, logits.dtype
        ) * (counts > 0).astype(logits.dtype)
        return logits - penalty


def frequency_penalty(value: Any) -> FrequencyPresencePenalty:
    """Frequency penalty in [-2, 2] (OpenAI's range), scalar or `[batch]`."""
    return FrequencyPresencePenalty(
        frequency=_float_leaf("frequency_penalty", value, lo=-2.0, hi=2.0),
        presence=jnp.zeros((), jnp.float32),
    )


def presence_penalty(value: Any) -> FrequencyPresencePenalty:
    """Presence penalty in [-2, 2] (OpenAI's range), scalar or `[batch]`."""
    return FrequencyPresencePenalty(
        frequency=jnp.zeros((), jnp.float32),
        presence=_float_leaf("presence_penalty", value, lo=-2.0, hi=2.0),
    )


def frequency_presence_penalty(
    frequency: Any = 0.0, presence: Any = 0.0
) -> FrequencyPresencePenalty:
    """Both OpenAI penalties in one processor (one pass over the counts)."""
    return FrequencyPresencePenalty(
        frequency=_float_leaf("frequency_penalty", frequency, lo=-2.0, hi=2.0),
        presence=_float_leaf("presence_penalty", presence, lo=-2.0, hi=2.0),
    )


@struct.dataclass
class NoRepeatNGram(LogitsProcessor):
    """Bans any token that would complete an n-gram already in the sequence."""

    n: int = struct.field(pytree_node=False, default=3)

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        n = self.n
        seq = ctx.sequences
        batch, buf = seq.shape
        if buf < n:
            return logits
        num_windows = buf - n + 1
        end = ctx.write_col
        # The current (n-1)-token suffix, matched against the head of every window
        # that lies wholly in the logical sequence.
        suffix = jax.lax.dynamic_slice_in_dim(seq, jnp.maximum(end - (n - 1), 0), n - 1, 1)
        starts = jnp.arange(num_windows)[None, :]
        match = (starts >= ctx.offset) & (starts <= end - n)
        for i in range(n - 1):
            match = match & (seq[:, i : i + num_windows] == suffix[:, i : i + 1])
        rows = jnp.arange(batch)[:, None]
        banned = jnp.zeros(logits.shape, bool).at[rows, seq[:, n - 1 :]].max(match, mode="drop")
        return jnp.where(banned, NEG_INF, logits)


def no_repeat_ngram_size(n: int) -> NoRepeatNGram:
    """No n-gram occurs twice (prompt included); n >= 1 is static."""
    return NoRepeatNGram(n=_static_int("no_repeat_ngram_size", n, 1))


@struct.dataclass
class SequenceBias(LogitsProcessor):
    """Adds a bias to a token, or to the last token of a multi-token sequence when
    the sequence so far ends with the rest of it.

    Entries are stored as padded arrays: shapes are static, ids and biases traced.
    """

    single_ids: Array  # [S] int32
    single_bias: Array  # [S] float32
    prefixes: Array  # [M, P] int32, right-aligned, left-padded with 0
    prefix_len: Array  # [M] int32
    last_ids: Array  # [M] int32
    multi_bias: Array  # [M] float32

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        batch, vocab = logits.shape
        bias = jnp.zeros((vocab,), logits.dtype)
        bias = bias.at[self.single_ids].set(self.single_bias.astype(logits.dtype), mode="drop")
        bias = jnp.broadcast_to(bias, logits.shape)
        num, width = self.prefixes.shape
        if num:
            cols = ctx.write_col - width + jnp.arange(width)
            tail = jnp.take(ctx.sequences, jnp.clip(cols, 0), axis=1)  # [B, P]
            needed = jnp.arange(width)[None, :] >= width - self.prefix_len[:, None]  # [M, P]
            equal = (tail[:, None, :] == self.prefixes[None]) | ~needed[None]
            match = jnp.all(equal, axis=-1) & (self.prefix_len <= ctx.cur_len)[None]  # [B, M]
            add = jnp.where(match, self.multi_bias.astype(logits.dtype)[None], 0.0)
            rows = jnp.arange(batch)[:, None]
            bias = bias.at[rows, self.last_ids[None, :]].add(add, mode="drop")
        return logits + bias


def _parse_sequences(name: str, entries: Any) -> list[tuple[tuple[int, ...], float]]:
    """Accepts transformers' forms: `{(ids...): bias}` or `[[[ids...], bias], ...]`."""
    if isinstance(entries, dict):
        items = list(entries.items())
    elif isinstance(entries, (list, tuple)):
        items = []
        for e in entries:
            if not (isinstance(e, (list, tuple)) and len(e) == 2):
                raise ValueError(f"{name} entries must be [token_ids, bias] pairs, got {e!r}")
            items.append((e[0], e[1]))
    else:
        raise ValueError(f"{name} must be a dict or a list of [token_ids, bias], got {entries!r}")
    if not items:
        raise ValueError(f"{name} must not be empty, got {entries!r}")
    out = []
    for ids, bias in items:
        ids = tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)
        if not ids or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in ids
        ):
            raise ValueError(
                f"{name} keys must be non-empty token id sequences (ints >= 0), got {ids!r}"
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float, np.floating, np.integer)):
            raise ValueError(f"{name} biases must be numbers, got {bias!r} for {ids!r}")
        if math.isnan(float(bias)):
            raise ValueError(f"{name} biases must not be NaN (entry {ids!r})")
        out.append((tuple(int(t) for t in ids), float(bias)))
    return out


def _sequence_bias_from_items(items: list[tuple[tuple[int, ...], float]]) -> SequenceBias:
    merged: dict[tuple[int, ...], float] = {}
    for ids, bias in items:  # later duplicates win, as in a dict
        merged[ids] = bias
    singles = [(ids[0], b) for ids, b in merged.items() if len(ids) == 1]
    multis = [(ids, b) for ids, b in merged.items() if len(ids) > 1]
    width = max((len(ids) - 1 for ids, _ in multis), default=0)
    prefixes = np.zeros((len(multis), width), np.int32)
    for i, (ids, _) in enumerate(multis):
        prefix = ids[:-1]
        prefixes[i, width - len(prefix) :] = prefix
    return SequenceBias(
        single_ids=jnp.asarray([t for t, _ in singles], jnp.int32).reshape(-1),
        single_bias=jnp.asarray([b for _, b in singles], jnp.float32).reshape(-1),
        prefixes=jnp.asarray(prefixes),
        prefix_len=jnp.asarray([len(ids) - 1 for ids, _ in multis], jnp.int32).reshape(-1),
        last_ids=jnp.asarray([ids[-1] for ids, _ in multis], jnp.int32).reshape(-1),
        multi_bias=jnp.asarray([b for _, b in multis], jnp.float32).reshape(-1),
    )


def sequence_bias(entries: Any) -> SequenceBias:
    """Biases tokens and token sequences.

    Args:
        entries: `{(id,): bias, (id1, id2, id3): bias}` or transformers' list form
            `[[[id], bias], [[id1, id2, id3], bias]]`. A single id is a constant
            bias; a longer sequence biases its last token only when the sequence
            so far ends with the rest of it.
    """
    return _sequence_bias_from_items(_parse_sequences("sequence_bias", entries))


def bad_words_ids(words: Any, *, eos_token_id: Any = None) -> SequenceBias:
    """Forbids token sequences: a `-inf` sequence bias.

    Args:
        words: list of token id lists, e.g. `[[42], [7, 8]]`.
        eos_token_id: single-token entries equal to an EOS id are dropped, as
            transformers does, so that generation can still stop.
    """
    if not isinstance(words, (list, tuple)) or not words:
        raise ValueError(f"bad_words_ids must be a non-empty list of token id lists, got {words!r}")
    if any(not isinstance(w, (list, tuple)) for w in words):
        raise ValueError(f"bad_words_ids must be a list of lists, got {words!r}")
    eos = set() if eos_token_id is None else {int(t) for t in np.asarray(eos_token_id).reshape(-1)}
    kept = [list(w) for w in words if not (len(w) == 1 and int(w[0]) in eos)]
    items = _parse_sequences("bad_words_ids", [[w, -math.inf] for w in kept]) if kept else []
    return _sequence_bias_from_items(items)


# --------------------------------------------------------------------------- #
# Length and forcing processors.
# --------------------------------------------------------------------------- #


@struct.dataclass
class MinLength(LogitsProcessor):
    """Bans EOS while the sequence (padded prompt included) is shorter than `min_length`,
    or, with `new_tokens=True`, while fewer than `min_length` tokens were generated."""

    min_length: Array
    eos_token_id: Array
    new_tokens: bool = struct.field(pytree_node=False, default=False)

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        length = ctx.cur_len - ctx.prompt_length if self.new_tokens else ctx.cur_len
        ban = _vocab_mask(self.eos_token_id, logits.shape[-1]) & (length < self.min_length)
        return jnp.where(ban, NEG_INF, logits)


def min_length(value: Any, eos_token_id: Any) -> MinLength:
    """No EOS before the whole sequence (prompt included) reaches `value` tokens."""
    return MinLength(
        min_length=_int_leaf("min_length", value, lo=0),
        eos_token_id=_token_ids("eos_token_id", eos_token_id),
    )


def min_new_tokens(value: Any, eos_token_id: Any) -> MinLength:
    """No EOS before `value` tokens have been generated."""
    return MinLength(
        min_length=_int_leaf("min_new_tokens", value, lo=0),
        eos_token_id=_token_ids("eos_token_id", eos_token_id),
        new_tokens=True,
    )


@struct.dataclass
class ForceTokens(LogitsProcessor):
    """At one length, every logit becomes -inf except the forced ids (set to 0).

    `at="bos"`: when `cur_len == 1`. `at="eos"`: when `cur_len == max_length - 1`.
    """

    token_ids: Array
    at: str = struct.field(pytree_node=False, default="bos")

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        when = ctx.cur_len == 1 if self.at == "bos" else ctx.cur_len == ctx.max_length - 1
        forced = jnp.where(_vocab_mask(self.token_ids, logits.shape[-1]), 0.0, NEG_INF)
        return jnp.where(when, forced.astype(logits.dtype), logits)


def forced_bos_token_id(token_id: Any) -> ForceTokens:
    """Forces `token_id` as the first token (at sequence length 1)."""
    return ForceTokens(token_ids=_token_ids("forced_bos_token_id", token_id), at="bos")


def forced_eos_token_id(token_id: Any) -> ForceTokens:
    """Forces an EOS id as the last token (at length `max_length - 1`)."""
    return ForceTokens(token_ids=_token_ids("forced_eos_token_id", token_id), at="eos")


@struct.dataclass
class SuppressTokens(LogitsProcessor):
    """Sets the given ids to -inf: always, or (`at_begin`) only at the first
    generated step."""

    token_ids: Array
    at_begin: bool = struct.field(pytree_node=False, default=False)
    after_forced_bos: bool = struct.field(pytree_node=False, default=False)

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        ban = _vocab_mask(self.token_ids, logits.shape[-1])
        if self.at_begin:
            # transformers starts one step later when a 1-token prompt is followed by
            # a forced BOS token.
            begin = ctx.prompt_length
            if self.after_forced_bos:
                begin = begin + (ctx.prompt_length <= 1).astype(begin.dtype)
            ban = ban & (ctx.cur_len == begin)
        return jnp.where(ban, NEG_INF, logits)


def suppress_tokens(token_ids: Any) -> SuppressTokens:
    """These ids are never generated."""
    return SuppressTokens(token_ids=_token_ids("suppress_tokens", token_ids))


def begin_suppress_tokens(token_ids: Any, *, after_forced_bos: bool = False) -> SuppressTokens:
    """These ids are not generated at the first step."""
    return SuppressTokens(
        token_ids=_token_ids("begin_suppress_tokens", token_ids),
        at_begin=True,
        after_forced_bos=bool(after_forced_bos),
    )


@struct.dataclass
class ExponentialDecayLengthPenalty(LogitsProcessor):
    """After `start` generated tokens, raises EOS by `|x| * (factor ** (n - start) - 1)`."""

    start: Array
    factor: Array
    eos_token_id: Array
    growth: Array  # [M] float32(factor ** n - 1) for n < M, computed in float64

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        regulation_start = self.start + ctx.prompt_length
        steps = ctx.cur_len - regulation_start
        eos = jnp.take(logits, self.eos_token_id, axis=-1, mode="clip")  # [B, E]
        # transformers rounds `factor ** n - 1` once from float64; the table holds
        # those values, float32 powers serve beyond it (or for a traced factor).
        growth = jnp.power(self.factor.astype(logits.dtype), steps.astype(logits.dtype)) - 1
        m = self.growth.shape[0]
        if m:
            exact = self.growth[jnp.clip(steps, 0, m - 1)].astype(logits.dtype)
            growth = jnp.where(steps < m, exact, growth)
        penalty = jnp.abs(eos) * growth
        # A zero logit gets no penalty (transformers computes 0 * inf = NaN once the
        # factor's power overflows); an overflowing penalty caps at the largest
        # float, so that EOS becomes certain instead of NaN after softmax.
        active = jnp.isfinite(eos) & (eos != 0) & (ctx.cur_len > regulation_start)
        penalty = jnp.where(active, penalty, 0.0)
        rows = jnp.arange(logits.shape[0])[:, None]
        add = jnp.zeros_like(logits).at[rows, self.eos_token_id[None, :]].set(penalty, mode="drop")
        out = logits + add
        return jnp.where(jnp.isposinf(out) & ~jnp.isposinf(logits), jnp.finfo(out.dtype).max, out)


def exponential_decay_length_penalty(
    start_and_factor: Any, eos_token_id: Any, *, max_steps: int = 1024
) -> ExponentialDecayLengthPenalty:
    """`(start_index, decay_factor)`: start >= 0 generated tokens, factor >= 1.

    `max_steps` (static) sizes the float64-exact table of `factor ** n - 1`."""
    if not isinstance(start_and_factor, (tuple, list)) or len(start_and_factor) != 2:
        raise ValueError(
            "exponential_decay_length_penalty must be a (start_index, decay_factor) pair, "
            f"got {start_and_factor!r}"
        )
    start, factor = start_and_factor
    factor_leaf = _float_leaf("exponential_decay_length_penalty[1] (decay_factor)", factor, lo=1.0)
    max_steps = _static_int("max_steps", max_steps, 0)
    if _is_concrete(factor) and np.ndim(factor) == 0:
        with np.errstate(over="ignore"):  # beyond float32: inf, capped in __call__
            table = (np.power(np.float64(factor), np.arange(max_steps + 1)) - 1.0).astype(
                np.float32
            )
        growth = jnp.asarray(table)
    else:
        growth = jnp.zeros((0,), jnp.float32)
    return ExponentialDecayLengthPenalty(
        start=_int_leaf("exponential_decay_length_penalty[0] (start_index)", start, lo=0),
        factor=factor_leaf,
        eos_token_id=_token_ids("eos_token_id", eos_token_id),
        growth=growth,
    )


@struct.dataclass
class RemoveInvalidValues(LogitsProcessor):
    """NaN -> 0, +inf -> largest finite float, -inf -> lowest finite float."""

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        info = jnp.finfo(logits.dtype)
        out = jnp.where(jnp.isnan(logits), 0.0, logits)
        out = jnp.where(logits == jnp.inf, info.max, out)
        return jnp.where(logits == -jnp.inf, info.min, out)


def remove_invalid_values() -> RemoveInvalidValues:
    """Replaces NaN and infinities so that sampling never fails on them."""
    return RemoveInvalidValues()


@struct.dataclass
class Renormalize(LogitsProcessor):
    """`log_softmax` of the processed scores (transformers' `renormalize_logits`)."""

    def __call__(self, logits: Array, ctx: DecodeContext) -> Array:
        return jax.nn.log_softmax(logits, axis=-1)


def renormalize_logits() -> Renormalize:
    """Normalises the scores to log-probabilities after all other processors."""
    return Renormalize()


def eos_ids(value: Any, name: str = "eos_token_id") -> Sequence[int]:
    """Normalises an int / list / None EOS setting to a tuple of ints."""
    if value is None:
        return ()
    arr = np.asarray(value).reshape(-1)
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer) or np.any(arr < 0):
        raise ValueError(
            f"{name} must be a token id or a non-empty list of them (ints >= 0), got {value!r}"
        )
    return tuple(int(t) for t in arr)
