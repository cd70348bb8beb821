"""Logits processors: small, pure, composable, in the style of optax.

Each processor is a frozen dataclass pytree with three pure functions (see
`base`): `init(ctx) -> state`, `__call__(logits, ctx, state) -> logits`,
`update(state, tokens) -> state`. Numeric hyper-parameters are leaves (scalar or
per row), so changing a value never recompiles.

>>> chain(repetition_penalty(1.2), temperature(0.7), top_k(50), top_p(0.9))

Rooms: `base` (protocol, `chain`, shared pieces), `warpers` (temperature and
truncation), `penalties` (history-reading penalties, with state), `rules`
(lengths, forcing, suppression), `grammar` (regex / JSON schema / choices as a
token automaton on the device; `automata` compiles them on the host),
`watermark` (green-list watermarking and its detector), `build`
(a `GenerationConfig` to its chain).
Semantics follow Hugging Face transformers 5 (see the README for the order that
`logits_processor` uses and for the few deliberate differences).
"""

from jaxdecode.processors.base import (
    Chain,
    LogitsProcessor,
    chain,
    processor_stages,
    stage_names,
)
from jaxdecode.processors.build import (
    TracedConfig,
    from_config,
    logits_processor,
    process_logits,
    split_config,
)
from jaxdecode.processors.grammar import Grammar, choice, grammar, json_schema, regex
from jaxdecode.processors.penalties import (
    FrequencyPresencePenalty,
    NoRepeatNGram,
    RepetitionPenalty,
    SequenceBias,
    bad_words_ids,
    frequency_penalty,
    frequency_presence_penalty,
    no_repeat_ngram_size,
    presence_penalty,
    repetition_penalty,
    sequence_bias,
)
from jaxdecode.processors.rules import (
    ExponentialDecayLengthPenalty,
    ForceTokens,
    MinLength,
    RemoveInvalidValues,
    Renormalize,
    SuppressTokens,
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
    EpsilonCutoff,
    EtaCutoff,
    MinP,
    Temperature,
    TopH,
    TopK,
    TopP,
    TypicalP,
    epsilon_cutoff,
    eta_cutoff,
    min_p,
    temperature,
    top_h,
    top_k,
    top_p,
    typical_p,
)
from jaxdecode.processors.watermark import (
    SynthIDDetection,
    SynthIDText,
    Watermark,
    WatermarkDetection,
    synthid_detect,
    synthid_text,
    watermark,
    watermark_detect,
)

__all__ = [
    # Protocol and composition.
    "LogitsProcessor",
    "Chain",
    "chain",
    "stage_names",
    "processor_stages",
    # From a config.
    "TracedConfig",
    "from_config",
    "split_config",
    "logits_processor",
    "process_logits",
    # Warpers.
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
    # Penalties.
    "RepetitionPenalty",
    "FrequencyPresencePenalty",
    "NoRepeatNGram",
    "SequenceBias",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "frequency_presence_penalty",
    "no_repeat_ngram_size",
    "sequence_bias",
    "bad_words_ids",
    # Rules.
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
    # Watermarking.
    "SynthIDDetection",
    "SynthIDText",
    "synthid_detect",
    "synthid_text",
    "Watermark",
    "WatermarkDetection",
    "watermark",
    "watermark_detect",
    # Output constraints.
    "Grammar",
    "regex",
    "json_schema",
    "choice",
    "grammar",
]
