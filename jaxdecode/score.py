"""`score`: the log-probabilities of given sequences, as `generate` would assign them.

Reinforcement learning from sampled rollouts (GRPO, PPO) needs the probability
the sampler gave each token *and* the same quantity under the parameters being
trained, as a differentiable function. `score` is that function: one full
forward pass of the model over the sequences, then a `lax.scan` over the
generated positions that runs exactly the processor chain `generate` applies for
the config (init from the prompt, apply, update with each given token). So for a
sequence `generate` produced, `score(...).logprobs` equals its `token_logprobs`
(to float rounding: a full forward pass instead of prefill plus one-token steps),
and `jax.grad` of a loss of it reaches the params.

What each log-probability is:

* `raw_logprobs`: `log_softmax(logits)` of the model, before any processor.
* `logprobs`: `log_softmax(processed scores)`: the distribution the sampler drew
  from (temperature, top-k/top-p/... truncation, penalties, forced tokens):
  what importance ratios against the sampler must use.
* `support_logmass`: the raw log-probability mass of the tokens the processors
  kept (not -inf); with only truncation at temperature 1 it is
  `raw_logprobs - logprobs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import pytree
from jaxdecode.arrays import is_traced
from jaxdecode.config import GenerationConfig
from jaxdecode.context import DecodeContext
from jaxdecode.generation import model_parts, stop_tables
from jaxdecode.models.base import Decoder, Model, positions_from_mask
from jaxdecode.processors import Chain, split_config
from jaxdecode.processors.base import LogitsProcessor, check_rows
from jaxdecode.search.loop import eos_hit
from jaxdecode.validation import host_rows

Array = jax.Array

__all__ = ["ScoreOutput", "score"]


@pytree.dataclass
class ScoreOutput:
    """What `score` returns (N = sequence length - prompt_length).

    Attributes:
        logprobs: `[batch, N]` float32, each given token's log-probability under
            the processed distribution (what `generate` reports as
            `token_logprobs` and samples from); 0 where `mask` is False.
        raw_logprobs: `[batch, N]` float32, under the model's own distribution
            (log_softmax of the raw logits); 0 where `mask` is False.
        mask: `[batch, N]` bool, True for the tokens that count: up to and
            including the first EOS or stop string of the completion (`generate`
            pads after it)
            and, with a full-length `attention_mask`, where it is 1.
        support_size: `[batch, N]` int32, tokens the processors kept (scores
            above -inf) at each position (`return_support=True`).
        support_logmass: `[batch, N]` float32, log of the raw probability mass
            of those kept tokens (`return_support=True`).
    """

    logprobs: Array
    raw_logprobs: Array
    mask: Array
    support_size: Array | None = None
    support_logmass: Array | None = None


@dataclasses.dataclass(frozen=True)
class ScorePlan:
    """Everything static about one compiled `score` program."""

    decoder: Decoder
    prompt_length: int
    max_length: int
    eos: tuple[int, ...]
    support: bool


def _tokens_scan(
    plan: ScorePlan,
    processor: Chain,
    stop: Any,
    ctx: DecodeContext,
    logits: Array,
    tokens: Array,
    valid: Array,
) -> dict[str, Array]:
    """Processor chain along the given tokens: `[B, N, V]` logits, `[B, N]`
    tokens and validity -> per-position outputs `[B, N]`. A row's completion ends
    at its first EOS or stop string (`stop`: the `StopStrings` tables or None)."""

    def step(carry, x):
        ctx, state, done, window = carry
        raw_logits, tok, ok = x  # [B, V], [B], [B]
        scores = processor.apply(raw_logits, ctx, state)
        logp = jax.nn.log_softmax(scores, axis=-1)
        raw = jax.nn.log_softmax(raw_logits, axis=-1)
        counts = ok & ~done
        pick = lambda a: jnp.take_along_axis(a, tok[:, None], axis=-1)[:, 0]
        out = {
            "logprobs": jnp.where(counts, pick(logp), 0.0),
            "raw_logprobs": jnp.where(counts, pick(raw), 0.0),
            "mask": counts,
        }
        if plan.support:
            kept = scores > -jnp.inf
            out["support_size"] = jnp.sum(kept, axis=-1, dtype=jnp.int32)
            out["support_logmass"] = jax.nn.logsumexp(jnp.where(kept, raw, -jnp.inf), axis=-1)
        done = done | eos_hit(tok, plan.eos)
        if stop is not None:
            window, stopped = stop.advance(window, tok)
            done = done | stopped
        return (ctx.append(tok), processor.update(state, tok), done, window), out

    done = jnp.zeros((tokens.shape[0],), bool)
    window = None if stop is None else stop.init(ctx)
    xs = (logits.swapaxes(0, 1), tokens.T, valid.T)
    _, outs = jax.lax.scan(step, (ctx, processor.init(ctx), done, window), xs)
    return {k: v.T for k, v in outs.items()}


@jax.jit(static_argnums=0)
def score_program(
    plan: ScorePlan, params: Any, sequences: Array, mask: Array, processor: Chain, stop: Any
) -> ScoreOutput:
    """One forward pass over `sequences [B, L]` (`mask [B, L]`), then the
    processor scan over the last `L - prompt_length` positions."""
    p = plan.prompt_length
    batch, length = sequences.shape
    params = plan.decoder.prepared(params, batch)
    ids, ids_mask = sequences[:, :-1], mask[:, :-1]  # the last token predicts nothing
    cache = plan.decoder.init_cache(batch, length - 1, None)
    logits, _ = plan.decoder.apply(params, ids, positions_from_mask(ids_mask), cache, ids_mask)
    logits = logits[:, p - 1 :, :].astype(jnp.float32)  # [B, N, V]: predicts tokens p..L-1
    ctx = DecodeContext.from_ids(
        sequences,
        vocab_size=logits.shape[-1],
        prompt_length=p,
        max_length=plan.max_length,
        attention_mask=mask[:, :p],
        cur_len=p,
    )
    outs = _tokens_scan(plan, processor, stop, ctx, logits, sequences[:, p:], mask[:, p:] == 1)
    return ScoreOutput(
        logprobs=outs["logprobs"],
        raw_logprobs=outs["raw_logprobs"],
        mask=outs["mask"],
        support_size=outs.get("support_size"),
        support_logmass=outs.get("support_logmass"),
    )


def _check_inputs(
    decoder: Decoder, sequences: Any, attention_mask: Any, prompt_length: Any
) -> tuple[Any, Any, int]:
    """`(sequences, full-length mask, prompt_length)`, validated where concrete."""
    traced = is_traced(sequences, attention_mask)
    seqs = sequences if traced else host_rows("sequences", sequences)
    if seqs.ndim != 2 or not jnp.issubdtype(seqs.dtype, jnp.integer):
        raise ValueError(
            f"sequences must be a [batch, length] integer array, got {seqs.dtype} {seqs.shape}"
        )
    batch, length = seqs.shape
    if (
        isinstance(prompt_length, bool)
        or not isinstance(prompt_length, (int, np.integer))
        or not 1 <= prompt_length < length
    ):
        raise ValueError(
            f"prompt_length must be an integer in [1, {length - 1}] (sequences have {length} "
            f"columns and at least one is scored), got {prompt_length!r}"
        )
    p = int(prompt_length)
    if attention_mask is None:
        mask = jnp.ones((batch, length), jnp.int32)
    else:
        mask = (
            attention_mask
            if is_traced(attention_mask)
            else host_rows("attention_mask", attention_mask)
        )
        if mask.shape not in ((batch, p), (batch, length)):
            raise ValueError(
                f"attention_mask must be [batch, prompt_length] = {(batch, p)} or "
                f"[batch, length] = {(batch, length)}, got {mask.shape}"
            )
        if not is_traced(attention_mask) and not np.all((mask == 0) | (mask == 1)):
            raise ValueError("attention_mask must hold only 0 and 1")
        if not is_traced(attention_mask) and not np.all(np.any(mask[:, :p] == 1, axis=1)):
            raise ValueError("attention_mask: every prompt needs at least one real token")
        mask = jnp.asarray(mask, jnp.int32)
        if mask.shape[1] == p:  # completion tokens are all real
            mask = jnp.concatenate([mask, jnp.ones((batch, length - p), jnp.int32)], axis=1)
    if not traced and seqs.size and (seqs.min() < 0 or seqs.max() >= decoder.vocab_size):
        raise ValueError(
            f"sequences must hold token ids in [0, {decoder.vocab_size - 1}], "
            f"got [{seqs.min()}, {seqs.max()}]"
        )
    return jnp.asarray(seqs, jnp.int32), mask, p


def score(
    model: Model | Decoder,
    sequences: Any,
    config: GenerationConfig | None = None,
    *,
    prompt_length: int,
    attention_mask: Any = None,
    params: Any = None,
    logits_processor: LogitsProcessor | None = None,
    return_support: bool = False,
    tokenizer: Any = None,
    **overrides: Any,
) -> ScoreOutput:
    """Per-token log-probabilities of `sequences` after their prompt, as `generate`
    assigns them for `config`.

    Jittable and differentiable with respect to the params (pass the model as a
    `CausalLM` pytree with traced params, or a `Decoder` with `params=`).

    Args:
        model: a `CausalLM`, or a `Decoder` together with `params=`.
        sequences: `[batch, length]` int token ids: the (left-padded) prompt, then
            the completion, e.g. `generate(...).sequences`.
        config: the `GenerationConfig` the completions were sampled with
            (default: the model's), updated by `overrides`. Its processor chain
            (temperature, truncation, penalties, ...) defines `logprobs`; its
            `eos_token_id` ends each completion; `max_new_tokens` / `max_length`
            set where a forced EOS falls (default: the sequences' length).
            Per-row values need one value per sequence row.
        prompt_length: static, the prompt's columns (`input_ids.shape[1]` of the
            `generate` call); the `length - prompt_length` columns after it are
            scored.
        attention_mask: `[batch, prompt_length]` (0 on the prompt's left padding)
            or `[batch, length]` (also 0 on completion tokens not to count);
            default all 1.
        params: the parameters when `model` is a `Decoder`.
        logits_processor: the caller's processors (stateful ones included),
            placed where `generate` places them: after the config's processors,
            before the sampling warpers.
        return_support: also return `support_size` and `support_logmass`.
        tokenizer: for the config's `stop_strings` (which end a completion as
            in `generate`) and `regex` / `json_schema` / `choices` (default: the
            `CausalLM`'s).

    Returns:
        A `ScoreOutput` (`[batch, length - prompt_length]` arrays).

    A function over ~80 lines: mostly its docstring; the body is check, plan, run.
    """
    decoder, params, base, model_tokenizer = model_parts(model, params)
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    config = (config or base).replace(**overrides) if overrides else (config or base)
    config.validate(vocab_size=decoder.vocab_size)
    seqs, mask, p = _check_inputs(decoder, sequences, attention_mask, prompt_length)
    batch, length = seqs.shape
    decoder.check_length(length)
    if config.max_new_tokens is None and config.max_length is None:
        max_length = length
    else:
        max_length = config.resolve_max_length(p)
        if max_length < length:
            raise ValueError(
                f"sequences have {length} columns, more than the config's max_length="
                f"{max_length} (prompt_length {p} + max_new_tokens); set max_new_tokens to the "
                "generated length"
            )
    tokenizer = model_tokenizer if tokenizer is None else tokenizer
    # The one chain builder: the caller's processors and the constraint go where
    # `generate` puts them (before the sampling warpers).
    _, traced = split_config(config, tokenizer=tokenizer, extra=logits_processor)
    processor = traced.processor
    check_rows(processor, batch)
    stop = None
    if config.stop_strings is not None:
        stop = stop_tables(config.stop_strings, tokenizer, decoder.vocab_size)
    plan = ScorePlan(
        decoder=decoder.with_cache(config.kv_cache()),
        prompt_length=p,
        max_length=max_length,
        eos=config.eos_ids,
        support=bool(return_support),
    )
    return score_program(plan, params, seqs, mask, processor, stop)
