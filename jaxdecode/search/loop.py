"""What every search strategy shares: the static plan, the output, the prefill,
the model step and one scan-or-while runner.

A strategy (greedy/sampling in `sample.py`, beam search in `beam.py`) is a step
function `(carry, i, run_model) -> (carry, outputs)`; `run` drives it `n` times
with `lax.scan` (a fixed number of steps) or `lax.while_loop` (stopping when the
strategy says every row is finished).

Over ~500 lines: the plan, the output, the state and the prefill are the
contract between the strategies, kept in one module that the strategies import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdecode import pytree
from jaxdecode.cache import cache_specs, gather_rows
from jaxdecode.config import StaticConfig
from jaxdecode.context import DecodeContext
from jaxdecode.models.base import Decoder, last_real, positions_from_mask
from jaxdecode.paged_cache import PagedCache
from jaxdecode.processors import Chain, TracedConfig
from jaxdecode.search.record import top_n
from jaxdecode.search.stopping import StopStrings
from jaxdecode.sharding import DATA, MODEL, constrain, fit_spec

Array = jax.Array

__all__ = [
    "Plan",
    "GenerateOutput",
    "DecodeState",
    "Guidance",
    "guided_logits",
    "expand_rows",
    "prompt_cache",
    "expand_cache",
    "prefill",
    "model_step",
    "constrain_logits",
    "eos_hit",
    "row_keys",
    "prompt_outputs",
    "run",
    "trace_outputs",
]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one compiled generate program."""

    decoder: Decoder
    config: StaticConfig
    batch: int  # prompt rows
    bucket: int  # padded prompt columns
    new_tokens: int
    loop: str  # "scan" or "while"
    # One PRNG key per prompt row (`key` of shape [batch]) instead of one key.
    per_row_keys: bool = False
    # `trace`: also output the scores after every processor (and, for beam search,
    # every candidate). False in `generate`, so its program carries none of it.
    record: bool = False
    mesh: Mesh | None = None  # shard rows over `data`, heads/vocab over `model`

    @property
    def expand(self) -> int:
        """Cache rows per prompt: beams, or returned sequences when sampling."""
        cfg = self.config
        return cfg.num_beams if cfg.num_beams > 1 else cfg.num_return_sequences

    @property
    def rows(self) -> int:
        return self.batch * self.expand


@pytree.dataclass
class GenerateOutput:
    """What `generate` returns (R = num_return_sequences, N = max_new_tokens).

    Attributes:
        sequences: `[B * R, prompt_len + N]` int32, prompt then generated tokens,
            pad-filled after a row finishes.
        token_logprobs: `[B * R, N]` float32, log-probability of each chosen token
            under the processed distribution (0 after a row finishes).
        lengths: `[B * R]` int32, generated tokens (EOS included).
        scores: `[B * R, N, V]` processed scores per step (`output_scores`); for
            beam search `[B * num_beams, N, V]`, as transformers.
        logits: raw logits per step, same shape as `scores` (`output_logits`).
        sequences_scores: `[B * R]` length-normalised beam scores (beam search).
        beam_indices: `[B * R, N]` int32 beam index per step, -1 after the end
            (beam search).
        raw_token_logprobs: `[B * R, N]` float32, log-probability of each chosen
            token under the model's own distribution (log_softmax of the raw
            logits, before any processor; 0 after a row finishes)
            (`output_raw_logprobs`).
        top_logprobs: `[B * R, N, n]` float32, the n most likely tokens' log-probs
            at each step, best first, under the processed distribution (or the
            raw one with `logprobs_mode="raw"`); 0 after a row finishes
            (`logprobs=n`).
        top_token_ids: `[B * R, N, n]` int32, their ids (pad after a row finishes).
        prompt_logprobs: `[B * R, prompt_len]` float32, log-probability of each
            prompt token given the tokens before it under the model's own
            distribution; 0 for the first real token and for left padding
            (`prompt_logprobs` not None).
        prompt_top_logprobs: `[B * R, prompt_len, n]` float32, the n most likely
            tokens at each prompt position (the alternatives to `prompt_logprobs`;
            0 where it is 0) (`prompt_logprobs=n`, n >= 1).
        prompt_top_token_ids: `[B * R, prompt_len, n]` int32, their ids (pad where
            there is no prediction).
        routed_experts: `[B * R, N, moe_layers, k]` int32, for a mixture-of-experts
            model, the experts each MoE layer routed to in the forward pass whose
            logits chose token j (the position before it: the prompt's last for
            the first token), best first; -1 after a row finishes
            (`output_routed_experts`).
        drafted: `[B * R]` int32 draft tokens verified per row (speculative
            decoding: `prompt_lookup_num_tokens` or `assistant_model`), else
            None; transformers' candidates (at most `max_new_tokens - 1 -
            generated` per round, up to a draft EOS).
        accepted: `[B * R]` int32 of those, the ones accepted (`accepted /
            drafted` is the row's acceptance rate), else None; transformers'
            `n_matches` (an accepted draft that ends the row is not counted).
        num_assistant_tokens: `[B * R]` int32 with a draft model: each row's K
            for a next round (its `num_assistant_tokens_schedule` applied to
            every round's acceptance; transformers' "heuristic" schedule carries
            it into the next call: pass it back as `num_assistant_tokens`), else
            None.
        trace: only from `jaxdecode.trace`.
        seed: the seed `generate` drew itself when sampling without a key or a
            seed (pass it back as `seed=` to reproduce the call); else None.
    """

    sequences: Array
    token_logprobs: Array
    lengths: Array
    scores: Array | None = None
    logits: Array | None = None
    sequences_scores: Array | None = None
    beam_indices: Array | None = None
    raw_token_logprobs: Array | None = None
    top_logprobs: Array | None = None
    top_token_ids: Array | None = None
    prompt_logprobs: Array | None = None
    prompt_top_logprobs: Array | None = None
    prompt_top_token_ids: Array | None = None
    routed_experts: Array | None = None
    drafted: Array | None = None
    accepted: Array | None = None
    num_assistant_tokens: Array | None = None
    trace: dict[str, Array] | None = None
    seed: int | None = pytree.field(pytree_node=False, default=None)


@pytree.dataclass
class DecodeState:
    """The loop state of greedy search and sampling (`rows = batch * R`).

    Attributes:
        ctx: the `DecodeContext` (token buffer `[rows, bucket + N]`, per-row lengths).
        cache: the model's KV cache.
        logits: `[rows, vocab]` float32 raw logits for the next token.
        done: `[rows]` bool, finished rows (they emit pad).
        positions: `[rows]` int32 position id of the next token.
        lengths: `[rows]` int32 tokens generated so far (EOS included).
        step: `[]` int32 steps taken.
        row_keys: `[rows]` PRNG keys, one stream per row.
        proc_state: the processor chain's state (leaves `[rows, ...]`).
        stop_window: `[rows, W]` int32 last bytes of each row's text when the
            config has stop strings (`jaxdecode.search.stopping`), else None.
        prompt: the prompt log-probability outputs of `prompt_outputs` (`[batch,
            bucket, ...]`, one per prompt, not per row) when the config asks for
            them, else None; `generate_program` takes them out before the loop.
        guide: classifier-free guidance's unconditional rows, when guided: a
            dict with their own KV `cache` (the negative prompt, then the same
            tokens as the row), `logits [rows, vocab]` and `positions [rows]`.
        routed: `[rows, moe_layers, k]` int32 the experts of the forward pass
            that gave `logits` (`output_routed_experts`), else None.
    """

    ctx: DecodeContext
    cache: Any
    logits: Array
    done: Array
    positions: Array
    lengths: Array
    step: Array
    row_keys: Array
    proc_state: Any
    stop_window: Array | None = None
    prompt: dict[str, Array] | None = None
    guide: dict[str, Any] | None = None
    routed: Array | None = None


@pytree.dataclass
class Guidance:
    """Classifier-free guidance's traced inputs (transformers'
    `UnbatchedClassifierFreeGuidanceLogitsProcessor`).

    Attributes:
        ids: `[batch, width]` int32 the negative prompt, left-padded (bucket
            padding first, masked out).
        mask: `[batch, width]` int32, 0 on padding.
        length: `[]` or `[batch]` int32 the negative prompt's logical length
            (columns, the user's padding included, without the bucket padding):
            transformers gives its tokens positions `0 .. length - 1` and the
            next token `length`; per row for per-row negative prompts.
        scale: `[]` or `[batch]` float32 guidance scale.
    """

    ids: Array
    mask: Array
    length: Array
    scale: Array


def guided_logits(cond: Array, uncond: Array, scale: Array) -> Array:
    """`scale * (log_softmax(cond) - log_softmax(uncond)) + log_softmax(uncond)`,
    `[rows, V]` each, `scale` `[]` or `[rows]`."""
    cond = jax.nn.log_softmax(cond, axis=-1)
    uncond = jax.nn.log_softmax(uncond, axis=-1)
    scale = jnp.asarray(scale, cond.dtype)
    scale = scale[:, None] if scale.ndim else scale
    return scale * (cond - uncond) + uncond


def expand_rows(tree: Any, expand: int) -> Any:
    """Repeats every leaf's rows (axis 0) `expand` times: `[B, ...] -> [B * expand, ...]`."""
    if expand == 1:
        return tree
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, expand, axis=0), tree)


def with_prompt_logprobs(
    out: GenerateOutput, prompt: dict[str, Array] | None, num_return_sequences: int
) -> GenerateOutput:
    """`out` with the prefill's prompt log-probabilities (`prompt_logprobs=n`), one
    row per returned sequence; `out` unchanged when they were not asked for."""
    if prompt is None:
        return out
    prompt = expand_rows(prompt, num_return_sequences)
    return out.replace(
        prompt_logprobs=prompt["logprobs"],
        prompt_top_logprobs=prompt.get("top_logprobs"),
        prompt_top_token_ids=prompt.get("top_ids"),
    )


def prompt_cache(plan: Plan, width: int) -> Any:
    """An empty cache of `plan.batch` prompt rows of `width + new_tokens` slots,
    for `prompt_pass`. A paged one (`cache_implementation="paged"`) with more
    than one row per prompt is laid out for `expand_cache`: the `plan.expand`
    rows of a prompt will name its full pages (`PagedCache.share_prefix`)."""
    cache = plan.decoder.init_cache(plan.batch, width + plan.new_tokens, None)
    if plan.expand > 1 and isinstance(cache, PagedCache):
        cache = cache.share_prefix(plan.expand, width)
    return cache


def expand_cache(plan: Plan, cache: Any, width: int) -> Any:
    """`prompt_cache`'s rows, each holding its `width`-slot prompt, as the
    `plan.expand` rows that continue it: copies of each row (`gather_rows`),
    or, paged, rows naming the prompt's full pages and owning the rest
    (`PagedCache.fork`: the prompt stored once, not `expand` times)."""
    if plan.expand == 1:
        return cache
    if isinstance(cache, PagedCache):
        return cache.fork(plan.expand, width)
    return gather_rows(cache, jnp.repeat(jnp.arange(plan.batch), plan.expand))


def row_keys(key: Array, batch: int, expand: int, per_row: bool) -> Array:
    """`[batch * expand]` keys, one stream per row.

    Row j of prompt b draws from `fold_in(key[b], j)` with per-prompt keys
    (`per_row`, `key: [batch]`), else from `fold_in(key, b * expand + j)`: either
    way a prompt draws the same tokens in a batch as alone with its key.
    """
    if per_row:
        j = jnp.tile(jnp.arange(expand), batch)
        return jax.vmap(jax.random.fold_in)(jnp.repeat(key, expand, axis=0), j)
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(batch * expand))


def constrain_logits(plan: Plan, logits: Array) -> Array:
    # Vocabulary-sharded logits: processors and choosers run on them as on one
    # device (XLA partitions the reductions, top_k and sorts exactly).
    if plan.mesh is None:
        return logits
    return constrain(logits, plan.mesh, fit_spec(P(DATA, MODEL), logits.shape, plan.mesh))


def prompt_outputs(plan: Plan, logits: Array, ids: Array, mask: Array) -> dict[str, Array]:
    """Log-probabilities of the prompt tokens under the model (no processors).

    Args:
        plan: the static plan (`config.prompt_logprobs >= 0`).
        logits: `[batch, bucket, V]` the prefill's logits.
        ids: `[batch, bucket]` the prompt.
        mask: `[batch, bucket]` 0 on padding.

    Returns:
        `{"logprobs": [batch, bucket]}`, plus `"top_logprobs"`, `"top_ids"`
        `[batch, bucket, n]` for `prompt_logprobs = n >= 1`. Column j is about
        token j given the tokens before it; columns without a real token before
        them (the first real token, padding) hold 0 (and the pad id).
    """
    cfg = plan.config
    logp = jax.nn.log_softmax(logits[:, :-1, :].astype(jnp.float32), axis=-1)
    has = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)  # [B, bucket - 1]
    own = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    pad = lambda x, value: jnp.pad(
        x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2), constant_values=value
    )
    out = {"logprobs": pad(jnp.where(has, own, 0.0), 0.0)}
    if cfg.prompt_logprobs > 0:
        values, top = top_n(logp, cfg.prompt_logprobs)
        out["top_logprobs"] = pad(jnp.where(has[..., None], values, 0.0), 0.0)
        out["top_ids"] = pad(jnp.where(has[..., None], top, cfg.pad_token_id), cfg.pad_token_id)
    return out


def prompt_pass(
    plan: Plan, params: Any, ids: Array, mask: Array, cache: Any, offset: Array | int = 0
) -> tuple[Array, Any, dict[str, Array] | None, Array | None]:
    """The prompts through the model, written into `cache`: the one prefill of
    `generate`, `stream`, speculative decoding and the engine.

    Args:
        ids: `[n, bucket]` left-padded prompt ids.
        mask: `[n, bucket]` 0 on padding.
        cache: an empty cache of `n` rows (or, with `offset`, rows holding
            `offset` tokens already: a paged prefill's next chunk, right-padded).
        offset: `[]` or `[n]` real tokens already in the cache before these.

    Returns:
        The last position's logits `[n, V]` float32, the cache, the prompts'
        log-probability outputs (`prompt_outputs`) when the config asks for them,
        else None, and the last position's routed experts `[n, moe_layers, k]`
        (`output_routed_experts`), else None. Without prompt outputs the LM head
        runs on the last position only: the others' `[n, bucket, V]` logits
        would dwarf a long prompt's work.
    """
    positions = positions_from_mask(mask, offset)
    all_logits = plan.config.prompt_logprobs >= 0  # every position's logits
    routed = None
    if plan.config.output_routed_experts:
        logits, cache, experts = plan.decoder.apply_routed(
            params, ids, positions, cache, mask, last=not all_logits
        )
        routed = last_real(experts, mask)[:, 0]
    elif all_logits:
        logits, cache = plan.decoder.apply(params, ids, positions, cache, mask)
    else:
        last, cache = plan.decoder.prefill_last(params, ids, positions, cache, mask)
        return last, cache, None, None
    if not all_logits:  # `apply_routed(last=True)`: the last real position's only
        return logits[:, -1].astype(jnp.float32), cache, None, routed
    last = last_real(logits, mask)[:, 0].astype(jnp.float32)
    return last, cache, prompt_outputs(plan, logits, ids, mask), routed


def start_state(
    plan: Plan,
    ids: Array,
    mask: Array,
    prompt_len: Array,
    max_length: Array,
    new_tokens: int,
    cache: Any,
    last: Array,
    keys: Array,
    processor: Chain,
    stop: StopStrings | None,
    step: Array,
    routed: Array | None = None,
    offset: Array | None = None,
) -> DecodeState:
    """The decode state of rows whose prompts have been through `prompt_pass`.

    Args:
        ids: `[rows, bucket]` left-padded prompt ids; `mask` as ids.
        prompt_len: `[]` or `[rows]` int32 logical prompt lengths (`bucket` less
            the bucket padding, as `generate` counts them).
        max_length: `[]` or `[rows]` int32 `prompt_len + max_new_tokens`.
        new_tokens: columns for new tokens in the token buffer (static).
        cache, last: `prompt_pass`'s cache and logits, one row per row.
        keys: `[rows]` per-row PRNG keys (`row_keys`).
        processor: the chain whose state starts here; `stop` the stop strings.
        step: `[]` int32 the step counter to start from.
        routed: `prompt_pass`'s routed experts, one row per row, or None.
        offset: `[rows]` int32 bucket padding before each row's prompt, when
            `ids` holds prompts of several buckets (each right-aligned to its
            own bucket, padding after it); default `bucket - prompt_len`.
    """
    rows, bucket = ids.shape
    pad = jnp.full((rows, new_tokens), plan.config.pad_token_id, jnp.int32)
    ctx = DecodeContext.from_ids(
        jnp.concatenate([ids, pad], axis=1),
        vocab_size=last.shape[-1],
        prompt_length=prompt_len,
        max_length=max_length,
        attention_mask=mask,
        offset=jnp.int32(bucket) - prompt_len if offset is None else offset,
        cur_len=prompt_len,
    )
    return DecodeState(
        ctx=ctx,
        cache=cache,
        logits=last,
        done=jnp.zeros((rows,), bool),
        positions=jnp.sum(mask, axis=-1).astype(jnp.int32),
        lengths=jnp.zeros((rows,), jnp.int32),
        step=step,
        row_keys=keys,
        proc_state=processor.init(ctx),
        stop_window=None if stop is None else stop.init(ctx),
        routed=routed,
    )


def prefill(
    plan: Plan,
    params: Any,
    ids: Array,
    mask: Array,
    prompt_len: Array,
    key: Array,
    traced: TracedConfig,
) -> DecodeState:
    """Runs the prompt through the model and builds the initial loop state.

    Args:
        plan: the static plan.
        params: the model parameters (prepared for `plan.rows`).
        ids: `[batch, bucket]` left-padded prompt ids.
        mask: `[batch, bucket]` 0 on padding.
        prompt_len: `[]` the logical prompt length (before bucket padding).
        key: one key, or `[batch]` keys (`plan.per_row_keys`).
        traced: the traced config: the processor chain whose state the loop
            carries and the stop strings (both initialised here from the prompt).
    """
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.asarray(mask, jnp.int32)
    # Shared prefix: each prompt goes through the model once; its cache rows and
    # last logits are then copied to the `expand` rows (returned sequences or
    # beams) that continue it (on pages, they share the prompt's pages). A row's
    # prefill does not depend on the rows around it, so this equals prefilling
    # every copy, at 1/expand of the cost.
    cache = constrain(prompt_cache(plan, plan.bucket), plan.mesh, cache_specs)
    last, cache, prompt, routed = prompt_pass(plan, params, ids, mask, cache)
    cache = expand_cache(plan, cache, plan.bucket)
    if plan.expand > 1:
        parent = jnp.repeat(jnp.arange(plan.batch), plan.expand)
        last = jnp.take(last, parent, axis=0)
        ids, mask, routed = expand_rows((ids, mask, routed), plan.expand)
    cache = constrain(cache, plan.mesh, cache_specs)
    last = constrain_logits(plan, last)
    keys = row_keys(key, plan.batch, plan.expand, plan.per_row_keys)
    state = start_state(
        plan,
        ids,
        mask,
        prompt_len,
        prompt_len + plan.new_tokens,
        plan.new_tokens,
        cache,
        last,
        keys,
        traced.processor,
        traced.stop,
        jnp.zeros((), jnp.int32),
        routed,
    )
    guide = None if traced.guidance is None else _prefill_guide(plan, params, traced.guidance)
    return state.replace(prompt=prompt, guide=guide)


def _prefill_guide(plan: Plan, params: Any, guidance: Guidance) -> dict[str, Any]:
    """The unconditional rows: the negative prompt through the model into a cache
    of its own, copied to each prompt's `expand` rows."""
    width = guidance.ids.shape[1]
    cache = constrain(prompt_cache(plan, width), plan.mesh, cache_specs)
    # transformers calls the model without position ids: positions count columns,
    # padding included (bucket padding, before logical column 0, is masked).
    length = jnp.asarray(guidance.length, jnp.int32)
    rows_length = length[:, None] if length.ndim else length
    positions = jnp.arange(width, dtype=jnp.int32)[None, :] - (width - rows_length)
    positions = jnp.broadcast_to(jnp.maximum(positions, 0), guidance.ids.shape)
    last, cache = plan.decoder.prefill_last(params, guidance.ids, positions, cache, guidance.mask)
    cache = expand_cache(plan, cache, width)
    if plan.expand > 1:
        parent = jnp.repeat(jnp.arange(plan.batch), plan.expand)
        last = jnp.take(last, parent, axis=0)
    cache = constrain(cache, plan.mesh, cache_specs)
    if length.ndim and plan.expand > 1:
        length = jnp.repeat(length, plan.expand)
    positions = jnp.broadcast_to(length, (plan.rows,))
    return {"cache": cache, "logits": constrain_logits(plan, last), "positions": positions}


def model_step(
    plan: Plan, params: Any, cache: Any, tokens: Array, positions: Array
) -> tuple[Array, Any, Array | None]:
    """One token per row through the model: `(logits [rows, V] float32, cache,
    routed experts [rows, moe_layers, k] int32 or None)`, the experts with
    `output_routed_experts` only."""
    rows = tokens.shape[0]
    args = (params, tokens[:, None], positions[:, None], cache, jnp.ones((rows, 1), jnp.int32))
    routed = None
    if plan.config.output_routed_experts:
        logits, cache, experts = plan.decoder.apply_routed(*args)
        routed = experts[:, -1]
    else:
        logits, cache = plan.decoder.apply(*args)
    cache = constrain(cache, plan.mesh, cache_specs)
    return constrain_logits(plan, logits[:, 0, :].astype(jnp.float32)), cache, routed


def eos_hit(tokens: Array, eos: tuple[int, ...]) -> Array:
    """`tokens == any EOS id`, elementwise."""
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == jnp.asarray(eos, jnp.int32), axis=-1)


StepFn = Callable[[Any, Array, bool], tuple[Any, dict[str, Array]]]


def run(
    step: StepFn,
    carry: Any,
    n: int,
    *,
    loop: str,
    finished: Callable[[Any], Array],
    fill: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Array]]:
    """Runs `step` for `n` steps; returns the final carry and the stacked outputs.

    Args:
        step: `(carry, i, run_model) -> (carry, outputs)`; `run_model=False` on
            the scan's last step (its model call would be wasted).
        carry: the initial carry.
        n: steps (static).
        loop: "scan" (exactly n steps) or "while" (stops once `finished(carry)`).
        finished: `carry -> []` bool, every row finished (the while loop's exit).
        fill: initial values of output buffers for steps a while loop never
            runs (default 0), e.g. the pad id for tokens.

    Returns:
        `(carry, outputs)` with every output stacked step-major: `[n, ...]`.
    """
    if loop == "scan":
        carry, outs = jax.lax.scan(lambda c, i: step(c, i, True), carry, jnp.arange(n - 1))
        carry, last = step(carry, jnp.int32(n - 1), False)
        return carry, {k: jnp.concatenate([outs[k], v[None]], axis=0) for k, v in last.items()}
    fill = fill or {}
    shapes = jax.eval_shape(lambda c: step(c, jnp.int32(0), True)[1], carry)
    bufs = {
        k: jnp.full((n, *s.shape), fill.get(k, 0), s.dtype)
        for k, s in shapes.items()
        if not k.startswith("trace/")
    }

    def cond(state):
        i, c, _ = state
        return (i < n) & ~finished(c)

    def body(state):
        i, c, b = state
        c, out = step(c, i, True)
        return i + 1, c, {k: b[k].at[i].set(out[k]) for k in b}

    _, carry, bufs = jax.lax.while_loop(cond, body, (jnp.int32(0), carry, bufs))
    return carry, bufs


def trace_outputs(plan: Plan, outs: dict[str, Array]) -> dict[str, Array] | None:
    """The `trace/...` outputs, step-major (`[steps, ...]`), or None."""
    if not plan.record:
        return None
    return {k.removeprefix("trace/"): v for k, v in outs.items() if k.startswith("trace/")}
