"""Continuous batching: a fixed set of decode slots, refilled as rows finish.

`Engine` keeps one `[slots, max_len]` KV cache (allocated once) and the per-row
decode state of every slot. New prompts are prefilled in groups of one prompt
bucket and placed into free slots (their cache rows, context rows, processor
state rows, keys and per-row values); one jitted program then runs up to
`steps_per_call` decoding steps for every slot at once; finished rows are
harvested and their slots refilled. The host intervenes once per call.

Every row decodes exactly as it would alone: its draw is `fold_in(row key, its
own token index)` and every length is per row (`DecodeContext`), so a prompt's
tokens and log-probabilities equal `generate` on that prompt alone (same options,
same seed), whatever slot it lands in, whatever runs beside it and whatever
`steps_per_call` is.

Static (one program each): the slot count, `max_len`, the prefill group size,
each prompt bucket, the decoding strategy and which processors are present.
Traced, per row: the prompt, its seed, its `max_new_tokens`, and every per-row
value (`GenerationConfig` fields with `per_row`: temperature, top_k, top_p,
min_p, typical_p, epsilon/eta cutoffs, repetition/frequency/presence
penalties). Prompts whose other options differ cannot share slots: `Engine`
refuses them, `generate_many` runs one engine per group. Beam search and
`num_return_sequences > 1` are refused (use `generate`).

A module over ~500 lines: the engine, its two programs and the grouping rules
that decide what may share slots belong together.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import pytree
from jaxdecode.cache import KVCache
from jaxdecode.config import PER_ROW_FIELDS, SEED_MAX, GenerationConfig
from jaxdecode.context import DecodeContext
from jaxdecode.generation import available_bytes, bucket_length, stop_tables
from jaxdecode.models.base import Decoder, positions_from_mask
from jaxdecode.processors import Chain, LogitsProcessor, TracedConfig, from_config
from jaxdecode.search.loop import DecodeState, Plan, row_keys
from jaxdecode.search.sample import decode_step

Array = jax.Array

__all__ = [
    "Engine",
    "EngineResult",
    "EngineStats",
    "SlotState",
    "arrayed_fields",
    "generate_many",
    "group_key",
]

# Resolved per prompt, never part of what must be shared.
_PER_PROMPT = frozenset(PER_ROW_FIELDS) | {"seed", "max_new_tokens", "max_length"}


# --------------------------------------------------------------------------- #
# What may share slots.
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=4096)
def _structure(config: GenerationConfig) -> Any:
    return jax.tree_util.tree_structure(from_config(config))


def group_key(config: GenerationConfig) -> tuple:
    """What prompts must have in common to share one engine (one decode program):
    every option except the per-row values, the seed and the length, and which
    processors are present (the chain's tree structure)."""
    fixed = tuple(
        (f.name, getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name not in _PER_PROMPT
    )
    same = config.replace(seed=None, max_new_tokens=None, max_length=None)
    return fixed, _structure(same)


def arrayed_fields(config: GenerationConfig, rows: int) -> tuple[str, ...]:
    """The per-row fields that can be `[rows]` arrays without changing which
    processors are present (an absent processor's neutral value stays a scalar,
    part of `group_key`)."""
    base = jax.tree_util.tree_structure(from_config(config))
    out = []
    for name in PER_ROW_FIELDS:
        value = getattr(config, name)
        if value is None:
            continue
        try:  # an array makes a processor present: it may refuse a neutral value
            trial = from_config(config.replace(**{name: np.full(rows, value)}))
        except ValueError:
            continue
        if jax.tree_util.tree_structure(trial) == base:
            out.append(name)
    return tuple(out)


def _row_values(configs: Sequence[GenerationConfig], arrayed: tuple[str, ...]) -> dict:
    """`{field: [rows] array}`: float64 (so that a top-p cutoff `1 - p` is rounded
    from the same float64 as for a scalar p), int32 for top_k."""
    return {
        name: np.asarray(
            [getattr(c, name) for c in configs], np.int32 if name == "top_k" else np.float64
        )
        for name in arrayed
    }


def _put_per_row(live: Chain, new: Chain, slots: Array) -> Chain:
    """`live` with the per-row values of `new` (`[n]`) written into rows `slots`."""
    procs = []
    for p, q in zip(live.processors, new.processors, strict=True):
        changes = {
            field: getattr(p, field).at[slots].set(getattr(q, field), mode="drop")
            for field in p.row_fields
            if jnp.ndim(getattr(p, field)) == 1
        }
        procs.append(dataclasses.replace(p, **changes) if changes else p)
    return Chain(processors=tuple(procs))


def _put_rows(live: Any, new: Any, slots: Array) -> Any:
    """Every leaf's rows `slots` set from `new` (rows on axis 0; a `KVCache`'s
    `k`/`v` on axis 1); rows past the end (unused prefill rows) are dropped."""

    def put(x: Any, y: Any) -> Any:
        if isinstance(x, KVCache):
            return x.replace(
                k=x.k.at[:, slots].set(y.k.astype(x.k.dtype), mode="drop"),
                v=x.v.at[:, slots].set(y.v.astype(x.v.dtype), mode="drop"),
                mask=x.mask.at[slots].set(y.mask, mode="drop"),
                index=x.index.at[slots].set(y.index, mode="drop"),
            )
        if jnp.ndim(x) == 0:
            return x  # the loop's step counter
        return x.at[slots].set(y, mode="drop")

    return jax.tree_util.tree_map(put, live, new, is_leaf=lambda x: isinstance(x, KVCache))


# --------------------------------------------------------------------------- #
# The two programs.
# --------------------------------------------------------------------------- #


@pytree.dataclass
class SlotState:
    """Everything on device (`S` slots, `L = max_len`).

    Attributes:
        dec: the greedy/sampling `DecodeState` of the slots (`done` is True for
            finished and empty slots).
        traced: the processor chain, its per-row values `[S]`.
        max_new: `[S]` int32, each row's `max_new_tokens`.
        logp: `[S, L]` float32, log-probability of each generated token.
    """

    dec: DecodeState
    traced: TracedConfig
    max_new: Array
    logp: Array


def _admit(
    plan: Plan,
    params: Any,
    state: SlotState,
    ids: Array,
    mask: Array,
    slots: Array,
    max_new: Array,
    seeds: Array,
    processor: Chain,
) -> SlotState:
    """Prefills `n` prompts of one bucket and places them into `slots`.

    Args:
        ids: `[n, bucket]` left-padded (bucket padding only) prompt ids.
        mask: `[n, bucket]` 0 on the padding.
        slots: `[n]` int32 target slots; `S` (past the end) for unused rows.
        max_new: `[n]` int32 `max_new_tokens` per prompt.
        seeds: `[n]` uint32, each prompt's seed (its key is `jax.random.key(seed)`,
            as `generate(seed=...)` makes it).
        processor: the chain with the new rows' per-row values `[n]`.
    """
    n, bucket = ids.shape
    width = state.logp.shape[1]
    cache = plan.decoder.init_cache(n, width, None)
    # The LM head on the last position only: the others' logits are not needed.
    last, cache = plan.decoder.prefill_last(params, ids, positions_from_mask(mask), cache, mask)
    prompt_len = jnp.sum(mask, axis=-1).astype(jnp.int32)
    pad = jnp.full((n, width - bucket), plan.config.pad_token_id, jnp.int32)
    ctx = DecodeContext.from_ids(
        jnp.concatenate([ids, pad], axis=1),
        vocab_size=last.shape[-1],
        prompt_length=prompt_len,
        max_length=prompt_len + max_new,
        attention_mask=mask,
        offset=bucket - prompt_len,
        cur_len=prompt_len,
    )
    keys = jax.vmap(jax.random.key)(seeds)
    rows = DecodeState(
        ctx=ctx,
        cache=cache,
        logits=last,
        done=jnp.zeros((n,), bool),
        positions=prompt_len,
        lengths=jnp.zeros((n,), jnp.int32),
        step=state.dec.step,
        row_keys=row_keys(keys, n, 1, True),
        proc_state=processor.init(ctx),
        stop_window=None if state.traced.stop is None else state.traced.stop.init(ctx),
    )
    traced = state.traced.replace(processor=_put_per_row(state.traced.processor, processor, slots))
    return state.replace(
        dec=_put_rows(state.dec, rows, slots),
        traced=traced,
        max_new=state.max_new.at[slots].set(max_new, mode="drop"),
        logp=state.logp.at[slots].set(0.0, mode="drop"),
    )


def _decode(
    plan: Plan, steps: int, params: Any, state: SlotState, want: Array
) -> tuple[SlotState, Array, Array]:
    """Up to `steps` decoding steps for every slot; stops early (after at least
    one step) once `want` slots are finished or empty, so that waiting prompts
    get their slots. Returns the state, the steps run and the tokens generated
    (live slot-steps)."""
    slots = state.max_new.shape[0]
    rows = jnp.arange(slots)

    def body(carry):
        i, work, st = carry
        live = ~st.dec.done
        dec, out = decode_step(plan, params, st.traced, st.dec, True)
        col = jnp.where(live, st.dec.lengths, st.logp.shape[1])
        logp = st.logp.at[rows, col].set(out["logp"], mode="drop")
        dec = dec.replace(done=dec.done | (dec.lengths >= st.max_new))
        return i + 1, work + jnp.sum(live), st.replace(dec=dec, logp=logp)

    def cond(carry):
        i, _, st = carry
        return (i < steps) & ((i == 0) | (jnp.sum(st.dec.done) < want))

    n, work, state = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.int32(0), state))
    return state, n, work


def _empty(plan: Plan, width: int, processor: Chain, stop: Any) -> SlotState:
    """Every slot empty (finished), with the per-row values of `processor` and
    the stop strings' tables `stop` (or None)."""
    slots, decoder = plan.batch, plan.decoder
    ids = jnp.full((slots, width), plan.config.pad_token_id, jnp.int32)
    zeros = jnp.zeros((slots,), jnp.int32)
    ctx = DecodeContext.from_ids(
        ids, vocab_size=decoder.vocab_size, prompt_length=zeros, max_length=zeros + 1, cur_len=zeros
    )
    dec = DecodeState(
        ctx=ctx,
        cache=decoder.init_cache(slots, width, None),
        logits=jnp.zeros((slots, decoder.vocab_size), jnp.float32),
        done=jnp.ones((slots,), bool),
        positions=zeros,
        lengths=zeros,
        step=jnp.zeros((), jnp.int32),
        row_keys=jax.vmap(jax.random.key)(zeros.astype(jnp.uint32)),
        proc_state=processor.init(ctx),
        stop_window=None if stop is None else stop.init(ctx),
    )
    return SlotState(
        dec=dec,
        traced=TracedConfig(processor=processor, length_penalty=jnp.float32(1.0), stop=stop),
        max_new=zeros,
        logp=jnp.zeros((slots, width), jnp.float32),
    )


def _take(state: SlotState, rows: Array) -> SlotState:
    """The state of slots `rows` only (`[n]` int32): every per-row leaf, the
    cache's rows and the processors' per-row values; shared tables as they are."""

    def take(x: Any) -> Any:
        if isinstance(x, KVCache):
            return x.replace(k=x.k[:, rows], v=x.v[:, rows], mask=x.mask[rows], index=x.index[rows])
        return x if jnp.ndim(x) == 0 else x[rows]

    dec = jax.tree_util.tree_map(take, state.dec, is_leaf=lambda x: isinstance(x, KVCache))
    procs = []
    for p in state.traced.processor.processors:
        changes = {
            field: getattr(p, field)[rows]
            for field in p.row_fields
            if jnp.ndim(getattr(p, field)) == 1
        }
        procs.append(dataclasses.replace(p, **changes) if changes else p)
    traced = state.traced.replace(processor=Chain(processors=tuple(procs)))
    return SlotState(dec=dec, traced=traced, max_new=state.max_new[rows], logp=state.logp[rows])


def _spread(full: SlotState, small: SlotState, rows: Array) -> SlotState:
    """`full` with its slots `rows` set from every row of `small` (`_take`'s inverse)."""
    traced = full.traced.replace(
        processor=_put_per_row(full.traced.processor, small.traced.processor, rows)
    )
    return full.replace(
        dec=_put_rows(full.dec, small.dec, rows),
        traced=traced,
        max_new=full.max_new.at[rows].set(small.max_new),
        logp=full.logp.at[rows].set(small.logp),
    )


_empty_jit = jax.jit(_empty, static_argnums=(0, 1))
_take_jit = jax.jit(_take)
_spread_jit = jax.jit(_spread, donate_argnums=0)
_admit_jit = jax.jit(_admit, static_argnums=0, donate_argnums=2)
_decode_jit = jax.jit(_decode, static_argnums=(0, 1), donate_argnums=3)
_prepare_jit = jax.jit(
    lambda decoder, params, rows: decoder.prepared(params, rows), static_argnums=(0, 2)
)


# --------------------------------------------------------------------------- #
# The host side.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class EngineResult:
    """One finished prompt.

    Attributes:
        index: the prompt's number in submission order (0, 1, ...).
        prompt: its token ids.
        tokens: `[n]` int32 generated tokens, EOS included when it ended the row.
        token_logprobs: `[n]` float32 log-probability of each (processed scores).
        config: the prompt's resolved config (`max_new_tokens` set, its seed when
            sampling).
        seed: the seed it sampled with (drawn here when it had none), else None.
    """

    index: int
    prompt: tuple[int, ...]
    tokens: np.ndarray
    token_logprobs: np.ndarray
    config: GenerationConfig
    seed: int | None


@dataclasses.dataclass
class EngineStats:
    """Counters of one engine (`Engine.stats`).

    Attributes:
        slots: the engine's slots.
        calls: decode program calls.
        steps: decoding steps run (over all calls).
        work: tokens generated (slot-steps of live rows).
        waiting_steps, waiting_work: the same, over the calls that started
            with prompts waiting for a slot.
        tokens: tokens of the finished prompts.
        row_steps: rows computed (steps times the rows of the state; fewer
            than `steps * slots` when `compact_tail` shrank the state).
        prefills: prefill program calls.
        finished: prompts finished.
    """

    slots: int = 0
    calls: int = 0
    steps: int = 0
    work: int = 0
    waiting_steps: int = 0
    waiting_work: int = 0
    tokens: int = 0
    prefills: int = 0
    finished: int = 0
    row_steps: int = 0

    @property
    def occupancy(self) -> float:
        """Fraction of slot-steps that generated a token."""
        return self.work / max(self.steps * self.slots, 1)

    @property
    def compute_occupancy(self) -> float:
        """Fraction of the rows computed that generated a token (equals
        `occupancy` unless `compact_tail` shrank the state)."""
        return self.work / max(self.row_steps, 1)

    @property
    def occupancy_while_waiting(self) -> float:
        """The occupancy while prompts were waiting for a slot: how well the
        engine refills (the rest is the tail, when the last rows run with
        fewer neighbours than slots)."""
        return self.waiting_work / max(self.waiting_steps * self.slots, 1)


@dataclasses.dataclass
class _Pending:
    index: int
    ids: tuple[int, ...]
    config: GenerationConfig
    seed: int
    bucket: int
    max_new: int


def _model_parts(model: Any) -> tuple[Decoder, Any, GenerationConfig]:
    decoder = getattr(model, "decoder", None)
    if not isinstance(decoder, Decoder):
        raise ValueError(f"model must be a CausalLM, got {type(model).__name__}")
    return decoder, model.params, model.generation_config


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


class Engine:
    """Continuous batching over a fixed set of slots (see the module docstring).

    >>> engine = Engine(lm, slots=64, max_len=512, config=lm.generation_config)
    >>> engine.submit(prompts, [{"temperature": 0.7, "seed": 1}, ...])
    >>> for result in engine:  # as prompts finish
    ...     print(result.index, result.tokens)

    Args:
        model: a `CausalLM` (`from_pretrained`, or built around a `Decoder`).
        slots: rows decoded together (the cache's batch).
        max_len: cache columns per slot: every prompt's bucket plus its
            `max_new_tokens` must fit.
        config: the options every prompt starts from (default: the model's);
            its static part (strategy, which processors, EOS, pad) is the
            engine's.
        prompt_buckets: prompt padding rule (`bucket_length`): one prefill
            program per bucket.
        steps_per_call: most decoding steps per call of the decode program
            (static); a call ends earlier once enough slots are free for the
            prompts waiting.
        prefill_rows: prompts prefilled together (static; default
            `min(slots, 8)`).
        compact_tail: when no prompt waits and at most a quarter of the rows
            decoding are live, move the live rows into a state of a quarter as
            many rows (down to one), so that the tail's steps compute only them
            (on a CPU a step costs in proportion to its rows). The programs of
            every size (`slots`, `slots/4`, ...) are compiled here, at
            construction; a `submit` after compaction moves the rows back
            (compiling that copy on its first use).

    Raises:
        ValueError: a bad argument, or a slot cache that cannot fit in the
            device's free memory (checked before allocating).
    """

    def __init__(
        self,
        model: Any,
        *,
        slots: int = 64,
        max_len: int,
        config: GenerationConfig | None = None,
        prompt_buckets: Any = "pow2",
        steps_per_call: int = 16,
        prefill_rows: int | None = None,
        compact_tail: bool = False,
    ) -> None:
        decoder, params, base = _model_parts(model)
        self.slots = _check_int("slots", slots, 1)
        self.max_len = _check_int("max_len", max_len, 2)
        self.steps_per_call = _check_int("steps_per_call", steps_per_call, 1)
        rows = min(self.slots, 8) if prefill_rows is None else prefill_rows
        self.prefill_rows = _check_int("prefill_rows", rows, 1)
        bucket_length(1, prompt_buckets)  # validates the rule
        self.prompt_buckets = prompt_buckets
        if config is not None and not isinstance(config, GenerationConfig):
            raise ValueError(f"config must be a GenerationConfig, got {type(config).__name__}")
        self.config = (config or base).validate(vocab_size=decoder.vocab_size)
        _check_strategy(self.config)
        self.decoder = decoder
        self.tokenizer = getattr(model, "tokenizer", None)
        self._key = group_key(self.config)
        self._arrayed = arrayed_fields(self.config, self.slots)
        self.cache_bytes, self.state_bytes = self._check_memory()
        static = self.config.replace(max_new_tokens=self.max_len, max_length=None).static()
        self._plan = Plan(
            decoder=decoder,
            config=static,
            batch=self.slots,
            bucket=0,
            new_tokens=self.max_len,
            loop="scan",
            per_row_keys=True,
        )
        self._params = _prepare_jit(decoder, params, self.slots)
        # Row counts the state may shrink to: slots, slots/4, ... (rounded up), 1.
        self._levels = [self.slots]
        while compact_tail and self._levels[-1] > 1:
            self._levels.append(-(-self._levels[-1] // 4))
        stop = None
        if self.config.stop_strings is not None:
            if self.tokenizer is None:
                raise ValueError("stop_strings needs the model's tokenizer (the model has none)")
            stop = stop_tables(self.config.stop_strings, self.tokenizer, decoder.vocab_size)
        self._stop = stop
        self._state = _empty_jit(self._plan, self.max_len, self._template(self.slots), stop)
        self._size = self.slots  # rows of self._state
        self._small: dict[int, tuple[Plan, Any]] = {}
        for size in self._levels[1:]:  # compile every size's programs now
            plan = dataclasses.replace(self._plan, batch=size)
            self._small[size] = (plan, _prepare_jit(decoder, params, size))
        if len(self._levels) > 1:
            state = _empty_jit(self._plan, self.max_len, self._template(self.slots), stop)
            for size in self._levels[1:]:
                state = _take_jit(state, jnp.arange(size, dtype=jnp.int32))
                plan, prepared = self._small[size]
                state, _, _ = _decode_jit(
                    plan, self.steps_per_call, prepared, state, jnp.int32(size + 1)
                )
            del state
        # Waiting prompts by bucket, each in submission order.
        self._pending: dict[int, collections.deque[_Pending]] = {}
        self._owner: dict[int, _Pending] = {}
        self._free = list(range(self.slots))
        self._submitted = 0
        self.stats = EngineStats(slots=self.slots)

    # ------------------------------------------------------------------ #
    def _template(self, rows: int, configs: Sequence[GenerationConfig] | None = None) -> Chain:
        """The chain with per-row values `[rows]` (from `configs`, else the
        engine's config repeated); tables sized for the longest row."""
        configs = list(configs) if configs else [self.config] * rows
        values = _row_values(configs, self._arrayed)
        config = configs[0].replace(**values, max_new_tokens=self.max_len, max_length=None)
        return from_config(config)

    def _check_memory(self) -> tuple[int, int]:
        slots, width, vocab = self.slots, self.max_len, self.decoder.vocab_size
        cache = jax.eval_shape(lambda: self.decoder.init_cache(slots, width, None))
        cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
        chain = jax.eval_shape(lambda: self._template(slots))
        # Tallies of stateful processors are [slots, vocab]; logits, scores and a
        # few temporaries per step; the token buffer and log-probabilities.
        tallies = sum(
            slots * vocab * 4 for p in chain.processors if type(p).init is not LogitsProcessor.init
        )
        other = 8 * slots * vocab * 4 + 2 * slots * width * 4 + tallies
        free = available_bytes()
        if free is not None and cache_bytes + other > free:
            raise ValueError(
                f"Engine(slots={slots}, max_len={width}) needs about "
                f"{(cache_bytes + other) / 2**30:.2f} GiB (KV cache {cache_bytes / 2**30:.2f} GiB) "
                f"but the device has {free / 2**30:.2f} GiB free; lower slots or max_len"
            )
        return int(cache_bytes), int(other)

    # ------------------------------------------------------------------ #
    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        configs: Any = None,
    ) -> list[int]:
        """Queues prompts; returns their indices (as `EngineResult.index`).

        Args:
            prompts: token id sequences (or strings, when the model has a tokenizer).
            configs: None (the engine's config), one `GenerationConfig` or dict
                of overrides for every prompt, or one per prompt. A prompt that
                samples without a seed gets a fresh one (reported in its result).

        Raises:
            ValueError (before anything is queued): a bad prompt, a prompt that
            does not fit `max_len`, or options that cannot share this engine's
            program (name the field; see `generate_many`).
        """
        prompts = list(prompts)
        if isinstance(configs, (list, tuple)):
            if len(configs) != len(prompts):
                raise ValueError(
                    f"configs has {len(configs)} entries for {len(prompts)} prompts; give one "
                    "per prompt, or one for all"
                )
            per = list(configs)
        else:
            per = [configs] * len(prompts)
        items = [
            self._resolve(self._submitted + i, p, c)
            for i, (p, c) in enumerate(zip(prompts, per, strict=True))
        ]
        for it in items:
            self._pending.setdefault(it.bucket, collections.deque()).append(it)
        self._submitted += len(items)
        return [it.index for it in items]

    def _resolve(self, index: int, prompt: Any, override: Any) -> _Pending:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but the model has no tokenizer")
            prompt = self.tokenizer.encode(prompt)
        ids = tuple(int(t) for t in np.asarray(prompt).reshape(-1))
        vocab = self.decoder.vocab_size
        if not ids:
            raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt {index}: token ids must be in [0, {vocab - 1}]")
        config = _overridden(self.config, override)
        config = config.validate(vocab_size=vocab)
        _check_strategy(config)
        total = config.resolve_max_length(len(ids))
        max_new = total - len(ids)
        if max_new < 1:
            raise ValueError(
                f"prompt {index}: max_length={total} leaves no room after its {len(ids)} tokens"
            )
        self.decoder.check_length(total)
        bucket = bucket_length(len(ids), self.prompt_buckets)
        if bucket + max_new > self.max_len:
            raise ValueError(
                f"prompt {index}: its bucket ({bucket} tokens) plus max_new_tokens={max_new} "
                f"exceeds the engine's max_len={self.max_len}"
            )
        config = config.replace(max_new_tokens=max_new, max_length=None)
        seed = 0
        if config.do_sample:
            seed = config.seed if config.seed is not None else secrets.randbits(32)
            if not 0 <= seed <= SEED_MAX:
                raise ValueError(f"seed must be in [0, {SEED_MAX}], got {seed}")
            config = config.replace(seed=seed)
        if group_key(config) != self._key:
            raise ValueError(
                f"prompt {index}: {_difference(config, self.config)} differs from the engine's "
                "config, so it cannot share its slots (per row may differ: "
                f"{', '.join(PER_ROW_FIELDS)}, seed, max_new_tokens); use generate_many, which "
                "runs one engine per group"
            )
        return _Pending(index, ids, config, seed, bucket, max_new)

    # ------------------------------------------------------------------ #
    @property
    def pending(self) -> int:
        """Prompts submitted and not finished yet."""
        return self._waiting() + len(self._owner)

    def _waiting(self) -> int:
        return sum(len(q) for q in self._pending.values())

    def __iter__(self) -> Iterator[EngineResult]:
        """Runs until every submitted prompt is finished, yielding each result as
        its row finishes (not in submission order)."""
        while self.pending:
            yield from self.step()

    def step(self) -> list[EngineResult]:
        """One round: fill free slots, one call of the decode program, harvest."""
        self._admit_waiting()
        if not self._owner:
            return []
        waiting = self._waiting()
        if not waiting:
            self._compact()
        want = len(self._free) + min(waiting, self.prefill_rows) if waiting else self._size + 1
        plan, params = (
            (self._plan, self._params) if self._size == self.slots else self._small[self._size]
        )
        self._state, n, work = _decode_jit(
            plan, self.steps_per_call, params, self._state, jnp.int32(want)
        )
        n, work = int(n), int(work)
        self.stats.calls += 1
        self.stats.steps += n
        self.stats.row_steps += n * self._size
        self.stats.work += work
        if waiting:
            self.stats.waiting_steps += n
            self.stats.waiting_work += work
        return self._harvest()

    def _compact(self) -> None:
        """Live rows into the next smaller state while they fit (`compact_tail`)."""
        level = self._levels.index(self._size)
        while level + 1 < len(self._levels) and len(self._owner) <= self._levels[level + 1]:
            size = self._levels[level + 1]
            live = sorted(self._owner)
            rows = live + [s for s in range(self._size) if s not in self._owner][: size - len(live)]
            self._state = _take_jit(self._state, jnp.asarray(rows, jnp.int32))
            self._owner = {j: self._owner[s] for j, s in enumerate(live)}
            self._free = list(range(len(live), size))
            self._size, level = size, level + 1

    def _expand(self) -> None:
        """Back to all slots (prompts were submitted after compaction)."""
        full = _empty_jit(self._plan, self.max_len, self._template(self.slots), self._stop)
        rows = jnp.arange(self._size, dtype=jnp.int32)
        self._state = _spread_jit(full, self._state, rows)
        self._free = sorted(self._free + list(range(self._size, self.slots)))
        self._size = self.slots

    def _admit_waiting(self) -> None:
        if self._pending and self._size < self.slots:
            self._expand()
        while self._free and self._pending:
            # The bucket of the oldest waiting prompt; up to prefill_rows of it.
            bucket = min(self._pending, key=lambda b: self._pending[b][0].index)
            queue = self._pending[bucket]
            take = min(len(self._free), self.prefill_rows, len(queue))
            group = [queue.popleft() for _ in range(take)]
            if not queue:
                del self._pending[bucket]
            self._place(group, [self._free.pop(0) for _ in group])

    def _place(self, group: list[_Pending], slots: list[int]) -> None:
        rows, bucket = self.prefill_rows, group[0].bucket
        filler = group + [group[-1]] * (rows - len(group))
        ids = np.full((rows, bucket), self._plan.config.pad_token_id, np.int32)
        mask = np.zeros((rows, bucket), np.int32)
        for r, it in enumerate(filler):
            ids[r, bucket - len(it.ids) :] = it.ids
            mask[r, bucket - len(it.ids) :] = 1
        target = np.asarray(slots + [self.slots] * (rows - len(group)), np.int32)
        max_new = np.asarray([it.max_new for it in filler], np.int32)
        seeds = np.asarray([it.seed for it in filler], np.uint32)
        processor = self._template(rows, [it.config for it in filler])
        self._state = _admit_jit(
            self._plan, self._params, self._state, ids, mask, target, max_new, seeds, processor
        )
        for slot, it in zip(slots, group, strict=True):
            self._owner[slot] = it
        self.stats.prefills += 1

    def _harvest(self) -> list[EngineResult]:
        done = np.asarray(self._state.dec.done)
        finished = [s for s in sorted(self._owner) if done[s]]
        if not finished:
            return []
        seqs = np.asarray(self._state.dec.ctx.sequences)
        lengths = np.asarray(self._state.dec.lengths)
        logp = np.asarray(self._state.logp)
        out = []
        for slot in finished:
            it = self._owner.pop(slot)
            n = int(lengths[slot])
            out.append(
                EngineResult(
                    index=it.index,
                    prompt=it.ids,
                    tokens=seqs[slot, it.bucket : it.bucket + n].copy(),
                    token_logprobs=logp[slot, :n].copy(),
                    config=it.config,
                    seed=it.seed if it.config.do_sample else None,
                )
            )
            self.stats.tokens += n
            self.stats.finished += 1
        self._free = sorted(self._free + finished)
        return out


def _check_strategy(config: GenerationConfig) -> None:
    if config.num_beams > 1 or config.num_return_sequences > 1:
        raise ValueError(
            f"the engine decodes one sequence per prompt (greedy search or sampling); "
            f"num_beams={config.num_beams}, num_return_sequences={config.num_return_sequences} "
            "need generate()"
        )
    for name in ("output_scores", "output_logits"):
        if getattr(config, name):
            raise ValueError(
                f"the engine returns tokens and their log-probabilities; {name}=True needs "
                "generate()"
            )
    if config.prompt_lookup_num_tokens is not None:
        raise ValueError(
            "the engine decodes one token per slot and step; speculative decoding "
            f"(prompt_lookup_num_tokens={config.prompt_lookup_num_tokens}) needs generate()"
        )


def _difference(a: GenerationConfig, b: GenerationConfig) -> str:
    for f in dataclasses.fields(a):
        if f.name in _PER_PROMPT:
            continue
        if getattr(a, f.name) != getattr(b, f.name):
            return f"{f.name}={getattr(a, f.name)!r} (engine: {getattr(b, f.name)!r})"
    return "which processors are present (a per-row value at its neutral setting)"


def _overridden(base: GenerationConfig, override: Any) -> GenerationConfig:
    """A prompt's config: `base`, a whole `GenerationConfig`, or `base` with a dict."""
    if override is None:
        return base
    if isinstance(override, GenerationConfig):
        return override
    if isinstance(override, dict):
        return base.replace(**override)
    raise ValueError(
        f"configs entries must be a GenerationConfig, a dict or None, got {override!r}"
    )


def generate_many(
    model: Any,
    prompts: Sequence[Sequence[int]],
    configs: Any = None,
    *,
    slots: int = 64,
    max_len: int | None = None,
    prompt_buckets: Any = "pow2",
    steps_per_call: int = 16,
    prefill_rows: int | None = None,
    compact_tail: bool = False,
    **overrides: Any,
) -> list[EngineResult]:
    """Generates for many prompts with continuous batching; results in prompt order.

    Prompts whose options cannot share slots (`group_key`) run in separate
    engines, one after the other. Each result equals `generate` on that prompt
    alone with its options and seed.

    Args:
        model: a `CausalLM`.
        prompts: token id sequences.
        configs: as `Engine.submit` (None, one config or dict, or one per prompt).
        slots, prompt_buckets, steps_per_call, prefill_rows, compact_tail: as
            `Engine`.
        max_len: cache columns per slot (default: the longest prompt bucket plus
            `max_new_tokens` among the prompts).
        **overrides: `GenerationConfig` fields applied to the model's config
            before `configs`.
    """
    decoder, _, base = _model_parts(model)
    base = base.replace(**overrides) if overrides else base
    prompts = list(prompts)
    per = list(configs) if isinstance(configs, (list, tuple)) else [configs] * len(prompts)
    if len(per) != len(prompts):
        raise ValueError(f"configs has {len(per)} entries for {len(prompts)} prompts")
    resolved = [_overridden(base, c).validate(vocab_size=decoder.vocab_size) for c in per]
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(resolved):
        _check_strategy(c)
        groups.setdefault(group_key(c), []).append(i)
    results: list[EngineResult | None] = [None] * len(prompts)
    for members in groups.values():
        need = max(
            bucket_length(len(prompts[i]), prompt_buckets)
            + resolved[i].resolve_max_length(len(prompts[i]))
            - len(prompts[i])
            for i in members
        )
        engine = Engine(
            model,
            slots=slots,
            max_len=max_len or need,
            config=resolved[members[0]],
            prompt_buckets=prompt_buckets,
            steps_per_call=steps_per_call,
            prefill_rows=prefill_rows,
            compact_tail=compact_tail,
        )
        engine.submit([prompts[i] for i in members], [resolved[i] for i in members])
        for r in engine:
            results[members[r.index]] = dataclasses.replace(r, index=members[r.index])
        del engine
    return results  # type: ignore[return-value]
