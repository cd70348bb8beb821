"""Length and forcing rules: minimum lengths, forced BOS/EOS, suppressed tokens,
the exponential decay length penalty, invalid-value removal and renormalisation.
All stateless; each reads the row's own lengths from the context."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import pytree, sampling
from jaxdecode.context import DecodeContext
from jaxdecode.processors.base import (
    NEG_INF,
    LogitsProcessor,
    float_leaf,
    int_leaf,
    token_id_leaf,
    vocab_mask,
)
from jaxdecode.validation import is_concrete, static_int

Array = jax.Array

__all__ = [
    "MinLength",
    "ForceTokens",
    "SuppressTokens",
    "ExponentialDecayLengthPenalty",
    "RemoveInvalidValues",
    "Renormalize",
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


@pytree.dataclass
class MinLength(LogitsProcessor):
    """Bans EOS while the sequence (padded prompt included) is shorter than `min_length`,
    or, with `new_tokens=True`, while fewer than `min_length` tokens were generated."""

    row_fields: ClassVar[dict[str, str]] = {"min_length": "min_length"}

    min_length: Array
    eos_token_id: Array
    new_tokens: bool = pytree.field(pytree_node=False, default=False)

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        length = ctx.generated if self.new_tokens else ctx.cur_len  # [B]
        short = length[:, None] < sampling.per_row(self.min_length)  # [B, 1]
        ban = vocab_mask(self.eos_token_id, logits.shape[-1])[None, :] & short
        return jnp.where(ban, NEG_INF, logits)


def min_length(value: Any, eos_token_id: Any) -> MinLength:
    """No EOS before the whole sequence (prompt included) reaches `value` tokens."""
    return MinLength(
        min_length=int_leaf("min_length", value, lo=0),
        eos_token_id=token_id_leaf("eos_token_id", eos_token_id),
    )


def min_new_tokens(value: Any, eos_token_id: Any) -> MinLength:
    """No EOS before `value` tokens have been generated."""
    return MinLength(
        min_length=int_leaf("min_new_tokens", value, lo=0),
        eos_token_id=token_id_leaf("eos_token_id", eos_token_id),
        new_tokens=True,
    )


@pytree.dataclass
class ForceTokens(LogitsProcessor):
    """At one length, every logit becomes -inf except the forced ids (set to 0).

    `at="bos"`: when `cur_len == 1`. `at="eos"`: when `cur_len == max_length - 1`.
    """

    token_ids: Array
    at: str = pytree.field(pytree_node=False, default="bos")

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        when = ctx.cur_len == 1 if self.at == "bos" else ctx.cur_len == ctx.max_length - 1
        when = when[:, None]  # [B, 1]
        forced = jnp.where(vocab_mask(self.token_ids, logits.shape[-1]), 0.0, NEG_INF)
        return jnp.where(when, forced.astype(logits.dtype), logits)


def forced_bos_token_id(token_id: Any) -> ForceTokens:
    """Forces `token_id` as the first token (at sequence length 1)."""
    return ForceTokens(token_ids=token_id_leaf("forced_bos_token_id", token_id), at="bos")


def forced_eos_token_id(token_id: Any) -> ForceTokens:
    """Forces an EOS id as the last token (at length `max_length - 1`)."""
    return ForceTokens(token_ids=token_id_leaf("forced_eos_token_id", token_id), at="eos")


@pytree.dataclass
class SuppressTokens(LogitsProcessor):
    """Sets the given ids to -inf: always, or (`at_begin`) only at the first
    generated step."""

    token_ids: Array
    at_begin: bool = pytree.field(pytree_node=False, default=False)
    after_forced_bos: bool = pytree.field(pytree_node=False, default=False)

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        ban = vocab_mask(self.token_ids, logits.shape[-1])
        if self.at_begin:
            # transformers starts one step later when a 1-token prompt is followed by
            # a forced BOS token.
            begin = ctx.prompt_length
            if self.after_forced_bos:
                begin = begin + (ctx.prompt_length <= 1).astype(begin.dtype)
            ban = ban[None, :] & (ctx.cur_len == begin)[:, None]
        return jnp.where(ban, NEG_INF, logits)


def suppress_tokens(token_ids: Any) -> SuppressTokens:
    """These ids are never generated."""
    return SuppressTokens(token_ids=token_id_leaf("suppress_tokens", token_ids))


def begin_suppress_tokens(token_ids: Any, *, after_forced_bos: bool = False) -> SuppressTokens:
    """These ids are not generated at the first step."""
    return SuppressTokens(
        token_ids=token_id_leaf("begin_suppress_tokens", token_ids),
        at_begin=True,
        after_forced_bos=bool(after_forced_bos),
    )


@pytree.dataclass
class ExponentialDecayLengthPenalty(LogitsProcessor):
    """After `start` generated tokens, raises EOS by `|x| * (factor ** (n - start) - 1)`."""

    row_fields: ClassVar[dict[str, str]] = {
        "start": "exponential_decay_length_penalty",
        "factor": "exponential_decay_length_penalty",
    }

    start: Array
    factor: Array
    eos_token_id: Array
    growth: Array  # [M] float32(factor ** n - 1) for n < M, computed in float64

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        regulation_start = (sampling.per_row(self.start) + ctx.prompt_length[:, None]).astype(
            jnp.int32
        )  # [B, 1]
        steps = ctx.cur_len[:, None] - regulation_start  # [B, 1]
        eos = jnp.take(logits, self.eos_token_id, axis=-1, mode="clip")  # [B, E]
        # transformers rounds `factor ** n - 1` once from float64; the table holds
        # those values, float32 powers serve beyond it (or for a traced factor).
        factor = sampling.per_row(self.factor).astype(logits.dtype)
        growth = jnp.power(factor, steps.astype(logits.dtype)) - 1
        m = self.growth.shape[0]
        if m:
            exact = self.growth[jnp.clip(steps, 0, m - 1)].astype(logits.dtype)
            growth = jnp.where(steps < m, exact, growth)
        penalty = jnp.abs(eos) * growth
        # A zero logit gets no penalty (transformers computes 0 * inf = NaN once the
        # factor's power overflows); an overflowing penalty caps at the largest
        # float, so that EOS becomes certain instead of NaN after softmax.
        active = jnp.isfinite(eos) & (eos != 0) & (ctx.cur_len[:, None] > regulation_start)
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
    factor_leaf = float_leaf("exponential_decay_length_penalty[1] (decay_factor)", factor, lo=1.0)
    max_steps = static_int("max_steps", max_steps, 0)
    if is_concrete(factor) and np.ndim(factor) == 0:
        with np.errstate(over="ignore"):  # beyond float32: inf, capped in __call__
            table = (np.power(np.float64(factor), np.arange(max_steps + 1)) - 1.0).astype(
                np.float32
            )
        growth = jnp.asarray(table)
    else:
        growth = jnp.zeros((0,), jnp.float32)
    return ExponentialDecayLengthPenalty(
        start=int_leaf("exponential_decay_length_penalty[0] (start_index)", start, lo=0),
        factor=factor_leaf,
        eos_token_id=token_id_leaf("eos_token_id", eos_token_id),
        growth=growth,
    )


@pytree.dataclass
class RemoveInvalidValues(LogitsProcessor):
    """NaN -> 0, +inf -> largest finite float, -inf -> lowest finite float."""

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        info = jnp.finfo(logits.dtype)
        out = jnp.where(jnp.isnan(logits), 0.0, logits)
        out = jnp.where(logits == jnp.inf, info.max, out)
        return jnp.where(logits == -jnp.inf, info.min, out)


def remove_invalid_values() -> RemoveInvalidValues:
    """Replaces NaN and infinities so that sampling never fails on them."""
    return RemoveInvalidValues()


@pytree.dataclass
class Renormalize(LogitsProcessor):
    """`log_softmax` of the processed scores (transformers' `renormalize_logits`)."""

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        return jax.nn.log_softmax(logits, axis=-1)


def renormalize_logits() -> Renormalize:
    """Normalises the scores to log-probabilities after all other processors."""
    return Renormalize()
