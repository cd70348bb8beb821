"""The per-token record: what every decoding path writes for each generated token.

Greedy search and sampling (`generate`'s loop, `stream`, the engine) and
speculative decoding all build a token's outputs here, under the names of the
`GenerateOutput` fields they end up in, so that the same token has the same
log-probability, raw log-probability and alternatives whichever path chose it:

- `tokens`: the chosen token ids;
- `token_logprobs`: log-probability under the processed scores;
- `raw_token_logprobs`: under the model's own logits (`output_raw_logprobs`);
- `top_logprobs` / `top_token_ids`: the n best and their ids (`logprobs=n`,
  processed or raw by `logprobs_mode`);
- `scores` / `logits`: the whole processed / raw rows (`output_scores`,
  `output_logits`);
- `routed_experts`: the experts each MoE layer routed the forward pass that
  gave the token's logits to (the position before the token: the prompt's last
  for the first token), `[..., MoE layers, k]` int32 (`output_routed_experts`).

Beam search records per beam (its own `beam_step`), `score` per given token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdecode.config import StaticConfig

Array = jax.Array

__all__ = [
    "FIELDS",
    "NO_EXPERT",
    "PAD_FIELDS",
    "finished",
    "record_fields",
    "token_record",
    "top_n",
]

# Every field a record may hold, in `GenerateOutput`'s order.
FIELDS = (
    "tokens",
    "token_logprobs",
    "raw_token_logprobs",
    "top_logprobs",
    "top_token_ids",
    "scores",
    "logits",
    "routed_experts",
)
# Token-id fields: a finished row or an unused column holds the pad id, not 0.
PAD_FIELDS = ("tokens", "top_token_ids")
# Expert ids: a finished row or an unused column holds -1 (no expert).
NO_EXPERT = -1


def top_n(logp: Array, n: int) -> tuple[Array, Array]:
    """The n largest log-probs of each row, best first, and their ids:
    `logp: [..., V]` -> `([..., n] float32, [..., n] int32)`."""
    values, ids = jax.lax.top_k(logp, n)
    return values, ids.astype(jnp.int32)


def record_fields(cfg: StaticConfig) -> tuple[str, ...]:
    """The fields a record holds under `cfg` (which outputs were asked for)."""
    wanted = {
        "raw_token_logprobs": cfg.output_raw_logprobs,
        "top_logprobs": bool(cfg.logprobs),
        "top_token_ids": bool(cfg.logprobs),
        "scores": cfg.output_scores,
        "logits": cfg.output_logits,
        "routed_experts": cfg.output_routed_experts,
    }
    return tuple(f for f in FIELDS if wanted.get(f, True))


def token_record(
    cfg: StaticConfig,
    scores: Array,
    logits: Array,
    tokens: Array,
    routed: Array | None = None,
) -> dict[str, Array]:
    """The record of `tokens` chosen from `scores`.

    Args:
        cfg: the static config (which outputs exist, `logprobs_mode`).
        scores: `[..., V]` processed scores the tokens were chosen from.
        logits: `[..., V]` the model's raw logits at the same positions.
        tokens: `[...]` int32 the chosen ids.
        routed: `[..., MoE layers, k]` int32 the experts of the forward pass that
            gave `logits` (needed with `output_routed_experts`).

    Returns:
        `record_fields(cfg)`'s fields, each `[...]` (or `[..., n]`, `[..., V]`).
    """
    logp_all = jax.nn.log_softmax(scores, axis=-1)
    pick = lambda all_: jnp.take_along_axis(all_, tokens[..., None], axis=-1)[..., 0]
    out = {"tokens": tokens, "token_logprobs": pick(logp_all)}
    if cfg.output_raw_logprobs or (cfg.logprobs and cfg.logprobs_mode == "raw"):
        raw_all = jax.nn.log_softmax(logits, axis=-1)
    if cfg.output_raw_logprobs:
        out["raw_token_logprobs"] = pick(raw_all)
    if cfg.logprobs:
        source = raw_all if cfg.logprobs_mode == "raw" else logp_all
        out["top_logprobs"], out["top_token_ids"] = top_n(source, cfg.logprobs)
    if cfg.output_scores:
        out["scores"] = scores
    if cfg.output_logits:
        out["logits"] = logits
    if cfg.output_routed_experts:
        if routed is None:
            raise ValueError("output_routed_experts needs the forward pass's routed experts")
        out["routed_experts"] = routed
    return out


def finished(record: dict[str, Array], done: Array, pad: int) -> dict[str, Array]:
    """`record` with rows `done` (`[rows]` bool) blanked: the pad id in token-id
    fields, `NO_EXPERT` in `routed_experts`, 0 in log-probability fields; `scores` and `logits` kept as they are
    (transformers keeps a finished row's scores)."""
    out = dict(record)
    for name, value in record.items():
        if name in ("scores", "logits"):
            continue
        row = done.reshape(done.shape + (1,) * (value.ndim - done.ndim))
        blank = pad if name in PAD_FIELDS else NO_EXPERT if name == "routed_experts" else 0
        out[name] = jnp.where(row, blank, value).astype(value.dtype)
    return out
