"""The continuous-batching engine's device programs (JetStream's split).

Pure functions over one `SlotState` (every slot's decode state, per-row values
and output buffers), each jitted once per static shape: `empty_program` (every
slot free), `admit_program` (prefill a group of prompts of one bucket and
insert them into slots), `decode_program` (up to `steps` decoding steps for
every slot), `take_program` / `spread_program` (compact the live slots into a
smaller state and back). The host side, which decides what runs where, is
`jaxdecode.serving.scheduler`.

On a mesh (`Plan.mesh`) every program ends with the slot state laid out by
`shard_state`: slots over `data`, the cache's heads and the logits'
vocabulary over `model` (the cache's own `partition_specs`); the weights come
placed by the family's specs. A row's tokens do not depend on the layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxdecode import pytree
from jaxdecode.cache import cache_specs, put_rows, take_rows
from jaxdecode.context import DecodeContext
from jaxdecode.processors import Chain, TracedConfig
from jaxdecode.processors.grammar import FREE, Grammar
from jaxdecode.search.loop import (
    DecodeState,
    Plan,
    constrain_logits,
    prompt_pass,
    row_keys,
    start_state,
)
from jaxdecode.search.sample import decode_step
from jaxdecode.sharding import DATA, constrain, fit_spec

Array = jax.Array

__all__ = [
    "Pages",
    "SlotState",
    "admit_program",
    "chunk_program",
    "decode_pages_program",
    "decode_program",
    "empty_program",
    "out_buffers",
    "shard_state",
    "spread_program",
    "take_program",
    "with_table",
]


def put_per_row(live: Chain, new: Chain, slots: Array) -> Chain:
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


@pytree.dataclass
class SlotState:
    """Everything on device (`S` slots, `L = max_len`).

    Attributes:
        dec: the greedy/sampling `DecodeState` of the slots (`done` is True for
            finished and empty slots).
        traced: the processor chain, its per-row values `[S]`.
        max_new: `[S]` int32, each row's `max_new_tokens`.
        outs: what each generated token records, by `decode_step`'s names:
            `"token_logprobs"` `[S, L]` float32 log-probability of each
            generated token; `"raw_token_logprobs"` `[S, L]`
            (`output_raw_logprobs`); `"top_logprobs"` float32 and
            `"top_token_ids"` int32 `[S, L, n]` (`logprobs=n`);
            `"routed_experts"` int32 `[S, L, moe_layers, k]`
            (`output_routed_experts`): the per-token
            record's fields (`jaxdecode.search.record`) less the tokens, which
            are in the token buffer.
    """

    dec: DecodeState
    traced: TracedConfig
    max_new: Array
    outs: dict[str, Array]


def out_buffers(
    cfg: Any, rows: int, width: int, routed_shape: tuple[int, int] | None = None
) -> dict[str, Array]:
    """Zeroed `SlotState.outs` for `rows` rows of `width` tokens (`cfg`: the
    `StaticConfig`; `routed_shape`: the decoder's, for `output_routed_experts`)."""
    outs = {"token_logprobs": jnp.zeros((rows, width), jnp.float32)}
    if cfg.output_raw_logprobs:
        outs["raw_token_logprobs"] = jnp.zeros((rows, width), jnp.float32)
    if cfg.logprobs:
        outs["top_logprobs"] = jnp.zeros((rows, width, cfg.logprobs), jnp.float32)
        outs["top_token_ids"] = jnp.zeros((rows, width, cfg.logprobs), jnp.int32)
    if cfg.output_routed_experts:
        outs["routed_experts"] = jnp.zeros((rows, width, *routed_shape), jnp.int32)
    return outs


def shard_state(plan: Plan, state: SlotState) -> SlotState:
    """`state` constrained to the slot layout on `plan.mesh` (unchanged without
    one): every per-slot leaf of the decode state and the output buffers by
    rows over `data`, each cache by its `partition_specs`, the logits `[S, V]`
    also by vocabulary over `model`. The processors' per-row values and tables
    are left to XLA (a few numbers per row)."""
    mesh = plan.mesh
    if mesh is None:
        return state
    dec = constrain(state.dec, mesh, cache_specs)
    dec = dec.replace(logits=constrain_logits(plan, dec.logits))
    rows = lambda x: fit_spec(P(DATA), x.shape, mesh)
    outs = constrain(state.outs, mesh, jax.tree_util.tree_map(rows, state.outs))
    max_new = constrain(state.max_new, mesh, rows(state.max_new))
    return state.replace(dec=dec, outs=outs, max_new=max_new)


def admit(
    plan: Plan,
    params: Any,
    state: SlotState,
    ids: Array,
    mask: Array,
    slots: Array,
    max_new: Array,
    seeds: Array,
    processor: Chain,
    pages: Pages | None = None,
    offset: Array | None = None,
) -> tuple[SlotState, dict[str, Array] | None]:
    """Prefills `n` prompts of one bucket and places them into `slots`.

    Args:
        ids: `[n, bucket]` left-padded (bucket padding only) prompt ids.
        mask: `[n, bucket]` 0 on the padding.
        slots: `[n]` int32 target slots; `S` (past the end) for unused rows.
        max_new: `[n]` int32 `max_new_tokens` per prompt.
        seeds: `[n]` uint32, each prompt's seed (its key is `jax.random.key(seed)`,
            as `generate(seed=...)` makes it).
        processor: the chain with the new rows' per-row values `[n]` (and their
            constraints' start states).
        pages: with a paged cache, the prompts' last chunks (`Pages`): the
            model reads `pages.ids` after the tokens the rows' pages already
            hold, and `ids` / `mask` (the whole prompts) start the decode state.
        offset: with `pages`, `[n]` int32 each prompt's bucket less its length:
            `ids` / `mask` are then `[n, width]`, each prompt right-aligned to
            its own bucket, so one program serves every prompt bucket (its
            shapes are the chunk's alone).

    Returns:
        The state, and the prompts' log-probabilities (`prompt_outputs`,
        `[n, bucket]` / `[n, bucket, k]`) when the config asks for them, else None.
    """
    n, bucket = ids.shape
    width = state.outs["token_logprobs"].shape[1]
    if plan.mesh is not None:
        spec = fit_spec(P(DATA, None), ids.shape, plan.mesh)
        ids, mask = constrain((ids, mask), plan.mesh, (spec, spec))
    if pages is None:
        cache = constrain(plan.decoder.init_cache(n, width, None), plan.mesh, cache_specs)
        last, cache, prompt, routed = prompt_pass(plan, params, ids, mask, cache)
    else:
        last, cache, prompt, routed = chunk_pass(plan, params, state.dec.cache, pages)
    prompt_len = jnp.sum(mask, axis=-1).astype(jnp.int32)
    keys = row_keys(jax.vmap(jax.random.key)(seeds), n, 1, True)
    rows = start_state(
        plan,
        ids,
        mask,
        prompt_len,
        prompt_len + max_new,
        width - bucket,
        cache,
        last,
        keys,
        processor,
        state.traced.stop,
        state.dec.step,
        routed,
        offset,
    )
    traced = state.traced.replace(processor=put_per_row(state.traced.processor, processor, slots))
    new = state.replace(
        dec=put_rows(state.dec, slots, rows),
        traced=traced,
        max_new=state.max_new.at[slots].set(max_new, mode="drop"),
        outs={k: v.at[slots].set(0, mode="drop") for k, v in state.outs.items()},
    )
    return shard_state(plan, new), prompt


@pytree.dataclass
class Pages:
    """One chunk of `n` prompts for rows of a `PagedCache`.

    Attributes:
        ids: `[n, T]` the chunk's tokens, right-padded.
        mask: `[n, T]` 1 on its real tokens.
        start: `[n]` int32 tokens of each prompt already in its pages (prefix
            cache hits and earlier chunks): the chunk goes at slots `start ..`.
        table: `[n, max_pages]` int32 each row's page table (the pool's page
            count where unassigned: unused rows write nothing).
    """

    ids: Array
    mask: Array
    start: Array
    table: Array


def chunk_pass(
    plan: Plan, params: Any, cache: Any, pages: Pages
) -> tuple[Array, Any, dict[str, Array] | None, Array | None]:
    """`prompt_pass` of one chunk through a view of the pool (`with_rows`):
    the last real token's logits `[n, V]`, the view (its rows now hold
    `start + chunk` tokens; the pool written), the prompt outputs and the last
    real token's routed experts (as `prompt_pass`)."""
    view = cache.with_rows(pages.table, pages.start)
    last, view, prompt, routed = prompt_pass(plan, params, pages.ids, pages.mask, view, pages.start)
    # Right padding: the next token goes after the real ones, over the padding.
    real = jnp.sum(pages.mask, axis=1).astype(jnp.int32)
    return last, view.assign(view.table, pages.start + real), prompt, routed


def prefill_chunk(
    plan: Plan, params: Any, state: SlotState, pages: Pages, slots: Array
) -> SlotState:
    """Writes one chunk of `n` prompts that are not finished yet into their
    pages (`slots: [n]`, `S` for unused rows); their rows keep waiting (a
    chunked prefill: running rows decode between the chunks)."""
    _, view, _, _ = chunk_pass(plan, params, state.dec.cache, pages)
    cache = state.dec.cache.put_rows(slots, view)
    return shard_state(plan, state.replace(dec=state.dec.replace(cache=cache)))


def decode_pages(
    plan: Plan,
    steps: int,
    params: Any,
    state: SlotState,
    want: Array,
    table: Array,
    active: Array,
) -> tuple[SlotState, Array, Array]:
    """`decode` over a paged cache with the host's page table `[S, max_pages]`:
    rows not `active` (`[S]` bool: free, or still being prefilled) are
    finished and own no page, so their steps write nothing and their index
    (reset to 0) does not widen the key blocks every row reads."""
    cache = state.dec.cache
    cache = cache.assign(
        jnp.where(active[:, None], table, cache.pages), jnp.where(active, cache.index, 0)
    )
    dec = state.dec.replace(cache=cache, done=state.dec.done | ~active)
    return decode(plan, steps, params, state.replace(dec=dec), want)


def decode(
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
        col = jnp.where(live, st.dec.lengths, st.outs["token_logprobs"].shape[1])
        outs = {k: v.at[rows, col].set(out[k], mode="drop") for k, v in st.outs.items()}
        dec = dec.replace(done=dec.done | (dec.lengths >= st.max_new))
        return i + 1, work + jnp.sum(live), shard_state(plan, st.replace(dec=dec, outs=outs))

    def cond(carry):
        i, _, st = carry
        return (i < steps) & ((i == 0) | (jnp.sum(st.dec.done) < want))

    state = shard_state(plan, state)
    n, work, state = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.int32(0), state))
    return state, n, work


def empty_state(
    plan: Plan, width: int, processor: Chain, stop: Any, pool: tuple[int, int] | None = None
) -> SlotState:
    """Every slot empty (finished), with the per-row values of `processor` and
    the stop strings' tables `stop` (or None); with `pool = (pages,
    page_size)`, the cache is a `PagedCache` of that pool (`width` per row)."""
    slots, decoder = plan.batch, plan.decoder
    if pool is None:
        cache = decoder.init_cache(slots, width, None)
    else:
        cache = decoder.init_paged(slots, width, pool[0], pool[1], None)
    ids = jnp.full((slots, width), plan.config.pad_token_id, jnp.int32)
    zeros = jnp.zeros((slots,), jnp.int32)
    ctx = DecodeContext.from_ids(
        ids, vocab_size=decoder.vocab_size, prompt_length=zeros, max_length=zeros + 1, cur_len=zeros
    )
    dec = DecodeState(
        ctx=ctx,
        cache=cache,
        logits=jnp.zeros((slots, decoder.vocab_size), jnp.float32),
        done=jnp.ones((slots,), bool),
        positions=zeros,
        lengths=zeros,
        step=jnp.zeros((), jnp.int32),
        row_keys=jax.vmap(jax.random.key)(zeros.astype(jnp.uint32)),
        proc_state=processor.init(ctx),
        stop_window=None if stop is None else stop.init(ctx),
        routed=(
            jnp.zeros((slots, *decoder.routed_shape), jnp.int32)
            if plan.config.output_routed_experts
            else None
        ),
    )
    state = SlotState(
        dec=dec,
        traced=TracedConfig(processor=processor, length_penalty=jnp.float32(1.0), stop=stop),
        max_new=zeros,
        outs=out_buffers(plan.config, slots, width, decoder.routed_shape),
    )
    return shard_state(plan, state)


def rows_of(chain: Chain, pick: Any) -> Chain:
    """`chain` with `pick(value)` applied to every per-row value `[S]`."""
    procs = []
    for p in chain.processors:
        changes = {
            field: pick(getattr(p, field))
            for field in p.row_fields
            if jnp.ndim(getattr(p, field)) == 1
        }
        procs.append(dataclasses.replace(p, **changes) if changes else p)
    return Chain(processors=tuple(procs))


def take_slots(state: SlotState, rows: Array) -> SlotState:
    """The state of slots `rows` only (`[n]` int32): every per-row leaf, the
    cache's rows and the processors' per-row values; shared tables as they are."""

    dec = take_rows(state.dec, rows)
    traced = state.traced.replace(processor=rows_of(state.traced.processor, lambda v: v[rows]))
    return SlotState(
        dec=dec,
        traced=traced,
        max_new=state.max_new[rows],
        outs={k: v[rows] for k, v in state.outs.items()},
    )


def spread_slots(full: SlotState, small: SlotState, rows: Array) -> SlotState:
    """`full` with its slots `rows` set from every row of `small` (`take_slots`'s inverse)."""
    traced = full.traced.replace(
        processor=put_per_row(full.traced.processor, small.traced.processor, rows)
    )
    return full.replace(
        dec=put_rows(full.dec, rows, small.dec),
        traced=traced,
        max_new=full.max_new.at[rows].set(small.max_new),
        outs={k: v.at[rows].set(small.outs[k]) for k, v in full.outs.items()},
    )


def with_table(state: SlotState, grammar: Grammar, at: int) -> SlotState:
    """`state` with the constraint table of `grammar` (copied: the state's
    buffers are donated to the programs): its `Grammar` gets the new arrays and
    keeps its rows' start states; a state without one gets it at position `at`
    of its chain, every row free."""
    table = jax.tree_util.tree_map(jnp.copy, grammar)
    procs = list(state.traced.processor.processors)
    proc_state = list(state.dec.proc_state)
    rows = state.max_new.shape[0]
    if any(isinstance(p, Grammar) for p in procs):
        i = next(j for j, p in enumerate(procs) if isinstance(p, Grammar))
        procs[i] = table.replace(start=procs[i].start)
    else:
        procs.insert(at, table.replace(start=jnp.full((rows,), FREE, jnp.int32)))
        proc_state.insert(at, jnp.full((rows,), FREE, jnp.int32))
    traced = state.traced.replace(processor=Chain(processors=tuple(procs)))
    return state.replace(traced=traced, dec=state.dec.replace(proc_state=tuple(proc_state)))


empty_program = jax.jit(empty_state, static_argnums=(0, 1, 4))
chunk_program = jax.jit(prefill_chunk, static_argnums=0, donate_argnums=2)
decode_pages_program = jax.jit(decode_pages, static_argnums=(0, 1), donate_argnums=3)
take_program = jax.jit(take_slots)
spread_program = jax.jit(spread_slots, donate_argnums=0)
admit_program = jax.jit(admit, static_argnums=0, donate_argnums=2)
decode_program = jax.jit(decode, static_argnums=(0, 1), donate_argnums=3)
