"""Warpers: reshape the distribution before a draw (transformers applies them only
when sampling): temperature, top-h, top-k, top-p, min-p, typical-p, epsilon and
eta cutoffs. All stateless."""

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
    divide,
    float_leaf,
    int_leaf,
    row,
)
from jaxdecode.validation import is_concrete, static_int

Array = jax.Array

__all__ = [
    "Temperature",
    "TopH",
    "TopK",
    "TopP",
    "MinP",
    "TypicalP",
    "EpsilonCutoff",
    "EtaCutoff",
    "temperature",
    "top_h",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
]


@pytree.dataclass
class Temperature(LogitsProcessor):
    """Divides logits by the temperature (scalar or per row)."""

    row_fields: ClassVar[dict[str, str]] = {"temperature": "temperature"}

    temperature: Array

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        return divide(logits, row(self.temperature, logits.dtype))


def temperature(value: Any) -> Temperature:
    """`logits / value`, value > 0 (scalar or `[batch]`)."""
    return Temperature(temperature=float_leaf("temperature", value, lo=0.0, lo_open=True))


# transformers' TopHLogitsWarper considers the 100 most likely tokens only.
TOP_H_CANDIDATES = 100


@pytree.dataclass
class TopH(LogitsProcessor):
    """Top-H (entropy-bounded) filtering, arXiv:2509.02510, as transformers 5's
    `TopHLogitsWarper`: among the 100 most likely tokens (renormalised), keeps the
    longest most-likely prefix whose summed `-p log p` is at most `top_h` times
    their entropy; the most likely token is always kept."""

    row_fields: ClassVar[dict[str, str]] = {"top_h": "top_h"}

    top_h: Array

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        batch, vocab = logits.shape
        top_logits, top_idx = jax.lax.top_k(logits, min(TOP_H_CANDIDATES, vocab))
        # As torch.distributions.Categorical(logits=top_logits): normalised
        # log-probabilities, probabilities from them, the entropy with the
        # log-probabilities clamped to the lowest finite float (a removed token
        # adds 0); the per-token terms use log(p), NaN (never kept) where p is 0.
        norm = top_logits - jax.nn.logsumexp(top_logits, axis=-1, keepdims=True)
        probs = jax.nn.softmax(norm, axis=-1)
        clamped = jnp.maximum(norm, jnp.finfo(norm.dtype).min)
        entropy = -jnp.sum(clamped * probs, axis=-1, keepdims=True)
        tau = entropy * row(self.top_h, logits.dtype)
        cumulative = jnp.cumsum(-probs * jnp.log(probs), axis=-1)
        selected = (cumulative <= tau).at[:, 0].set(True)
        rows = jnp.arange(batch)[:, None]
        keep = jnp.zeros((batch, vocab), bool).at[rows, top_idx].set(selected)
        return jnp.where(keep, logits, NEG_INF)


def top_h(value: Any) -> TopH:
    """Top-H filtering, top_h in (0, 1] (scalar or `[batch]`): the entropy budget
    as a fraction of the 100 most likely tokens' entropy."""
    return TopH(top_h=float_leaf("top_h", value, lo=0.0, hi=1.0, lo_open=True))


@pytree.dataclass
class TopK(LogitsProcessor):
    """Keeps the `k` largest logits per row (ties at the boundary all kept)."""

    row_fields: ClassVar[dict[str, str]] = {"k": "top_k"}

    k: Array
    min_tokens_to_keep: int = pytree.field(pytree_node=False, default=1)
    method: str = pytree.field(pytree_node=False, default="exact")
    max_k: int = pytree.field(pytree_node=False, default=0)

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
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
    leaf = int_leaf("top_k", k, lo=1)
    min_keep = static_int("min_tokens_to_keep", min_tokens_to_keep, 1)
    method = _check_method("top_k_method", method)
    cap = 0
    if method == "fast":
        if max_k is None:
            if not is_concrete(k):
                raise ValueError("top_k with method='fast' and a traced k needs a static max_k")
            biggest = max(int(np.max(np.asarray(k))), min_keep)
            cap = max(64, 1 << (biggest - 1).bit_length())
        else:
            cap = static_int("max_k", max_k, 1)
            if is_concrete(k) and int(np.max(np.asarray(k))) > cap:
                raise ValueError(f"top_k must be <= max_k={cap} with method='fast', got {k!r}")
    return TopK(k=leaf, min_tokens_to_keep=min_keep, method=method, max_k=cap)


@pytree.dataclass
class TopP(LogitsProcessor):
    """Nucleus filtering: keeps the smallest top set with probability mass >= p."""

    row_fields: ClassVar[dict[str, str]] = {"p": "top_p", "cutoff": "top_p"}

    p: Array
    cutoff: Array  # 1 - p, rounded from float64 as transformers does
    min_tokens_to_keep: int = pytree.field(pytree_node=False, default=1)
    method: str = pytree.field(pytree_node=False, default="exact")

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
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
    leaf = float_leaf("top_p", p, lo=0.0, hi=1.0, lo_open=True)
    if is_concrete(p):
        cutoff = jnp.asarray(1.0 - np.asarray(p, np.float64), jnp.float32)
    else:
        cutoff = 1.0 - leaf
    return TopP(
        p=leaf,
        cutoff=cutoff,
        min_tokens_to_keep=static_int("min_tokens_to_keep", min_tokens_to_keep, 1),
        method=_check_method("top_p_method", method),
    )


@pytree.dataclass
class MinP(LogitsProcessor):
    """Removes tokens whose probability is below `min_p * max probability`."""

    row_fields: ClassVar[dict[str, str]] = {"min_p": "min_p"}

    min_p: Array
    min_tokens_to_keep: int = pytree.field(pytree_node=False, default=1)

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        probs = jax.nn.softmax(logits, axis=-1)
        scaled = row(self.min_p, probs.dtype) * jnp.max(probs, axis=-1, keepdims=True)
        remove = (probs < scaled) & ~sampling.keep_top_mask(probs, self.min_tokens_to_keep)
        return jnp.where(remove, NEG_INF, logits)


def min_p(value: Any, *, min_tokens_to_keep: int = 1) -> MinP:
    """Min-p filtering, value in [0, 1] (scalar or `[batch]`)."""
    return MinP(
        min_p=float_leaf("min_p", value, lo=0.0, hi=1.0),
        min_tokens_to_keep=static_int("min_tokens_to_keep", min_tokens_to_keep, 1),
    )


@pytree.dataclass
class TypicalP(LogitsProcessor):
    """Locally typical sampling: keeps tokens whose surprisal is close to the entropy."""

    row_fields: ClassVar[dict[str, str]] = {"mass": "typical_p"}

    mass: Array
    min_tokens_to_keep: int = pytree.field(pytree_node=False, default=1)

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        plogp = jnp.exp(logp) * logp
        entropy = -jnp.sum(jnp.where(jnp.isnan(plogp), 0.0, plogp), axis=-1, keepdims=True)
        shifted = jnp.abs(-logp - entropy)
        order = jnp.argsort(shifted, axis=-1, stable=True)
        shifted_sorted = jnp.take_along_axis(shifted, order, axis=-1)
        logits_sorted = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(logits_sorted, axis=-1), axis=-1)
        last = jnp.sum(cumulative < row(self.mass, cumulative.dtype), axis=-1, keepdims=True)
        last = jnp.minimum(last, vocab - 1)
        remove_sorted = shifted_sorted > jnp.take_along_axis(shifted_sorted, last, axis=-1)
        remove_sorted = remove_sorted & (jnp.arange(vocab)[None, :] >= self.min_tokens_to_keep)
        rows = jnp.arange(logits.shape[0])[:, None]
        remove = jnp.zeros(logits.shape, bool).at[rows, order].set(remove_sorted)
        return jnp.where(remove, NEG_INF, logits)


def typical_p(mass: Any, *, min_tokens_to_keep: int = 1) -> TypicalP:
    """Typical decoding with probability mass in (0, 1) (scalar or `[batch]`)."""
    return TypicalP(
        mass=float_leaf("typical_p", mass, lo=0.0, hi=1.0, lo_open=True, hi_open=True),
        min_tokens_to_keep=static_int("min_tokens_to_keep", min_tokens_to_keep, 1),
    )


def _cutoff(logits: Array, threshold: Array, min_tokens_to_keep: int) -> Array:
    probs = jax.nn.softmax(logits, axis=-1)
    remove = (probs < threshold) & (logits < sampling.nth_largest(logits, min_tokens_to_keep))
    return jnp.where(remove, NEG_INF, logits)


@pytree.dataclass
class EpsilonCutoff(LogitsProcessor):
    """Removes tokens with probability below epsilon."""

    row_fields: ClassVar[dict[str, str]] = {"epsilon": "epsilon_cutoff"}

    epsilon: Array
    min_tokens_to_keep: int = pytree.field(pytree_node=False, default=1)

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        return _cutoff(logits, row(self.epsilon, logits.dtype), self.min_tokens_to_keep)


def epsilon_cutoff(epsilon: Any, *, min_tokens_to_keep: int = 1) -> EpsilonCutoff:
    """Epsilon sampling, epsilon in (0, 1) (scalar or `[batch]`)."""
    return EpsilonCutoff(
        epsilon=float_leaf("epsilon_cutoff", epsilon, lo=0.0, hi=1.0, lo_open=True, hi_open=True),
        min_tokens_to_keep=static_int("min_tokens_to_keep", min_tokens_to_keep, 1),
    )


@pytree.dataclass
class EtaCutoff(LogitsProcessor):
    """Eta sampling: cutoff `min(eps, sqrt(eps) * exp(-entropy))`."""

    row_fields: ClassVar[dict[str, str]] = {"epsilon": "eta_cutoff"}

    epsilon: Array
    min_tokens_to_keep: int = pytree.field(pytree_node=False, default=1)

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        # Entropy as torch.distributions.Categorical computes it: log-probs clamped to
        # the lowest finite float so that removed (-inf) tokens add 0, not NaN.
        logp = jax.nn.log_softmax(logits, axis=-1)
        logp = jnp.maximum(logp, jnp.finfo(logp.dtype).min)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1, keepdims=True)
        eps = row(self.epsilon, logits.dtype)
        eta = jnp.minimum(eps, jnp.sqrt(eps) * jnp.exp(-entropy))
        return _cutoff(logits, eta, self.min_tokens_to_keep)


def eta_cutoff(epsilon: Any, *, min_tokens_to_keep: int = 1) -> EtaCutoff:
    """Eta sampling, epsilon in (0, 1) (scalar or `[batch]`)."""
    return EtaCutoff(
        epsilon=float_leaf("eta_cutoff", epsilon, lo=0.0, hi=1.0, lo_open=True, hi_open=True),
        min_tokens_to_keep=static_int("min_tokens_to_keep", min_tokens_to_keep, 1),
    )
