"""The front door: `generate` and `stream` validate a request, pad the prompt to its
bucket, pick the static plan and run the compiled program (`jaxdecode.search`).

Static (recompiles when changed): batch, prompt bucket, max_new_tokens, num_beams,
num_return_sequences, do_sample, early_stopping, output flags, which processors
are present. Traced (never recompiles): every numeric value, the prompts, the keys.

A module over ~500 lines: the request checks, bucketing, memory pre-check and program
choice that `generate` and `stream` share; each is its own function.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdecode import pytree
from jaxdecode.arrays import is_traced, owned
from jaxdecode.cache import cache_nbytes
from jaxdecode.config import SEED_MAX, GenerationConfig
from jaxdecode.errors import MemoryBudgetError
from jaxdecode.models import lora
from jaxdecode.models.base import Decoder, Model
from jaxdecode.processors import TracedConfig, split_config
from jaxdecode.processors.base import LogitsProcessor, check_rows
from jaxdecode.search.drafters import (
    DEFAULT_NGRAM,
    HEURISTIC_MAX_TOKENS,
    DraftModel,
    PromptLookup,
)
from jaxdecode.search.loop import GenerateOutput, Guidance, Plan, expand_cache, prompt_cache
from jaxdecode.search.program import generate_program, prefill_program
from jaxdecode.search.sample import decode_step
from jaxdecode.search.speculative import speculative_program
from jaxdecode.search.stopping import stop_strings, token_tables
from jaxdecode.sharding import check_mesh, shard_params
from jaxdecode.tokenizers import Tokenizer
from jaxdecode.validation import host_rows

Array = jax.Array

__all__ = [
    "GenerateOutput",
    "Request",
    "available_bytes",
    "StreamStep",
    "bucket_length",
    "check_memory",
    "drop_bucket",
    "drop_columns",
    "model_parts",
    "generate",
    "prepare",
    "stop_tables",
    "stream",
    "Timings",
    "generate_timed",
]


def bucket_length(length: int, buckets: Any = "pow2") -> int:
    """The padded prompt length for `length` under a bucketing rule.

    Args:
        length: the prompt length.
        buckets: "pow2" (next power of two, at least 8; past 1024, four
            buckets per doubling: 1280, 1536, 1792, 2048, 2560, ..., so that a
            long prompt's prefill pads by under 25%, not up to 2x), None (no
            padding), an int m
            (round up to a multiple of m), or a sorted sequence of lengths (the
            first >= length; beyond the last, the length itself).
    """
    if buckets is None:
        return length
    if buckets == "pow2":
        power = max(8, 1 << max(length - 1, 0).bit_length())
        if power <= 1024:
            return power
        step = power // 8  # a quarter of the power of two below
        return -(-length // step) * step
    if isinstance(buckets, int) and not isinstance(buckets, bool):
        if buckets < 1:
            raise ValueError(f"prompt_buckets must be >= 1, got {buckets}")
        return -(-length // buckets) * buckets
    if isinstance(buckets, Sequence):
        for b in sorted(int(x) for x in buckets):
            if b >= length:
                return b
        return length
    raise ValueError(
        f"prompt_buckets must be 'pow2', None, an int or a list of ints, got {buckets!r}"
    )


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated request: the static plan and the arguments of the program."""

    plan: Plan
    params: Any
    ids: Any
    mask: Any
    prompt_len: Array
    traced: TracedConfig
    key: Array
    extra: int  # bucket padding columns, dropped from the output
    config: GenerationConfig  # the resolved configuration
    seed: int | None  # the seed drawn here (sampling without key or seed), else None
    # Speculative decoding: the drafter (static) and the draft model's params.
    drafter: PromptLookup | DraftModel | None = None
    draft_params: Any = None

    def args(self) -> tuple[Any, ...]:
        """The arguments of `generate_program` after the plan."""
        return (self.params, self.ids, self.mask, self.prompt_len, self.traced, self.key)

    def program(self) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        """`(jitted program, its static arguments, its other arguments)`: plain
        or speculative."""
        if self.drafter is None:
            return generate_program, (self.plan,), self.args()
        dynamic = (self.params, self.draft_params, self.ids, self.mask, self.prompt_len)
        return speculative_program, (self.plan, self.drafter), (*dynamic, self.traced, self.key)

    def run(self) -> GenerateOutput:
        """The compiled program for this request (plain or speculative)."""
        program, static, dynamic = self.program()
        return program(*static, *dynamic)


def _is_global(*xs: Any) -> bool:
    """Arrays with shards on other hosts (multi-process `jax.distributed`)."""
    return any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in xs)


def model_parts(
    model: Model | Decoder, params: Any
) -> tuple[Decoder, Any, GenerationConfig, Tokenizer | None]:
    """`(decoder, params, default config, tokenizer)` of a `Model` (a `CausalLM`)
    or a `Decoder`; `params` replaces the model's own when given."""
    if isinstance(model, Decoder):
        if params is None:
            raise ValueError("generate(decoder, ...) needs params=")
        return model, params, GenerationConfig(), None
    decoder = getattr(model, "decoder", None)
    if isinstance(decoder, Decoder):
        params = model.params if params is None else params
        return decoder, params, model.generation_config, getattr(model, "tokenizer", None)
    raise TypeError(f"model must be a CausalLM or a Decoder, got {type(model).__name__}")


def _drafter(
    config: GenerationConfig,
    decoder: Decoder,
    assistant_model: Model | Decoder | None,
    assistant_params: Any,
    mesh: Mesh | None,
    new_tokens: int,
) -> tuple[PromptLookup | DraftModel | None, Any]:
    """`(drafter, draft params)` for speculative decoding, or `(None, None)`.

    Raises ValueError for what speculation does not combine with (beam search,
    a mesh, both drafters at once, a draft model with another vocabulary)."""
    lookup = config.prompt_lookup_num_tokens
    if assistant_model is None:
        if assistant_params is not None:
            raise ValueError("assistant_params needs assistant_model (a Decoder)")
        if lookup is None:
            return None, None
    if config.num_beams > 1:
        raise ValueError(
            "speculative decoding (prompt_lookup_num_tokens / assistant_model) works with greedy "
            f"search and sampling (num_beams=1), got num_beams={config.num_beams}"
        )
    if config.output_routed_experts:
        raise ValueError(
            "output_routed_experts=True records one forward pass per token; speculative "
            "decoding (prompt_lookup_num_tokens / assistant_model) verifies several tokens per "
            "pass: decode without it"
        )
    if mesh is not None:
        raise ValueError("speculative decoding runs on one device: mesh must be None")
    if assistant_model is None:
        ngram = config.max_matching_ngram_size or DEFAULT_NGRAM
        return PromptLookup(k=int(lookup), max_ngram=int(ngram)), None
    if lookup is not None:
        raise ValueError(
            "give either prompt_lookup_num_tokens (prompt lookup) or assistant_model (a draft "
            f"model), not both; got prompt_lookup_num_tokens={lookup}"
        )
    try:
        draft, draft_params, _, _ = model_parts(assistant_model, assistant_params)
    except (TypeError, ValueError) as e:
        raise type(e)(
            f"assistant_model: {e}".replace("generate(decoder", "assistant_model")
        ) from None
    if draft.vocab_size != decoder.vocab_size:
        raise ValueError(
            f"assistant_model must share the model's vocabulary: its vocab_size is "
            f"{draft.vocab_size}, the model's {decoder.vocab_size}"
        )
    start = int(config.num_assistant_tokens)
    schedule = config.num_assistant_tokens_schedule
    # The heuristic schedule's static bound: a round never uses more than
    # max_new_tokens - 1 drafts (transformers' candidates stop at max_length - 1),
    # and never more than HEURISTIC_MAX_TOKENS (or the first K when larger).
    cap = start
    if schedule != "constant":
        cap = max(start, min(new_tokens - 1, HEURISTIC_MAX_TOKENS), 1)
    return DraftModel(decoder=draft, k=cap, start=start, schedule=schedule), draft_params


def _check_seed(name: str, seed: Any) -> int:
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= int(seed) <= SEED_MAX
    ):
        raise ValueError(f"{name} must be an integer in [0, {SEED_MAX}], got {seed!r}")
    return int(seed)


def _resolve_key(key: Any, batch: int) -> tuple[Array, bool]:
    """`(key, per_row)`: one typed key, or `[batch]` typed keys (one per prompt).

    Accepts a typed key (`jax.random.key`), raw `uint32` key data (`[2]`, or
    `[batch, 2]` for per-prompt keys), `[batch]` typed keys, or an int seed.
    """
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(_check_seed("key (an int seed)", key)), False
    arr = key if isinstance(key, (jax.Array, jax.core.Tracer)) else np.array(key, copy=True)
    typed = jnp.issubdtype(arr.dtype, jax.dtypes.prng_key)
    if typed:
        if arr.ndim == 0:
            return arr, False
        if arr.shape == (batch,):
            return arr, True
    elif arr.dtype == np.uint32 and arr.shape in ((2,), (batch, 2)):
        wrapped = jax.random.wrap_key_data(owned(arr, jnp.uint32))
        return wrapped, wrapped.ndim == 1
    raise ValueError(
        "key must be a jax.random.key, a [batch] array of keys (one per prompt row, "
        f"batch={batch}), raw uint32 key data of shape [2] or [batch, 2], or an int seed in "
        f"[0, {SEED_MAX}]; got {getattr(arr, 'dtype', type(key).__name__)} "
        f"{getattr(arr, 'shape', '')}"
    )


def available_bytes() -> int | None:
    """Free memory of the device that will hold the cache, when known (the
    accelerator's allocator limit, or the host's available memory on CPU)."""
    # A local device: in a multi-process run jax.devices()[0] may belong to another
    # process, and its memory_stats() raises.
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _check_memory(plan: Plan, decoder: Decoder, mesh: Mesh | None) -> None:
    """MemoryBudgetError when the KV cache, the prefill and the per-step buffers
    cannot fit, before anything is allocated."""
    total = plan.bucket + plan.new_tokens
    # The decode cache as `prefill` builds it (paged: a prompt's rows share its pages).
    plan = dataclasses.replace(plan, decoder=decoder)
    cache = jax.eval_shape(lambda: expand_cache(plan, prompt_cache(plan, plan.bucket), plan.bucket))
    cache_bytes = cache_nbytes(cache)
    vocab = decoder.vocab_size
    # logits, scores and a few [rows, V] temporaries per step, float32; beam search's
    # candidate scores [B, nb * V]; output_scores / output_logits keep [rows, N, V].
    step_bytes = 6 * plan.rows * vocab * 4
    kept = (int(plan.config.output_scores) + int(plan.config.output_logits)) * plan.rows
    # The prefill: the prompt's activations and attention scratch, and its logits
    # (every position's with prompt_logprobs, else the last one's).
    prefill = decoder.prefill_bytes(
        plan.batch, plan.bucket, total, all_logits=plan.config.prompt_logprobs >= 0
    )
    need = cache_bytes + max(step_bytes + kept * plan.new_tokens * vocab * 4, prefill)
    devices = 1 if mesh is None else mesh.devices.size
    free = available_bytes()
    if free is not None and need > free * devices:
        cfg = plan.config
        raise MemoryBudgetError(
            f"generate needs about {need / 2**30:.2f} GiB (KV cache {cache_bytes / 2**30:.2f} GiB "
            f"for batch={plan.batch} x num_beams={cfg.num_beams} x "
            f"num_return_sequences={cfg.num_return_sequences} = {plan.rows} rows of {total} "
            f"tokens; prefill of the {plan.bucket}-token padded prompt {prefill / 2**30:.2f} GiB) "
            f"but the device has {free / 2**30:.2f} GiB free; lower the batch, the prompt length, "
            "num_beams or max_new_tokens"
        )


def check_memory(
    decoder: Decoder,
    config: GenerationConfig,
    batch: int,
    prompt_len: int,
    prompt_buckets: Any = "pow2",
    mesh: Mesh | None = None,
) -> None:
    """The memory check `generate` makes, without a prompt: ValueError when
    `batch` prompts of `prompt_len` tokens with `config` (validated,
    `max_new_tokens` or `max_length` set) cannot fit in the device's free
    memory."""
    new_tokens = config.resolve_max_length(prompt_len) - prompt_len
    decoder = decoder.with_cache(config.kv_cache())
    plan = Plan(
        decoder=decoder,
        config=config.static(),
        batch=batch,
        bucket=bucket_length(prompt_len, prompt_buckets),
        new_tokens=new_tokens,
        loop="while",
    )
    _check_memory(plan, decoder, mesh)


def _prompt_arrays(
    input_ids: Any,
    attention_mask: Any,
    vocab_size: int,
    traced_inputs: bool,
    names: tuple[str, str] = ("input_ids", "attention_mask"),
) -> tuple[Any, Any]:
    """Validated `(ids, mask)`, copied from host memory (or as given when traced);
    `names` are the arguments' names in the errors."""
    id_name, mask_name = names
    ids = input_ids if traced_inputs else host_rows(id_name, input_ids)
    if ids.ndim != 2 or ids.shape[1] < 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"{id_name} must be a [batch, prompt_len] integer array, got {ids.dtype} {ids.shape}"
        )
    if attention_mask is None:
        mask = jnp.ones_like(ids) if traced_inputs else np.ones(ids.shape, np.int32)
    else:
        mask = attention_mask if traced_inputs else host_rows(mask_name, attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(
                f"{mask_name} shape {mask.shape} must equal {id_name} shape {ids.shape}"
            )
    if traced_inputs:
        return ids, mask
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(
            f"{id_name} must be in [0, {vocab_size - 1}], got [{ids.min()}, {ids.max()}]"
        )
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{mask_name} must hold only 0 and 1")
    empty = np.flatnonzero(~np.any(mask == 1, axis=1))
    if empty.size:
        raise ValueError(
            f"{mask_name} rows {empty.tolist()} are all 0: every prompt needs at least "
            "one real token"
        )
    return ids, mask


def _guidance(
    config: GenerationConfig,
    ids: Any,
    negative_ids: Any,
    negative_mask: Any,
    vocab_size: int,
    traced_inputs: bool,
    prompt_buckets: Any,
) -> Guidance | None:
    """Classifier-free guidance's inputs: the negative prompt (default: each
    prompt's last token, as transformers), bucketed, and the scale; None when
    `guidance_scale` is unset or 1."""
    names = ("negative_prompt_ids", "negative_prompt_attention_mask")
    if not config.guided():
        given = [
            n for n, v in zip(names, (negative_ids, negative_mask), strict=True) if v is not None
        ]
        if given:
            raise ValueError(
                f"{given[0]} is the negative prompt of classifier-free guidance: set "
                f"guidance_scale (!= 1), got guidance_scale={config.guidance_scale!r}"
            )
        return None
    batch = ids.shape[0]
    length: Any = None  # the logical length: one for all rows, or one per row (ragged)
    if negative_ids is None:
        if negative_mask is not None:
            raise ValueError("negative_prompt_attention_mask needs negative_prompt_ids")
        neg, mask = ids[:, -1:], (jnp if traced_inputs else np).ones((batch, 1), np.int32)
    elif _per_row_lists(negative_ids, negative_mask, batch):
        neg, mask, length = _ragged_negative(negative_ids, negative_mask, batch, config.pad_id)
        _prompt_arrays(neg, mask, vocab_size, False, names)
    else:
        neg, mask = _prompt_arrays(negative_ids, negative_mask, vocab_size, traced_inputs, names)
        if neg.shape[0] not in (1, batch):
            raise ValueError(
                f"negative_prompt_ids has {neg.shape[0]} rows; it needs one per prompt row "
                f"({batch}) or one for all"
            )
        if neg.shape[0] != batch:
            xp = jnp if traced_inputs else np
            neg, mask = xp.repeat(neg, batch, axis=0), xp.repeat(mask, batch, axis=0)
    width = neg.shape[1]
    extra = bucket_length(width, prompt_buckets) - width
    if extra:
        xp = jnp if traced_inputs else np
        neg = xp.pad(neg, ((0, 0), (extra, 0)), constant_values=config.pad_id)
        mask = xp.pad(mask, ((0, 0), (extra, 0)))
    return Guidance(
        ids=owned(neg, jnp.int32),
        mask=owned(mask, jnp.int32),
        length=jnp.int32(width) if length is None else owned(length, jnp.int32),
        scale=owned(config.guidance_scale, jnp.float32),
    )


def _select_adapters(params: Any, adapter_ids: Any, batch: int, traced_inputs: bool) -> Any:
    """`params` with each row's LoRA adapter chosen (`lora.select`) when the model
    holds stacked adapters; ValueError naming `adapter_ids` when it is missing,
    not one per prompt row, or outside `[-1, adapters - 1]`."""
    count = lora.adapter_count(params)
    if adapter_ids is None:
        if count is not None:
            raise ValueError(
                f"the model holds {count} stacked LoRA adapters: pass adapter_ids=[...] (one "
                "per prompt row, -1 for the base model) to choose each row's"
            )
        return params
    if count is None:
        raise ValueError(
            "adapter_ids selects among stacked LoRA adapters: load several with "
            "lm.load_adapter([dir, ...]); this model has none"
        )
    traced = traced_inputs or is_traced(adapter_ids)
    ids = adapter_ids if traced else np.asarray(adapter_ids)
    if ids.shape != (batch,) or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"adapter_ids must be {batch} integers (one per prompt row), got {ids.dtype} "
            f"{ids.shape}"
        )
    if not traced and (ids.min() < -1 or ids.max() >= count):
        raise ValueError(
            f"adapter_ids must be in [-1, {count - 1}] (-1: the base model; {count} adapters), "
            f"got [{ids.min()}, {ids.max()}]"
        )
    return lora.select(params, owned(ids, jnp.int32))


def _per_row_lists(rows: Any, mask: Any, batch: int) -> bool:
    """Whether `rows` are per-row negative prompts, each on its own: a list of
    token lists of different lengths, or (without a mask) one per prompt row of
    any lengths (equal lengths without padding mean the same as the array, and
    take the same program as different ones)."""
    if not isinstance(rows, (list, tuple)) or not rows:
        return False
    lengths = {len(r) if isinstance(r, (list, tuple, np.ndarray)) else None for r in rows}
    if None in lengths:
        return False
    return len(lengths) > 1 or (mask is None and len(rows) == batch)


def _ragged_negative(
    rows: Any, mask: Any, batch: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row negative prompts of different lengths, left-padded to the longest:
    `(ids [batch, width], mask, lengths [batch])`. Each row's tokens take
    positions `0 .. len - 1` (its padding is not counted), so each row is guided
    as `generate` on that row alone with its own negative prompt."""
    if mask is not None:
        raise ValueError(
            "negative_prompt_attention_mask goes with a [batch, length] negative_prompt_ids; "
            "a list of negative prompts of different lengths needs no mask (each row is "
            "its own negative prompt, unpadded)"
        )
    if len(rows) != batch:
        raise ValueError(
            f"negative_prompt_ids has {len(rows)} rows of different lengths; it needs one "
            f"per prompt row ({batch})"
        )
    lengths = np.array([len(r) for r in rows], np.int32)
    if lengths.min() < 1:
        row = int(np.argmin(lengths))
        raise ValueError(f"negative_prompt_ids row {row} is empty; each needs at least one token")
    width = int(lengths.max())
    ids = np.full((batch, width), pad_id, np.int64)
    mask = np.zeros((batch, width), np.int32)
    for i, r in enumerate(rows):
        row = np.asarray(r)
        if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(
                f"negative_prompt_ids row {i} must be a list of token ids (integers), got {r!r}"
            )
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask, lengths


def _sampling_key(
    key: Any, config: GenerationConfig, batch: int, host_side: bool
) -> tuple[Array, bool, int | None]:
    """`(key, per_row, drawn seed)`: the key given, else `config.seed`, else a
    fresh seed drawn here (reported back), else an unused key for greedy/beams."""
    drawn = None
    if key is None and config.do_sample:
        if config.seed is not None:
            key = config.seed
        elif not host_side:
            raise ValueError(
                "generate(do_sample=True) inside jit, or on multi-host arrays, needs key= (or a "
                "seed in the config): every host must draw the same numbers"
            )
        else:
            key = drawn = secrets.randbits(32)
    if key is None:
        key = 0  # unused by greedy and beam search
    key, per_row = _resolve_key(key, batch)
    return key, per_row, drawn


def prepare(
    model: Model | Decoder,
    input_ids: Any,
    attention_mask: Any = None,
    config: GenerationConfig | None = None,
    *,
    params: Any = None,
    key: Any = None,
    prompt_buckets: Any = "pow2",
    loop: str = "while",
    mesh: Mesh | None = None,
    logits_processor: LogitsProcessor | None = None,
    tokenizer: Any = None,
    overrides: dict[str, Any] | None = None,
    assistant_model: Model | Decoder | None = None,
    assistant_params: Any = None,
    negative_prompt_ids: Any = None,
    negative_prompt_attention_mask: Any = None,
    adapter_ids: Any = None,
) -> Request:
    """Validates a `generate` call before tracing and pads the prompt to its bucket.

    Every check `generate` makes happens here, in order, before anything is
    traced; that is why it is long.

    The arguments are `generate`'s. Returns the `Request` whose `plan` and
    `args()` `generate_program` runs (`jaxdecode.trace` runs it with recording on).
    """
    decoder, params, base, model_tokenizer = model_parts(model, params)
    tokenizer = model_tokenizer if tokenizer is None else tokenizer
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    config = (config or base).replace(**overrides) if overrides else (config or base)
    config.validate(vocab_size=decoder.vocab_size)
    # The model's cache as the config asks (a quantized one: `cache_implementation`).
    decoder = decoder.with_cache(config.kv_cache())
    if loop not in ("scan", "while"):
        raise ValueError(f"loop must be 'scan' or 'while', got {loop!r}")
    check_mesh(mesh)
    # Traced inside a user's jit, or global arrays spanning several hosts: no
    # host-side look at the values.
    traced_inputs = is_traced(input_ids, attention_mask) or _is_global(input_ids, attention_mask)
    ids, mask = _prompt_arrays(input_ids, attention_mask, decoder.vocab_size, traced_inputs)
    batch, prompt_len = ids.shape
    params = _select_adapters(params, adapter_ids, batch, traced_inputs)
    max_length = config.resolve_max_length(prompt_len)
    new_tokens = max_length - prompt_len
    if new_tokens < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room after the {prompt_len}-token prompt; "
            "set max_new_tokens"
        )
    decoder.check_length(max_length, new_tokens)
    decoder.check_routed(config.output_routed_experts)
    drafter, draft_params = _drafter(
        config, decoder, assistant_model, assistant_params, mesh, new_tokens
    )
    if isinstance(drafter, DraftModel):
        drafter.decoder.check_length(max_length, new_tokens)

    bucket = bucket_length(prompt_len, prompt_buckets)
    extra = bucket - prompt_len
    if extra:  # left padding, masked out (np on the host: no compile per length)
        xp = jnp if traced_inputs else np
        ids = xp.pad(ids, ((0, 0), (extra, 0)), constant_values=config.pad_id)
        mask = xp.pad(mask, ((0, 0), (extra, 0)))

    host_side = not (traced_inputs or is_traced(params))
    key, per_row, drawn = _sampling_key(key, config, batch, host_side)

    static, traced = split_config(config, tokenizer=tokenizer, extra=logits_processor)
    guidance = _guidance(
        config,
        ids,
        negative_prompt_ids,
        negative_prompt_attention_mask,
        decoder.vocab_size,
        traced_inputs,
        prompt_buckets,
    )
    if guidance is not None:
        if drafter is not None:
            raise ValueError(
                "guidance_scale (classifier-free guidance) and speculative decoding "
                "(assistant_model) cannot be combined"
            )
        if np.ndim(guidance.scale) == 1 and guidance.scale.shape[0] != batch:
            raise ValueError(
                f"guidance_scale has {guidance.scale.shape[0]} values; a per-row "
                f"guidance_scale needs one value per prompt row, {batch} here"
            )
        traced = traced.replace(guidance=guidance)
    if isinstance(drafter, DraftModel) and config.assistant_confidence_threshold is not None:
        threshold = owned(config.assistant_confidence_threshold, jnp.float32)
        if np.ndim(threshold) == 1 and threshold.shape[0] != batch:
            raise ValueError(
                f"assistant_confidence_threshold has {threshold.shape[0]} values; per row it "
                f"needs one value per prompt row, {batch} here"
            )
        traced = traced.replace(assistant_confidence=threshold)
    if config.stop_strings is not None:
        stop = stop_tables(config.stop_strings, tokenizer, decoder.vocab_size)
        traced = traced.replace(stop=stop)
    check_rows(traced.processor, batch)
    plan = Plan(
        decoder=decoder,
        config=static,
        batch=batch,
        bucket=bucket,
        new_tokens=new_tokens,
        loop=loop,
        per_row_keys=per_row,
        mesh=mesh,
    )
    if not traced_inputs:
        _check_memory(plan, decoder, mesh)
    if mesh is not None:
        params = shard_params(params, mesh, decoder.param_specs)
    elif host_side:
        params = decoder.viewed(params, owner=model)
    return Request(
        plan=plan,
        params=params,
        ids=ids,
        mask=mask,
        prompt_len=jnp.int32(prompt_len),
        traced=traced,
        key=key,
        extra=extra,
        config=config,
        seed=drawn,
        drafter=drafter,
        draft_params=draft_params,
    )


_TOKEN_TABLES: dict[tuple[int, int], tuple[Any, Any]] = {}


def stop_tables(strings: Any, tokenizer: Any, vocab_size: int) -> Any:
    """The stop strings' device tables; each tokenizer's byte table is built once
    (it walks the whole vocabulary)."""
    cached = _TOKEN_TABLES.get((id(tokenizer), vocab_size))
    if cached is None or cached[0] is not tokenizer:
        cached = (tokenizer, token_tables(tokenizer, vocab_size))
        _TOKEN_TABLES[(id(tokenizer), vocab_size)] = cached
    return stop_strings(strings, tables=cached[1])


def drop_columns(x: Array, extra: int) -> Array:
    """`x[:, extra:]`, in NumPy when concrete (no compilation per prompt length)."""
    if isinstance(x, jax.core.Tracer) or _is_global(x):
        return x[:, extra:] if extra else x
    # device_put, not jnp.asarray: the latter compiles a copy for every new shape.
    return jax.device_put(np.asarray(x)[:, extra:])


def generate(
    model: Model | Decoder,
    input_ids: Any,
    attention_mask: Any = None,
    config: GenerationConfig | None = None,
    *,
    params: Any = None,
    key: Any = None,
    prompt_buckets: Any = "pow2",
    loop: str = "while",
    mesh: Mesh | None = None,
    logits_processor: LogitsProcessor | None = None,
    tokenizer: Any = None,
    assistant_model: Model | Decoder | None = None,
    assistant_params: Any = None,
    negative_prompt_ids: Any = None,
    negative_prompt_attention_mask: Any = None,
    adapter_ids: Any = None,
    **overrides: Any,
) -> GenerateOutput:
    """Generates continuations of `input_ids` in one compiled program.

    Args:
        model: a `CausalLM`, or a `Decoder` together with `params=`.
        input_ids: `[batch, prompt_len]` int token ids, left-padded.
        attention_mask: `[batch, prompt_len]`, 0 on left padding (default: all 1);
            every row needs at least one 1.
        config: a `GenerationConfig` (default: the model's), updated by `overrides`
            (any `GenerationConfig` field, e.g. `max_new_tokens=32, do_sample=True`).
        params: the parameters when `model` is a `Decoder`.
        key: for sampling: a `jax.random.key`, or `[batch]` keys (one per prompt
            row: each prompt then draws what it draws alone with its key), or an
            int seed in `[0, 2**32 - 1]`; else `config.seed`; else a fresh random
            seed, returned as `GenerateOutput.seed` (outside `jit`; inside a `jit`
            pass `key`).
        prompt_buckets: how the prompt is padded so that many lengths share one
            compilation (see `bucket_length`); invisible in the results.
        loop: "while" (default: a `lax.while_loop` that stops as soon as every
            row has finished, as transformers does) or "scan" (a `lax.scan` of
            exactly `max_new_tokens` steps, run even after every row has
            ended). Both give the same tokens and output shapes (columns after
            the end hold pad / 0). "while" works under `jit`, `vmap` and
            differentiation (`jax.grad` differentiates the "scan" program,
            since reverse mode cannot go through a while loop). Pick "scan"
            for a fixed cost per call (e.g. timing every step, or a training
            step whose cost must not depend on when the rows end); note that
            under `vmap` the while loop runs until every mapped row has ended.
            Speculative decoding always stops early.
        mesh: a `jax.sharding.Mesh` with axes `("data", "model")`
            (`jaxdecode.make_mesh`): rows over `data`, weights, KV-cache heads
            and the vocabulary over `model` (see `jaxdecode.sharding`). The
            tokens are the single-device ones.
        logits_processor: extra processors (a processor or `chain`, stateful
            ones included, e.g. `jd.json_schema(schema, lm.tokenizer)`), placed
            where transformers puts a custom `logits_processor` list: after the
            config's processors, before the sampling warpers (temperature,
            top-k, top-p, ...). A pytree like the rest: its values are traced,
            its structure is static.
        tokenizer: for `stop_strings`, `regex`, `json_schema` and `choices`
            (default: the `CausalLM`'s tokenizer).
        assistant_model: a draft model for speculative decoding: a `CausalLM`,
            or a `Decoder` with `assistant_params=`, with the model's vocabulary;
            it proposes `num_assistant_tokens` tokens per round, which the model
            verifies in one forward pass (`jaxdecode.search.speculative`).
            `prompt_lookup_num_tokens=K` speculates without a draft model.
            Greedy output is plain greedy's; sampled output has the same
            distribution. Not with beam search or a mesh.
        assistant_params: the draft model's parameters when it is a `Decoder`.
        negative_prompt_ids: classifier-free guidance's negative prompt, `[batch
            or 1, length]` left-padded ids, with `guidance_scale` set (default:
            each prompt's last token, as transformers), or a list of one token
            list per prompt row (lengths may differ): each row guided by its
            own, as `generate` on that row alone (transformers counts a padded
            negative prompt's padding in its positions). The unconditional rows
            run in the same program with a KV cache of their own.
        negative_prompt_attention_mask: its mask, 0 on padding (default all 1).
        adapter_ids: `[batch]` ints, each prompt row's LoRA adapter among the
            model's stacked ones (`lm.load_adapter([dir, ...])`; -1: the base
            model), vLLM's multi-LoRA; traced (another choice compiles nothing).

    Returns:
        A `GenerateOutput` (with per-row `drafted` / `accepted` counts when
        speculating).

    A function over ~80 lines: mostly its docstring's arguments; the body is
    prepare, run, unpack.
    """
    req = prepare(
        model,
        input_ids,
        attention_mask,
        config,
        params=params,
        key=key,
        prompt_buckets=prompt_buckets,
        loop=loop,
        mesh=mesh,
        logits_processor=logits_processor,
        tokenizer=tokenizer,
        overrides=overrides,
        assistant_model=assistant_model,
        assistant_params=assistant_params,
        negative_prompt_ids=negative_prompt_ids,
        negative_prompt_attention_mask=negative_prompt_attention_mask,
        adapter_ids=adapter_ids,
    )
    out = req.run()
    return drop_bucket(out, req.extra).replace(seed=req.seed)


@dataclasses.dataclass(frozen=True)
class Timings:
    """Where the time of a `generate_timed` call went (wall-clock seconds).

    Attributes:
        compile_s: compiling the generate program (a read when JAX's persistent
            compilation cache has it).
        prepare_s: the weights' preparation for the batch (`Decoder.prepared`,
            e.g. fused projections), run on its own after the generate program.
        prefill_s: the prompt's forward pass, run on its own after it.
        decode_s: the program's run minus `prepare_s` and `prefill_s`: the
            decoding loop.
        steps: decoding steps the loop can run (`max_new_tokens`).
        tokens: tokens generated, over every row (EOS included, padding not).
    """

    compile_s: float
    prepare_s: float
    prefill_s: float
    decode_s: float
    steps: int
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of decoding."""
        return self.tokens / max(self.decode_s, 1e-9)


_prefill_state_jit = jax.jit(
    lambda plan, params, *args: prefill_program(plan, params, *args)[1], static_argnums=0
)


def generate_timed(
    model: Model | Decoder,
    input_ids: Any,
    attention_mask: Any = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[GenerateOutput, Timings]:
    """`generate`, and where its time went: compilation, prefill, decoding.

    The same program as `generate` with the same arguments (so the same
    output), compiled ahead of time to time the compilation apart; the weights'
    preparation and the prefill are timed by running their own programs once
    after it (a diagnostic, for `jaxdecode generate --verbose`: it costs one
    more preparation and prefill, their compilations, and while they run the
    memory of the prepared weights).

    Args:
        model: as `generate`.
        input_ids: as `generate`.
        attention_mask: as `generate`.
        config: as `generate`.
        **kwargs: `generate`'s keyword arguments and config overrides.

    Returns:
        `(the GenerateOutput generate returns, Timings)`.
    """
    # generate's keyword arguments with generate's defaults; the rest are config overrides.
    signature = inspect.signature(generate).parameters.values()
    options = {p.name: p.default for p in signature if p.kind is p.KEYWORD_ONLY}
    options.update({name: kwargs.pop(name) for name in list(kwargs) if name in options})
    req = prepare(model, input_ids, attention_mask, config, overrides=kwargs, **options)
    program, static, dynamic = req.program()
    start = time.perf_counter()
    compiled = program.lower(*static, *dynamic).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*dynamic))
    total_s = time.perf_counter() - start
    # The program's first two parts on their own: the weights' preparation, the prefill.
    plan, args = req.plan, req.args()
    prepare_params = jax.jit(plan.decoder.prepared, static_argnums=1)
    prepare_params = prepare_params.lower(args[0], plan.rows).compile()
    start = time.perf_counter()
    prepared = jax.block_until_ready(prepare_params(args[0]))
    prepare_s = time.perf_counter() - start
    prefill = _prefill_state_jit.lower(plan, prepared, *args[1:]).compile()
    start = time.perf_counter()
    jax.block_until_ready(prefill(prepared, *args[1:]))
    prefill_s = time.perf_counter() - start
    del prepared, prefill
    out = drop_bucket(out, req.extra).replace(seed=req.seed)
    timings = Timings(
        compile_s=compile_s,
        prepare_s=prepare_s,
        prefill_s=prefill_s,
        decode_s=max(total_s - prepare_s - prefill_s, 0.0),
        steps=req.plan.new_tokens,
        tokens=int(np.sum(np.asarray(out.lengths))),
    )
    return out, timings


def drop_bucket(out: GenerateOutput, extra: int) -> GenerateOutput:
    """The output without the bucket padding's columns (sequences and prompt outputs)."""
    names = ("sequences", "prompt_logprobs", "prompt_top_logprobs", "prompt_top_token_ids")
    return out.replace(
        **{n: drop_columns(getattr(out, n), extra) for n in names if getattr(out, n) is not None}
    )


# --------------------------------------------------------------------------- #
# Streaming: a Python loop over the same jitted step.
# --------------------------------------------------------------------------- #


@pytree.dataclass
class StreamStep:
    """One step of `stream`: NumPy arrays over the `batch * R` rows.

    Attributes:
        tokens: `[rows]` the tokens chosen at this step (pad for finished rows).
        logprobs: `[rows]` their log-probabilities (0 for finished rows).
        active: `[rows]` bool, False for rows that had already finished (their
            token is padding, not output).
        raw_logprobs: `[rows]` the tokens' raw-model log-probabilities
            (`output_raw_logprobs`), else None.
        top_logprobs: `[rows, n]` the n best log-probabilities (`logprobs=n`), else None.
        top_token_ids: `[rows, n]` their ids, else None.
        routed_experts: `[rows, moe_layers, k]` the experts of the forward pass
            that chose the tokens (`output_routed_experts`), else None.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    active: np.ndarray
    raw_logprobs: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    top_token_ids: np.ndarray | None = None
    routed_experts: np.ndarray | None = None


_prefill_jit = jax.jit(prefill_program, static_argnums=0)
# The state is donated: XLA updates the cache and buffers in place, step after step.
_step_jit = jax.jit(decode_step, static_argnums=(0, 4), donate_argnums=3)


def stream(
    model: Model | Decoder,
    input_ids: Any,
    attention_mask: Any = None,
    config: GenerationConfig | None = None,
    *,
    params: Any = None,
    key: Any = None,
    prompt_buckets: Any = "pow2",
    logits_processor: LogitsProcessor | None = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> Iterator[StreamStep]:
    """Yields each step's tokens as they are produced (greedy search and sampling).

    The same prefill and the same step function as `generate`, driven by a
    Python loop (one jitted call per token, the state donated), so the tokens
    equal `generate`'s for the same key. Stops when every row has finished.

    Raises:
        ValueError: at the call, before the first step (bad inputs or options,
            beam search, speculative decoding, prompt_logprobs), so that a caller
            can check everything before printing anything.
    """
    req = prepare(
        model,
        input_ids,
        attention_mask,
        config,
        params=params,
        key=key,
        prompt_buckets=prompt_buckets,
        logits_processor=logits_processor,
        tokenizer=tokenizer,
        overrides=overrides,
    )
    if req.drafter is not None:
        raise ValueError(
            "stream() decodes one token per step; speculative decoding "
            "(prompt_lookup_num_tokens) needs generate()"
        )
    if req.plan.config.num_beams > 1:
        raise ValueError(
            "stream() supports greedy search and sampling (num_beams=1); beam search only "
            "knows its best hypothesis at the end: use generate()"
        )
    if req.plan.config.prompt_logprobs >= 0:
        raise ValueError(
            "stream() yields the generated tokens only; prompt_logprobs needs generate() "
            "(or jaxdecode.score for the prompt)"
        )
    return _stream_steps(req)


def _stream_steps(req: Request) -> Iterator[StreamStep]:
    """The steps of a validated `stream` request (the generator part of `stream`)."""
    params = req.plan.decoder.prepared_outside(req.params, req.plan.rows)
    traced, state = _prefill_jit(req.plan, params, *req.args()[1:])
    for _ in range(req.plan.new_tokens):
        active = ~np.asarray(state.done)
        if not active.any():
            return
        state, out = _step_jit(req.plan, params, traced, state, True)
        host = {k: np.asarray(v) for k, v in out.items()}
        yield StreamStep(
            tokens=host["tokens"],
            logprobs=host["token_logprobs"],
            active=active,
            raw_logprobs=host.get("raw_token_logprobs"),
            top_logprobs=host.get("top_logprobs"),
            top_token_ids=host.get("top_token_ids"),
            routed_experts=host.get("routed_experts"),
        )
