"""`generate`: greedy search, sampling and beam search as one compiled program.

Prefill runs the prompt through the model once; then a `lax.scan` (or, with
`loop="while"`, a `lax.while_loop` that stops when every row is finished) runs the
new-token steps over the functional KV cache: processors -> chooser -> model step.
Beam search follows transformers 5's vectorised algorithm step for step (see
README); the cache is gathered by parent beam once per step.

Static (recompiles when changed): batch, prompt bucket, max_new_tokens, num_beams,
num_return_sequences, do_sample, early_stopping, output flags, which processors
are present. Traced (never recompiles): every numeric value, the prompts, the key.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdecode import sampling
from jaxdecode.cache import gather_beams
from jaxdecode.config import GenerationConfig, StaticConfig, TracedConfig
from jaxdecode.context import DecodeContext
from jaxdecode.lm import CausalLM
from jaxdecode.models.base import Decoder, positions_from_mask
from jaxdecode.processors import processor_stages
from jaxdecode.sharding import DATA, MODEL, cache_specs, constrain, fit_spec, shard_params

Array = jax.Array

__all__ = ["DecodeState", "GenerateOutput", "StreamStep", "bucket_length", "generate", "stream"]

# transformers' "minus infinity" for beam bookkeeping (a finite number, so that
# arithmetic on it stays exact where transformers' does).
_NEG = -1.0e9


@struct.dataclass
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
    """

    sequences: Array
    token_logprobs: Array
    lengths: Array
    scores: Array | None = None
    logits: Array | None = None
    sequences_scores: Array | None = None
    beam_indices: Array | None = None
    trace: dict[str, Array] | None = None  # only from `jaxdecode.trace`


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one compiled generate program."""

    decoder: Decoder
    config: StaticConfig
    batch: int
    bucket: int  # padded prompt columns
    new_tokens: int
    loop: str
    track_seen: bool
    track_counts: bool
    # `trace`: also output the scores after every processor (and, for beam search,
    # every candidate). False in `generate`, so its program carries none of it.
    record: bool = False
    mesh: Mesh | None = None  # shard rows over `data`, heads/vocab over `model`


# --------------------------------------------------------------------------- #
# Front door.
# --------------------------------------------------------------------------- #


def bucket_length(length: int, buckets: Any = "pow2") -> int:
    """The padded prompt length for `length` under a bucketing rule.

    Args:
        length: the prompt length.
        buckets: "pow2" (next power of two, at least 8), None (no padding), an
            int m (round up to a multiple of m), or a sorted sequence of lengths
            (the first >= length; beyond the last, the length itself).
    """
    if buckets is None:
        return length
    if buckets == "pow2":
        return max(8, 1 << max(length - 1, 0).bit_length())
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


def _is_traced(*xs: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A validated request: the static plan and the arguments of the program."""

    plan: _Plan
    params: Any
    ids: Any
    mask: Any
    prompt_len: Array
    traced: TracedConfig
    key: Array
    extra: int  # bucket padding columns, dropped from the output
    config: GenerationConfig  # the resolved configuration


def _prepare(
    model: CausalLM | Decoder,
    input_ids: Any,
    attention_mask: Any,
    config: GenerationConfig | None,
    params: Any,
    key: Any,
    prompt_buckets: Any,
    loop: str,
    overrides: dict[str, Any],
    mesh: Mesh | None = None,
) -> _Prepared:
    """Validates everything before tracing; pads the prompt to its bucket."""
    if isinstance(model, CausalLM):
        decoder, params = model.decoder, model.params if params is None else params
        base = model.generation_config
    elif isinstance(model, Decoder):
        if params is None:
            raise ValueError("generate(decoder, ...) needs params=")
        decoder, base = model, GenerationConfig()
    else:
        raise ValueError(f"model must be a CausalLM or a Decoder, got {type(model).__name__}")
    if config is not None and not isinstance(config, GenerationConfig):
        raise ValueError(f"config must be a GenerationConfig, got {type(config).__name__}")
    config = (config or base).replace(**overrides) if overrides else (config or base)
    config.validate(vocab_size=decoder.vocab_size)
    if loop not in ("scan", "while"):
        raise ValueError(f"loop must be 'scan' or 'while', got {loop!r}")

    if mesh is not None:
        if not isinstance(mesh, Mesh) or set(mesh.axis_names) != {DATA, MODEL}:
            raise ValueError(
                f"mesh must be a jax.sharding.Mesh with axes ('data', 'model') "
                f"(see jaxdecode.make_mesh), got {mesh!r}"
            )
        params = shard_params(params, mesh, decoder.param_specs)
    # Traced inside a user's jit, or global arrays spanning several hosts: no
    # host-side look at the values.
    traced_inputs = _is_traced(input_ids, attention_mask) or _is_global(input_ids, attention_mask)
    ids = input_ids if traced_inputs else np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] < 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"input_ids must be a [batch, prompt_len] integer array, got {ids.dtype} {ids.shape}"
        )
    batch, prompt_len = ids.shape
    if attention_mask is None:
        mask = np.ones((batch, prompt_len), np.int32) if not traced_inputs else jnp.ones_like(ids)
    else:
        mask = attention_mask if traced_inputs else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask shape {mask.shape} must equal input_ids shape {ids.shape}"
            )
    if not traced_inputs:
        if ids.min() < 0 or ids.max() >= decoder.vocab_size:
            raise ValueError(
                f"input_ids must be in [0, {decoder.vocab_size - 1}], got [{ids.min()}, {ids.max()}]"
            )
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError("attention_mask must hold only 0 and 1")
    max_length = config.resolve_max_length(prompt_len)
    new_tokens = max_length - prompt_len
    if new_tokens < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room after the {prompt_len}-token prompt; "
            "set max_new_tokens"
        )
    decoder.check_length(max_length)

    bucket = bucket_length(prompt_len, prompt_buckets)
    extra = bucket - prompt_len
    if extra:
        pad_id = config.pad_id
        if traced_inputs:
            ids = jnp.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
            mask = jnp.pad(mask, ((0, 0), (extra, 0)))
        else:
            ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
            mask = np.pad(mask, ((0, 0), (extra, 0)))

    if config.do_sample and key is None:
        if config.seed is not None:
            key = jax.random.key(config.seed)
        elif traced_inputs or _is_traced(params):
            raise ValueError(
                "generate(do_sample=True) inside jit, or on multi-host arrays, needs key= (or a "
                "seed in the config): every host must draw the same numbers"
            )
        else:
            key = jax.random.key(secrets.randbits(31))
    if key is None:
        key = jax.random.key(0)  # unused by greedy and beam search
    elif not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))

    static, traced = config.split()
    needs = traced.processor.requires
    plan = _Plan(
        decoder=decoder,
        config=static,
        batch=batch,
        bucket=bucket,
        new_tokens=new_tokens,
        loop=loop,
        track_seen="seen" in needs,
        track_counts="token_counts" in needs,
        mesh=mesh,
    )
    return _Prepared(plan, params, ids, mask, jnp.int32(prompt_len), traced, key, extra, config)


def _is_global(*xs: Any) -> bool:
    """Arrays with shards on other hosts (multi-process `jax.distributed`)."""
    return any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in xs)


def _drop_columns(x: Array, extra: int) -> Array:
    """`x[:, extra:]`, in NumPy when concrete (no compilation per prompt length)."""
    if isinstance(x, jax.core.Tracer) or _is_global(x):
        return x[:, extra:] if extra else x
    # device_put, not jnp.asarray: the latter compiles a copy for every new shape.
    return jax.device_put(np.asarray(x)[:, extra:])


def generate(
    model: CausalLM | Decoder,
    input_ids: Any,
    attention_mask: Any = None,
    config: GenerationConfig | None = None,
    *,
    params: Any = None,
    key: Any = None,
    prompt_buckets: Any = "pow2",
    loop: str = "scan",
    mesh: Mesh | None = None,
    **overrides: Any,
) -> GenerateOutput:
    """Generates continuations of `input_ids` in one compiled program.

    Args:
        model: a `CausalLM`, or a `Decoder` together with `params=`.
        input_ids: `[batch, prompt_len]` int token ids, left-padded.
        attention_mask: `[batch, prompt_len]`, 0 on left padding (default: all 1).
        config: a `GenerationConfig` (default: the model's), updated by `overrides`
            (any `GenerationConfig` field, e.g. `max_new_tokens=32, do_sample=True`).
        params: the parameters when `model` is a `Decoder`.
        key: a `jax.random` key for sampling; else `config.seed`; else a fresh
            random seed (outside `jit`; inside a `jit` pass `key`).
        prompt_buckets: how the prompt is padded so that many lengths share one
            compilation (see `bucket_length`); invisible in the results.
        loop: "scan" (fixed number of steps) or "while" (stops as soon as every
            row is finished).
        mesh: a `jax.sharding.Mesh` with axes `("data", "model")`
            (`jaxdecode.make_mesh`): rows over `data`, weights, KV-cache heads
            and the vocabulary over `model` (see `jaxdecode.sharding`). The
            tokens are the single-device ones.

    Returns:
        A `GenerateOutput`.
    """
    req = _prepare(
        model, input_ids, attention_mask, config, params, key, prompt_buckets, loop, overrides, mesh
    )
    out = _generate_program(
        req.plan, req.params, req.ids, req.mask, req.prompt_len, req.traced, req.key
    )
    return out.replace(sequences=_drop_columns(out.sequences, req.extra))


# --------------------------------------------------------------------------- #
# The compiled program.
# --------------------------------------------------------------------------- #


@struct.dataclass
class DecodeState:
    """The loop state of greedy search and sampling (`rows = batch * R`).

    Attributes:
        ctx: the `DecodeContext` (token buffer `[rows, bucket + N]` and tallies).
        cache: the model's KV cache.
        logits: `[rows, vocab]` float32 raw logits for the next token.
        done: `[rows]` bool, finished rows (they emit pad).
        positions: `[rows]` int32 position id of the next token.
        lengths: `[rows]` int32 tokens generated so far (EOS included).
        step: `[]` int32 steps taken.
        row_keys: `[rows]` PRNG keys, one stream per row.
    """

    ctx: DecodeContext
    cache: Any
    logits: Array
    done: Array
    positions: Array
    lengths: Array
    step: Array
    row_keys: Array


def _expand(cfg: StaticConfig) -> int:
    """Cache rows per prompt: beams, or returned sequences when sampling."""
    return cfg.num_beams if cfg.num_beams > 1 else cfg.num_return_sequences


def _prefill(
    plan: _Plan, params: Any, ids: Array, mask: Array, prompt_len: Array, key: Array
) -> DecodeState:
    """Runs the prompt through the model and builds the initial loop state."""
    cfg = plan.config
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.asarray(mask, jnp.int32)
    expand = _expand(cfg)
    if expand > 1:
        ids = jnp.repeat(ids, expand, axis=0)
        mask = jnp.repeat(mask, expand, axis=0)
    rows = ids.shape[0]
    total = plan.bucket + plan.new_tokens
    cache = plan.decoder.init_cache(rows, total, None)
    cache = constrain(cache, plan.mesh, cache_specs)
    logits, cache = plan.decoder.apply(params, ids, positions_from_mask(mask), cache, mask)
    last = _constrain_logits(plan, logits[:, -1, :].astype(jnp.float32))
    buffer = jnp.concatenate(
        [ids, jnp.full((rows, plan.new_tokens), cfg.pad_token_id, jnp.int32)], axis=1
    )
    ctx = DecodeContext.from_ids(
        ids,
        vocab_size=last.shape[-1],
        prompt_length=prompt_len,
        max_length=prompt_len + plan.new_tokens,
        attention_mask=mask,
        track_seen=plan.track_seen,
        track_counts=plan.track_counts,
        offset=jnp.int32(plan.bucket) - prompt_len,
    ).replace(sequences=buffer)
    return DecodeState(
        ctx=ctx,
        cache=cache,
        logits=last,
        done=jnp.zeros((rows,), bool),
        positions=jnp.sum(mask, axis=-1).astype(jnp.int32),
        lengths=jnp.zeros((rows,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        row_keys=_row_keys(key, rows),
    )


def _model_step(plan: _Plan, params: Any, cache: Any, tokens: Array, positions: Array):
    """One token per row through the model: `(logits [rows, V] float32, cache)`."""
    rows = tokens.shape[0]
    logits, cache = plan.decoder.apply(
        params, tokens[:, None], positions[:, None], cache, jnp.ones((rows, 1), jnp.int32)
    )
    cache = constrain(cache, plan.mesh, cache_specs)
    return _constrain_logits(plan, logits[:, 0, :].astype(jnp.float32)), cache


def _constrain_logits(plan: _Plan, logits: Array) -> Array:
    # Vocabulary-sharded logits: processors and choosers run on them as on one
    # device (XLA partitions the reductions, top_k and sorts exactly).
    if plan.mesh is None:
        return logits
    return constrain(logits, plan.mesh, fit_spec(P(DATA, MODEL), logits.shape, plan.mesh))


def _decode_step(
    plan: _Plan, params: Any, traced: TracedConfig, state: DecodeState, run_model: bool = True
) -> tuple[DecodeState, dict[str, Array]]:
    """Processors -> chooser -> append -> model. The body of every greedy/sampling
    loop: `generate`'s scan and while loop, and the Python loop of `stream`.

    Returns the new state and this step's outputs: `tokens [rows]`, `logp [rows]`,
    plus `scores` / `logits` `[rows, V]` when the config asks for them.
    """
    cfg = plan.config
    if plan.record:
        stages = processor_stages(traced.processor, state.logits, state.ctx)
        scores = stages[-1] if stages else state.logits
    else:
        scores = traced.processor(state.logits, state.ctx)
    if cfg.do_sample:
        keys = jax.vmap(lambda k: jax.random.fold_in(k, state.step))(state.row_keys)
        tokens = sampling.categorical(keys, scores)
    else:
        tokens = sampling.greedy(scores)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), tokens[:, None], axis=-1)[:, 0]
    tokens = jnp.where(state.done, cfg.pad_token_id, tokens)
    logp = jnp.where(state.done, 0.0, logp)
    out = {"tokens": tokens, "logp": logp}
    if cfg.output_scores:
        out["scores"] = scores
    if cfg.output_logits:
        out["logits"] = state.logits
    if plan.record:
        out["trace/stages"] = jnp.stack([state.logits, *stages])  # [S + 1, rows, V]
    logits, cache = state.logits, state.cache
    if run_model:
        logits, cache = _model_step(plan, params, cache, tokens, state.positions)
    new = state.replace(
        ctx=state.ctx.append(tokens),
        cache=cache,
        logits=logits,
        done=state.done | _eos_hit(tokens, cfg.eos_token_id),
        positions=state.positions + 1,
        lengths=state.lengths + (~state.done).astype(jnp.int32),
        step=state.step + 1,
    )
    return new, out


@jax.jit(static_argnums=0)
def _generate_program(
    plan: _Plan,
    params: Any,
    ids: Array,
    mask: Array,
    prompt_len: Array,
    traced: TracedConfig,
    key: Array,
) -> GenerateOutput:
    params = plan.decoder.prepared(params, ids.shape[0] * _expand(plan.config))
    if plan.mesh is not None:
        rows = fit_spec(P(DATA, None), ids.shape, plan.mesh)
        ids, mask = constrain((ids, mask), plan.mesh, (rows, rows))
    state = _prefill(plan, params, ids, mask, prompt_len, key)
    if plan.config.num_beams > 1:
        step = partial(_model_step, plan, params)
        return _beam_search(
            plan, traced, key, state.ctx, state.cache, state.logits, state.positions, step
        )
    return _sample_or_greedy(plan, params, traced, state)


def _eos_hit(tokens: Array, eos: tuple[int, ...]) -> Array:
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == jnp.asarray(eos, jnp.int32), axis=-1)


def _row_keys(key: Array, rows: int) -> Array:
    # Row r's stream depends only on (key, r): a row draws the same tokens in a
    # batch of 1 or 64.
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))


def _sample_or_greedy(
    plan: _Plan, params: Any, traced: TracedConfig, state: DecodeState
) -> GenerateOutput:
    cfg = plan.config
    n = plan.new_tokens
    if plan.loop == "scan":
        # N - 1 steps that also run the model, then a last choice without it.
        body = lambda st, _: _decode_step(plan, params, traced, st)
        state, outs = jax.lax.scan(body, state, None, length=n - 1)
        state, last = _decode_step(plan, params, traced, state, run_model=False)
        outs = {k: jnp.concatenate([outs[k], v[None]], axis=0) for k, v in last.items()}
    else:
        rows, vocab = state.logits.shape
        outs = {
            "tokens": jnp.full((n, rows), cfg.pad_token_id, jnp.int32),
            "logp": jnp.zeros((n, rows), jnp.float32),
        }
        if cfg.output_scores:
            outs["scores"] = jnp.zeros((n, rows, vocab), jnp.float32)
        if cfg.output_logits:
            outs["logits"] = jnp.zeros((n, rows, vocab), jnp.float32)

        def cond(carry):
            st, _ = carry
            return (st.step < n) & ~jnp.all(st.done)

        def body(carry):
            st, bufs = carry
            i = st.step
            st, out = _decode_step(plan, params, traced, st)
            return st, {k: bufs[k].at[i].set(out[k]) for k in bufs}

        state, outs = jax.lax.while_loop(cond, body, (state, outs))
    return GenerateOutput(
        sequences=state.ctx.sequences,
        token_logprobs=outs["logp"].T,
        lengths=state.lengths,
        scores=outs["scores"].swapaxes(0, 1) if "scores" in outs else None,
        logits=outs["logits"].swapaxes(0, 1) if "logits" in outs else None,
        trace=_trace_outputs(plan, outs),
    )


def _trace_outputs(plan: _Plan, outs: dict[str, Array]) -> dict[str, Array] | None:
    """The `trace/...` outputs, step-major (`[steps, ...]`), or None."""
    if not plan.record:
        return None
    return {k.removeprefix("trace/"): v for k, v in outs.items() if k.startswith("trace/")}


def _beam_search(plan, traced, key, ctx, cache, last, next_pos, model_step):
    """transformers 5's vectorised beam search over a fixed number of steps.

    Shapes: B batch rows, nb beams, K = max(2, 1 + #eos) * nb candidates, V vocab,
    T buffer columns, N new tokens.
    """
    cfg = plan.config
    nb = cfg.num_beams
    rows, vocab = last.shape
    b = rows // nb
    n = plan.new_tokens
    total = ctx.sequences.shape[1]
    eos = cfg.eos_token_id
    k_cand = max(2, 1 + len(eos)) * nb
    lp = traced.length_penalty
    processor = traced.processor
    early = cfg.early_stopping
    batch_offset = (jnp.arange(b) * nb)[:, None]
    top_mask = jnp.arange(k_cand) < nb
    row_keys = _row_keys(key, b)

    def take(x, idx):  # x [B, M, ...], idx [B, J] -> [B, J, ...]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    state = {
        "running_scores": jnp.where(jnp.arange(nb)[None, :] == 0, 0.0, _NEG) * jnp.ones((b, 1)),
        "running_beam_idx": jnp.full((b, nb, n), -1, jnp.int32),
        "running_tok_lp": jnp.zeros((b, nb, n), jnp.float32),
        "fin_seqs": ctx.sequences.reshape(b, nb, total),
        "fin_scores": jnp.full((b, nb), _NEG, jnp.float32),
        "fin_beam_idx": jnp.full((b, nb, n), -1, jnp.int32),
        "fin_tok_lp": jnp.zeros((b, nb, n), jnp.float32),
        "fin_flag": jnp.zeros((b, nb), bool),
        "unsatisfied": jnp.ones((b,), bool),
    }

    def step_fn(carry, step):
        ctx, cache, logits, pos, st = carry
        logp = jax.nn.log_softmax(logits, axis=-1)
        if plan.record:
            stages = processor_stages(processor, logp, ctx)
            scores = stages[-1] if stages else logp
        else:
            scores = processor(logp, ctx)  # [B*nb, V]
        acc = (scores.reshape(b, nb, vocab) + st["running_scores"][:, :, None]).reshape(
            b, nb * vocab
        )
        if cfg.do_sample:
            # Sampling K without replacement from softmax(acc) = Gumbel top-K; then
            # sorted by acc, as transformers sorts its multinomial draws.
            keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
            gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (nb * vocab,)))(keys)
            _, idx = jax.lax.top_k(acc + gumbel, k_cand)
            vals = jnp.take_along_axis(acc, idx, axis=1)
            order = jnp.argsort(-vals, axis=1, stable=True)
            vals, idx = jnp.take_along_axis(vals, order, 1), jnp.take_along_axis(idx, order, 1)
        else:
            vals, idx = jax.lax.top_k(acc, k_cand)
        parent = idx // vocab  # [B, K]
        tokens = (idx % vocab).astype(jnp.int32)
        tok_lp = _token_scores(scores, parent, tokens, b, nb, vocab)
        cand_seqs = take(ctx.sequences.reshape(b, nb, total), parent)
        cand_seqs = jax.lax.dynamic_update_slice(
            cand_seqs, tokens[:, :, None], (0, 0, ctx.write_col)
        )
        cand_beam_idx = (
            take(st["running_beam_idx"], parent).at[:, :, step].set(parent + batch_offset)
        )
        cand_tok_lp = take(st["running_tok_lp"], parent).at[:, :, step].set(tok_lp)
        hits = _eos_hit(tokens, eos) | (step == n - 1)

        # Running beams for the next step: the best nb candidates that did not finish.
        run_lp = vals + hits.astype(jnp.float32) * _NEG
        _, nxt = jax.lax.top_k(run_lp, nb)
        new_running_scores = jnp.take_along_axis(run_lp, nxt, 1)
        new_tokens = jnp.take_along_axis(tokens, nxt, 1)
        new_parent = (jnp.take_along_axis(parent, nxt, 1) + batch_offset).reshape(-1)
        new_running_beam_idx = take(cand_beam_idx, nxt)
        new_running_tok_lp = take(cand_tok_lp, nxt)

        # Finished hypotheses: only the top nb candidates may enter.
        just = hits & top_mask[None, :]
        gen_len = (step + 1).astype(jnp.float32)
        cand = vals / jnp.power(gen_len, lp)
        if early is True:
            full = jnp.all(st["fin_flag"], axis=-1, keepdims=True)
            cand = cand + full.astype(jnp.float32) * _NEG
        cand = cand + (~st["unsatisfied"])[:, None].astype(jnp.float32) * _NEG
        cand = cand + (~just).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([st["fin_scores"], cand], axis=1)
        _, best = jax.lax.top_k(merged_scores, nb)
        fin_scores = jnp.take_along_axis(merged_scores, best, 1)
        fin_seqs = take(jnp.concatenate([st["fin_seqs"], cand_seqs], axis=1), best)
        fin_beam_idx = take(jnp.concatenate([st["fin_beam_idx"], cand_beam_idx], axis=1), best)
        fin_tok_lp = take(jnp.concatenate([st["fin_tok_lp"], cand_tok_lp], axis=1), best)
        fin_flag = jnp.take_along_axis(jnp.concatenate([st["fin_flag"], just], axis=1), best, 1)

        # Can a running beam still beat the worst finished one?
        if early == "never":
            best_len = jnp.where(lp > 0.0, jnp.float32(n), gen_len + 0.0)
        else:
            best_len = gen_len
        best_running = new_running_scores[:, 0] / jnp.power(best_len, lp)
        worst = jnp.where(fin_flag, jnp.min(fin_scores, axis=1, keepdims=True), _NEG)
        unsatisfied = st["unsatisfied"] & jnp.any(best_running[:, None] > worst, axis=1)

        ctx = ctx.reorder(new_parent).append(new_tokens.reshape(-1))
        cache = gather_beams(cache, new_parent)
        st = {
            "running_scores": new_running_scores,
            "running_beam_idx": new_running_beam_idx,
            "running_tok_lp": new_running_tok_lp,
            "fin_seqs": fin_seqs,
            "fin_scores": fin_scores,
            "fin_beam_idx": fin_beam_idx,
            "fin_tok_lp": fin_tok_lp,
            "fin_flag": fin_flag,
            "unsatisfied": unsatisfied,
        }
        extra = {}
        if cfg.output_scores:
            extra["scores"] = scores
        if cfg.output_logits:
            extra["logits"] = logits
        if plan.record:
            extra.update(
                {
                    "trace/stages": jnp.stack([logp, *stages]),  # [S + 1, rows, V]
                    "trace/cand_tokens": tokens,  # [B, K]
                    "trace/cand_parent": parent,  # beam 0..nb-1
                    "trace/cand_scores": vals,  # running log-prob sums
                    "trace/cand_normalized": vals / jnp.power(gen_len, lp),
                    "trace/cand_finishing": just,  # may enter the finished set
                    "trace/cand_eos": hits,
                    "trace/kept": nxt,  # [B, nb] candidates that run on
                    "trace/fin_scores": fin_scores,  # [B, nb] the finished set after it
                    "trace/fin_flag": fin_flag,
                    "trace/unsatisfied": unsatisfied,  # [B]
                }
            )
        return (ctx, cache, logits, pos, st), extra, new_tokens.reshape(-1)

    def scan_body(carry, step):
        (ctx, cache, logits, pos, st), extra, tokens = step_fn(carry, step)
        logits, cache = model_step(cache, tokens, pos)
        return (ctx, cache, logits, pos + 1, st), extra

    def stop(st: dict) -> Array:
        # transformers stops the whole batch when no row can improve, or (with
        # early_stopping=True) when every row has nb finished hypotheses.
        done = ~jnp.any(st["unsatisfied"])
        if early is True:
            done = done | jnp.all(st["fin_flag"])
        return done

    carry = (ctx, cache, last, next_pos, state)
    if plan.loop == "scan":
        carry, extras = jax.lax.scan(scan_body, carry, jnp.arange(n - 1))
        carry, final, _ = step_fn(carry, jnp.int32(n - 1))
        stacked = {k: jnp.concatenate([extras[k], v[None]], 0) for k, v in final.items()}
        traces = _trace_outputs(plan, stacked)
        stacked = {k: v.swapaxes(0, 1) for k, v in stacked.items() if not k.startswith("trace/")}
    else:
        bufs = {}
        if cfg.output_scores:
            bufs["scores"] = jnp.zeros((n, rows, vocab), jnp.float32)
        if cfg.output_logits:
            bufs["logits"] = jnp.zeros((n, rows, vocab), jnp.float32)

        def cond(s):
            step, carry, _ = s
            return (step < n) & ~stop(carry[4])

        def wbody(s):
            step, carry, bufs = s
            carry, extra, tokens = step_fn(carry, step)
            ctx_, cache_, logits_, pos_, st_ = carry
            logits_, cache_ = jax.lax.cond(
                step < n - 1,
                lambda: model_step(cache_, tokens, pos_),
                lambda: (logits_, cache_),
            )
            bufs = {k: v.at[step].set(extra[k]) for k, v in bufs.items()}
            return step + 1, (ctx_, cache_, logits_, pos_ + 1, st_), bufs

        _, carry, bufs = jax.lax.while_loop(cond, wbody, (jnp.int32(0), carry, bufs))
        stacked = {k: v.swapaxes(0, 1) for k, v in bufs.items()}
        traces = None  # `trace` runs the scan loop

    st = carry[4]
    r = cfg.num_return_sequences
    beam_idx = st["fin_beam_idx"][:, :r].reshape(b * r, n)
    lengths = jnp.sum(beam_idx >= 0, axis=-1).astype(jnp.int32)
    tok_lp = jnp.where(beam_idx >= 0, st["fin_tok_lp"][:, :r].reshape(b * r, n), 0.0)
    return GenerateOutput(
        sequences=st["fin_seqs"][:, :r].reshape(b * r, total),
        token_logprobs=tok_lp,
        lengths=lengths,
        scores=stacked.get("scores"),
        logits=stacked.get("logits"),
        sequences_scores=st["fin_scores"][:, :r].reshape(b * r),
        beam_indices=beam_idx,
        trace=traces,
    )


def _token_scores(
    scores: Array, parent: Array, tokens: Array, b: int, nb: int, vocab: int
) -> Array:
    """`scores[batch * nb + parent, token]` for every candidate: `[B, K]`."""
    flat = scores.reshape(b, nb * vocab)
    return jnp.take_along_axis(flat, parent * vocab + tokens, axis=1)


# --------------------------------------------------------------------------- #
# Streaming: a Python loop over the same jitted step.
# --------------------------------------------------------------------------- #


class StreamStep(struct.PyTreeNode):
    """One step of `stream`: NumPy arrays over the `batch * R` rows.

    Attributes:
        tokens: `[rows]` the tokens chosen at this step (pad for finished rows).
        logprobs: `[rows]` their log-probabilities (0 for finished rows).
        active: `[rows]` bool, False for rows that had already finished (their
            token is padding, not output).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    active: np.ndarray


_prefill_jit = jax.jit(_prefill, static_argnums=0)
_prepare_params_jit = jax.jit(
    lambda decoder, params, rows: decoder.prepared(params, rows), static_argnums=(0, 2)
)
# The state is donated: XLA updates the cache and buffers in place, step after step.
_step_jit = jax.jit(_decode_step, static_argnums=(0, 4), donate_argnums=3)


def stream(
    model: CausalLM | Decoder,
    input_ids: Any,
    attention_mask: Any = None,
    config: GenerationConfig | None = None,
    *,
    params: Any = None,
    key: Any = None,
    prompt_buckets: Any = "pow2",
    **overrides: Any,
) -> Iterator[StreamStep]:
    """Yields each step's tokens as they are produced (greedy search and sampling).

    The same prefill and the same step function as `generate`, driven by a
    Python loop (one jitted call per token, the state donated), so the tokens
    equal `generate`'s for the same key. Stops when every row has finished.
    """
    req = _prepare(
        model, input_ids, attention_mask, config, params, key, prompt_buckets, "scan", overrides
    )
    if req.plan.config.num_beams > 1:
        raise ValueError(
            "stream() supports greedy search and sampling (num_beams=1); beam search only "
            "knows its best hypothesis at the end: use generate()"
        )
    rows = req.ids.shape[0] * _expand(req.plan.config)
    params = _prepare_params_jit(req.plan.decoder, req.params, rows)
    state = _prefill_jit(req.plan, params, req.ids, req.mask, req.prompt_len, req.key)
    for _ in range(req.plan.new_tokens):
        active = ~np.asarray(state.done)
        if not active.any():
            return
        state, out = _step_jit(req.plan, params, req.traced, state, True)
        yield StreamStep(
            tokens=np.asarray(out["tokens"]), logprobs=np.asarray(out["logp"]), active=active
        )
