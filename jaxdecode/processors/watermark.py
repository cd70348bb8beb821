"""Watermarking (Kirchenbauer et al., arXiv:2306.04634) as transformers 5 does it:
`WatermarkingConfig`, the green-list processor, and `watermark_detect`.

transformers draws each green list with `torch.randperm(vocab_size, generator)`
on a CPU `torch.Generator` re-seeded from a hash of the context. That is a fact
this module reproduces bit for bit, on the device:

- torch's CPU generator is an MT19937 whose state is initialised from the low
  32 bits of the seed (`mt19937`);
- `randperm(n)` on the CPU (for n < 2**32 / 20) is a Fisher-Yates shuffle:
  for i = 0 .. n-2, swap r[i] with r[i + random() % (n - i)], `random()` the
  generator's next raw 32-bit output.

The green list is the permutation's first `int(vocab_size * greenlist_ratio)`
entries. The shuffle is sequential, but its first G entries are a function of
the G targets `t_i = i + random_i % (n - i)` that a parallel program computes
without running it (`randperm_head`): entry i is the value that position t_i held
just before step i, which is t_i itself unless an earlier step swapped into t_i,
and then is found by following "the last earlier step that wrote here" links,
which pointer jumping resolves in log2(G) rounds. So the device computes
transformers' exact green lists (the ones a CPU torch computes; torch on CUDA
has another randperm, so transformers' own lists differ by device).

Seeds, as transformers computes them: "lefthash", `hashing_key * last_token`
(Python integers) modulo 2**64 - 1; "selfhash", the minimum over the last
`context_width` tokens w (the candidate token c last) of the int64 product
`hashing_key * (T[w] + 1) * (T[c] + 1)` (wrapping), modulo 2**64 - 1, where T is
`randperm(1_000_003)` seeded with `hashing_key`; selfhash scores the 40 most
likely candidates and biases those in their own green list.

All code here is written once for NumPy and jax.numpy (`xp`): the host builds
per-token tables and scores texts (`watermark_detect`), the device runs the
same functions inside the decoding loop.

Over ~500 lines on purpose: both watermark schemes transformers has (green
lists and SynthID), each with its config, processor and detector, written once
for NumPy and jax.numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import pytree
from jaxdecode.config import (
    SynthIDTextWatermarkingConfig,
    WatermarkingConfig,
    as_watermarking_config,
)
from jaxdecode.context import DecodeContext
from jaxdecode.errors import ConfigError
from jaxdecode.processors.base import LogitsProcessor, float_leaf, row

Array = jax.Array

__all__ = [
    "WatermarkingConfig",
    "Watermark",
    "WatermarkDetection",
    "SynthIDText",
    "SynthIDDetection",
    "synthid_text",
    "synthid_detect",
    "synthid_g_values",
    "watermark",
    "watermark_detect",
    "mt19937",
    "randperm_head",
    "green_lists",
    "lefthash_seeds",
    "selfhash_seeds",
]

TABLE_SIZE = 1_000_003  # transformers' fixed table for selfhash
SELFHASH_CANDIDATES = 40  # transformers scores the 40 most likely tokens
_M64 = 2**64 - 1
_MT_N, _MT_M = 624, 397


# --------------------------------------------------------------------------- #
# torch's CPU generator and randperm, for NumPy (host) and jax.numpy (device).
# --------------------------------------------------------------------------- #


def _u32(xp: Any, value: Any) -> Any:
    return xp.asarray(value, dtype=xp.uint32)


def _twist(xp: Any, st: Any) -> Any:
    """One MT19937 state update `[..., 624] -> [..., 624]` (the in-place loop's
    order of reads, in four vector pieces)."""
    upper, lower = _u32(xp, 0x80000000), _u32(xp, 0x7FFFFFFF)
    one, matrix = _u32(xp, 1), _u32(xp, 0x9908B0DF)

    def new(cur: Any, nxt: Any, far: Any) -> Any:
        y = (cur & upper) | (nxt & lower)
        return far ^ (y >> one) ^ xp.where((y & one) == one, matrix, _u32(xp, 0))

    k = _MT_N - _MT_M  # 227
    a = new(st[..., :k], st[..., 1 : k + 1], st[..., _MT_M:])
    b1 = new(st[..., k : 2 * k], st[..., k + 1 : 2 * k + 1], a)
    b2 = new(st[..., 2 * k : _MT_N - 1], st[..., 2 * k + 1 :], b1[..., : _MT_N - 1 - 2 * k])
    last = new(st[..., _MT_N - 1 :], a[..., :1], b1[..., _MT_N - 1 - 2 * k : _MT_N - 2 * k])
    return xp.concatenate([a, b1, b2, last], axis=-1)


def _temper(xp: Any, y: Any) -> Any:
    y = y ^ (y >> _u32(xp, 11))
    y = y ^ ((y << _u32(xp, 7)) & _u32(xp, 0x9D2C5680))
    y = y ^ ((y << _u32(xp, 15)) & _u32(xp, 0xEFC60000))
    return y ^ (y >> _u32(xp, 18))


def mt19937(seeds: Any, count: int, xp: Any = jnp) -> Any:
    """The first `count` raw outputs of torch's CPU generator after
    `manual_seed(seed)` (an MT19937 seeded with the seed's low 32 bits).

    Args:
        seeds: `[...]` uint32, the seeds' low 32 bits.
        count: static number of outputs.
        xp: `numpy` or `jax.numpy`.

    Returns:
        `[..., count]` uint32.
    """
    seeds = _u32(xp, seeds)
    mult = _u32(xp, 1812433253)
    if xp is np:
        state = [seeds]
        for j in range(1, _MT_N):
            prev = state[-1]
            state.append(mult * (prev ^ (prev >> np.uint32(30))) + np.uint32(j))
        st = np.stack(state, axis=-1)
    else:

        def init(prev: Array, j: Array) -> tuple[Array, Array]:
            nxt = mult * (prev ^ (prev >> jnp.uint32(30))) + j
            return nxt, nxt

        _, rest = jax.lax.scan(init, seeds, jnp.arange(1, _MT_N, dtype=jnp.uint32))
        st = jnp.concatenate([seeds[None], rest], axis=0)
        st = jnp.moveaxis(st, 0, -1)
    blocks = -(-count // _MT_N)
    if xp is np:
        outs = []
        for _ in range(blocks):
            st = _twist(np, st)
            outs.append(_temper(np, st))
        out = np.concatenate(outs, axis=-1)
    else:

        def block(s: Array, _: Any) -> tuple[Array, Array]:
            s = _twist(jnp, s)
            return s, _temper(jnp, s)

        _, outs = jax.lax.scan(block, st, None, length=blocks)  # [blocks, ..., 624]
        out = jnp.moveaxis(outs, 0, -2).reshape(*st.shape[:-1], blocks * _MT_N)
    return out[..., :count]


def randperm_head(outputs: Any, n: int, xp: Any = jnp) -> Any:
    """The first G entries of torch's CPU `randperm(n)` from the generator's
    first G outputs, without running the shuffle (see the module docstring).

    Args:
        outputs: `[R, G]` uint32 raw generator outputs (`mt19937`), G <= n - 1.
        n: static permutation size (< 2**31).
        xp: `numpy` or `jax.numpy`.

    Returns:
        `[R, G]` int32: `randperm(n)[:G]` for each row.
    """
    rows, g = outputs.shape
    steps = xp.arange(g, dtype=xp.int32)
    span = _u32(xp, n - np.arange(g, dtype=np.int64))
    targets = steps + (outputs % span).astype(xp.int32)  # [R, G], t_i >= i
    # prev[j]: the last step before j that swapped into position j (-1: none).
    into = xp.where((targets < g) & (targets != steps), targets, g)
    prev_init = xp.full((rows, g + 1), -1, xp.int32)
    ridx = xp.arange(rows)[:, None]
    stepb = xp.broadcast_to(steps, (rows, g))
    if xp is np:
        prev = prev_init.copy()
        np.maximum.at(prev, (np.broadcast_to(ridx, (rows, g)), into), stepb)
        order = np.lexsort((stepb, targets), axis=-1)
        t_sorted = np.take_along_axis(targets, order, -1)
        s_sorted = np.take_along_axis(stepb, order, -1)
    else:
        prev = prev_init.at[ridx, into].max(stepb)
        t_sorted, s_sorted = jax.lax.sort((targets, stepb), dimension=-1, num_keys=2)
    prev = prev[:, :g]
    # first[i]: the last step before i that swapped into t_i (-1: none).
    same = t_sorted[:, 1:] == t_sorted[:, :-1]
    pred = xp.concatenate(
        [xp.full((rows, 1), -1, xp.int32), xp.where(same, s_sorted[:, :-1], -1)], axis=-1
    )
    if xp is np:
        first = np.empty_like(pred)
        np.put_along_axis(first, s_sorted, pred, -1)
    else:
        first = jnp.zeros_like(pred).at[ridx, s_sorted].set(pred)
    # The value a step moved into place comes from the root of its "prev" chain.
    root = xp.where(prev >= 0, prev, stepb)
    for _ in range(max(1, int(g).bit_length())):
        root = xp.take_along_axis(root, root, -1)
    moved = xp.take_along_axis(root, xp.maximum(first, 0), -1)
    return xp.where(first >= 0, moved, targets).astype(xp.int32)


def green_lists(seeds: Any, vocab_size: int, size: int, xp: Any = jnp) -> Any:
    """`[R, size]` int32: `torch.randperm(vocab_size)[:size]` on a CPU generator
    seeded with each of `seeds: [R]` (low 32 bits, uint32)."""
    if size == 0:
        return xp.zeros((np.shape(seeds)[0], 0), xp.int32)
    return randperm_head(mt19937(seeds, size, xp), vocab_size, xp)


# --------------------------------------------------------------------------- #
# Seeds (host tables per token, 64-bit arithmetic as uint32 pairs on the device).
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=16)
def _lefthash_seeds(key: int, vocab: int) -> np.ndarray:
    """`[vocab]` uint32: low 32 bits of `(key * token) % (2**64 - 1)`."""
    return np.asarray([((key * t) % _M64) & 0xFFFFFFFF for t in range(vocab)], np.uint32)


@functools.lru_cache(maxsize=16)
def _selfhash_tables(key: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token t: `key * (T[t] + 1) mod 2**64` as (high, low) uint32 halves, and
    `T[t] + 1` (uint32), T = `randperm(1_000_003)` seeded with `key`."""
    tokens = np.arange(vocab) % TABLE_SIZE
    count = int(tokens.max()) + 1
    table = green_lists(np.asarray([key & 0xFFFFFFFF], np.uint32), TABLE_SIZE, count, np)[0]
    plus = table[tokens].astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        prod = np.uint64(key % 2**64) * plus  # wraps modulo 2**64, as torch's int64
    hi = (prod >> np.uint64(32)).astype(np.uint32)
    lo = (prod & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return hi, lo, plus.astype(np.uint32)


def _mul_u64_u32(xp: Any, hi: Any, lo: Any, b: Any) -> tuple[Any, Any]:
    """`(hi, lo) * b` modulo 2**64, b < 2**32, in uint32 halves."""
    mask16 = _u32(xp, 0xFFFF)
    s16 = _u32(xp, 16)
    a0, a1 = lo & mask16, lo >> s16
    b0, b1 = b & mask16, b >> s16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> s16) + (p01 & mask16) + (p10 & mask16)
    low = (p00 & mask16) | (mid << s16)
    carry = (mid >> s16) + (p01 >> s16) + (p10 >> s16) + p11  # high 32 bits of lo * b
    return hi * b + carry, low


def _selfhash_seed(xp: Any, hi: Any, lo: Any) -> Any:
    """Low 32 bits of `s % (2**64 - 1)` for the minimum signed int64 `s` over the
    last axis of `(hi, lo)` pairs."""
    signed_hi = hi.view(np.int32) if xp is np else jax.lax.bitcast_convert_type(hi, jnp.int32)
    min_hi = signed_hi.min(axis=-1, keepdims=True)
    big = _u32(xp, 0xFFFFFFFF)
    min_lo = xp.where(signed_hi == min_hi, lo, big).min(axis=-1)
    negative = min_hi[..., 0] < 0
    return xp.where(negative, min_lo - _u32(xp, 1), min_lo)


def selfhash_seeds(windows: Any, key: int, vocab: int, xp: Any = jnp) -> Any:
    """`[..., width]` token windows (the scored or candidate token last) ->
    `[...]` uint32 seeds, as transformers' selfhash `set_seed`."""
    hi_t, lo_t, plus_t = (xp.asarray(a) for a in _selfhash_tables(key, vocab))
    windows = xp.clip(windows, 0, vocab - 1)
    hi, lo = hi_t[windows], lo_t[windows]
    b = plus_t[windows[..., -1:]]
    hi, lo = _mul_u64_u32(xp, hi, lo, b)
    return _selfhash_seed(xp, hi, lo)


def lefthash_seeds(last: Any, key: int, vocab: int, xp: Any = jnp) -> Any:
    """`[...]` previous tokens -> `[...]` uint32 seeds (transformers' lefthash)."""
    return xp.asarray(_lefthash_seeds(key, vocab))[xp.clip(last, 0, vocab - 1)]


# --------------------------------------------------------------------------- #
# The processor.
# --------------------------------------------------------------------------- #


@pytree.dataclass
class Watermark(LogitsProcessor):
    """Adds `bias` to the green tokens' logits (transformers'
    `WatermarkLogitsProcessor`, exact green lists; see the module docstring).

    The vocabulary size of the green lists is the logits' last axis. A row
    shorter than `context_width` (prompt padding counted, as transformers)
    is left unchanged.

    Attributes:
        bias: `[]` or `[batch]` float32.
        greenlist_ratio, hashing_key, seeding_scheme, context_width: static.
    """

    row_fields: ClassVar[dict[str, str]] = {"bias": "watermarking_config.bias"}

    bias: Array
    greenlist_ratio: float = pytree.field(pytree_node=False, default=0.25)
    hashing_key: int = pytree.field(pytree_node=False, default=15485863)
    seeding_scheme: str = pytree.field(pytree_node=False, default="lefthash")
    context_width: int = pytree.field(pytree_node=False, default=1)

    def _window(self, ctx: DecodeContext, width: int) -> Array:
        """`[batch, width]` the last `width` logical tokens of each row."""
        cols = ctx.write_col[:, None] - width + jnp.arange(width)[None, :]
        return jnp.take_along_axis(ctx.sequences, jnp.maximum(cols, 0), axis=1)

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        batch, vocab = logits.shape
        size = int(vocab * self.greenlist_ratio)
        rows = jnp.arange(batch)[:, None]
        if self.seeding_scheme == "lefthash":
            last = self._window(ctx, 1)[:, 0]
            green = green_lists(lefthash_seeds(last, self.hashing_key, vocab), vocab, size)
            mask = jnp.zeros((batch, vocab), bool).at[rows, green].set(True)
        else:
            n_cand = min(SELFHASH_CANDIDATES, vocab)
            _, cand = jax.lax.top_k(logits, n_cand)  # [B, C]
            context = self._window(ctx, self.context_width - 1)  # [B, W - 1]
            windows = jnp.concatenate(
                [jnp.broadcast_to(context[:, None, :], (batch, n_cand, context.shape[1])),
                 cand[:, :, None]],
                axis=-1,
            )  # fmt: skip
            seeds = selfhash_seeds(windows, self.hashing_key, vocab).reshape(-1)
            lists = green_lists(seeds, vocab, size).reshape(batch, n_cand, size)
            is_green = jnp.any(lists == cand[:, :, None], axis=-1)  # [B, C]
            mask = jnp.zeros((batch, vocab), bool).at[rows, cand].set(is_green)
        mask = mask & (ctx.cur_len >= self.context_width)[:, None]
        return jnp.where(mask, logits + row(self.bias, logits.dtype), logits)


def watermark(config: Any = None, **fields: Any) -> Watermark | SynthIDText:
    """The watermark processor for `config`: a `WatermarkingConfig` (the default),
    a `SynthIDTextWatermarkingConfig`, or transformers' dict of either; fields
    overridable by keyword.

    >>> watermark(bias=2.5, seeding_scheme="selfhash")
    >>> watermark({"ngram_len": 5, "keys": [654, 400, 836]})
    """
    base = WatermarkingConfig() if config is None else as_watermarking_config(config)
    cfg = dataclasses.replace(base, **fields).validate()
    if isinstance(cfg, SynthIDTextWatermarkingConfig):
        return synthid_text(cfg)
    return Watermark(
        bias=float_leaf("watermarking_config.bias", cfg.bias),
        greenlist_ratio=float(cfg.greenlist_ratio),
        hashing_key=int(cfg.hashing_key),
        seeding_scheme=cfg.seeding_scheme,
        context_width=int(cfg.context_width),
    )


# --------------------------------------------------------------------------- #
# Detection.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class WatermarkDetection:
    """Per row, as transformers' `WatermarkDetectorOutput` (all `[batch]` NumPy
    arrays).

    Attributes:
        num_tokens_scored: tokens (or distinct n-grams) scored.
        num_green_tokens: green ones among them.
        green_fraction: their ratio.
        z_score: `(green - ratio * scored) / sqrt(scored * ratio * (1 - ratio))`.
        p_value: `erfc(z / sqrt(2)) / 2`.
        prediction: `z_score > z_threshold`.
        confidence: `1 - p_value`.
    """

    num_tokens_scored: np.ndarray
    num_green_tokens: np.ndarray
    green_fraction: np.ndarray
    z_score: np.ndarray
    p_value: np.ndarray
    prediction: np.ndarray
    confidence: np.ndarray


def _erfc(x: np.ndarray) -> np.ndarray:
    return np.asarray([math.erfc(v) for v in np.asarray(x, np.float64).reshape(-1)]).reshape(
        np.shape(x)
    )


def _green_flags(ids: np.ndarray, cfg: WatermarkingConfig, vocab: int) -> np.ndarray:
    """`[L - n + 1]` bool: whether each scored token of one row is green, n the
    n-gram length transformers' detector uses (`context_width + 1 - selfhash`)."""
    selfhash = cfg.seeding_scheme == "selfhash"
    n = cfg.context_width + 1 - int(selfhash)
    starts = np.arange(len(ids) - n + 1)
    grams = ids[starts[:, None] + np.arange(n)[None, :]]
    target = grams[:, -1]
    size = cfg.greenlist_size(vocab)
    if selfhash:
        seeds = selfhash_seeds(grams[:, -cfg.context_width :], cfg.hashing_key, vocab, np)
    else:
        seeds = lefthash_seeds(grams[:, -2], cfg.hashing_key, vocab, np)
    lists = green_lists(seeds, vocab, size, np)
    return np.any(lists == target[:, None], axis=-1), grams


def watermark_detect(
    sequences: Any,
    config: Any,
    *,
    vocab_size: int,
    bos_token_id: int | None = None,
    z_threshold: float = 3.0,
    ignore_repeated_ngrams: bool = False,
    eos_token_id: int | None = None,
    weights: Any = None,
) -> WatermarkDetection | SynthIDDetection:
    """Scores texts for the watermark of `config`, as transformers'
    `WatermarkDetector(...)(sequences, z_threshold, return_dict=True)`. Over ~80
    lines: the input checks (each a named error), then transformers' detector's
    steps in its order.

    Args:
        sequences: `[batch, length]` token ids (best without the prompt), or a
            list of rows of different lengths (each scored on its own).
        config: the `WatermarkingConfig` (or its dict) used to generate; or a
            `SynthIDTextWatermarkingConfig`, for which this returns
            `synthid_detect(sequences, config, eos_token_id=, weights=)`.
        vocab_size: the model's vocabulary size (the green lists' range).
        bos_token_id: when every row starts with it, it is dropped (as
            transformers does with the model's BOS; rows must agree).
        z_threshold: `prediction` is `z_score > z_threshold`.
        ignore_repeated_ngrams: count each distinct n-gram once.
        eos_token_id, weights: SynthID only (see `synthid_detect`).

    Returns:
        A `WatermarkDetection` (a `SynthIDDetection` for SynthID).
    """
    cfg = as_watermarking_config(config)
    if isinstance(cfg, SynthIDTextWatermarkingConfig):
        return synthid_detect(sequences, cfg, eos_token_id=eos_token_id, weights=weights)
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, (int, np.integer))
        or vocab_size < 2
    ):
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    rows = [np.asarray(r, np.int64).reshape(-1) for r in sequences]
    for r in rows:
        if r.size and (r.min() < 0 or r.max() >= vocab_size):
            raise ValueError(
                f"sequences must hold token ids in [0, {vocab_size - 1}], got {r.tolist()}"
            )
    if bos_token_id is not None and rows:
        has_bos = [r.size > 0 and r[0] == bos_token_id for r in rows]
        if any(has_bos) != all(has_bos):
            raise ValueError(
                "some rows start with bos_token_id and some do not: tokenize them the same way"
            )
        if all(has_bos):
            rows = [r[1:] for r in rows]
    scored, green = [], []
    for r in rows:
        if r.size - cfg.context_width < 1:
            raise ValueError(
                f"each row needs at least {cfg.context_width + 1} tokens (context_width="
                f"{cfg.context_width}, plus one to score), got {r.size}"
            )
        flags, grams = _green_flags(r, cfg, vocab_size)
        if ignore_repeated_ngrams:
            _, first = np.unique(grams, axis=0, return_index=True)
            scored.append(len(first))
            green.append(int(flags[first].sum()))
        else:
            scored.append(len(flags))
            green.append(int(flags.sum()))
    scored_a, green_a = np.asarray(scored, np.float64), np.asarray(green, np.float64)
    ratio = cfg.greenlist_ratio
    z = (green_a - ratio * scored_a) / np.sqrt(scored_a * ratio * (1 - ratio))
    p = 0.5 * _erfc(z / np.sqrt(2))
    return WatermarkDetection(
        num_tokens_scored=scored_a,
        num_green_tokens=green_a,
        green_fraction=green_a / scored_a,
        z_score=z,
        p_value=p,
        prediction=z > z_threshold,
        confidence=1 - p,
    )


# --------------------------------------------------------------------------- #
# SynthID-Text: transformers' integer hashing, in uint32 halves of its int64.
# --------------------------------------------------------------------------- #

_LCG_MULT = 6364136223846793005  # transformers' accumulate_hash multiplier


def _const64(xp: Any, value: int) -> tuple[Any, Any]:
    value %= 2**64
    return _u32(xp, value >> 32), _u32(xp, value & 0xFFFFFFFF)


def _add64(xp: Any, a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    lo = a[1] + b[1]
    carry = (lo < a[1]).astype(xp.uint32)
    return a[0] + b[0] + carry, lo


def _mul64(xp: Any, a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    hi, lo = _mul_u64_u32(xp, a[0], a[1], b[1])
    return hi + a[1] * b[0], lo


def _accumulate(xp: Any, h: tuple[Any, Any], data: Any) -> tuple[Any, Any]:
    """transformers' `accumulate_hash` step: `(h + data) * M + 1` modulo 2**64,
    `data` a non-negative int32 array or an (hi, lo) pair."""
    if not isinstance(data, tuple):
        low = _u32(xp, data)
        data = (xp.zeros_like(low), low)
    h = _add64(xp, h, data)
    h = _mul64(xp, h, _const64(xp, _LCG_MULT))
    return _add64(xp, h, _const64(xp, 1))


def _mod_signed(xp: Any, h: tuple[Any, Any], m: int) -> Any:
    """Python's `h % m` of the signed int64 `h` (m <= 2**24), as int32."""
    mm = _u32(xp, m)
    r = xp.zeros_like(h[1])
    for word in h:
        for shift in (24, 16, 8, 0):
            r = (r * _u32(xp, 256) + ((word >> _u32(xp, shift)) & _u32(xp, 255))) % mm
    negative = (h[0] >> _u32(xp, 31)) == _u32(xp, 1)
    wrap = _u32(xp, (2**64) % m)
    return xp.where(negative, (r + mm - wrap) % mm, r).astype(xp.int32)


@functools.lru_cache(maxsize=16)
def _sampling_table(seed: int, size: int) -> np.ndarray:
    """`torch.randint(0, 2, (size,), generator=manual_seed(seed))` on the CPU."""
    return (mt19937(np.asarray([seed & 0xFFFFFFFF], np.uint32), size, np)[0] % 2).astype(np.int32)


def _context_hash(xp: Any, tokens: Any) -> tuple[Any, Any]:
    """`accumulate_hash(1, tokens)` over the last axis of `tokens: [..., n]`."""
    shape = tokens.shape[:-1]
    h = (xp.zeros(shape, xp.uint32), xp.ones(shape, xp.uint32))
    for i in range(tokens.shape[-1]):
        h = _accumulate(xp, h, tokens[..., i])
    return h


def _g_values(xp: Any, h: tuple[Any, Any], cfg: SynthIDTextWatermarkingConfig) -> Any:
    """`[..., depth]` int32 g-values of n-gram hashes `h: [...]`."""
    size = int(cfg.sampling_table_size)
    table = xp.asarray(_sampling_table(int(cfg.sampling_table_seed), size))
    out = []
    for key in cfg.keys:
        hk = _accumulate(xp, h, _const64(xp, key))
        out.append(table[_mod_signed(xp, hk, size)])
    return xp.stack(out, axis=-1)


def synthid_g_values(ngrams: Any, config: Any, xp: Any = np) -> Any:
    """transformers' `compute_g_values` for n-grams `[..., ngram_len]` ->
    `[..., depth]` int32 (0 or 1)."""
    cfg = as_watermarking_config(config)
    return _g_values(xp, _context_hash(xp, xp.asarray(ngrams)), cfg)


@pytree.dataclass
class SynthIDText(LogitsProcessor):
    """SynthID-Text tournament watermarking as transformers'
    `SynthIDTextWatermarkLogitsProcessor`, its state carried by the loop.

    As transformers: the n-gram context is the last `ngram_len - 1` *generated*
    tokens, zeros before the first (the prompt is not read); each candidate's
    g-values hash the context, the candidate and each key; the probabilities go
    through one tournament layer per key; a context seen in the last
    `context_history_size` steps (or hashing to 0, the history's initial value)
    leaves the scores as they are. Every field is static (no number to tune).

    State: `(context [B, ngram_len - 1] int32, history high and low uint32
    halves [B, context_history_size] of the int64 context hashes, calls [B])`.
    """

    ngram_len: int = pytree.field(pytree_node=False, default=5)
    keys: tuple[int, ...] = pytree.field(pytree_node=False, default=())
    context_history_size: int = pytree.field(pytree_node=False, default=1024)
    sampling_table_seed: int = pytree.field(pytree_node=False, default=0)
    sampling_table_size: int = pytree.field(pytree_node=False, default=2**16)
    skip_first_ngram_calls: bool = pytree.field(pytree_node=False, default=False)
    debug_mode: bool = pytree.field(pytree_node=False, default=False)

    @property
    def config(self) -> SynthIDTextWatermarkingConfig:
        names = [f.name for f in dataclasses.fields(SynthIDTextWatermarkingConfig)]
        return SynthIDTextWatermarkingConfig(**{n: getattr(self, n) for n in names})

    def init(self, ctx: DecodeContext) -> tuple[Array, Array, Array, Array]:
        batch = ctx.batch
        history = jnp.zeros((batch, self.context_history_size), jnp.uint32)
        context = jnp.zeros((batch, self.ngram_len - 1), jnp.int32)
        return context, history, history, jnp.zeros((batch,), jnp.int32)

    def _skipped(self, calls: Array) -> Array:
        return jnp.asarray(self.skip_first_ngram_calls) & (calls + 1 < self.ngram_len)

    def update(self, state: Any, tokens: Array) -> Any:
        context, hist_hi, hist_lo, calls = state
        h = _context_hash(jnp, context)
        keep = self._skipped(calls)[:, None]
        hist_hi = jnp.where(keep, hist_hi, jnp.concatenate([h[0][:, None], hist_hi[:, :-1]], 1))
        hist_lo = jnp.where(keep, hist_lo, jnp.concatenate([h[1][:, None], hist_lo[:, :-1]], 1))
        context = jnp.concatenate([context, tokens[:, None].astype(jnp.int32)], 1)[:, 1:]
        return context, hist_hi, hist_lo, calls + 1

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        context, hist_hi, hist_lo, calls = state
        batch, vocab = logits.shape
        scores = jnp.ones_like(logits) if self.debug_mode else logits
        h_ctx = _context_hash(jnp, context)
        candidates = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), (batch, vocab))
        h = _accumulate(jnp, (h_ctx[0][:, None], h_ctx[1][:, None]), candidates)
        g = _g_values(jnp, h, self.config).astype(scores.dtype)  # [B, V, depth]
        probs = jax.nn.softmax(scores, axis=-1)
        for i in range(g.shape[-1]):
            mass = jnp.sum(g[..., i] * probs, axis=1, keepdims=True)
            probs = probs * (1 + g[..., i] - mass)
        log_probs = jnp.log(probs)
        updated = jnp.where(jnp.isfinite(log_probs), log_probs, jnp.finfo(log_probs.dtype).min)
        seen = (hist_hi == h_ctx[0][:, None]) & (hist_lo == h_ctx[1][:, None])
        plain = (jnp.any(seen, axis=1) | self._skipped(calls))[:, None]
        return jnp.where(plain, scores, updated)


def synthid_text(config: Any) -> SynthIDText:
    """The SynthID-Text processor for a `SynthIDTextWatermarkingConfig` (or its dict).

    >>> synthid_text({"ngram_len": 5, "keys": [654, 400, 836, 123]})
    """
    cfg = as_watermarking_config(config)
    if not isinstance(cfg, SynthIDTextWatermarkingConfig):
        raise ConfigError(
            "synthid_text needs a SynthIDTextWatermarkingConfig (with ngram_len and keys)"
        )
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for flag in ("skip_first_ngram_calls", "debug_mode"):
        fields[flag] = bool(fields[flag])
    return SynthIDText(**fields)


@dataclasses.dataclass(frozen=True)
class SynthIDDetection:
    """SynthID-Text scores per row: the SynthID paper's Mean and Weighted Mean
    detectors over transformers' g-values and mask.

    Attributes:
        g_values: per row, `[T, depth]` int32 g-values of its T = length -
            ngram_len + 1 n-grams (transformers' `compute_g_values`).
        mask: per row, `[T]` bool: the n-grams scored (context not repeated, as
            `compute_context_repetition_mask`, and before the first EOS, as
            `compute_eos_token_mask`).
        num_tokens_scored: `[batch]` True entries of each mask.
        mean: `[batch]` mean of the scored g-values (0.5 for unwatermarked text).
        weighted_mean: `[batch]` the same with per-layer weights (by default
            linearly 10 down to 1, normalised to sum to the depth).
    """

    g_values: tuple[np.ndarray, ...]
    mask: tuple[np.ndarray, ...]
    num_tokens_scored: np.ndarray
    mean: np.ndarray
    weighted_mean: np.ndarray


def _repetition_mask(ids: np.ndarray, cfg: SynthIDTextWatermarkingConfig) -> np.ndarray:
    n = cfg.ngram_len
    starts = np.arange(len(ids) - n + 1)
    contexts = ids[:-1][starts[:, None] + np.arange(n - 1)[None, :]]
    hi, lo = _context_hash(np, contexts.reshape(len(starts), n - 1))
    hashes = (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)
    history = [np.uint64(0)] * cfg.context_history_size
    out = np.zeros(len(starts), bool)
    for i, h in enumerate(hashes):
        out[i] = h not in history
        history = [h, *history[:-1]]
    return out


def synthid_detect(
    sequences: Any,
    config: Any,
    *,
    eos_token_id: int | None = None,
    weights: Any = None,
) -> SynthIDDetection:
    """SynthID-Text Mean and Weighted Mean scores of texts (higher: more likely
    watermarked; unwatermarked text scores about 0.5).

    Args:
        sequences: `[batch, length]` token ids, or rows of different lengths
            (each at least `ngram_len` long).
        config: the `SynthIDTextWatermarkingConfig` (or its dict) used to generate.
        eos_token_id: n-grams from the first EOS on are not scored.
        weights: `[depth]` non-negative layer weights for the weighted mean.

    Returns:
        A `SynthIDDetection`.
    """
    cfg = as_watermarking_config(config)
    if not isinstance(cfg, SynthIDTextWatermarkingConfig):
        raise ConfigError("synthid_detect needs a SynthIDTextWatermarkingConfig")
    depth = len(cfg.keys)
    w = np.linspace(10, 1, depth) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (depth,) or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError(
            f"weights must be {depth} non-negative numbers (one per key), got {weights!r}"
        )
    w = w * (depth / w.sum())
    n = cfg.ngram_len
    all_g, all_mask, scored, mean, weighted = [], [], [], [], []
    for r in sequences:
        ids = np.asarray(r, np.int64).reshape(-1)
        if ids.size < n or ids.min() < 0:
            raise ValueError(
                f"each row needs at least ngram_len={n} token ids >= 0, got {ids.tolist()}"
            )
        starts = np.arange(ids.size - n + 1)
        g = synthid_g_values(ids[starts[:, None] + np.arange(n)[None, :]], cfg, np)
        mask = _repetition_mask(ids, cfg)
        if eos_token_id is not None:
            hits = np.flatnonzero(ids == eos_token_id)
            if hits.size:
                mask &= np.arange(ids.size)[n - 1 :] < hits[0]
        count = int(mask.sum())
        total = np.float64(depth * count)
        all_g.append(g)
        all_mask.append(mask)
        scored.append(count)
        mean.append((g * mask[:, None]).sum() / total if count else np.nan)
        weighted.append((g * w * mask[:, None]).sum() / total if count else np.nan)
    return SynthIDDetection(
        g_values=tuple(all_g),
        mask=tuple(all_mask),
        num_tokens_scored=np.asarray(scored),
        mean=np.asarray(mean, np.float64),
        weighted_mean=np.asarray(weighted, np.float64),
    )
