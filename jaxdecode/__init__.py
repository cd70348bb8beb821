"""jaxdecode: pure, jit-compiled text decoding for JAX.

Processors compose like optax transforms (`chain(temperature(0.7), top_p(0.9))`),
choosers pick tokens, and `GenerationConfig` names every option as transformers
does. See the README for the order in which `generate` applies processors.
"""

from jaxdecode import sampling
from jaxdecode.config import (
    GenerationConfig,
    StaticConfig,
    TracedConfig,
    logits_processor,
    process_logits,
)
from jaxdecode.context import DecodeContext
from jaxdecode.processors import (
    Chain,
    LogitsProcessor,
    bad_words_ids,
    begin_suppress_tokens,
    chain,
    epsilon_cutoff,
    eta_cutoff,
    exponential_decay_length_penalty,
    forced_bos_token_id,
    forced_eos_token_id,
    frequency_penalty,
    frequency_presence_penalty,
    min_length,
    min_new_tokens,
    min_p,
    no_repeat_ngram_size,
    presence_penalty,
    remove_invalid_values,
    renormalize_logits,
    repetition_penalty,
    sequence_bias,
    suppress_tokens,
    temperature,
    top_k,
    top_p,
    typical_p,
)
from jaxdecode.sampling import categorical, greedy, split_keys

__version__ = "0.1.0"

__all__ = [
    "Chain",
    "DecodeContext",
    "GenerationConfig",
    "LogitsProcessor",
    "StaticConfig",
    "TracedConfig",
    "bad_words_ids",
    "begin_suppress_tokens",
    "categorical",
    "chain",
    "epsilon_cutoff",
    "eta_cutoff",
    "exponential_decay_length_penalty",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "frequency_penalty",
    "frequency_presence_penalty",
    "greedy",
    "logits_processor",
    "min_length",
    "min_new_tokens",
    "min_p",
    "no_repeat_ngram_size",
    "presence_penalty",
    "process_logits",
    "remove_invalid_values",
    "renormalize_logits",
    "repetition_penalty",
    "sampling",
    "sequence_bias",
    "split_keys",
    "suppress_tokens",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
]
