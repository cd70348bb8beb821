"""Rotary position embeddings as transformers parameterises them (`rope_parameters`).

One home for every rope type a family may read: validation of a
`rope_parameters` dict (`check_rope`), its static inverse frequencies
(`inv_freq`, as transformers' `ROPE_INIT_FUNCTIONS`), and the cos/sin tables of
a call (`rope_tables`), where the two length-dependent types are computed inside
the program from the largest position of the call, as transformers'
`dynamic_rope_update` does in each forward:

* "dynamic" (NTK): the base grows with the length seen;
* "longrope" (Phi-3): the short factors up to `original_max_position_embeddings`,
  the long factors past it.

Keys already in the cache keep the rotation they were written with, as in
transformers. A rope is carried as sorted `(key, value)` pairs (lists as
tuples) so the configs holding it stay hashable static jit arguments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode.models.layers import rope_cos_sin

Array = jax.Array

__all__ = ["ROPE_TYPES", "check_rope", "freeze_rope", "inv_freq", "rope_tables"]

# The rope_parameters keys each rope_type reads (besides rope_type / rope_theta).
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "longrope": (
        "short_factor",
        "long_factor",
        "factor",
        "attention_factor",
        "original_max_position_embeddings",
    ),
}
_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ROPE_TYPES["llama3"],
    "yarn": ("factor",),
    "longrope": ("original_max_position_embeddings",),
}


def freeze_rope(rope: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """`rope` as sorted `(key, value)` pairs, lists as tuples (hashable)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(rope).items()))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_rope(
    rope: Mapping[str, Any], where: str, allowed: tuple[str, ...], rotary_dim: int
) -> None:
    """ValueError naming `where` (e.g. "LlamaConfig rope_parameters") for a rope
    dict jaxdecode cannot honour: a type outside `allowed`, a key its type does
    not read, a missing or non-numeric required value, factor lists of the wrong
    length (longrope: `rotary_dim // 2` each)."""
    rope_type = rope.get("rope_type", "default")
    if rope_type not in allowed:
        raise ValueError(f"{where} rope_type must be one of {sorted(allowed)}, got {rope_type!r}")
    theta = rope.get("rope_theta")
    if not _is_number(theta) or theta <= 0:
        raise ValueError(f"{where} rope_theta must be a number > 0, got {theta!r}")
    known = {"rope_type", "rope_theta", *ROPE_TYPES[rope_type]}
    unknown = sorted(k for k in rope if k not in known)
    if unknown:
        raise ValueError(
            f"{where} key {unknown[0]!r} is not read by rope_type {rope_type!r} "
            f"(reads {sorted(known)}); refusing rather than ignoring it"
        )
    for key in _REQUIRED.get(rope_type, ()):
        if not _is_number(rope.get(key)):
            raise ValueError(
                f"{where} of rope_type {rope_type!r} need a number {key!r}, got {rope.get(key)!r}"
            )
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = rope.get(key)
            if (
                not isinstance(factors, (list, tuple))
                or len(factors) != rotary_dim // 2
                or not all(_is_number(f) for f in factors)
            ):
                raise ValueError(
                    f"{where} of rope_type 'longrope' need {key!r}: a list of {rotary_dim // 2} "
                    f"numbers (rotary dimensions / 2), got {factors!r}"
                )


def inv_freq(
    rope: Mapping[str, Any], dim: int, max_position_embeddings: int, *, long: bool = False
) -> tuple[np.ndarray, float]:
    """Inverse frequencies `[dim // 2]` float32 and the cos/sin scaling of `rope`
    over `dim` rotary dimensions, computed as transformers'
    `ROPE_INIT_FUNCTIONS` do ("dynamic": those below the original length;
    "longrope": the short factors, or the long ones with `long=True`)."""
    rope_type = rope.get("rope_type", "default")
    base = float(rope["rope_theta"])
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv = (1.0 / np.power(np.float32(base), exponents)).astype(np.float32)
    if rope_type in ("default", "dynamic"):
        return inv, 1.0
    if rope_type == "longrope":
        return _longrope(rope, base, dim, max_position_embeddings, long)
    factor = float(rope["factor"])
    if rope_type == "linear":
        return (inv / np.float32(factor)).astype(np.float32), 1.0
    if rope_type == "llama3":
        return _llama3(inv, rope, factor), 1.0
    return _yarn(rope, base, dim, factor)


def rope_tables(
    rope: Mapping[str, Any], dim: int, max_position_embeddings: int, positions: Array
) -> tuple[Array, Array]:
    """`cos, sin: [batch, T, dim]` float32 for `positions: [batch, T]`.

    "dynamic" and "longrope" read `seq_len = max(positions) + 1` of the whole
    call (transformers' `dynamic_rope_update`); every other type is static."""
    rope_type = rope.get("rope_type", "default")
    inv, scaling = inv_freq(rope, dim, max_position_embeddings)
    seq_len = jnp.max(positions) + 1
    if rope_type == "dynamic":
        # never below max_position_embeddings (where the formula gives the base).
        factor = jnp.float32(rope["factor"])
        limit = max_position_embeddings
        length = jnp.maximum(seq_len, limit).astype(jnp.float32)
        base = jnp.float32(rope["rope_theta"]) * (
            (factor * length / jnp.float32(limit)) - (factor - 1)
        ) ** jnp.float32(dim / (dim - 2))
        exponents = jnp.asarray(np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        inv = 1.0 / jnp.power(base, exponents)
    elif rope_type == "longrope":
        long, _ = inv_freq(rope, dim, max_position_embeddings, long=True)
        original = int(rope["original_max_position_embeddings"])
        inv = jnp.where(seq_len > original, jnp.asarray(long), jnp.asarray(inv))
    return rope_cos_sin(positions, inv, scaling)


def _longrope(
    rope: Mapping[str, Any], base: float, dim: int, max_position_embeddings: int, long: bool
) -> tuple[np.ndarray, float]:
    """LongRoPE (transformers' `_compute_longrope_parameters`): per-frequency
    factors, and an attention scaling from `factor` (by default the ratio of
    `max_position_embeddings` to the original length)."""
    original = float(rope["original_max_position_embeddings"])
    factor = rope.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    ext = np.asarray(rope["long_factor" if long else "short_factor"], np.float32)
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = 1.0 / (ext * np.power(np.float32(base), shape))
    return inv.astype(np.float32), float(attention_factor)


def _llama3(inv: np.ndarray, rope: Mapping[str, Any], factor: float) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling (transformers' `_compute_llama3_parameters`)."""
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = (2 * math.pi / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(
    rope: Mapping[str, Any], base: float, dim: int, factor: float
) -> tuple[np.ndarray, float]:
    """YaRN (transformers' `_compute_yarn_parameters`): a ramp between
    interpolated and extrapolated frequencies, and an attention scaling."""
    original = float(rope["original_max_position_embeddings"])
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no singular ramp
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extra_factor = (1 - ramp).astype(np.float32)
    inv = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv.astype(np.float32), float(attention_factor)
