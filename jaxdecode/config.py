"""`GenerationConfig`: every decoding option, validated, with transformers' names.

Field names and defaults follow `transformers.GenerationConfig` (v5, with its
global defaults filled in: `top_k=50`, ...; `max_length=None` means 20 new
tokens, as transformers' default does), so a
`generation_config.json` from the hub reads and writes unchanged. Our additions:
`frequency_penalty`, `presence_penalty`, `prompt_ignore_length` (an argument
of transformers' repetition-penalty processor, not of its config), `seed`, `repetition_penalty_form`,
`top_k_method`, `top_p_method`, the output constraints `regex`,
`json_schema`, `choices`, and the log-probability outputs named as
vLLM's `SamplingParams`: `logprobs` (top-N alternatives per step),
`logprobs_mode`, `prompt_logprobs`, and `output_raw_logprobs`.

A config splits in two: a hashable `StaticConfig` (`static()`: shapes and which
code runs) and a pytree of traced values (`jaxdecode.processors.split_config`:
the processor chain, built next to the processors, whose numbers are leaves,
and the length penalty). Jitted functions take the first as a static argument
and the second as an ordinary argument, so changing a number never recompiles.

A module over ~500 lines: the field table, the checks of every field and their
interactions, and the static part read by the programs describe one object; split, a
field's rules would live in several files.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin, get_type_hints

import jax
import numpy as np

from jaxdecode.errors import ConfigError
from jaxdecode.validation import (
    CONSTRAINT_FIELDS,
    check_range,
    eos_ids,
    normalize_schema,
    parse_constraints,
    parse_sequences,
)

Array = jax.Array

__all__ = [
    "CONSTRAINT_FIELDS",
    "FIELD_CHOICES",
    "FIELD_TYPES",
    "HF_FIELDS",
    "PER_ROW_FIELDS",
    "SEED_MAX",
    "GenerationConfig",
    "QuantizedCacheConfig",
    "StaticConfig",
    "SynthIDTextWatermarkingConfig",
    "WatermarkingConfig",
    "as_watermarking_config",
]

# Seeds are 32-bit: `jax.random.key` keeps only the low 32 bits of larger seeds
# (without x64), so two larger seeds would silently draw the same numbers.
SEED_MAX = 2**32 - 1

# What transformers generates when neither max_length nor max_new_tokens is set.
DEFAULT_NEW_TOKENS = 20

# Types of the fields. A per-row value is a scalar, or one value per row `[batch]`.
PerRowFloat = float | Sequence[float] | Array
PerRowInt = int | Sequence[int] | Array
TokenIds = int | Sequence[int]  # one token id, or several
TokenSequences = Sequence[Sequence[int]]  # [[ids], [ids], ...]
SequenceBias = Mapping[tuple[int, ...], float] | Sequence[tuple[Sequence[int], float]]
# Output constraints: one for every row, or a list with one entry per row (None:
# that row is free).
Regex = str | Sequence[str | None]
JsonSchema = Mapping[str, object] | str | Sequence[Mapping[str, object] | str | None]
Choices = Sequence[str] | Sequence[Sequence[str] | None]


SEEDING_SCHEMES = ("lefthash", "selfhash")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WatermarkingConfig:
    """transformers' `WatermarkingConfig`, with its field names and defaults.

    Attributes:
        greenlist_ratio: fraction of the vocabulary in each green list, in (0, 1).
        bias: added to the green tokens' logits; a number or one per row.
        hashing_key: the secret key (an integer in [0, 2**63)).
        seeding_scheme: "lefthash" (green list from the previous token) or
            "selfhash" (from the candidate token and the `context_width - 1`
            before it).
        context_width: tokens of context in the seed (>= 1).
    """

    greenlist_ratio: float = 0.25
    bias: float | tuple[float, ...] = 2.0
    hashing_key: int = 15485863
    seeding_scheme: str = "lefthash"
    context_width: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.bias, (list, np.ndarray)):
            object.__setattr__(self, "bias", tuple(float(b) for b in np.asarray(self.bias)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WatermarkingConfig:
        """From transformers' `to_dict()` form; unknown keys raise ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"watermarking_config has unknown key(s) {', '.join(unknown)}; a "
                f"WatermarkingConfig takes {', '.join(sorted(names))}"
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """transformers' `to_dict()` form."""
        out = dataclasses.asdict(self)
        if isinstance(out["bias"], tuple):
            out["bias"] = list(out["bias"])
        return out

    def validate(self) -> WatermarkingConfig:
        """ConfigError naming the field, its value and what is allowed."""
        name = "watermarking_config"
        if self.seeding_scheme not in SEEDING_SCHEMES:
            raise ConfigError(
                f"{name}.seeding_scheme must be one of {SEEDING_SCHEMES}, got {self.seeding_scheme!r}"
            )
        ratio = self.greenlist_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ConfigError(f"{name}.greenlist_ratio must be in (0, 1), got {ratio!r}")
        key = self.hashing_key
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= key < 2**63:
            raise ConfigError(f"{name}.hashing_key must be an integer in [0, 2**63), got {key!r}")
        width = self.context_width
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
            raise ConfigError(f"{name}.context_width must be an integer >= 1, got {width!r}")
        bias = np.asarray(self.bias, dtype=object)
        if bias.ndim > 1 or not all(
            isinstance(b, (int, float, np.number)) and not isinstance(b, bool) and math.isfinite(b)
            for b in bias.reshape(-1)
        ):
            raise ConfigError(
                f"{name}.bias must be a finite number or one per row, got {self.bias!r}"
            )
        return self

    def greenlist_size(self, vocab_size: int) -> int:
        """transformers' `int(vocab_size * greenlist_ratio)`."""
        return int(vocab_size * self.greenlist_ratio)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthIDTextWatermarkingConfig:
    """transformers' `SynthIDTextWatermarkingConfig` (SynthID-Text, Dathathri et
    al., Nature 2024), with its field names and defaults.

    Attributes:
        ngram_len: tokens hashed per g-value (the previous `ngram_len - 1` and
            the candidate), >= 1.
        keys: one integer key per watermarking layer (the depth).
        context_history_size: how many previous contexts a row remembers; a
            context seen before is not watermarked again.
        sampling_table_seed: seed of the random 0/1 table of g-values.
        sampling_table_size: its size, in [1, 2**24].
        skip_first_ngram_calls: leave the first `ngram_len - 1` steps alone.
        debug_mode: replace the scores by ones before watermarking (to test).
    """

    ngram_len: int
    keys: tuple[int, ...]
    context_history_size: int = 1024
    sampling_table_seed: int = 0
    sampling_table_size: int = 2**16
    skip_first_ngram_calls: bool = False
    debug_mode: bool = False

    def __post_init__(self) -> None:
        keys = self.keys
        if isinstance(keys, (list, tuple, np.ndarray)):
            keys = tuple(int(k) if isinstance(k, (int, np.integer)) else k for k in keys)
        object.__setattr__(self, "keys", keys)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SynthIDTextWatermarkingConfig:
        """From transformers' `to_dict()` form; unknown keys raise ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted({"ngram_len", "keys"} - set(data))
        if unknown or missing:
            raise ConfigError(
                f"watermarking_config (SynthID) has unknown key(s) {unknown} or lacks {missing}; "
                f"it takes {', '.join(sorted(names))}"
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """transformers' `to_dict()` form."""
        out = dataclasses.asdict(self)
        out["keys"] = list(self.keys)
        return out

    def validate(self) -> SynthIDTextWatermarkingConfig:
        """ConfigError naming the field, its value and what is allowed."""
        name = "watermarking_config"
        _check_int(f"{name}.ngram_len", self.ngram_len, 1)
        _check_int(f"{name}.context_history_size", self.context_history_size, 1)
        _check_int(f"{name}.sampling_table_seed", self.sampling_table_seed, 0)
        size = self.sampling_table_size
        if (
            isinstance(size, bool)
            or not isinstance(size, (int, np.integer))
            or not 1 <= size <= 2**24
        ):
            raise ConfigError(
                f"{name}.sampling_table_size must be an integer in [1, 2**24], got {size!r}"
            )
        keys = self.keys
        if (
            not isinstance(keys, tuple)
            or not keys
            or any(
                isinstance(k, bool) or not isinstance(k, int) or not -(2**63) <= k < 2**63
                for k in keys
            )
        ):
            raise ConfigError(
                f"{name}.keys must be a non-empty list of int64 integers, got {keys!r}"
            )
        for flag in ("skip_first_ngram_calls", "debug_mode"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise ConfigError(
                    f"{name}.{flag} must be True or False, got {getattr(self, flag)!r}"
                )
        return self


# `cache_implementation` values. transformers' names for its own float caches
# ("dynamic", "static", and the sliding-window ones a Gemma 2 or 3
# generation_config.json names) all mean the one cache jaxdecode keeps: a static-shape
# float cache, window-sized rings for sliding layers. "quantized": `QuantizedKVCache`.
# transformers' offloaded caches (host memory) are refused by name.
CacheImplementation = Literal["dynamic", "static", "sliding_window", "hybrid", "quantized"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedCacheConfig:
    """`cache_config` of `cache_implementation="quantized"`, resolved
    (`GenerationConfig.quantized_cache()`); transformers' keys.

    Keys and values are quantized per token and head over groups of `q_group_size`
    features (all of `head_dim` by default), asymmetrically by each group's
    minimum and maximum (`jaxdecode.quantized_cache`). transformers' keys that
    ask for something else are refused by name: `axis_key` / `axis_value` other
    than 0 (per-channel scales over tokens: a static cache written token by token
    cannot re-scale the tokens it already holds), `residual_length` other than 0
    (transformers keeps up to that many recent tokens in float; here every token
    is quantized, so that a token's logits do not depend on how the calls split
    the text), and a `backend` other than "quanto" (whose rule, per-group
    min/max with a zero point, this is; "hqq" optimises its zero points, "fp8" is
    another format).

    Attributes:
        nbits: bits per code: 8, 4 (transformers' default) or 2. Static.
        q_group_size: features per scale, dividing the model's head_dim (None:
            head_dim, one scale per token and head). Static.
    """

    nbits: int = 4
    q_group_size: int | None = None

    KEYS = ("nbits", "q_group_size", "axis_key", "axis_value", "residual_length", "backend")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> QuantizedCacheConfig:
        """From `cache_config` (a dict, or its frozen pairs); ConfigError naming
        a key transformers does not have or a value this cache cannot honour."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise ConfigError(
                f"cache_config has unknown key(s) {', '.join(map(str, unknown))}; the quantized "
                f"cache takes {', '.join(cls.KEYS)}"
            )
        nbits = data.get("nbits")
        if nbits is not None and (isinstance(nbits, bool) or nbits not in (2, 4, 8)):
            raise ConfigError(f"cache_config nbits must be 2, 4 or 8, got {nbits!r}")
        group = data.get("q_group_size")
        if group is not None:
            _check_int("cache_config q_group_size", group, 1)
        for name in ("axis_key", "axis_value"):
            if data.get(name) not in (None, 0):
                raise ConfigError(
                    f"cache_config {name} must be 0 (scales per token and head, over its "
                    f"features), got {data[name]!r}: per-channel scales over tokens cannot be "
                    "kept in a cache written one token at a time"
                )
        if data.get("residual_length") not in (None, 0):
            raise ConfigError(
                f"cache_config residual_length must be 0, got {data['residual_length']!r}: every "
                "token is quantized (no float residual of recent tokens), so a token's logits do "
                "not depend on how the prompt and steps were split into calls"
            )
        if data.get("backend") not in (None, "quanto"):
            raise ConfigError(
                f"cache_config backend must be 'quanto' (per-group min/max with a zero point, "
                f"the rule of jaxdecode's quantized cache) or unset, got {data['backend']!r}"
            )
        return cls(nbits=4 if nbits is None else int(nbits), q_group_size=group)


def as_watermarking_config(value: Any) -> WatermarkingConfig | SynthIDTextWatermarkingConfig:
    """A `WatermarkingConfig` / `SynthIDTextWatermarkingConfig` from itself, from
    transformers' object, or from its dict (SynthID's has `ngram_len`), validated."""
    if not isinstance(
        value, (Mapping, WatermarkingConfig, SynthIDTextWatermarkingConfig)
    ) and callable(getattr(value, "to_dict", None)):
        value = value.to_dict()  # transformers' own config objects
    if isinstance(value, Mapping):
        cls = SynthIDTextWatermarkingConfig if "ngram_len" in value else WatermarkingConfig
        value = cls.from_dict(value)
    if not isinstance(value, (WatermarkingConfig, SynthIDTextWatermarkingConfig)):
        raise ConfigError(
            "watermarking_config must be a dict, a jd.WatermarkingConfig or a "
            f"jd.SynthIDTextWatermarkingConfig, got {type(value).__name__}"
        )
    return value.validate()


def _field(default: Any, *, hf: bool = True, per_row: bool = False) -> Any:
    """A `GenerationConfig` field. Metadata, read by `to_hf`/`from_hf` and the CLI:
    `hf` (transformers has a field of that name), `per_row` (a traced value that may
    be one value per row; rows differing only in such values share one program)."""
    return dataclasses.field(default=default, metadata={"hf": hf, "per_row": per_row})


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """All options of `generate`, named and defaulted as in transformers.

    Numeric sampling/penalty values may be a scalar or one value per row (a
    list or array of length batch). Call `validate()` (done by every entry point)
    to get a `ConfigError` (a `ValueError`) naming any bad field.
    """

    # Length.
    max_length: int | None = _field(None)
    max_new_tokens: int | None = _field(None)
    min_length: int = _field(0)
    min_new_tokens: int | None = _field(None)
    # Strategy.
    do_sample: bool = _field(False)
    num_beams: int = _field(1)
    early_stopping: bool | Literal["never"] = _field(False)
    length_penalty: float = _field(1.0)
    num_return_sequences: int = _field(1)
    # Warpers (sampling only).
    temperature: PerRowFloat = _field(1.0, per_row=True)
    top_h: PerRowFloat | None = _field(None, per_row=True)
    top_k: PerRowInt = _field(50, per_row=True)
    top_p: PerRowFloat = _field(1.0, per_row=True)
    min_p: PerRowFloat | None = _field(None, per_row=True)
    typical_p: PerRowFloat = _field(1.0, per_row=True)
    epsilon_cutoff: PerRowFloat = _field(0.0, per_row=True)
    eta_cutoff: PerRowFloat = _field(0.0, per_row=True)
    # Processors.
    repetition_penalty: PerRowFloat = _field(1.0, per_row=True)
    prompt_ignore_length: PerRowInt = _field(0, hf=False, per_row=True)
    no_repeat_ngram_size: int = _field(0)
    bad_words_ids: TokenSequences | None = _field(None)
    sequence_bias: SequenceBias | None = _field(None)
    forced_bos_token_id: int | None = _field(None)
    forced_eos_token_id: TokenIds | None = _field(None)
    remove_invalid_values: bool = _field(False)
    exponential_decay_length_penalty: tuple[int, float] | None = _field(None)
    suppress_tokens: TokenIds | None = _field(None)
    begin_suppress_tokens: TokenIds | None = _field(None)
    renormalize_logits: bool = _field(False)
    # Classifier-free guidance (the negative prompt is `generate`'s
    # `negative_prompt_ids` / `negative_prompt_attention_mask`); None or 1: off.
    guidance_scale: PerRowFloat | None = _field(None, per_row=True)
    # Watermarking (jaxdecode.processors.watermark): applied after every other
    # processor but renormalisation, greedy or sampling.
    watermarking_config: (
        WatermarkingConfig | SynthIDTextWatermarkingConfig | Mapping[str, object] | None
    ) = _field(None)
    # Outputs.
    output_scores: bool = _field(False)
    output_logits: bool = _field(False)
    return_dict_in_generate: bool = _field(False)
    # Special tokens.
    pad_token_id: int | None = _field(None)
    bos_token_id: int | None = _field(None)
    eos_token_id: TokenIds | None = _field(None)
    stop_strings: str | Sequence[str] | None = _field(None)
    # Speculative decoding (jaxdecode.search.speculative): K draft tokens per
    # round from prompt lookup, or from `generate(assistant_model=...)`.
    prompt_lookup_num_tokens: int | None = _field(None)
    max_matching_ngram_size: int | None = _field(None)
    num_assistant_tokens: int = _field(20)
    # How K changes between rounds, per row (transformers' rule): "constant", or
    # +2 after a round whose drafts were all accepted, else -1 (at least 1).
    num_assistant_tokens_schedule: Literal["constant", "heuristic", "heuristic_transient"] = _field(
        "constant"
    )
    # The draft model stops drafting a row after a token it gives less than this
    # probability (0 or None: never); transformers' default 0.4.
    assistant_confidence_threshold: PerRowFloat | None = _field(0.4, per_row=True)
    # jaxdecode additions.
    frequency_penalty: PerRowFloat = _field(0.0, hf=False, per_row=True)
    presence_penalty: PerRowFloat = _field(0.0, hf=False, per_row=True)
    seed: int | None = _field(None, hf=False)
    repetition_penalty_form: Literal["hf", "ctrl"] = _field("hf", hf=False)
    top_k_method: Literal["exact", "fast"] = _field("exact", hf=False)
    top_p_method: Literal["exact", "fast"] = _field("exact", hf=False)
    # Output constraints (need the model's tokenizer; see jaxdecode.processors.grammar).
    regex: Regex | None = _field(None, hf=False)
    json_schema: JsonSchema | None = _field(None, hf=False)
    choices: Choices | None = _field(None, hf=False)
    # Log-probability outputs (names as vLLM's SamplingParams; off by default, so
    # the program computes none of it unless asked).
    output_raw_logprobs: bool = _field(False, hf=False)
    logprobs: int | None = _field(None, hf=False)
    logprobs_mode: Literal["processed", "raw"] = _field("processed", hf=False)
    prompt_logprobs: int | None = _field(None, hf=False)
    # The KV cache (transformers' names): "quantized" stores the full-attention
    # layers' keys and values in `cache_config["nbits"]` bits (QuantizedCacheConfig).
    cache_implementation: CacheImplementation | None = _field(None)
    cache_config: Mapping[str, object] | None = _field(None)

    def __post_init__(self) -> None:
        marking = self.watermarking_config
        if not isinstance(
            marking, (Mapping, WatermarkingConfig, SynthIDTextWatermarkingConfig)
        ) and callable(getattr(marking, "to_dict", None)):
            marking = marking.to_dict()  # transformers' own config objects
        if isinstance(marking, Mapping):
            cls = SynthIDTextWatermarkingConfig if "ngram_len" in marking else WatermarkingConfig
            object.__setattr__(self, "watermarking_config", cls.from_dict(marking))
        # A JSON schema is kept as its compact JSON text (hashable, key order kept).
        schema = self.json_schema
        if isinstance(schema, Mapping):
            object.__setattr__(self, "json_schema", _schema_text(schema))
        elif isinstance(schema, (list, tuple)):
            texts = tuple(_schema_text(s) if isinstance(s, Mapping) else s for s in schema)
            object.__setattr__(self, "json_schema", texts)
        # Lists and NumPy arrays become tuples so that configs compare and hash by
        # content (a config is static data for jit; see CausalLM).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                value = tuple((_freeze(k), _freeze(v)) for k, v in value.items())
            else:
                value = _freeze(value)
            object.__setattr__(self, f.name, value)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    # ------------------------------------------------------------------ #
    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with `changes`; unknown names raise ConfigError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown GenerationConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    @property
    def pad_id(self) -> int:
        """The id finished rows emit: pad_token_id, else the first EOS id (as
        transformers falls back), else 0."""
        if self.pad_token_id is not None:
            return int(self.pad_token_id)
        return self.eos_ids[0] if self.eos_ids else 0

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS ids as a tuple (empty when unset)."""
        return eos_ids(self.eos_token_id)

    def validate(self, vocab_size: int | None = None) -> GenerationConfig:
        """Raises ConfigError naming the field, its value and the allowed range.

        Args:
            vocab_size: when given, every token id must be `< vocab_size`.

        Returns:
            self, so that calls chain.

        A function over ~80 lines: one check per field family, in the order a
        reader looks for them; each names the field, its value and what is
        allowed.
        """
        _int = _check_int
        if self.max_length is not None:
            _int("max_length", self.max_length, 1)
        if self.max_new_tokens is not None:
            _int("max_new_tokens", self.max_new_tokens, 1)
        _int("min_length", self.min_length, 0)
        if self.min_new_tokens is not None:
            _int("min_new_tokens", self.min_new_tokens, 0)
        _int("num_beams", self.num_beams, 1)
        _int("num_return_sequences", self.num_return_sequences, 1)
        _int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if self.prompt_lookup_num_tokens is not None:
            _int("prompt_lookup_num_tokens", self.prompt_lookup_num_tokens, 1)
        if self.max_matching_ngram_size is not None:
            _int("max_matching_ngram_size", self.max_matching_ngram_size, 1)
        _int("num_assistant_tokens", self.num_assistant_tokens, 1)
        if self.assistant_confidence_threshold is not None:
            check_range(
                "assistant_confidence_threshold",
                self.assistant_confidence_threshold,
                lo=0.0,
                hi=1.0,
            )
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0)
        if self.prompt_logprobs is not None:
            _int("prompt_logprobs", self.prompt_logprobs, 0)
        for name in (
            "do_sample",
            "remove_invalid_values",
            "renormalize_logits",
            "output_scores",
            "output_logits",
            "output_raw_logprobs",
            "return_dict_in_generate",
        ):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(
                f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
        if np.ndim(self.length_penalty) != 0:
            raise ConfigError(f"length_penalty must be a scalar, got {self.length_penalty!r}")
        check_range("length_penalty", self.length_penalty)
        if self.do_sample:
            check_range("temperature", self.temperature, lo=0.0, lo_open=True)
        else:
            check_range("temperature", self.temperature, lo=0.0)
        check_range("top_k", self.top_k, lo=0, integer=True)
        check_range("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        if self.top_h is not None:
            check_range("top_h", self.top_h, lo=0.0, hi=1.0, lo_open=True)
        if self.min_p is not None:
            check_range("min_p", self.min_p, lo=0.0, hi=1.0)
        # 1.0 (the default) turns typical sampling off; per row the processor is
        # present for every row, and takes masses in (0, 1) only.
        per_row_typical = np.ndim(self.typical_p) == 1
        check_range(
            "typical_p" + (" (per row)" if per_row_typical else ""),
            self.typical_p,
            lo=0.0,
            hi=1.0,
            lo_open=True,
            hi_open=per_row_typical,
        )
        check_range("epsilon_cutoff", self.epsilon_cutoff, lo=0.0, hi=1.0, hi_open=True)
        check_range("eta_cutoff", self.eta_cutoff, lo=0.0, hi=1.0, hi_open=True)
        check_range("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        check_range("prompt_ignore_length", self.prompt_ignore_length, lo=0, integer=True)
        if self.guidance_scale is not None:
            check_range("guidance_scale", self.guidance_scale)
        check_range("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        check_range("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, (int, np.integer))
            or not 0 <= self.seed <= SEED_MAX
        ):
            raise ConfigError(f"seed must be an integer in [0, {SEED_MAX}], got {self.seed!r}")
        for name, allowed in FIELD_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.watermarking_config is not None:
            as_watermarking_config(self.watermarking_config)
        if self.cache_implementation not in (None, *get_args(CacheImplementation)):
            raise ConfigError(
                f"cache_implementation must be None or one of {get_args(CacheImplementation)}, "
                f"got {self.cache_implementation!r} (transformers' offloaded caches are not "
                "supported)"
            )
        self.quantized_cache()
        self._validate_token_ids(vocab_size)
        self._validate_logprobs(vocab_size)
        self._validate_combinations()
        self._validate_decay_penalty()
        parsed = self.constraints()
        self._validate_rows(parsed)
        if parsed is not None and not self.eos_ids:
            names = ", ".join(sorted({spec[0] for spec in parsed[1] if spec is not None}))
            raise ConfigError(
                f"{names} needs eos_token_id (a constrained row ends with EOS once complete)"
            )
        return self

    def _validate_rows(self, parsed: Any) -> None:
        """Per-row values (and per-row constraint lists, `parsed` as returned by
        `constraints()`) all have one length."""
        lengths = {
            name: np.shape(getattr(self, name))[0]
            for name in PER_ROW_FIELDS
            if getattr(self, name) is not None and np.ndim(getattr(self, name)) == 1
        }
        if parsed is not None and parsed[0]:
            lengths["regex / json_schema / choices"] = len(parsed[1])
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{name} has {n}" for name, n in lengths.items())
            raise ConfigError(
                f"per-row values need one value per prompt row, the same count for every "
                f"field: {listed}"
            )

    def constraints(self) -> tuple[bool, list[tuple[str, Any] | None]] | None:
        """The output constraint of `regex` / `json_schema` / `choices`: None, or
        `(per_row, specs)` with `specs` `(field, value)` pairs (one for every row,
        or one per row, None for a free row). Raises ConfigError when malformed."""
        return parse_constraints({name: getattr(self, name) for name in CONSTRAINT_FIELDS})

    def _validate_logprobs(self, vocab_size: int | None) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if vocab_size is not None and n is not None and n > vocab_size:
                raise ConfigError(f"{name} must be <= the vocabulary size {vocab_size}, got {n}")
        if self.num_beams > 1:
            for name, used in (
                ("output_raw_logprobs", self.output_raw_logprobs),
                ("logprobs", bool(self.logprobs)),
            ):
                if used:
                    raise ConfigError(
                        f"{name} applies to greedy search and sampling (num_beams=1), got "
                        f"num_beams={self.num_beams}; beam search returns token_logprobs and "
                        "sequences_scores"
                    )

    def _validate_decay_penalty(self) -> None:
        value = self.exponential_decay_length_penalty
        if value is None:
            return
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ConfigError(
                "exponential_decay_length_penalty must be a (start_index, decay_factor) pair, "
                f"got {value!r}"
            )
        check_range(
            "exponential_decay_length_penalty[0] (start_index)", value[0], lo=0, integer=True
        )
        check_range("exponential_decay_length_penalty[1] (decay_factor)", value[1], lo=1.0)

    def _validate_token_ids(self, vocab_size: int | None) -> None:
        def check(name: str, ids: Any) -> None:
            if isinstance(ids, (list, tuple)) and any(isinstance(t, (list, tuple)) for t in ids):
                raise ConfigError(f"{name} must be a token id or a flat list of them, got {ids!r}")
            for t in np.asarray(ids, dtype=object).reshape(-1):
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
                    raise ConfigError(f"{name} must hold token ids (integers >= 0), got {ids!r}")
                if vocab_size is not None and t >= vocab_size:
                    raise ConfigError(
                        f"{name} contains {int(t)}, outside the vocabulary [0, {vocab_size - 1}]"
                    )

        for name in ("pad_token_id", "bos_token_id", "forced_bos_token_id"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (list, tuple)):
                    raise ConfigError(f"{name} must be a single token id, got {value!r}")
                check(name, value)
        for name in (
            "eos_token_id",
            "forced_eos_token_id",
            "suppress_tokens",
            "begin_suppress_tokens",
        ):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (list, tuple)) and not value:
                    raise ConfigError(f"{name} must not be an empty list")
                check(name, value)
        if self.bad_words_ids is not None:
            words = self.bad_words_ids
            for word in words if isinstance(words, (list, tuple)) and words else [None]:
                if not isinstance(word, (list, tuple)):
                    raise ConfigError(
                        f"bad_words_ids must be a list of token id lists, got {self.bad_words_ids!r}"
                    )
                if not word:
                    raise ConfigError(
                        f"bad_words_ids must be non-empty token id lists, got "
                        f"{self.bad_words_ids!r}"
                    )
                check("bad_words_ids", list(word))
        if self.sequence_bias is not None:
            for ids, _ in parse_sequences("sequence_bias", self.sequence_bias):
                check("sequence_bias", list(ids))

    def _validate_combinations(self) -> None:
        beams = self.num_beams
        if beams == 1 and not self.do_sample and self.num_return_sequences != 1:
            raise ConfigError(
                "num_return_sequences must be 1 for greedy search (num_beams=1, do_sample=False), "
                f"got {self.num_return_sequences}; use do_sample=True or num_beams >= it"
            )
        if self.stop_strings is not None:
            strings = (
                [self.stop_strings] if isinstance(self.stop_strings, str) else self.stop_strings
            )
            if not strings or any(not isinstance(x, str) or not x for x in strings):
                raise ConfigError(
                    "stop_strings must be a string or a non-empty list of non-empty strings, "
                    f"got {self.stop_strings!r}"
                )
            if beams > 1:
                raise ConfigError(
                    "stop_strings works with greedy search and sampling (num_beams=1), got "
                    f"num_beams={beams}"
                )
        if beams > 1 and self.guided():
            raise ConfigError(
                "guidance_scale (classifier-free guidance) works with greedy search and "
                f"sampling (num_beams=1), got num_beams={beams}"
            )
        if self.guided() and self.prompt_lookup_num_tokens is not None:
            raise ConfigError(
                "guidance_scale (classifier-free guidance) and prompt_lookup_num_tokens "
                "(speculative decoding) cannot be combined"
            )
        if beams > 1 and self.prompt_lookup_num_tokens is not None:
            raise ConfigError(
                "prompt_lookup_num_tokens (speculative decoding) works with greedy search and "
                f"sampling (num_beams=1), got num_beams={beams}"
            )
        if beams > 1 and self.num_return_sequences > beams:
            raise ConfigError(
                f"num_return_sequences must be <= num_beams={beams}, got {self.num_return_sequences}"
            )
        if (
            self.max_new_tokens is not None
            and self.min_new_tokens is not None
            and self.min_new_tokens > self.max_new_tokens
        ):
            raise ConfigError(
                f"min_new_tokens={self.min_new_tokens} must be <= max_new_tokens={self.max_new_tokens}"
            )
        if (
            self.max_new_tokens is None
            and self.max_length is not None
            and self.min_length > self.max_length
        ):
            raise ConfigError(
                f"min_length={self.min_length} must be <= max_length={self.max_length}"
            )
        needs_eos = {
            "min_length": self.min_length > 0,
            "min_new_tokens": bool(self.min_new_tokens),
            "exponential_decay_length_penalty": self.exponential_decay_length_penalty is not None,
        }
        for name, used in needs_eos.items():
            if used and self.eos_token_id is None:
                raise ConfigError(f"{name} needs eos_token_id to be set (it acts on the EOS logit)")
        if isinstance(self.top_k, jax.core.Tracer):
            return
        if self.top_k_method == "fast" and self.do_sample:
            k = np.asarray(self.top_k)
            if np.any(k > 4096):
                raise ConfigError(
                    f"top_k must be <= 4096 with top_k_method='fast', got {self.top_k!r}; "
                    "use top_k_method='exact'"
                )
        if (
            np.ndim(self.top_k) == 1
            and np.any(np.asarray(self.top_k) == 0)
            and not np.all(np.asarray(self.top_k) == 0)
        ):
            raise ConfigError("top_k per row must be all > 0 or all 0 (0 disables top-k)")

    # ------------------------------------------------------------------ #
    def quantized_cache(self) -> QuantizedCacheConfig | None:
        """The quantized cache's settings with `cache_implementation="quantized"`,
        else None (the float cache). ConfigError for a `cache_config` it cannot
        honour, or one given without `cache_implementation="quantized"`."""
        try:  # a dict, frozen into (key, value) pairs by __post_init__
            data = dict(self.cache_config or ())
        except (TypeError, ValueError):
            raise ConfigError(
                f"cache_config must be a dict (e.g. {{'nbits': 8}}), got {self.cache_config!r}"
            ) from None
        if self.cache_implementation != "quantized":
            if data:
                raise ConfigError(
                    "cache_config configures cache_implementation='quantized', got "
                    f"cache_implementation={self.cache_implementation!r}"
                )
            return None
        return QuantizedCacheConfig.from_dict(data)

    def guided(self) -> bool:
        """Whether classifier-free guidance runs: `guidance_scale` set and not the
        scalar 1 (per-row values always run it, as traced values do)."""
        scale = self.guidance_scale
        if scale is None:
            return False
        if isinstance(scale, jax.core.Tracer) or np.ndim(scale):
            return True
        return float(scale) != 1.0

    def min_tokens_to_keep(self) -> int:
        """What transformers protects in the warpers: 1, or 1 + #EOS in beam sampling."""
        if self.num_beams > 1:
            return len(self.eos_ids) + 1 if self.eos_token_id is not None else 2
        return 1

    # ------------------------------------------------------------------ #
    def step_bound(self) -> int:
        """An upper bound on generated tokens, to size per-step tables."""
        if self.max_new_tokens is not None:
            return int(self.max_new_tokens)
        return DEFAULT_NEW_TOKENS if self.max_length is None else int(self.max_length)

    def resolve_max_length(self, prompt_length: int) -> int:
        """Total length: `prompt_length + max_new_tokens`, else `max_length`, else
        `prompt_length + 20` (transformers' default of 20 counts new tokens)."""
        if self.max_new_tokens is not None:
            return int(prompt_length) + int(self.max_new_tokens)
        if self.max_length is None:
            return int(prompt_length) + DEFAULT_NEW_TOKENS
        return int(self.max_length)

    def static(self) -> StaticConfig:
        """The hashable part: what a compiled program reads (shapes, which code
        runs), nothing else, so that configs differing elsewhere share programs.
        The length is not here: the plan carries the number of new tokens, so
        `max_length=prompt+8` and `max_new_tokens=8` are one program. Validates
        first."""
        self.validate()
        return StaticConfig(
            do_sample=bool(self.do_sample),
            num_beams=int(self.num_beams),
            num_return_sequences=int(self.num_return_sequences),
            # Read by beam search only, and the mode by the top-N output only.
            early_stopping=self.early_stopping if self.num_beams > 1 else False,
            output_scores=bool(self.output_scores),
            output_logits=bool(self.output_logits),
            output_raw_logprobs=bool(self.output_raw_logprobs),
            logprobs=int(self.logprobs or 0),
            logprobs_mode=self.logprobs_mode if self.logprobs else "processed",
            prompt_logprobs=-1 if self.prompt_logprobs is None else int(self.prompt_logprobs),
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )

    # ------------------------------------------------------------------ #
    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | os.PathLike[str]) -> GenerationConfig:
        """Reads a transformers generation config: a dict, a `generation_config.json`
        path, or a directory holding one. Unknown keys are ignored; `None` means the
        default."""
        if isinstance(source, Mapping):
            data = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "generation_config.json")
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"generation config not found: {path}") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"generation config {path} is not valid JSON: {e}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and v is not None}
        bias = kwargs.get("sequence_bias")
        if isinstance(bias, list):
            kwargs["sequence_bias"] = [[list(ids), float(b)] for ids, b in bias]
        elif isinstance(bias, dict):  # transformers writes {(ids,): bias} with "(3, 4)" keys
            kwargs["sequence_bias"] = {
                _parse_key("sequence_bias", k): float(v) for k, v in bias.items()
            }
        if isinstance(kwargs.get("exponential_decay_length_penalty"), list):
            kwargs["exponential_decay_length_penalty"] = tuple(
                kwargs["exponential_decay_length_penalty"]
            )
        return cls(**kwargs).validate()

    def to_hf(self) -> dict[str, Any]:
        """The non-default fields as a `generation_config.json` dict.

        transformers fields use their own names; our additions are written under
        theirs (transformers keeps unknown keys as attributes)."""
        default = GenerationConfig()
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, jax.Array):
                value = np.asarray(value).tolist()
            if isinstance(value, (WatermarkingConfig, SynthIDTextWatermarkingConfig)):
                out[f.name] = value.to_dict()
                continue
            if f.name == "cache_config" and value is not None:  # frozen pairs -> dict
                out[f.name] = dict(value)
                continue
            if value != getattr(default, f.name):
                out[f.name] = _thaw(value)
        return out


# Derived from the dataclass (one list of fields): transformers' names, the
# fields that take one value per row, and the allowed values of `Literal` fields.
FIELD_TYPES: dict[str, Any] = get_type_hints(GenerationConfig)
HF_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(GenerationConfig) if f.metadata["hf"]
)
PER_ROW_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(GenerationConfig) if f.metadata["per_row"]
)
# `Literal[...]` fields: their allowed values.
FIELD_CHOICES: dict[str, tuple[Any, ...]] = {
    name: get_args(t) for name, t in FIELD_TYPES.items() if get_origin(t) is Literal
}


def _schema_text(schema: Mapping[str, Any]) -> Any:
    """A schema dict as JSON text; left as is (for `validate` to report) when it
    holds values JSON cannot write."""
    try:
        return normalize_schema(schema)
    except ValueError:
        return schema


def _parse_key(name: str, key: Any) -> tuple[int, ...]:
    """A token-id tuple from a JSON dict key such as "(3, 4)" or "[5]"."""
    if isinstance(key, str):
        try:
            key = ast.literal_eval(key)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{name} key {key!r} is not a token id tuple") from None
    if isinstance(key, int):
        key = (key,)
    if not isinstance(key, (tuple, list)):
        raise ConfigError(f"{name} key {key!r} is not a token id tuple")
    return tuple(key)


def _freeze(value: Any) -> Any:
    """Lists / tuples / NumPy arrays -> nested tuples of Python scalars."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _thaw(value: Any) -> Any:
    """Nested tuples -> nested lists (JSON's and transformers' form)."""
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class StaticConfig:
    """The hashable part of a config: what a compiled program reads (see
    `GenerationConfig.static`)."""

    do_sample: bool
    num_beams: int
    num_return_sequences: int
    early_stopping: bool | str
    output_scores: bool
    output_logits: bool
    output_raw_logprobs: bool
    logprobs: int  # top-N alternatives per step; 0 = none
    logprobs_mode: str  # "processed" or "raw": the distribution of the alternatives
    prompt_logprobs: int  # -1 = off; 0 = the prompt tokens' own; N = plus top-N
    pad_token_id: int  # resolved: see GenerationConfig.pad_id
    eos_token_id: tuple[int, ...]
