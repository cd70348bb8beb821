"""Token choosers and the truncation masks behind top-k / top-p.

Two families of masks:

* **exact** (sort based): the same arithmetic as transformers, token for token,
  ties included. A full sort of the vocabulary costs O(V log V) per row and step.
* **fast** (sort free): top-k via `lax.top_k` with a static cap (`k <= max_k`),
  which yields the *same* threshold, hence the same mask, as the exact sort;
  top-p via a bisection over the bit patterns of float32 probabilities (31
  passes of a masked sum, no sort). See `top_p_mask_fast` for where it can differ.

All functions take `logits: [batch, vocab]` and per-row parameters shaped `[]` or
`[batch]`, and return `remove: [batch, vocab]` bool masks (True = filter out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "greedy",
    "categorical",
    "split_keys",
    "top_k_mask",
    "top_k_mask_fast",
    "top_p_mask",
    "top_p_mask_fast",
    "keep_top_mask",
    "nth_largest",
    "per_row",
    "top_p_candidates",
]


def per_row(value: Array, ndim: int = 2) -> Array:
    """Shapes a `[]` or `[batch]` parameter to broadcast against `[batch, vocab]`."""
    value = jnp.asarray(value)
    return value.reshape(value.shape + (1,) * (ndim - 1)) if value.ndim == 1 else value


def greedy(logits: Array) -> Array:
    """Argmax per row; the lowest index wins ties (as `torch.argmax` does).

    Args:
        logits: `[batch, vocab]`.

    Returns:
        `[batch]` int32 token ids.
    """
    # min(index where x == max) is jnp.argmax's answer (NaN: the first NaN), and
    # several times faster than argmax's variadic reduction on XLA's CPU backend.
    vocab = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, iota, vocab), axis=-1).astype(jnp.int32)


def split_keys(key: Array, batch: int) -> Array:
    """One independent PRNG key per row: `[batch]` keys from one key."""
    return jax.random.split(key, batch)


# `categorical` draws among this many candidates when no row has more finite
# logits (what top-k / top-p leave), instead of one Gumbel per vocabulary entry.
SAMPLE_CANDIDATES = 64


def categorical(keys: Array, logits: Array) -> Array:
    """Samples one token per row from `softmax(logits)`, each row with its own key.

    A row's draw depends only on its key and its logits, never on the other rows,
    so a row sampled in a batch of 8 gets the token it would get alone.

    A row with at most `SAMPLE_CANDIDATES` finite logits (after top-k, or a
    small nucleus) draws by Gumbel-max over those candidates only (`lax.top_k`):
    the same distribution for a fraction of the cost (~1 ms instead of ~5 ms for
    8 rows of 50k on a 2-core CPU). The choice is per row.

    Args:
        keys: `[batch]` PRNG keys (see `split_keys`), typed or raw `[batch, 2]`.
        logits: `[batch, vocab]`; `-inf` entries are never drawn.

    Returns:
        `[batch]` int32 token ids.
    """
    draw = jax.vmap(jax.random.categorical)
    n = SAMPLE_CANDIDATES
    if logits.shape[-1] <= 4 * n:
        return draw(keys, logits).astype(jnp.int32)

    def among_candidates() -> Array:
        values, idx = jax.lax.top_k(logits, n)
        pick = draw(keys, values)
        return jnp.take_along_axis(idx, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def everywhere() -> Array:
        return draw(keys, logits).astype(jnp.int32)

    # Each row takes its own path (so its draw never depends on the other rows: a
    # continuous-batching engine's neighbours come and go); a batch computes both
    # only when its rows differ. The predicate is a count, not read from the
    # top_k: a cond whose predicate depends on lax.top_k ran 10x slower on
    # XLA:CPU (measured).
    few = jnp.sum(logits > -jnp.inf, axis=-1) <= n  # [batch]
    mixed = lambda: jnp.where(few, among_candidates(), everywhere())
    branch = jnp.where(jnp.all(few), 0, jnp.where(jnp.any(few), 1, 2))
    return jax.lax.switch(branch, [among_candidates, mixed, everywhere])


def keep_top_mask(logits: Array, n: int) -> Array:
    """True for the `n` largest entries of each row (ties: the lower index first).

    This is how transformers protects `min_tokens_to_keep` in min-p (`torch.topk`
    indices). `n` is static: it sets a shape.
    """
    n = min(int(n), logits.shape[-1])
    _, idx = jax.lax.top_k(logits, n)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros(logits.shape, bool).at[rows, idx].set(True)


def nth_largest(logits: Array, n: int) -> Array:
    """The `n`-th largest value of each row, `[batch, 1]` (static `n`)."""
    n = min(int(n), logits.shape[-1])
    return jax.lax.top_k(logits, n)[0][:, n - 1 : n]


# Exact top-k looks for the k-th largest value among this many candidates
# (`lax.top_k`, fast) and falls back to a full sort (slow on CPU) only when k is larger.
EXACT_TOP_K_CANDIDATES = 256


def top_k_mask(logits: Array, k: Array) -> Array:
    """Exact top-k: removes every value strictly below the k-th largest.

    Ties at the boundary are kept, so more than k tokens may survive (as in
    transformers). `k` is traced (`[]` or `[batch]`, already clipped to `[1, V]`).
    The k-th largest value is read from `lax.top_k` candidates when every row's
    k fits in `EXACT_TOP_K_CANDIDATES`, else from a full sort (`lax.cond`, so
    either way nothing recompiles): the same threshold, hence the same mask.
    """
    vocab = logits.shape[-1]
    k = jnp.broadcast_to(per_row(k), (logits.shape[0], 1)).astype(jnp.int32)

    def from_sort() -> Array:
        ascending = jnp.sort(logits, axis=-1)
        return jnp.take_along_axis(ascending, vocab - k, axis=-1)

    if vocab <= EXACT_TOP_K_CANDIDATES:
        threshold = from_sort()
    else:

        def from_candidates() -> Array:
            values = jax.lax.top_k(logits, EXACT_TOP_K_CANDIDATES)[0]
            return jnp.take_along_axis(values, jnp.minimum(k, EXACT_TOP_K_CANDIDATES) - 1, axis=-1)

        threshold = jax.lax.cond(jnp.max(k) <= EXACT_TOP_K_CANDIDATES, from_candidates, from_sort)
    return logits < threshold


def top_k_mask_fast(logits: Array, k: Array, max_k: int) -> Array:
    """Top-k without a full sort: `lax.top_k(logits, max_k)` then the k-th value.

    It gives the same threshold as `top_k_mask`, hence the same mask, whenever
    `k <= max_k` (checked by the `top_k` processor when `k` is concrete).
    """
    max_k = min(int(max_k), logits.shape[-1])
    values = jax.lax.top_k(logits, max_k)[0]
    k = jnp.broadcast_to(per_row(k), (logits.shape[0], 1)).astype(jnp.int32)
    threshold = jnp.take_along_axis(values, jnp.clip(k, 1, max_k) - 1, axis=-1)
    return logits < threshold


def _remove_in_order(
    shape, order: Array, probs: Array, below, cutoff: Array, keep_n: Array
) -> Array:
    """Transformers' top-p rule on tokens `order` (ids ranked ascending, stable)
    with probabilities `probs` and `below` the mass ranked before them; every
    token not in `order` is removed."""
    n = order.shape[-1]
    remove = (below + jnp.cumsum(probs, axis=-1) <= cutoff) & (jnp.arange(n)[None, :] < n - keep_n)
    rows = jnp.arange(shape[0])[:, None]
    return jnp.ones(shape, bool).at[rows, order].set(remove)


def _top_p_rows(logits: Array, top_p: Array, min_tokens_to_keep, cutoff) -> tuple[Array, Array]:
    """`cutoff` and `min_tokens_to_keep` as `[batch, 1]` columns."""
    batch = logits.shape[0]
    if cutoff is None:
        cutoff = 1 - jnp.asarray(top_p, logits.dtype)
    cutoff = jnp.broadcast_to(per_row(cutoff), (batch, 1)).astype(logits.dtype)
    keep_n = jnp.broadcast_to(per_row(min_tokens_to_keep), (batch, 1)).astype(jnp.int32)
    return cutoff, keep_n


def _top_p_sorted(logits: Array, cutoff: Array, keep_n: Array) -> Array:
    order = jnp.argsort(logits, axis=-1, stable=True)
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(ascending, axis=-1)
    return _remove_in_order(logits.shape, order, probs, 0.0, cutoff, keep_n)


def top_p_candidates(logits: Array, cutoff: Array, keep_n: Array) -> tuple[Array, Array]:
    """Top-p ranking only the `EXACT_TOP_K_CANDIDATES` largest of each row.

    Returns `(remove, exact)`: `exact` (a scalar) is True when that mask is
    the full sort's for every row: the mass outside the candidates is clear of
    the cutoff, no tie straddles the candidate boundary, and min_tokens_to_keep
    fits among them.
    """
    n = EXACT_TOP_K_CANDIDATES
    rows = jnp.arange(logits.shape[0])[:, None]
    # Candidates in stable ascending order: by value, ties by index.
    idx = jnp.sort(jax.lax.top_k(logits, n)[1], axis=-1)
    values = jnp.take_along_axis(logits, idx, -1)
    rank = jnp.argsort(values, axis=-1, stable=True)
    order = jnp.take_along_axis(idx, rank, -1)
    values = jnp.take_along_axis(values, rank, -1)
    probs = jax.nn.softmax(logits, axis=-1)
    outside = jnp.sum(probs.at[rows, order].set(0.0), axis=-1, keepdims=True)
    # Margin: the full sort sums in another order, so an outside mass within
    # rounding of the cutoff is left to it.
    settled = ((outside == 0) & (cutoff >= 0)) | (outside + 1e-5 < cutoff)
    # A tie across the boundary would rank outside tokens above candidates in the
    # full sort; harmless only among -inf tokens that min_tokens_to_keep misses.
    outside_max = jnp.max(logits.at[rows, order].set(-jnp.inf), axis=-1, keepdims=True)
    finite = jnp.sum(values > -jnp.inf, axis=-1, keepdims=True)
    clean = (outside_max < values[:, :1]) | ((outside_max == -jnp.inf) & (keep_n <= finite))
    exact = jnp.all(settled & clean & (keep_n <= n))
    remove = _remove_in_order(
        logits.shape, order, jnp.take_along_axis(probs, order, -1), outside, cutoff, keep_n
    )
    return remove, exact


def top_p_mask(
    logits: Array,
    top_p: Array,
    min_tokens_to_keep: Array | int = 1,
    cutoff: Array | None = None,
) -> Array:
    """Exact top-p, transformers' arithmetic.

    Sort ascending (stable), take the cumulative softmax `c`, remove where
    `c <= 1 - top_p`, never remove the last `min_tokens_to_keep` (the largest).
    The full sort (slow on XLA:CPU: ~9 ms per 50k row) runs only when the nucleus
    may extend beyond the `EXACT_TOP_K_CANDIDATES` largest (a `lax.cond`, so
    nothing recompiles); otherwise those are ranked alone, after the mass
    outside them (always the case after a top-k of at most that many).
    `cutoff` is `1 - top_p` when given: transformers computes it in float64
    before comparing with float32 sums, so the `top_p` processor precomputes it
    on the host (`float32(1 - float64(p))` can differ from `1 - float32(p)`).
    """
    cutoff, keep_n = _top_p_rows(logits, top_p, min_tokens_to_keep, cutoff)
    if logits.shape[-1] <= EXACT_TOP_K_CANDIDATES:
        return _top_p_sorted(logits, cutoff, keep_n)
    remove, exact = top_p_candidates(logits, cutoff, keep_n)
    return jax.lax.cond(exact, lambda: remove, lambda: _top_p_sorted(logits, cutoff, keep_n))


# Bit patterns of non-negative float32 values sort like the values: bisecting on
# the integers reaches an exact probability value of the row in 31 halvings.
_ONE_BITS = 0x3F800000  # bits of 1.0f


def top_p_mask_fast(logits: Array, top_p: Array, min_tokens_to_keep: int = 1) -> Array:
    """Top-p without a sort: bisection on the probability threshold.

    A token is kept iff the probability mass strictly above it is `< top_p`
    (what transformers' ascending cumulative sum computes). That kept set is
    `{p >= t}` for the smallest `t` whose "mass above t" is `< top_p`; `t` is one
    of the row's probabilities, found exactly by bisecting on float32 bit
    patterns (31 masked sums over the vocabulary).

    It can differ from `top_p_mask` in two ways, both at the boundary: tokens
    *tied* with the boundary token are all kept (the sort keeps a subset, by
    index), and the masses are summed in another order, so a cumulative sum that
    lands within float32 rounding of `1 - top_p` can fall on the other side.

    Args:
        logits: `[batch, vocab]`.
        top_p: `[]` or `[batch]` in (0, 1].
        min_tokens_to_keep: static count of largest tokens never removed.

    Returns:
        `[batch, vocab]` bool, True where removed.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    p = jnp.broadcast_to(per_row(top_p), (logits.shape[0], 1)).astype(probs.dtype)

    def mass_above(t_bits: Array) -> Array:
        return jnp.sum(jnp.where(bits > t_bits, probs, 0.0), axis=-1, keepdims=True)

    # Invariant: mass_above(hi) < p (hi = 1.0 has nothing above it); lo is below.
    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = mass_above(mid) < p
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo = jnp.full((logits.shape[0], 1), -1, jnp.int32)
    hi = jnp.full((logits.shape[0], 1), _ONE_BITS, jnp.int32)
    _, hi = jax.lax.fori_loop(0, 31, body, (lo, hi))
    # p >= 1 keeps everything (the float32 total can round below 1).
    remove = (bits < hi) & (p < 1.0)
    # The largest token always has zero mass above it, so it is always kept.
    if min_tokens_to_keep > 1:
        remove = remove & (logits < nth_largest(logits, min_tokens_to_keep))
    return remove
