"""From a `GenerationConfig` to the processor chain `generate` applies, and the
two entry points that apply it outside a loop (`logits_processor`,
`process_logits`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import pytree
from jaxdecode.arrays import owned
from jaxdecode.config import GenerationConfig, StaticConfig
from jaxdecode.context import DecodeContext
from jaxdecode.processors.base import Chain, LogitsProcessor, chain
from jaxdecode.processors.grammar import Grammar, from_specs
from jaxdecode.processors.penalties import (
    bad_words_ids,
    frequency_presence_penalty,
    no_repeat_ngram_size,
    repetition_penalty,
    sequence_bias,
)
from jaxdecode.processors.rules import (
    begin_suppress_tokens,
    exponential_decay_length_penalty,
    forced_bos_token_id,
    forced_eos_token_id,
    min_length,
    min_new_tokens,
    remove_invalid_values,
    renormalize_logits,
    suppress_tokens,
)
from jaxdecode.processors.warpers import (
    epsilon_cutoff,
    eta_cutoff,
    min_p,
    temperature,
    top_h,
    top_k,
    top_p,
    typical_p,
)
from jaxdecode.processors.watermark import watermark

Array = jax.Array

__all__ = ["TracedConfig", "from_config", "split_config", "logits_processor", "process_logits"]


def _is_active(value: Any, neutral: float, below: bool = False) -> bool:
    """Whether a processor is present: per-row values and traced values always are."""
    if isinstance(value, jax.core.Tracer):
        return True
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim:
        return True  # per-row values: present, whatever the rows say
    return bool(arr < neutral) if below else bool(arr != neutral)


def _constraint_and_extra(
    config: GenerationConfig, tokenizer: Any, extra: LogitsProcessor | None
) -> list[LogitsProcessor]:
    """The config's output constraint (built with `tokenizer`), then the caller's
    processors; a `Grammar` without EOS ids gets the config's."""
    out: list[LogitsProcessor] = []
    parsed = config.constraints()
    if parsed is not None:
        names = ", ".join(sorted({s[0] for s in parsed[1] if s is not None}))
        if tokenizer is None:
            raise ValueError(
                f"{names} needs the model's tokenizer: generate with a CausalLM that has one, "
                "or pass jd.regex / jd.json_schema / jd.choice(..., tokenizer) as "
                "logits_processor"
            )
        out.append(from_specs(parsed, tokenizer, config.eos_ids))
    if extra is not None and not isinstance(extra, LogitsProcessor):
        raise TypeError(
            "logits_processor must be a jaxdecode LogitsProcessor or chain, got "
            f"{type(extra).__name__}"
        )
    for p in () if extra is None else chain(extra).processors:
        if isinstance(p, Grammar) and p.eos is None:
            if not config.eos_ids:
                raise ValueError(
                    "a Grammar processor needs eos_token_id: set it in the config or build the "
                    "processor with eos_token_id="
                )
            p = p.with_eos(config.eos_ids)
        out.append(p)
    return out


def from_config(
    config: GenerationConfig,
    *,
    tokenizer: Any = None,
    extra: LogitsProcessor | None = None,
) -> Chain:
    """The processor chain `generate` applies for `config`, in transformers' order
    (see README). The config must be validated. Over ~80 lines: one `if` per
    processor in that order, read top to bottom.

    Args:
        config: the validated config.
        tokenizer: the model's tokenizer, needed by `regex` / `json_schema` /
            `choices` (their automaton is built over its vocabulary).
        extra: the caller's processors (`generate(logits_processor=)`), placed
            where transformers puts a custom `logits_processor` list: after the
            config's processors, before the sampling warpers. The constraint
            goes there too, so that top-k/top-p truncate the allowed tokens.
    """
    eos = config.eos_ids
    procs: list[LogitsProcessor] = []
    if config.sequence_bias is not None:
        procs.append(sequence_bias(config.sequence_bias))
    if _is_active(config.repetition_penalty, 1.0):
        procs.append(
            repetition_penalty(
                config.repetition_penalty,
                form=config.repetition_penalty_form,
                prompt_ignore_length=config.prompt_ignore_length,
            )
        )
    if _is_active(config.frequency_penalty, 0.0) or _is_active(config.presence_penalty, 0.0):
        procs.append(frequency_presence_penalty(config.frequency_penalty, config.presence_penalty))
    if config.no_repeat_ngram_size > 0:
        procs.append(no_repeat_ngram_size(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        procs.append(bad_words_ids(config.bad_words_ids, eos_token_id=eos or None))
    # transformers turns min_new_tokens into min_length = prompt + min_new_tokens,
    # replacing any min_length: the min-new-tokens processor alone does that.
    if config.min_length > 0 and eos and config.min_new_tokens is None:
        procs.append(min_length(config.min_length, eos))
    if config.min_new_tokens and eos:
        procs.append(min_new_tokens(config.min_new_tokens, eos))
    if config.forced_bos_token_id is not None:
        procs.append(forced_bos_token_id(config.forced_bos_token_id))
    if config.forced_eos_token_id is not None:
        procs.append(forced_eos_token_id(config.forced_eos_token_id))
    if config.remove_invalid_values:
        procs.append(remove_invalid_values())
    if config.exponential_decay_length_penalty is not None and eos:
        procs.append(
            exponential_decay_length_penalty(
                config.exponential_decay_length_penalty, eos, max_steps=config.step_bound()
            )
        )
    if config.suppress_tokens is not None:
        procs.append(suppress_tokens(config.suppress_tokens))
    if config.begin_suppress_tokens is not None:
        procs.append(
            begin_suppress_tokens(
                config.begin_suppress_tokens,
                after_forced_bos=config.forced_bos_token_id is not None,
            )
        )
    procs.extend(_constraint_and_extra(config, tokenizer, extra))
    if config.do_sample:
        keep = config.min_tokens_to_keep()
        # Always present when sampling (x / 1.0 is exact), so that sweeping the
        # temperature from 1.0 does not change the program.
        procs.append(temperature(config.temperature))
        if config.top_h is not None:
            procs.append(top_h(config.top_h))
        if isinstance(config.top_k, jax.core.Tracer) or np.any(np.asarray(config.top_k) != 0):
            procs.append(top_k(config.top_k, min_tokens_to_keep=keep, method=config.top_k_method))
        if _is_active(config.top_p, 1.0, below=True):
            procs.append(top_p(config.top_p, min_tokens_to_keep=keep, method=config.top_p_method))
        if config.min_p is not None:
            procs.append(min_p(config.min_p, min_tokens_to_keep=keep))
        if _is_active(config.typical_p, 1.0, below=True):
            procs.append(typical_p(config.typical_p, min_tokens_to_keep=keep))
        if _is_active(config.epsilon_cutoff, 0.0):
            procs.append(epsilon_cutoff(config.epsilon_cutoff, min_tokens_to_keep=keep))
        if _is_active(config.eta_cutoff, 0.0):
            procs.append(eta_cutoff(config.eta_cutoff, min_tokens_to_keep=keep))
    # transformers: watermarking after all other processing (see its #34630).
    if config.watermarking_config is not None:
        procs.append(watermark(config.watermarking_config))
    if config.renormalize_logits:
        procs.append(renormalize_logits())
    return chain(*procs)


@pytree.dataclass
class TracedConfig:
    """The traced part of a config: the processor chain (its numbers are leaves),
    the length penalty, the stop strings' tables (`jaxdecode.search.stopping`,
    set by `generate`, which has the tokenizer) and classifier-free guidance's
    negative prompt and scale (`jaxdecode.search.loop.Guidance`, set by
    `generate`, which has the negative prompt)."""

    processor: Chain
    length_penalty: Array
    stop: Any = None
    guidance: Any = None
    # Speculative decoding's assistant_confidence_threshold, `[]` or `[batch]`.
    assistant_confidence: Any = None


def split_config(
    config: GenerationConfig, *, tokenizer: Any = None, extra: LogitsProcessor | None = None
) -> tuple[StaticConfig, TracedConfig]:
    """(hashable static part, pytree of traced values). Validates first;
    `tokenizer` and `extra` as in `from_config`."""
    static = config.static()
    traced = TracedConfig(
        processor=from_config(config, tokenizer=tokenizer, extra=extra),
        length_penalty=owned(config.length_penalty, jnp.float32),
    )
    return static, traced


def logits_processor(
    config: GenerationConfig | None = None, *, tokenizer: Any = None, **overrides: Any
) -> Chain:
    """The chain `generate` applies for `config` (see the README for the order);
    `tokenizer` builds a `regex` / `json_schema` / `choices` constraint.

    >>> logits_processor(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9))
    """
    config = (config or GenerationConfig()).replace(**overrides)
    config.validate()
    return from_config(config, tokenizer=tokenizer)


@jax.jit
def _apply(processor: Chain, scores: Array, ctx: DecodeContext) -> Array:
    return processor(scores, ctx)


def process_logits(
    scores: Any,
    input_ids: Any,
    config: GenerationConfig | LogitsProcessor,
    *,
    prompt_length: int | None = None,
    attention_mask: Any = None,
    tokenizer: Any = None,
) -> Array:
    """Applies what `generate` would apply at this step, outside any loop.

    Processor state (e.g. the repetition penalty's seen tokens) is built from
    `input_ids`, as the loop's incremental state would be at this point.

    Args:
        scores: `[batch, vocab]` raw logits for the next token (cast to float32).
        input_ids: `[batch, length]` everything so far: the (left-padded) prompt
            followed by the tokens generated.
        config: a `GenerationConfig` (its chain is built with `logits_processor`),
            or a processor / chain to apply as is.
        prompt_length: columns of `input_ids` that are the prompt (default: all).
        attention_mask: `[batch, >= prompt_length]` prompt mask (0 = left padding).
        tokenizer: builds the config's `regex` / `json_schema` / `choices`.

    Returns:
        `[batch, vocab]` float32 processed scores.
    """
    scores = owned(scores, jnp.float32)
    ids = np.array(input_ids, copy=True)
    if scores.ndim != 2 or ids.ndim != 2 or ids.shape[0] != scores.shape[0]:
        raise ValueError(
            f"scores must be [batch, vocab] and input_ids [batch, length] with the same batch, "
            f"got {scores.shape} and {ids.shape}"
        )
    length = ids.shape[1]
    if prompt_length is None:
        prompt_length = length
    if not 0 <= int(prompt_length) <= length:
        raise ValueError(f"prompt_length must be in [0, {length}], got {prompt_length}")
    if isinstance(config, GenerationConfig):
        config.validate(vocab_size=scores.shape[-1])
        processor = from_config(config, tokenizer=tokenizer)
        max_length = config.resolve_max_length(prompt_length)
    elif isinstance(config, LogitsProcessor):
        processor = config if isinstance(config, Chain) else chain(config)
        max_length = length + 1
    else:
        raise TypeError(f"config must be a GenerationConfig or a LogitsProcessor, got {config!r}")
    # The history goes in a buffer of the next power of two (columns past
    # `cur_len` are ignored by every processor), so calling this once per step
    # compiles once per doubling of the history, not once per step.
    width = max(16, 1 << (length - 1).bit_length())
    buffer = np.zeros((ids.shape[0], width), ids.dtype)
    buffer[:, :length] = ids
    ctx = DecodeContext.from_ids(
        buffer,
        vocab_size=scores.shape[-1],
        prompt_length=prompt_length,
        max_length=max_length,
        attention_mask=attention_mask,
        cur_len=length,
    )
    return _apply(processor, scores, ctx)
