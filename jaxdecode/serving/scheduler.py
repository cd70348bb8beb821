"""The continuous-batching engine's host side: a fixed set of decode slots, refilled as rows finish.

`Engine` keeps one KV cache (allocated once: by default a pool of pages, see
below; `page_size=None`: one dense `[slots, max_len]` cache) and the per-row
decode state of every slot. New prompts are prefilled in groups of one prompt
bucket and placed into free slots (their cache rows, context rows, processor
state rows, keys and per-row values); one jitted program then runs up to
`steps_per_call` decoding steps for every slot at once; finished rows are
harvested and their slots refilled. The host intervenes once per call.

Every row decodes exactly as it would alone: its draw is `fold_in(row key, its
own token index)` and every length is per row (`DecodeContext`), so a prompt's
tokens and log-probabilities equal `generate` on that prompt alone (same options,
same seed), whatever slot it lands in, whatever runs beside it and whatever
`steps_per_call` is. The extra outputs `generate` gives for one sequence are
recorded per slot too: raw log-probabilities (`output_raw_logprobs`), the top-n
alternatives (`logprobs=n`) and the prompt's log-probabilities
(`prompt_logprobs`, from the prefill).

Output constraints (`regex`, `json_schema`, `choices`) are per row: the engine
keeps one union table (`grammar.UnionTable`) of every distinct constraint it
has been given, built on the host at `submit` (each constraint compiled once,
appended, so the states of rows already decoding keep their numbers), and each
slot's automaton state is its row of the processor state, set to the
constraint's start state when a prompt is placed into the slot (`FREE`, a
pass-through, for a prompt without one). The table's arrays keep their shapes
(states and transitions padded to powers of two, never shrinking) until the
set outgrows them: then, and when the first constraint arrives, the programs
compile again; a fixed set of constraints, or a new set that fits the same
bucket, compiles nothing. When no prompt is live or waiting, `submit` starts
the set afresh (same shapes), so the table holds the constraints of one run of
prompts, not of the engine's whole life. An engine that never sees a
constraint has no constraint processor at all.

Static (one program each): the slot count, `max_len`, the prefill group size,
each prompt bucket (paged: each chunk bucket, for a prompt's last chunk and
for the others), the page pool's shape, the decoding
strategy, which processors are present and the constraint table's shape.
Traced, per row (and the page tables): the prompt, its seed, its
`max_new_tokens`, its constraint and every per-row value (`GenerationConfig`
fields with `per_row`: temperature, top_k, top_p, min_p, typical_p,
epsilon/eta cutoffs, repetition/frequency/presence penalties). Prompts whose
other options differ cannot share slots: `Engine` refuses them,
`generate_many` runs one engine per group. Beam search and
`num_return_sequences > 1` are refused (use `generate`).

On a device mesh (`mesh=`, axes `data` and `model`) the slots split over
`data` (their number a multiple of its size, checked first), the weights by
the family's `param_specs` and the cache's heads and the logits' vocabulary
over `model`; the programs are the same, constrained to that layout, and every
prompt's tokens equal one device's. A pool of pages splits its kv heads over
`model` and is replicated over `data` (each data shard holds the whole pool of
its heads, so any row may name any page, a prefix cache hit included); the page
tables and the rest of the rows split over `data` as the dense slots do.

With `page_size` (16 by default) the cache is a `PagedCache` (a pool of pages,
a page table per slot): the host (`jaxdecode.serving.pages.PagePool`) hands out pages,
admits a prompt when its pages are free, reuses cached prompt pages (the prefix
cache), prefills long prompts in chunks (`prefill_chunk`) between decode calls,
gives each decoding row the pages its next call writes and, when the pool is
short, sends the newest rows back to the queue (recomputed later, same tokens).
The page table travels to the programs as an argument each call.

The device side (the pure programs: prefill-and-insert, decode, take, spread)
lives in `jaxdecode.serving.programs`; this module is the host side, JetStream's
split: queue, slot bookkeeping, grouping and harvest.

A module over ~500 lines: the queue, admission (by slots, or by pages with
chunks and preemption), compaction and harvest of one `Engine` share its
bookkeeping; `generate_many` and `slot_memory` are its two thin users. The
pages' own bookkeeping (free pages, references, the prefix cache) is
`serving.pages`.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdecode.cache import cache_nbytes
from jaxdecode.config import PER_ROW_FIELDS, SEED_MAX, GenerationConfig
from jaxdecode.errors import MemoryBudgetError
from jaxdecode.generation import available_bytes, bucket_length, model_parts, stop_tables
from jaxdecode.models.base import Decoder, Model
from jaxdecode.processors import Chain, LogitsProcessor, from_config
from jaxdecode.processors.grammar import FREE, Grammar, UnionTable, compile_spec, spec_key
from jaxdecode.rows import (
    arrayed_fields,
    group_key,
    per_prompt_fields,
    row_values,
    unconstrained,
)
from jaxdecode.search.loop import Plan
from jaxdecode.serving import programs
from jaxdecode.serving.pages import PagePool, chain_hashes, pages_for, table_row
from jaxdecode.sharding import DATA, check_mesh, per_device_bytes, shard_params

Array = jax.Array

__all__ = [
    "Engine",
    "EngineResult",
    "EngineStats",
    "generate_many",
    "slot_memory",
]


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
        raw_token_logprobs: `[n]` float32 the tokens' log-probabilities under the
            model alone (`output_raw_logprobs`), else None.
        top_logprobs, top_token_ids: `[n, k]` the k best log-probabilities at
            each step and their ids (`logprobs=k`), else None.
        prompt_logprobs: `[p]` float32 each prompt token's log-probability given
            the tokens before it, 0 for the first (`prompt_logprobs`), else None.
        prompt_top_logprobs, prompt_top_token_ids: `[p, k]` the k best at each
            prompt position (0 and the pad id for the first) (`prompt_logprobs=k`,
            k >= 1), else None.
        routed_experts: `[n, moe_layers, k]` int32 the experts each MoE layer
            routed the forward pass that chose each token to
            (`output_routed_experts`, a mixture-of-experts model), else None.
    """

    index: int
    prompt: tuple[int, ...]
    tokens: np.ndarray
    token_logprobs: np.ndarray
    config: GenerationConfig
    seed: int | None
    raw_token_logprobs: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    top_token_ids: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None
    prompt_top_logprobs: np.ndarray | None = None
    prompt_top_token_ids: np.ndarray | None = None
    routed_experts: np.ndarray | None = None


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
        prefills: prefill program calls (chunks included).
        finished: prompts finished.
        prefill_tokens: prompt tokens run through the model (a prefix cache
            hit's tokens are not; padding is not counted).
        prefix_tokens: prompt tokens taken from the prefix cache (paged).
        peak_kv_bytes: bytes of the pages rows held at the peak (paged; the
            dense cache: its whole size).
        preemptions: rows sent back to the queue when pages ran out (paged;
            recomputed from their prompt later, with the same tokens).
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
    prefill_tokens: int = 0
    prefix_tokens: int = 0
    peak_kv_bytes: int = 0
    preemptions: int = 0

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
    spec: tuple[str, Any] | None  # the output constraint
    # The prefill's prompt log-probabilities (device arrays of its group) and row.
    prompt_out: dict[str, Array] | None = None
    row: int = 0
    first: int = -1  # the prompt's first column in prompt_out (-1: bucket - len)
    # Paged: prefix-cache keys of its full pages, its pages in order, prompt
    # tokens already in them, whether it is still being prefilled, admission order.
    keys: list[bytes] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    start: int = 0
    filling: bool = False
    order: int = 0


def _model_parts(model: Model) -> tuple[Decoder, Any, GenerationConfig]:
    """A `Model`'s decoder, params and default config (the engine keeps the
    params it was given: a bare `Decoder` has none)."""
    if isinstance(model, Decoder):
        raise TypeError("model must be a CausalLM, got Decoder (the engine needs its params)")
    decoder, params, config, _ = model_parts(model, None)
    return decoder, params, config


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
        max_len: every prompt's bucket plus its `max_new_tokens` must fit:
            a bound per row on pages (the columns of its page table), the
            cache columns of every slot on the dense cache.
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
            every size (`slots`, `slots/4`, ...) are compiled before the first
            decoding call (and again after the constraint table grows); a
            `submit` after compaction moves the rows back (compiling that copy
            on its first use).
        mesh: a `jax.sharding.Mesh` with axes `("data", "model")`
            (`jaxdecode.make_mesh`), or None (one device): the slots split
            over `data` (`slots` must be a multiple of its size), the weights
            by the family's specs and the cache's heads and the logits'
            vocabulary over `model`. The weights are placed once (already
            placed ones are left alone). Every prompt's tokens equal one
            device's.

        page_size: keep the cache in pages of this many tokens (`PagedCache`;
            default 16; None: one dense `[slots, max_len]` cache). Prompts are
            then admitted by free pages, `max_len` bounds each row (prompt
            bucket plus `max_new_tokens`) without being allocated per slot, and
            a step reads only each row's live pages. Every bundled family has a
            paged cache (`Decoder.init_paged`; sliding-window layers read their
            window of the pages); a model without one (an adapted
            `from_linen` model, or a quantized cache over a paged cache that is
            not one `PagedCache`) gets the dense cache, and `page_size` is then
            None. On a `mesh` the pool's kv
            heads split over `model` and the pool is replicated over `data`:
            each data shard holds the whole pool of its heads (rows may use any
            page), the page tables split over `data` with the rows.
            With `cache_implementation="quantized"` the pool holds code pages
            and scale pages (`QuantizedKVCache` over a `PagedCache`); with
            `compact_tail` rows move with their page tables.
        kv_pages: pages in the pool (paged; default `slots * ceil(max_len /
            page_size)`, the dense cache's size). A prompt whose tokens plus
            `max_new_tokens` need more pages than the pool has is refused at
            `submit`; when pages run out mid-run, the newest rows go back to
            the queue and are recomputed later (same tokens).
        prefix_cache: reuse the pages of prompt prefixes seen before (paged):
            full pages keyed by a hash of their tokens and every token before
            them, kept until the pool needs them (least recently used first).
            A prompt whose leading pages are cached skips their prefill; the
            samples of one prompt (one prompt submitted with several seeds)
            share its pages. Prompts with `prompt_logprobs` are prefilled
            whole (every position's logits are needed).
        prefill_chunk: prefill long prompts (paged) in chunks of at most this
            many tokens, one chunk per round, so running rows keep decoding
            while they are read (None: a prompt's prefill is one call).

    Attributes:
        cache_bytes, state_bytes: device bytes of the slot cache (paged: the
            pool) and of the rest of the slot state (estimate). `page_bytes`
            and `kv_bytes_in_use` give the pool's bytes per page and in use.
        table_bytes: device bytes of the constraint table (0 without one).

    Raises:
        ValueError: a bad argument, or a slot cache that cannot fit in the
            device's free memory (checked before allocating).
    """

    def __init__(
        self,
        model: Model,
        *,
        slots: int = 64,
        max_len: int,
        config: GenerationConfig | None = None,
        prompt_buckets: Any = "pow2",
        steps_per_call: int = 16,
        prefill_rows: int | None = None,
        compact_tail: bool = False,
        mesh: Mesh | None = None,
        page_size: int | None = 16,
        kv_pages: int | None = None,
        prefix_cache: bool = True,
        prefill_chunk: int | None = None,
    ) -> None:
        # Over ~80 lines: the options are checked here, in the order a user
        # reads them in the class docstring, before anything is allocated.
        decoder, params, base = _model_parts(model)
        self.slots = _check_int("slots", slots, 1)
        self.mesh = check_mesh(mesh)
        if mesh is not None and self.slots % mesh.shape[DATA]:
            raise ValueError(
                f"slots={self.slots} must be a multiple of the mesh's data axis "
                f"({mesh.shape[DATA]}): each data shard holds the same number of slots"
            )
        self.max_len = _check_int("max_len", max_len, 2)
        self.steps_per_call = _check_int("steps_per_call", steps_per_call, 1)
        rows = min(self.slots, 8) if prefill_rows is None else prefill_rows
        self.prefill_rows = _check_int("prefill_rows", rows, 1)
        bucket_length(1, prompt_buckets)  # validates the rule
        self.prompt_buckets = prompt_buckets
        if config is not None and not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        self.config = (config or base).validate(vocab_size=decoder.vocab_size)
        _check_strategy(self.config)
        decoder.check_routed(self.config.output_routed_experts)
        self.decoder = decoder
        self._pool = self._check_pages(page_size, kv_pages, prefix_cache, prefill_chunk)
        self.tokenizer = getattr(model, "tokenizer", None)
        self._key = group_key(self.config, lengths_per_row=True)
        self._arrayed = arrayed_fields(self.config, self.slots)
        # The constraints' union table (built at submit; None: no constraint yet).
        self._table: UnionTable | None = None
        self.cache_bytes, self.state_bytes = self._check_memory()
        static = self.config.replace(max_new_tokens=self.max_len, max_length=None).static()
        self._plan = Plan(
            decoder=decoder.with_cache(self.config.quantized_cache()),
            config=static,
            batch=self.slots,
            bucket=0,
            new_tokens=self.max_len,
            loop="scan",
            per_row_keys=True,
            mesh=mesh,
        )
        if mesh is not None:  # placed once; the caller's arrays when already placed
            params = shard_params(params, mesh, decoder.param_specs)
        # The caller's weights, never a copy (one copy whatever the engines and sizes).
        self._params = decoder.prepared_outside(params, self.slots)
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
        self._state = programs.empty_program(
            self._plan, self.max_len, self._template(self.slots), stop, self._pool_shape()
        )
        self._size = self.slots  # rows of self._state
        self._small: dict[int, tuple[Plan, Any]] = {}
        for size in self._levels[1:]:
            plan = dataclasses.replace(self._plan, batch=size)
            self._small[size] = (plan, decoder.prepared_outside(params, size))
        self._warmed: Any = False  # the table shape the smaller sizes were compiled for
        # Waiting prompts by bucket, each in submission order.
        self._pending: dict[int, collections.deque[_Pending]] = {}
        self._owner: dict[int, _Pending] = {}
        self._free = list(range(self.slots))
        self._submitted = 0
        self._admitted = 0
        self.stats = EngineStats(slots=self.slots)
        if self._pool is None:
            self.stats.peak_kv_bytes = self.cache_bytes

    # ------------------------------------------------------------------ #
    @property
    def rows(self) -> int:
        """Rows of the slot state the next decode call computes: `slots`, or
        fewer while `compact_tail` has moved the tail into a smaller state."""
        return self._size

    @property
    def params(self) -> Any:
        """The weights the engine decodes with: the caller's arrays (placed on
        the mesh once when `mesh` is given), never a copy; a family's `prepare`
        hook may add derived arrays of its own."""
        return self._params

    @property
    def state(self) -> programs.SlotState:
        """The slot state on device (`jaxdecode.serving.programs.SlotState`: the
        cache, the last logits, each row's values and outputs), `rows` rows.
        Read-only: the engine's calls donate it, so keep no reference across a
        `step`; read its shapes or shardings, say."""
        return self._state

    @property
    def constraint_table(self) -> UnionTable | None:
        """The union table of the constraints of the current run of prompts
        (`jaxdecode.processors.grammar.UnionTable`: `len`, `in`, `shape`,
        `nbytes`); None before the first constraint."""
        return self._table

    @property
    def cache_bytes_per_device(self) -> int:
        """Bytes of the slot cache one device holds (`cache_bytes` on one device;
        on a mesh, its shard)."""
        return per_device_bytes(self._state.dec.cache)

    @property
    def table_bytes(self) -> int:
        """Device bytes of the constraint table (0 before the first constraint)."""
        return 0 if self._table is None else self._table.nbytes

    def _table_shape(self) -> Any:
        return None if self._table is None else self._table.shape

    def _template(
        self,
        rows: int,
        configs: Sequence[GenerationConfig] | None = None,
        specs: Sequence[tuple[str, Any] | None] | None = None,
    ) -> Chain:
        """The chain with per-row values `[rows]` (from `configs`, else the
        engine's config repeated) and, once the engine has a constraint table,
        the constraint processor with each row's start state (from `specs`,
        else every row free); tables sized for the longest row."""
        configs = list(configs) if configs else [self.config] * rows
        values = row_values(configs, self._arrayed)
        config = unconstrained(configs[0]).replace(
            **values, max_new_tokens=self.max_len, max_length=None
        )
        grammar = None
        if self._table is not None and self._table.grammar is not None:
            starts = [self._table.start(s) for s in specs] if specs else [FREE] * rows
            grammar = self._table.grammar.replace(start=jnp.asarray(starts, jnp.int32))
        return from_config(config, extra=grammar)

    def _warm_up(self) -> None:
        """Compiles the decode program and the row copy of every smaller size
        (`compact_tail`) for the current chain, once per constraint table shape."""
        shape = self._table_shape()
        if len(self._levels) == 1 or self._warmed == (shape,):
            return
        state = programs.empty_program(
            self._plan, self.max_len, self._template(self.slots), self._stop, self._pool_shape()
        )
        for size in self._levels[1:]:
            state = programs.take_program(state, jnp.arange(size, dtype=jnp.int32))
            plan, prepared = self._small[size]
            if self._pool is None:
                state, _, _ = programs.decode_program(
                    plan, self.steps_per_call, prepared, state, jnp.int32(size + 1)
                )
            else:  # every row inactive: no page written
                table = np.full((size, pages_for(self.max_len, self.page_size)), self.kv_pages)
                state, _, _ = programs.decode_pages_program(
                    plan, self.steps_per_call, prepared, state, jnp.int32(size + 1),
                    table.astype(np.int32), np.zeros((size,), bool),
                )  # fmt: skip
        del state
        self._warmed = (shape,)

    def warmup(self, max_prompt: int | None = None) -> None:
        """Compiles, without running anything, every program that prompts of up
        to `max_prompt` tokens can need: the prefill of each prompt bucket
        (paged: of each chunk width, for a last chunk and for the others), the
        decode call and, with `compact_tail`, each smaller size. Later prompts
        then compile nothing (until a constraint set outgrows its table, see
        the module docstring), so the first prompts of a run do not wait for
        the compiler, as JetStream warms its prefill buckets up at start.

        Args:
            max_prompt: the longest prompt (tokens) to expect; default
                `max_len - 1`. Buckets past it are not compiled.
        """
        for _, program, args in self._programs(max_prompt):
            program.lower(*args).compile()
        self._warm_up()

    def export(
        self, platforms: Sequence[str], max_prompt: int | None = None
    ) -> dict[str, jax.export.Exported]:
        """Lowers the programs `warmup` compiles (the slot count's: not
        `compact_tail`'s smaller copies) for other platforms with
        `jax.export`, without running or compiling anything: a check that the
        engine's programs, on its mesh if it has one, lower for, say,
        `("tpu", "cuda")` from a CPU host.

        Args:
            platforms: `jax.export` platform names (`"cpu"`, `"cuda"`,
                `"rocm"`, `"tpu"`).
            max_prompt: the longest prompt (tokens) to expect, as in `warmup`.

        Returns:
            The `jax.export.Exported` programs by name: `"decode"`,
            `"prefill_<width>"` for each prompt bucket up to `max_prompt` and,
            paged with `prefill_chunk` below `max_prompt`,
            `"chunk_<width>"` (a chunk that is not a prompt's last).
        """
        if isinstance(platforms, str) or not platforms:
            raise ValueError(
                f"platforms must be a non-empty sequence of platform names, got {platforms!r}"
            )
        return {
            name: jax.export.export(program, platforms=tuple(platforms))(*args)
            for name, program, args in self._programs(max_prompt)
        }

    def _programs(self, max_prompt: int | None) -> Iterator[tuple[str, Any, tuple]]:
        """(name, jitted program, its arguments) for every program of the slot
        count that prompts of up to `max_prompt` tokens can need (`warmup`):
        arguments for unused rows, so that running one would write nothing."""
        if max_prompt is None:
            max_prompt = self.max_len - 1
        max_prompt = _check_int("max_prompt", max_prompt, 1)
        if max_prompt >= self.max_len:
            raise ValueError(f"max_prompt must be below max_len ({self.max_len}), got {max_prompt}")
        rows = self.prefill_rows
        state = self._state
        if self._size != self.slots:  # compacted: the programs are for all slots
            state = programs.empty_program(
                self._plan, self.max_len, self._template(self.slots), self._stop,
                self._pool_shape(),
            )  # fmt: skip
        limit = max_prompt if self.prefill_chunk is None else min(max_prompt, self.prefill_chunk)
        widths = sorted({bucket_length(n, self.prompt_buckets) for n in range(1, limit + 1)})
        target = np.full((rows,), self.slots, np.int32)  # every row unused: writes nothing
        max_new = np.ones((rows,), np.int32)
        seeds = np.zeros((rows,), np.uint32)
        processor = self._template(rows)
        head = (self._plan, self._params, state)
        for width in widths:
            if self._pool is None:
                ids = np.zeros((rows, width), np.int32)
                args = (ids, ids, target, max_new, seeds, processor, None, None)
            else:
                ids = np.zeros((rows, self.max_len), np.int32)
                pages = self._dummy_pages(width)
                offset = np.zeros((rows,), np.int32)
                args = (ids, ids, target, max_new, seeds, processor, pages, offset)
            yield f"prefill_{width}", programs.admit_program, (*head, *args)
        chunked = self.prefill_chunk is not None and max_prompt > self.prefill_chunk
        if self._pool is not None and chunked:
            width = bucket_length(self.prefill_chunk, self.prompt_buckets)
            pages = self._dummy_pages(width)
            yield f"chunk_{width}", programs.chunk_program, (*head, pages, target)
        want = jnp.int32(self.slots + 1)
        decode = (self._plan, self.steps_per_call, self._params, state, want)
        if self._pool is None:
            yield "decode", programs.decode_program, decode
        else:
            cols = pages_for(self.max_len, self.page_size)
            table = np.full((self.slots, cols), self._pool.pages, np.int32)
            active = np.zeros((self.slots,), bool)
            yield "decode", programs.decode_pages_program, (*decode, table, active)

    def _dummy_pages(self, width: int) -> programs.Pages:
        """A chunk of `width` for `prefill_rows` unused rows (no page assigned)."""
        rows, cols = self.prefill_rows, pages_for(self.max_len, self.page_size)
        ids = np.zeros((rows, width), np.int32)
        start = np.zeros((rows,), np.int32)
        table = np.full((rows, cols), self._pool.pages, np.int32)
        return programs.Pages(ids=ids, mask=ids, start=start, table=table)

    def _check_memory(self) -> tuple[int, int]:
        devices = 1 if self.mesh is None else self.mesh.devices.size
        data = 1 if self.mesh is None else self.mesh.shape[DATA]
        return slot_memory(
            self.decoder,
            self.config,
            self.slots,
            self.max_len,
            self.prefill_rows,
            devices=devices,
            pool=self._pool_shape(),
            data=data,
        )

    def _pool_shape(self) -> tuple[int, int] | None:
        return None if self._pool is None else (self._pool.pages, self._pool.page_size)

    def _check_pages(
        self,
        page_size: Any,
        kv_pages: Any,
        prefix_cache: Any,
        prefill_chunk: Any,
    ) -> PagePool | None:
        """The page pool of a paged engine (None: the dense slot cache), after
        checking the paged options."""
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        if page_size is not None:
            page_size = _check_int("page_size", page_size, 1)
        # A model without a (quantized) paged cache keeps the dense slots.
        quantized = self.config.quantized_cache()
        has_pages = self.decoder.with_cache(quantized).init_paged is not None
        if page_size is None or not has_pages:
            why = (
                "give page_size too (e.g. page_size=16)"
                if page_size is None
                else f"the model {self.decoder.name!r} has none"
                + (" for cache_implementation='quantized'" if quantized is not None else "")
                + " (Decoder.init_paged), so the engine keeps the dense slot cache"
            )
            for name, value in (("kv_pages", kv_pages), ("prefill_chunk", prefill_chunk)):
                if value is not None:
                    raise ValueError(f"{name}={value!r} needs a paged cache: {why}")
            self.page_size = self.kv_pages = self.prefill_chunk = None
            return None
        per_row = pages_for(self.max_len, page_size)
        pages = self.slots * per_row if kv_pages is None else _check_int("kv_pages", kv_pages, 1)
        if prefill_chunk is not None:
            prefill_chunk = _check_int("prefill_chunk", prefill_chunk, 1)
        self.page_size, self.kv_pages, self.prefill_chunk = page_size, pages, prefill_chunk
        return PagePool(pages, page_size, prefix_cache)

    # ------------------------------------------------------------------ #
    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        configs: Any = None,
    ) -> list[int]:
        """Queues prompts; returns their indices (as `EngineResult.index`).

        Args:
            prompts: token id sequences (or strings, when the model has a tokenizer:
                encoded with the BOS / EOS it adds around a text, as transformers'
                `tokenizer(text)`; encode text rendered by a chat template yourself,
                `tokenizer.encode(text)`, as its template writes its own BOS).
            configs: None (the engine's config), one `GenerationConfig` or dict
                of overrides for every prompt, or one per prompt. A prompt that
                samples without a seed gets a fresh one (reported in its result).
                Each prompt may carry its own `regex` / `json_schema` /
                `choices` (compiled here, into the engine's constraint table).

        Raises:
            ValueError: before anything is queued: a bad prompt, a prompt that
                does not fit `max_len`, options that cannot share this engine's
                program (name the field; see `generate_many`), an invalid or
                unsatisfiable constraint, or a constraint table over its size limit.
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
        self._add_constraints(items)
        for it in items:  # paged: one queue in submission order
            queue = 0 if self._pool is not None else it.bucket
            self._pending.setdefault(queue, collections.deque()).append(it)
        self._submitted += len(items)
        return [it.index for it in items]

    def _resolve(self, index: int, prompt: Any, override: Any) -> _Pending:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but the model has no tokenizer")
            prompt = self.tokenizer.encode(prompt, add_special_tokens=True)
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
        self.decoder.check_length(total, max_new)
        self.decoder.check_routed(config.output_routed_experts)
        bucket = bucket_length(len(ids), self.prompt_buckets)
        if bucket + max_new > self.max_len:
            raise ValueError(
                f"prompt {index}: its bucket ({bucket} tokens) plus max_new_tokens={max_new} "
                f"exceeds the engine's max_len={self.max_len}"
            )
        if self._pool is not None:
            need = pages_for(len(ids) + max_new, self.page_size)
            if need > self.kv_pages:
                raise ValueError(
                    f"prompt {index}: kv_pages={self.kv_pages} is too small: its {len(ids)} "
                    f"tokens plus max_new_tokens={max_new} need {need} pages of "
                    f"page_size={self.page_size}; raise kv_pages to at least {need}"
                )
        config = config.replace(max_new_tokens=max_new, max_length=None)
        seed = 0
        if config.do_sample:
            seed = config.seed if config.seed is not None else secrets.randbits(32)
            if not 0 <= seed <= SEED_MAX:
                raise ValueError(f"seed must be in [0, {SEED_MAX}], got {seed}")
            config = config.replace(seed=seed)
        if group_key(config, lengths_per_row=True) != self._key:
            raise ValueError(
                f"prompt {index}: {_difference(config, self.config)} differs from the engine's "
                "config, so it cannot share its slots (per row may differ: "
                f"{', '.join(PER_ROW_FIELDS)}, seed, max_new_tokens); use generate_many, which "
                "runs one engine per group"
            )
        item = _Pending(index, ids, config, seed, bucket, max_new, self._spec(index, config))
        if self._pool is not None and self.config.prompt_logprobs is None:
            item.keys = chain_hashes(ids, self.page_size)
        return item

    def _spec(self, index: int, config: GenerationConfig) -> tuple[str, Any] | None:
        """The prompt's one output constraint `(field, value)`, or None."""
        parsed = config.constraints()
        if parsed is None:
            return None
        per_row, specs = parsed
        if per_row and len(specs) != 1:
            raise ValueError(
                f"prompt {index}: regex / json_schema / choices hold a list of {len(specs)} "
                "per-row constraints; an engine prompt is one row: give each prompt its own"
            )
        spec = specs[0]
        if spec is not None and self.tokenizer is None:
            raise ValueError(
                f"prompt {index}: {spec[0]} needs the model's tokenizer (the model has none)"
            )
        return spec

    def _add_constraints(self, items: list[_Pending]) -> None:
        """Compiles the items' new constraints into the table and gives the live
        state the new table (before anything is queued: errors leave the engine
        as it was)."""
        if self._table is None and not any(it.spec is not None for it in items):
            return
        if self._table is None:
            self._table = UnionTable(self.tokenizer, self.config.eos_ids)
        elif not self.pending:
            self._table.clear()  # nothing uses the table: start the set afresh
        compiled: dict[Any, tuple] = {}
        for it in items:
            if it.spec is None or it.spec in self._table or spec_key(it.spec) in compiled:
                continue
            try:
                compiled[spec_key(it.spec)] = (it.spec, compile_spec(it.spec, self.tokenizer))
            except ValueError as e:
                raise ValueError(f"prompt {it.index}: {e}") from None
        free = available_bytes()
        # The table lives twice: in the slot state and in each prefill's chain.
        if not self._table.add(list(compiled.values()), budget=None if free is None else free // 2):
            return
        chain = self._template(1).processors
        at = next(i for i, p in enumerate(chain) if isinstance(p, Grammar))
        self._state = programs.with_table(self._state, self._table.grammar, at)

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
        self._warm_up()
        if self._pool is None:
            self._admit_waiting()
        else:
            self._admit_pages()
        if not self._owner:
            return []
        waiting = self._waiting()
        if not waiting and not any(it.filling for it in self._owner.values()):
            self._compact()  # (paged: not while a prompt is being read in chunks)
        free = len(self._free)
        if self._pool is not None:
            table, active = self._decode_pages()
            if not active.any():
                return []  # only prompts being prefilled (chunks): no row decodes yet
            free = self._size - int(active.sum())
        want = free + min(waiting, self.prefill_rows) if waiting else self._size + 1
        plan, params = (
            (self._plan, self._params) if self._size == self.slots else self._small[self._size]
        )
        if self._pool is None:
            self._state, n, work = programs.decode_program(
                plan, self.steps_per_call, params, self._state, jnp.int32(want)
            )
        else:
            self._state, n, work = programs.decode_pages_program(
                plan, self.steps_per_call, params, self._state, jnp.int32(want), table, active
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
            self._state = programs.take_program(self._state, jnp.asarray(rows, jnp.int32))
            self._owner = {j: self._owner[s] for j, s in enumerate(live)}
            self._free = list(range(len(live), size))
            self._size, level = size, level + 1

    def _expand(self) -> None:
        """Back to all slots (prompts were submitted after compaction)."""
        full = programs.empty_program(
            self._plan, self.max_len, self._template(self.slots), self._stop, self._pool_shape()
        )  # paged: its pool is dropped, the rows' own comes with them (`PagedCache.put_rows`)
        rows = jnp.arange(self._size, dtype=jnp.int32)
        self._state = programs.spread_program(full, self._state, rows)
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

    def _place(
        self, group: list[_Pending], slots: list[int], pages: programs.Pages | None = None
    ) -> None:
        rows, bucket = self.prefill_rows, group[0].bucket
        filler = group + [group[-1]] * (rows - len(group))
        # Paged: the chunk went through the model already; the whole prompts
        # only start the decode state, each at its own bucket in a row of
        # `max_len`, so prompts of every bucket share one program per chunk width.
        offset = None if pages is None else np.zeros((rows,), np.int32)
        width = bucket if pages is None else self.max_len
        ids = np.full((rows, width), self._plan.config.pad_token_id, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for r, it in enumerate(filler):
            ids[r, it.bucket - len(it.ids) : it.bucket] = it.ids
            mask[r, it.bucket - len(it.ids) : it.bucket] = 1
            if offset is not None:
                offset[r] = it.bucket - len(it.ids)
        target = np.asarray(slots + [self.slots] * (rows - len(group)), np.int32)
        max_new = np.asarray([it.max_new for it in filler], np.int32)
        seeds = np.asarray([it.seed for it in filler], np.uint32)
        processor = self._template(rows, [it.config for it in filler], [it.spec for it in filler])
        self._state, prompt = programs.admit_program(
            self._plan, self._params, self._state, ids, mask, target, max_new, seeds, processor,
            pages, offset,
        )  # fmt: skip
        for r, (slot, it) in enumerate(zip(slots, group, strict=True)):
            self._owner[slot] = it
            it.prompt_out, it.row = prompt, r
            self.stats.prefill_tokens += len(it.ids) - it.start
        self.stats.prefills += 1

    # ------------------------------------------------------------------ #
    # Paged: admission by free pages, prefix hits, chunks, preemption.
    def _admit_pages(self) -> None:
        """New prompts into free slots while the pool has their pages (after
        a reserve for the running rows' next call), then one chunk of every
        prompt being prefilled."""
        pool, ps = self._pool, self.page_size
        queue = self._pending.get(0)
        if queue and self._size < self.slots:
            self._expand()
        decoding = sum(not it.filling for it in self._owner.values())
        reserve = decoding * pages_for(self.steps_per_call + 1, ps)
        writing = {k for it in self._owner.values() if it.filling for k in it.keys}
        while self._free and queue:
            it = queue[0]
            limit = (len(it.ids) - 1) // ps  # the last token is always computed
            hit = 0
            while hit < min(limit, len(it.keys)) and pool.cached(it.keys[hit]):
                hit += 1
            if hit < limit and hit < len(it.keys) and it.keys[hit] in writing:
                break  # its next page is being written by a row admitted earlier: wait for it
            hits = pool.lookup(it.keys, hit)
            new = pages_for(len(it.ids), ps) - len(hits)
            if pool.available < new + reserve:
                pool.release(hits)
                break
            queue.popleft()
            it.pages = hits + pool.allocate(new)
            it.start, it.filling, it.order = len(hits) * ps, True, self._admitted
            self._admitted += 1
            self.stats.prefix_tokens += it.start
            self._owner[self._free.pop(0)] = it
            writing.update(it.keys)
        if queue is not None and not queue:
            del self._pending[0]
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, pool.peak * self.page_bytes)
        self._run_chunks()

    @property
    def page_bytes(self) -> int | None:
        """Device bytes of one page of the pool: its keys and values over every
        layer (a quantized pool: codes and scales); None for the dense slot
        cache. A page holds `page_size` tokens of one row."""
        if self._pool is None:
            return None
        return int(self._state.dec.cache.page_bytes())

    @property
    def kv_bytes_in_use(self) -> int:
        """Device bytes of the KV cache rows hold now: the pages held by running
        or prefilling rows (cached prefix pages no row holds are not counted);
        the dense slot cache, its whole size (`stats.peak_kv_bytes` is the
        peak of this)."""
        if self._pool is None:
            return self.cache_bytes
        return self._pool.held * self.page_bytes

    def _chunk_of(self, it: _Pending) -> tuple[bool, int, int]:
        """`(final, real tokens, padded width)` of the prompt's next chunk."""
        rest = len(it.ids) - it.start
        # Prompt log-probabilities need every position's logits in one pass.
        whole = self.prefill_chunk is None or self.config.prompt_logprobs is not None
        chunk = rest if whole else min(rest, self.prefill_chunk)
        return chunk == rest, chunk, bucket_length(chunk, self.prompt_buckets)

    def _run_chunks(self) -> None:
        """One chunk of every prompt being prefilled, in groups of one program
        (final chunk or not, chunk width) of `prefill_rows`."""
        groups: dict[tuple, list[int]] = {}
        filling = sorted(
            (s for s, it in self._owner.items() if it.filling), key=lambda s: self._owner[s].order
        )
        for slot in filling:
            final, _, width = self._chunk_of(self._owner[slot])
            groups.setdefault((final, width), []).append(slot)
        for (final, width), slots in groups.items():
            for i in range(0, len(slots), self.prefill_rows):
                self._chunk_call(slots[i : i + self.prefill_rows], final, width)

    def _chunk_call(self, slots: list[int], final: bool, width: int) -> None:
        rows, pool = self.prefill_rows, self._pool
        group = [self._owner[s] for s in slots]
        ids = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), np.int32)
        start = np.zeros((rows,), np.int32)
        cols = pages_for(self.max_len, self.page_size)
        table = np.full((rows, cols), pool.pages, np.int32)  # unused rows write nothing
        counts = []
        for r, it in enumerate(group):
            _, n, _ = self._chunk_of(it)
            ids[r, :n] = it.ids[it.start : it.start + n]
            mask[r, :n] = 1
            start[r] = it.start
            table[r] = table_row(it.pages, cols, pool.pages)
            counts.append(n)
        pages = programs.Pages(ids=ids, mask=mask, start=start, table=table)
        target = np.asarray(slots + [self.slots] * (rows - len(slots)), np.int32)
        if final:
            self._place(group, slots, pages)
            for it in group:
                it.first = 0  # a whole prompt in one right-padded chunk
        else:
            self._state = programs.chunk_program(
                self._plan, self._params, self._state, pages, target
            )
            self.stats.prefills += 1
        for it, n in zip(group, counts, strict=True):
            if not final:
                self.stats.prefill_tokens += n
            it.start += n
            it.filling = not final
            full = it.start // self.page_size
            pool.register(it.keys[:full], it.pages[:full])

    def _decode_pages(self) -> tuple[np.ndarray, np.ndarray]:
        """The page table and active rows of the next decode call, after giving
        every decoding row the pages it writes in that call (the newest rows go
        back to the queue while the pool is short)."""
        pool, ps = self._pool, self.page_size
        lengths = np.asarray(self._state.dec.lengths)
        while True:
            need = {}
            for slot, it in self._owner.items():
                if it.filling:
                    continue
                upto = len(it.ids) + min(int(lengths[slot]) + self.steps_per_call, it.max_new)
                need[slot] = max(0, pages_for(upto, ps) - len(it.pages))
            if sum(need.values()) <= pool.available:
                break
            self._preempt(max(self._owner, key=lambda s: self._owner[s].order))
        for slot, n in need.items():
            self._owner[slot].pages += pool.allocate(n)
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, pool.peak * self.page_bytes)
        cols = pages_for(self.max_len, ps)
        table = np.full((self._size, cols), pool.pages, np.int32)
        active = np.zeros((self._size,), bool)
        for slot, it in self._owner.items():
            table[slot] = table_row(it.pages, cols, pool.pages)
            active[slot] = not it.filling
        return table, active

    def _preempt(self, slot: int) -> None:
        """Sends the row in `slot` back to the front of the queue (its pages
        freed; it is prefilled again later and gives the same tokens)."""
        it = self._owner.pop(slot)
        self._pool.release(it.pages)
        it.pages, it.start, it.filling, it.prompt_out, it.first = [], 0, False, None, -1
        self._pending.setdefault(0, collections.deque()).appendleft(it)
        self._free = sorted(self._free + [slot])
        self.stats.preemptions += 1

    def _harvest(self) -> list[EngineResult]:
        done = np.asarray(self._state.dec.done)
        finished = [s for s in sorted(self._owner) if done[s] and not self._owner[s].filling]
        if not finished:
            return []
        seqs = np.asarray(self._state.dec.ctx.sequences)
        lengths = np.asarray(self._state.dec.lengths)
        outs = {k: np.asarray(v) for k, v in self._state.outs.items()}
        out = []
        for slot in finished:
            it = self._owner.pop(slot)
            if self._pool is not None:
                self._pool.release(it.pages)
            n = int(lengths[slot])
            got = {k: v[slot, :n].copy() for k, v in outs.items()}
            out.append(
                EngineResult(
                    index=it.index,
                    prompt=it.ids,
                    tokens=seqs[slot, it.bucket : it.bucket + n].copy(),
                    config=it.config,
                    seed=it.seed if it.config.do_sample else None,
                    **got,  # the record's fields, by GenerateOutput's names
                    **_prompt_fields(it),
                )
            )
            self.stats.tokens += n
            self.stats.finished += 1
        self._free = sorted(self._free + finished)
        return out


def _prompt_fields(it: _Pending) -> dict[str, np.ndarray]:
    """An `EngineResult`'s prompt log-probability fields: the prompt's columns of
    its prefill row (the bucket's left padding cut off)."""
    if it.prompt_out is None:
        return {}
    names = {
        "logprobs": "prompt_logprobs",
        "top_logprobs": "prompt_top_logprobs",
        "top_ids": "prompt_top_token_ids",
    }
    first = it.bucket - len(it.ids) if it.first < 0 else it.first
    cols = slice(first, first + len(it.ids))
    return {names[k]: np.asarray(v)[it.row, cols] for k, v in it.prompt_out.items()}


def slot_memory(
    decoder: Decoder,
    config: GenerationConfig,
    slots: int,
    max_len: int,
    prefill_rows: int | None = None,
    *,
    devices: int = 1,
    pool: tuple[int, int] | None = None,
    data: int = 1,
) -> tuple[int, int]:
    """`(cache bytes, other state bytes)` of an `Engine(slots=, max_len=,
    prefill_rows=)` with `config`, estimated without allocating anything: the
    slots' cache, per-step buffers, processor tallies, recorded outputs and the
    largest prefill (`prefill_rows` prompts of `max_len` tokens with their own
    cache rows and, for `prompt_logprobs`, every position's logits). On a mesh
    of `devices` the totals are compared with that many devices' free memory
    (the state is split over them; a pool of pages is whole on each of the
    `data` shards of a mesh, so it counts `data` times).

    Raises:
        MemoryBudgetError: when they cannot fit in the device's free memory.
    """
    vocab = decoder.vocab_size
    rows = min(slots, 8) if prefill_rows is None else prefill_rows
    decoder = decoder.with_cache(config.quantized_cache())  # the cache the engine allocates
    if pool is None:
        cache = jax.eval_shape(lambda: decoder.init_cache(slots, max_len, None))
    else:  # a paged engine's pool of `pool = (pages, page_size)`
        cache = jax.eval_shape(lambda: decoder.init_paged(slots, max_len, *pool, None))
    cache_bytes = cache_nbytes(cache)
    plain = unconstrained(config).replace(max_new_tokens=max_len, max_length=None)
    chain = jax.eval_shape(lambda: from_config(plain))
    # Tallies of stateful processors are [slots, vocab]; logits, scores and a
    # few temporaries per step; the token buffer and the recorded outputs.
    tallies = sum(
        slots * vocab * 4 for p in chain.processors if type(p).init is not LogitsProcessor.init
    )
    outs = jax.eval_shape(
        lambda: programs.out_buffers(config.static(), slots, max_len, decoder.routed_shape)
    )
    recorded = cache_nbytes(outs)
    other = 8 * slots * vocab * 4 + slots * max_len * 4 + recorded + tallies
    # A dense engine prefills into a cache of its own; a paged one into the pool.
    prefill = (cache_bytes * rows // slots if pool is None else 0) + decoder.prefill_bytes(
        rows, max_len, max_len, all_logits=config.prompt_logprobs is not None
    )
    other += prefill
    free = available_bytes()
    held = cache_bytes * (data if pool is not None else 1)  # pages: a pool per data shard
    if free is not None and held + other > free * devices:
        raise MemoryBudgetError(
            f"Engine(slots={slots}, max_len={max_len}) needs about "
            f"{(held + other) / 2**30:.2f} GiB (KV cache {held / 2**30:.2f} GiB, "
            f"prefill of {rows} x {max_len} tokens {prefill / 2**30:.2f} GiB) but the device "
            f"has {free / 2**30:.2f} GiB free; lower slots or max_len (or prefill_rows)"
        )
    return int(cache_bytes), int(other)


def _check_strategy(config: GenerationConfig) -> None:
    if config.guided():
        raise ValueError(
            "the engine decodes without classifier-free guidance; guidance_scale needs "
            "generate() (with negative_prompt_ids)"
        )
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
    paged = config.paged_cache()
    if paged is not None:
        raise ValueError(
            "cache_implementation='paged' is generate()'s paged cache; the engine keeps "
            f"pages with Engine(..., page_size={paged.page_size}) (generate_many: page_size=)"
        )


def _difference(a: GenerationConfig, b: GenerationConfig) -> str:
    for f in dataclasses.fields(a):
        if f.name in per_prompt_fields(lengths_per_row=True):
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
    model: Model,
    prompts: Sequence[Sequence[int]],
    configs: Any = None,
    *,
    slots: int = 64,
    max_len: int | None = None,
    prompt_buckets: Any = "pow2",
    steps_per_call: int = 16,
    prefill_rows: int | None = None,
    compact_tail: bool = False,
    mesh: Mesh | None = None,
    page_size: int | None = 16,
    kv_pages: int | None = None,
    prefix_cache: bool = True,
    prefill_chunk: int | None = None,
    **overrides: Any,
) -> list[EngineResult]:
    """Generates for many prompts with continuous batching; results in prompt order.

    Prompts whose options cannot share slots (`group_key`) run in separate
    engines, one after the other; prompts with different output constraints
    (`regex` / `json_schema` / `choices`, or none) share one. Each result equals
    `generate` on that prompt alone with its options and seed.

    Args:
        model: a `CausalLM`.
        prompts: token id sequences, or texts (encoded with the model's
            tokenizer, with the BOS / EOS it adds around a text: encode text
            rendered by a chat template yourself, `add_special_tokens=False`).
        configs: as `Engine.submit` (None, one config or dict, or one per prompt).
        slots: as `Engine`.
        prompt_buckets: as `Engine`.
        steps_per_call: as `Engine`.
        prefill_rows: as `Engine`.
        compact_tail: as `Engine`.
        mesh: as `Engine`.
        page_size: as `Engine` (pages of 16 by default; None: the dense cache).
        kv_pages: as `Engine`.
        prefix_cache: as `Engine`.
        prefill_chunk: as `Engine`.
        max_len: cache columns per slot (default: the longest prompt bucket plus
            `max_new_tokens` among the prompts).
        **overrides: `GenerationConfig` fields applied to the model's config
            before `configs`.

    A function over ~80 lines: half of it is this docstring (one line per
    `Engine` option it passes on); the body groups prompts and runs one engine
    per group.
    """
    decoder, _, base = _model_parts(model)
    base = base.replace(**overrides) if overrides else base
    tokenizer = getattr(model, "tokenizer", None)
    # Text prompts encoded here, once (`max_len` counts tokens, not characters),
    # with the BOS / EOS the tokenizer adds, as `Engine.submit` encodes them.
    prompts = [
        tokenizer.encode(p, add_special_tokens=True)
        if isinstance(p, str) and tokenizer is not None
        else p
        for p in prompts
    ]
    per = list(configs) if isinstance(configs, (list, tuple)) else [configs] * len(prompts)
    if len(per) != len(prompts):
        raise ValueError(f"configs has {len(per)} entries for {len(prompts)} prompts")
    resolved = [_overridden(base, c).validate(vocab_size=decoder.vocab_size) for c in per]
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(resolved):
        _check_strategy(c)
        groups.setdefault(group_key(c, lengths_per_row=True), []).append(i)
    # Each prompt alone must fit (its bucket and max_new_tokens in every slot):
    # checked before any engine is built, naming the prompt.
    width = [
        bucket_length(len(p), prompt_buckets) + c.resolve_max_length(len(p)) - len(p)
        for p, c in zip(prompts, resolved, strict=True)
    ]
    devices = 1 if check_mesh(mesh) is None else mesh.devices.size
    if max_len is None:
        for i, c in enumerate(resolved):
            try:
                slot_memory(decoder, c, slots, width[i], devices=devices)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
    results: list[EngineResult | None] = [None] * len(prompts)
    for members in groups.values():
        need = max(width[i] for i in members)
        engine = Engine(
            model,
            slots=slots,
            max_len=max_len or need,
            config=resolved[members[0]],
            prompt_buckets=prompt_buckets,
            steps_per_call=steps_per_call,
            prefill_rows=prefill_rows,
            compact_tail=compact_tail,
            mesh=mesh,
            page_size=page_size,
            kv_pages=kv_pages,
            prefix_cache=prefix_cache,
            prefill_chunk=prefill_chunk,
        )
        engine.submit([prompts[i] for i in members], [resolved[i] for i in members])
        for r in engine:
            results[members[r.index]] = dataclasses.replace(r, index=members[r.index])
        del engine
    return results  # type: ignore[return-value]
