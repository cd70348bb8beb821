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
`logprobs_mode`, `prompt_logprobs`, and `output_raw_logprobs`; and
`output_routed_experts` (mixture-of-experts models).

A config splits in two: a hashable `StaticConfig` (`static()`: shapes and which
code runs) and a pytree of traced values (`jaxdecode.processors.split_config`:
the processor chain, built next to the processors, whose numbers are leaves,
and the length penalty). Jitted functions take the first as a static argument
and the second as an ordinary argument, so changing a number never recompiles.

A module over ~500 lines: the option table (one `option(...)` entry per field, with
its description, check, grouping and static reading: about 400 lines of data), the
checks between fields, and the transformers I/O describe one object; split, a field's
rules would live in several files. The watermarking configs could move out next.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_type_hints

import jax
import numpy as np

from jaxdecode import fields as fields_table
from jaxdecode.errors import ConfigError
from jaxdecode.fields import Static, option
from jaxdecode.validation import (
    BiasTable,
    DecayPenalty,
    Flag,
    Int,
    Joint,
    OneOf,
    Real,
    Strings,
    Token,
    TokenLists,
    Tokens,
    check_range,
    eos_ids,
    normalize_schema,
    parse_constraints,
    static_int,
)

Array = jax.Array

__all__ = [
    "CLI_FIELDS",
    "CONSTRAINT_FIELDS",
    "FIELD_CHECKS",
    "FIELD_CHOICES",
    "FIELD_TYPES",
    "HF_FIELDS",
    "LENGTH_FIELDS",
    "PER_PROMPT_FIELDS",
    "PER_ROW_FIELDS",
    "ROW_DTYPES",
    "SEED_MAX",
    "GenerationConfig",
    "PagedCacheConfig",
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
        static_int(f"{name}.ngram_len", self.ngram_len, 1)
        static_int(f"{name}.context_history_size", self.context_history_size, 1)
        static_int(f"{name}.sampling_table_seed", self.sampling_table_seed, 0)
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
# "paged": `PagedCache` (pages of `cache_config["page_size"]`; the returned sequences
# of one prompt share its pages). transformers' offloaded caches (host memory) are
# refused by name.
CacheImplementation = Literal["dynamic", "static", "sliding_window", "hybrid", "quantized", "paged"]


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
            Int(1)("cache_config q_group_size", group, None)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class PagedCacheConfig:
    """`cache_config` of `cache_implementation="paged"`, resolved
    (`GenerationConfig.paged_cache()`); transformers' key (its continuous
    batching's `page_size`).

    The cache is a `PagedCache`: a pool of pages of `page_size` token slots and
    a page table per row. In `generate`, the `num_return_sequences` rows of one
    prompt (sampling or greedy) name the same pages for the prompt's full pages
    and hold only their partial last page and their completion themselves, so
    the cache holds each prompt once. Other rows (beams, a single sequence) own
    their pages.

    Attributes:
        page_size: token slots per page (default 16; transformers' continuous
            batching defaults to 256, which would leave most of a short
            prompt's last page unshared). Static.
    """

    page_size: int = 16

    KEYS = ("page_size",)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PagedCacheConfig:
        """From `cache_config`; ConfigError naming an unknown key or a bad value."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise ConfigError(
                f"cache_config has unknown key(s) {', '.join(map(str, unknown))}; the paged "
                f"cache takes {', '.join(cls.KEYS)}"
            )
        size = data.get("page_size", 16)
        Int(1)("cache_config page_size", size, None)
        return cls(page_size=int(size))


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


def _check_watermark(name: str, value: Any, vocab_size: int | None) -> None:
    as_watermarking_config(value)


def _check_cache_implementation(name: str, value: Any, vocab_size: int | None) -> None:
    if value not in get_args(CacheImplementation):
        raise ConfigError(
            f"{name} must be None or one of {get_args(CacheImplementation)}, got {value!r} "
            "(transformers' offloaded caches are not supported)"
        )


def _check_cache_config(name: str, value: Any, vocab_size: int | None) -> None:
    """A dict (frozen to its pairs by `__post_init__`); its keys are checked by
    `quantized_cache`, against `cache_implementation`."""
    if not isinstance(value, (Mapping, tuple)):
        raise ConfigError(f"{name} must be a dict (e.g. {{'nbits': 8}}), got {value!r}")


def _check_typical(name: str, value: Any, vocab_size: int | None) -> None:
    """1.0 (the default) turns typical sampling off; per row the processor is
    present for every row, and takes masses in (0, 1) only."""
    per_row = np.ndim(value) == 1
    Real(lo=0.0, hi=1.0, lo_open=True, hi_open=per_row)(
        name + (" (per row)" if per_row else ""), value, vocab_size
    )


_CONSTRAINT = Joint("with the other output constraints (validation.parse_constraints)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """All options of `generate`, named and defaulted as in transformers.

    Numeric sampling/penalty values may be a scalar or one value per row (a
    list or array of length batch). Call `validate()` (done by every entry point)
    to get a `ConfigError` (a `ValueError`) naming any bad field.

    The fields are the option table (`jaxdecode.fields`): each `option(...)` holds
    the field's description, its check, whether transformers has it, how it may
    differ between prompts of one program, and what `StaticConfig` reads of it.
    """

    # Length.
    max_length: int | None = option(
        None,
        doc="Total length (prompt + new tokens); `max_new_tokens` wins when both are set.",
        check=Int(1),
        varies="slot",
    )
    max_new_tokens: int | None = option(
        None,
        doc="Tokens to generate at most (`None` and no `max_length`: 20, as transformers).",
        check=Int(1),
        varies="slot",
    )
    min_length: int = option(
        0,
        doc="EOS is banned while the whole sequence (padded prompt included) is shorter.",
        check=Int(0),
    )
    min_new_tokens: int | None = option(
        None, doc="EOS is banned until this many tokens were generated.", check=Int(0)
    )
    # Strategy.
    do_sample: bool = option(
        False,
        doc="Sample (`True`) or search greedily / by beams (`False`).",
        check=Flag(),
        static=Static(bool),
    )
    num_beams: int = option(
        1,
        doc="Beam search with this many beams (1: no beam search).",
        check=Int(1),
        static=Static(int),
    )
    early_stopping: bool | Literal["never"] = option(
        False,
        doc='When a beam-search row stops: `True`, `False` (heuristic) or `"never"`.',
        check=OneOf((True, False, "never")),
        static=Static(
            bool | str,
            read=lambda c: c.early_stopping if c.num_beams > 1 else False,
            doc="early_stopping with beam search, else False (only beam search reads it).",
        ),
    )
    length_penalty: float = option(
        1.0,
        doc="Beam scores are divided by `generated_length ** length_penalty`.",
        check=Real(scalar=True),
    )
    num_return_sequences: int = option(
        1,
        doc="Outputs per prompt (≤ `num_beams`; samples with `do_sample`).",
        check=Int(1),
        static=Static(int),
    )
    # Warpers (sampling only).
    temperature: PerRowFloat = option(
        1.0, doc="Divides the logits (sampling only); > 0.", check=Real(lo=0.0), varies="row"
    )
    top_h: PerRowFloat | None = option(
        None,
        doc="Top-H: keep the most likely tokens while their entropy stays within top_h × the top-100's entropy (sampling only).",
        check=Real(lo=0.0, hi=1.0, lo_open=True),
        varies="row",
    )
    top_k: PerRowInt = option(
        50,
        doc="Keep the k most likely tokens, ties kept (sampling only; 0 disables).",
        check=Real(lo=0, integer=True),
        varies="row",
    )
    top_p: PerRowFloat = option(
        1.0,
        doc="Keep the smallest set whose probability reaches p (sampling only).",
        check=Real(lo=0.0, hi=1.0, lo_open=True),
        varies="row",
    )
    min_p: PerRowFloat | None = option(
        None,
        doc="Remove tokens below `min_p` × the top probability (sampling only).",
        check=Real(lo=0.0, hi=1.0),
        varies="row",
    )
    typical_p: PerRowFloat = option(
        1.0,
        doc="Locally typical sampling with this mass (sampling only).",
        check=_check_typical,
        varies="row",
    )
    epsilon_cutoff: PerRowFloat = option(
        0.0,
        doc="Remove tokens whose probability is below ε (sampling only).",
        check=Real(lo=0.0, hi=1.0, hi_open=True),
        varies="row",
    )
    eta_cutoff: PerRowFloat = option(
        0.0,
        doc="Remove tokens below min(η, √η·exp(−entropy)) (sampling only).",
        check=Real(lo=0.0, hi=1.0, hi_open=True),
        varies="row",
    )
    # Processors.
    repetition_penalty: PerRowFloat = option(
        1.0,
        doc="Penalise every token already in the text (prompt included); 1.0: off.",
        check=Real(lo=0.0, lo_open=True),
        varies="row",
    )
    prompt_ignore_length: PerRowInt = option(
        0,
        doc="The repetition penalty skips tokens in each row's first this-many columns (transformers' processor argument).",
        check=Real(lo=0, integer=True),
        hf=False,
        varies="row",
    )
    no_repeat_ngram_size: int = option(
        0, doc="Ban any token that would repeat an n-gram of this size.", check=Int(0)
    )
    bad_words_ids: TokenSequences | None = option(
        None, doc="Token sequences never to produce.", check=TokenLists()
    )
    sequence_bias: SequenceBias | None = option(
        None,
        doc="Add a bias to a token, or to a sequence's last token after its prefix.",
        check=BiasTable(),
    )
    forced_bos_token_id: int | None = option(
        None, doc="The only token allowed as the first one.", check=Token()
    )
    forced_eos_token_id: TokenIds | None = option(
        None, doc="The only token(s) allowed at `max_length − 1`.", check=Tokens()
    )
    remove_invalid_values: bool = option(
        False, doc="Replace NaN and ±inf in the scores by finite values.", check=Flag()
    )
    exponential_decay_length_penalty: tuple[int, float] | None = option(
        None,
        doc="`(start, factor)`: raise EOS's score exponentially after `start` new tokens.",
        check=DecayPenalty(),
    )
    suppress_tokens: TokenIds | None = option(
        None, doc="Tokens banned at every step.", check=Tokens()
    )
    begin_suppress_tokens: TokenIds | None = option(
        None, doc="Tokens banned at the first generated step.", check=Tokens()
    )
    renormalize_logits: bool = option(
        False, doc="`log_softmax` the scores after every processor.", check=Flag()
    )
    # Classifier-free guidance (the negative prompt is `generate`'s
    # `negative_prompt_ids` / `negative_prompt_attention_mask`); None or 1: off.
    guidance_scale: PerRowFloat | None = option(
        None,
        doc="Classifier-free guidance: `s·(log p(x|prompt) − log p(x|negative)) + log p(x|negative)`; negative prompt via `generate(negative_prompt_ids=)`.",
        check=Real(),
        varies="row",
    )
    # Watermarking (jaxdecode.processors.watermark): applied after every other
    # processor but renormalisation, greedy or sampling.
    watermarking_config: (
        WatermarkingConfig | SynthIDTextWatermarkingConfig | Mapping[str, object] | None
    ) = option(
        None,
        doc="A watermark: Kirchenbauer green lists (`jd.WatermarkingConfig`) or SynthID-Text (`jd.SynthIDTextWatermarkingConfig`), or either's dict; detect with `jd.watermark_detect`.",
        check=_check_watermark,
    )
    # Outputs.
    output_scores: bool = option(
        False,
        doc="Return the processed scores of every step (`GenerateOutput.scores`).",
        check=Flag(),
        static=Static(bool),
    )
    output_logits: bool = option(
        False,
        doc="Return the raw logits of every step (`GenerateOutput.logits`).",
        check=Flag(),
        static=Static(bool),
    )
    return_dict_in_generate: bool = option(
        False,
        doc="Accepted for transformers compatibility; `generate` always returns a `GenerateOutput`.",
        check=Flag(),
        cli=False,  # the CLI always has the whole output
    )
    # Special tokens.
    pad_token_id: int | None = option(
        None,
        doc="Fills finished rows (default: the first EOS id).",
        check=Token(),
        static=Static(
            int,
            read=lambda c: c.pad_id,
            doc="resolved: pad_token_id, else the first EOS id, else 0 (see `pad_id`).",
        ),
    )
    bos_token_id: int | None = option(None, doc="Beginning-of-sequence token id.", check=Token())
    eos_token_id: TokenIds | None = option(
        None,
        doc="Token id(s) that end a row.",
        check=Tokens(),
        static=Static(
            tuple[int, ...], read=lambda c: c.eos_ids, doc="the EOS ids (empty when unset)."
        ),
    )
    stop_strings: str | Sequence[str] | None = option(
        None,
        doc="A row ends when its text contains one of these strings (decided on the device).",
        check=Strings(),
    )
    # Speculative decoding (jaxdecode.search.speculative): K draft tokens per
    # round from prompt lookup, or from `generate(assistant_model=...)`.
    prompt_lookup_num_tokens: int | None = option(
        None,
        doc="Speculative decoding by prompt lookup: tokens drafted per round.",
        check=Int(1),
    )
    max_matching_ngram_size: int | None = option(
        None, doc="Prompt lookup: longest n-gram matched (default 2).", check=Int(1)
    )
    num_assistant_tokens: int = option(
        20,
        doc="Draft-model speculative decoding: tokens drafted per round (the start, with a heuristic schedule).",
        check=Int(1),
    )
    # How K changes between rounds, per row (transformers' rule): "constant", or
    # +2 after a round whose drafts were all accepted, else -1 (at least 1).
    num_assistant_tokens_schedule: Literal["constant", "heuristic", "heuristic_transient"] = option(
        "constant",
        doc='`"constant"`, or `"heuristic"` / `"heuristic_transient"`: per row, K + 2 after a fully accepted round, else K − 1 (≥ 1).',
        check=OneOf(),
    )
    # The draft model stops drafting a row after a token it gives less than this
    # probability (0 or None: never); transformers' default 0.4.
    assistant_confidence_threshold: PerRowFloat | None = option(
        0.4,
        doc="The draft model stops drafting a row after a token it gives a lower probability (0 or `None`: never; 0.4 as transformers).",
        check=Real(lo=0.0, hi=1.0),
        varies="row",
    )
    # jaxdecode additions.
    frequency_penalty: PerRowFloat = option(
        0.0,
        doc="Subtract f × count of each generated token (OpenAI / vLLM).",
        check=Real(lo=-2.0, hi=2.0),
        hf=False,
        varies="row",
    )
    presence_penalty: PerRowFloat = option(
        0.0,
        doc="Subtract p from every token generated at least once (OpenAI / vLLM).",
        check=Real(lo=-2.0, hi=2.0),
        hf=False,
        varies="row",
    )
    seed: int | None = option(
        None,
        doc="Sampling seed (0 to 2³²−1) when no `key` is given.",
        check=Int(0, hi=SEED_MAX),
        hf=False,
        varies="prompt",
    )
    repetition_penalty_form: Literal["hf", "ctrl"] = option(
        "hf",
        doc='`"hf"` (transformers\' sign-dependent form) or `"ctrl"` (divide always).',
        check=OneOf(),
        hf=False,
    )
    top_k_method: Literal["exact", "fast"] = option(
        "exact",
        doc='`"exact"` (transformers\' mask) or `"fast"` (static cap, no sort).',
        check=OneOf(),
        hf=False,
    )
    top_p_method: Literal["exact", "fast"] = option(
        "exact",
        doc='`"exact"` (transformers\' mask) or `"fast"` (bisection, no sort).',
        check=OneOf(),
        hf=False,
    )
    # Output constraints (need the model's tokenizer; see jaxdecode.processors.grammar).
    regex: Regex | None = option(
        None,
        doc="Every output matches this regular expression (one for all rows, or one per row).",
        check=_CONSTRAINT,
        hf=False,
        varies="prompt",
    )
    json_schema: JsonSchema | None = option(
        None,
        doc="Every output is JSON of this schema (dict or JSON text; or one per row).",
        check=_CONSTRAINT,
        hf=False,
        varies="prompt",
    )
    choices: Choices | None = option(
        None,
        doc="Every output is one of these strings (or one list per row).",
        check=_CONSTRAINT,
        hf=False,
        varies="prompt",
    )
    # Log-probability outputs (names as vLLM's SamplingParams; off by default, so
    # the program computes none of it unless asked).
    output_raw_logprobs: bool = option(
        False,
        doc="Also return the raw model's log-probability of each chosen token.",
        check=Flag(),
        hf=False,
        static=Static(bool),
    )
    logprobs: int | None = option(
        None,
        doc="Return the N best tokens and their log-probabilities at every step.",
        check=Int(0, top_n=True),
        hf=False,
        static=Static(
            int, read=lambda c: int(c.logprobs or 0), doc="top-N alternatives per step; 0: none."
        ),
    )
    logprobs_mode: Literal["processed", "raw"] = option(
        "processed",
        doc='Whether `logprobs` ranks the `"processed"` or the `"raw"` distribution.',
        check=OneOf(),
        hf=False,
        static=Static(
            str,
            read=lambda c: c.logprobs_mode if c.logprobs else "processed",
            doc='"processed" or "raw": the distribution of the alternatives ("processed" '
            "without logprobs).",
        ),
    )
    prompt_logprobs: int | None = option(
        None,
        doc="Return each prompt token's log-probability (N ≥ 1 adds the top-N alternatives).",
        check=Int(0, top_n=True),
        hf=False,
        static=Static(
            int,
            read=lambda c: -1 if c.prompt_logprobs is None else int(c.prompt_logprobs),
            doc="-1: off; 0: the prompt tokens' own; N: plus the top-N.",
        ),
    )
    # Mixture-of-experts models: the experts each generated token's forward pass
    # was routed to (vLLM's / sglang's routed experts, for RL routing replay).
    output_routed_experts: bool = option(
        False,
        doc="Mixture-of-experts models: return the experts each generated token was chosen by (`[rows, N, MoE layers, k]`, for RL routing replay).",
        check=Flag(),
        hf=False,
        static=Static(bool),
    )
    # The KV cache (transformers' names): "quantized" stores the full-attention
    # layers' keys and values in `cache_config["nbits"]` bits (QuantizedCacheConfig).
    cache_implementation: CacheImplementation | None = option(
        None,
        doc='The KV cache: `"quantized"` stores full-attention layers\' keys and values in `cache_config["nbits"]` bits (8, 4 or 2; per token and head); `"paged"` keeps it in pages of `cache_config["page_size"]` tokens (16), the returned sequences of a prompt sharing its pages; transformers\' float caches (`"dynamic"`, `"static"`, `"hybrid"`, `"sliding_window"`) mean the float cache.',
        check=_check_cache_implementation,
    )
    cache_config: Mapping[str, object] | None = option(
        None,
        doc='Settings of the cache, transformers\' keys. `"quantized"`: `nbits`, `q_group_size`, `axis_key` / `axis_value` (0), `residual_length` (0), `backend` ("quanto"). `"paged"`: `page_size`.',
        check=_check_cache_config,
    )

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

        Each field's own check comes from the option table (`Spec.check`, in
        the fields' order); then the checks between fields.
        """
        for name, check in FIELD_CHECKS.items():
            value = getattr(self, name)
            if value is None and name in _NULLABLE:
                continue
            check(name, value, vocab_size)
        if self.do_sample:  # sampling divides by the temperature
            check_range("temperature", self.temperature, lo=0.0, lo_open=True)
        self._validate_logprobs()
        self.kv_cache()  # cache_config against cache_implementation
        self._validate_combinations()
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

    def _validate_logprobs(self) -> None:
        if self.num_beams > 1:
            for name, used in (
                ("output_raw_logprobs", self.output_raw_logprobs),
                ("logprobs", bool(self.logprobs)),
                ("output_routed_experts", self.output_routed_experts),
            ):
                if used:
                    raise ConfigError(
                        f"{name} applies to greedy search and sampling (num_beams=1), got "
                        f"num_beams={self.num_beams}; beam search returns token_logprobs and "
                        "sequences_scores"
                    )

    def _validate_combinations(self) -> None:
        beams = self.num_beams
        if beams == 1 and not self.do_sample and self.num_return_sequences != 1:
            raise ConfigError(
                "num_return_sequences must be 1 for greedy search (num_beams=1, do_sample=False), "
                f"got {self.num_return_sequences}; use do_sample=True or num_beams >= it"
            )
        if self.stop_strings is not None and beams > 1:
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
            if data and self.cache_implementation != "paged":
                raise ConfigError(
                    "cache_config configures cache_implementation='quantized' or 'paged', got "
                    f"cache_implementation={self.cache_implementation!r}"
                )
            return None
        return QuantizedCacheConfig.from_dict(data)

    def paged_cache(self) -> PagedCacheConfig | None:
        """The paged cache's settings with `cache_implementation="paged"`, else
        None. ConfigError for a `cache_config` it cannot honour."""
        if self.cache_implementation != "paged":
            self.quantized_cache()  # cache_config against the other kinds
            return None
        try:
            data = dict(self.cache_config or ())
        except (TypeError, ValueError):
            raise ConfigError(
                f"cache_config must be a dict (e.g. {{'page_size': 16}}), got {self.cache_config!r}"
            ) from None
        return PagedCacheConfig.from_dict(data)

    def kv_cache(self) -> QuantizedCacheConfig | PagedCacheConfig | None:
        """The cache `generate` allocates (`Decoder.with_cache`): quantized, paged,
        or None for the float cache."""
        return self.quantized_cache() or self.paged_cache()

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
        return StaticConfig(**{n: _SPECS[n].static.value(self, n) for n in _STATIC_FIELDS})

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


# Derived from the option table (one entry per field, `jaxdecode.fields`).
_SPECS = fields_table.specs(GenerationConfig)
FIELD_TYPES: dict[str, Any] = get_type_hints(GenerationConfig)
# transformers' names.
HF_FIELDS: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.hf)
# Traced values that may be one value per row, and how each is packed as `[rows]`.
PER_ROW_FIELDS: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.per_row)
ROW_DTYPES: dict[str, type] = {n: fields_table.row_dtype(FIELD_TYPES[n]) for n in PER_ROW_FIELDS}
# What prompts of one program may set differently: per row, per prompt (the seed,
# the output constraint) and per slot (the lengths: per engine slot; a static
# batch shares one).
PER_PROMPT_FIELDS: tuple[str, ...] = tuple(
    n for n, s in _SPECS.items() if s.varies in ("row", "prompt")
)
LENGTH_FIELDS: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.varies == "slot")
# The fields that constrain the output (one kind per row).
CONSTRAINT_FIELDS: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.check is _CONSTRAINT)
# `Literal[...]` fields: their allowed values.
FIELD_CHOICES: dict[str, tuple[Any, ...]] = {
    n: c for n, t in FIELD_TYPES.items() if (c := fields_table.choices(t)) is not None
}
# Each field's own check (`OneOf()` of a Literal field reads the type's values).
FIELD_CHECKS: dict[str, Any] = {
    n: OneOf(FIELD_CHOICES[n]) if isinstance(s.check, OneOf) and not s.check.values else s.check
    for n, s in _SPECS.items()
}
# Fields that may be None (not checked then).
_NULLABLE = frozenset(n for n, t in FIELD_TYPES.items() if fields_table.nullable(t))
# The fields `StaticConfig` reads.
_STATIC_FIELDS: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.static is not None)
CLI_FIELDS: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.cli)

StaticConfig = fields_table.static_class(
    GenerationConfig,
    name="StaticConfig",
    module=__name__,
    doc="""The hashable part of a config: what a compiled program reads (see
    `GenerationConfig.static`), derived from the option table's `static` entries.""",
)
"""The hashable part of a config: what a compiled program reads (`GenerationConfig.static()`).

A frozen dataclass built from the option table: one field per `GenerationConfig`
field whose entry has a `static` reading (the *static* column of the config's field
table), typed and read as that entry says (e.g. `pad_token_id` is the resolved pad
id, `early_stopping` is False without beam search).
"""


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
