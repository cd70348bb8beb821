"""Greedy search and sampling: processors -> chooser -> append -> model.

`decode_step` is the body of every greedy/sampling loop: `generate`'s scan and
while loop (through `loop.run`) and the Python loop of `stream`. A row's draw
depends only on its key stream and its own token index (`lengths`), never on the
loop's step count or the batch around it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdecode import sampling
from jaxdecode.processors import TracedConfig, processor_stages
from jaxdecode.search.loop import (
    DecodeState,
    GenerateOutput,
    Plan,
    eos_hit,
    guided_logits,
    model_step,
    run,
    trace_outputs,
)
from jaxdecode.search.record import FIELDS, NO_EXPERT, PAD_FIELDS, finished, token_record

Array = jax.Array

__all__ = ["decode_step", "sample_program"]


def decode_step(
    plan: Plan, params: Any, traced: TracedConfig, state: DecodeState, run_model: bool = True
) -> tuple[DecodeState, dict[str, Array]]:
    """One token per row.

    Returns the new state and this step's outputs (`token_record`'s fields):
    `tokens [rows]`, `token_logprobs [rows]`, plus, when the config asks for
    them, `scores` / `logits` `[rows, V]`, `raw_token_logprobs [rows]`,
    `top_logprobs` / `top_token_ids` `[rows, n]`, `routed_experts [rows,
    moe_layers, k]`.
    """
    cfg = plan.config
    processor = traced.processor
    logits_in = state.logits
    if state.guide is not None:  # classifier-free guidance, first as in transformers
        logits_in = guided_logits(state.logits, state.guide["logits"], traced.guidance.scale)
    if plan.record:
        stages = processor_stages(processor, logits_in, state.ctx, state.proc_state)
        scores = stages[-1] if stages else logits_in
    else:
        scores = processor(logits_in, state.ctx, state.proc_state)
    if cfg.do_sample:
        keys = jax.vmap(jax.random.fold_in)(state.row_keys, state.lengths)
        tokens = sampling.categorical(keys, scores)
    else:
        tokens = sampling.greedy(scores)
    record = token_record(cfg, scores, state.logits, tokens, state.routed)
    out = finished(record, state.done, cfg.pad_token_id)  # finished rows emit pad
    tokens = out["tokens"]
    if plan.record:
        out["trace/stages"] = jnp.stack([state.logits, *stages])  # [S + 1, rows, V]
    logits, cache, guide, routed = state.logits, state.cache, state.guide, state.routed
    if run_model:
        logits, cache, routed = model_step(plan, params, cache, tokens, state.positions)
    if guide is not None:
        g_logits, g_cache = guide["logits"], guide["cache"]
        if run_model:  # the unconditional rows take the same token
            g_logits, g_cache, _ = model_step(plan, params, g_cache, tokens, guide["positions"])
        guide = {"cache": g_cache, "logits": g_logits, "positions": guide["positions"] + 1}
    done = state.done | eos_hit(tokens, cfg.eos_token_id)
    window = state.stop_window
    if traced.stop is not None:
        window, stopped = traced.stop.advance(window, tokens)
        done = done | stopped
    new = state.replace(
        ctx=state.ctx.append(tokens),
        cache=cache,
        logits=logits,
        done=done,
        positions=state.positions + 1,
        lengths=state.lengths + (~state.done).astype(jnp.int32),
        step=state.step + 1,
        proc_state=processor.update(state.proc_state, tokens),
        stop_window=window,
        guide=guide,
        routed=routed,
    )
    return new, out


def sample_program(
    plan: Plan, params: Any, traced: TracedConfig, state: DecodeState
) -> GenerateOutput:
    """Greedy search or sampling from a prefilled state, `plan.new_tokens` steps."""
    cfg = plan.config
    state, outs = run(
        lambda st, i, run_model: decode_step(plan, params, traced, st, run_model),
        state,
        plan.new_tokens,
        loop=plan.loop,
        finished=lambda st: jnp.all(st.done),
        fill={**{name: cfg.pad_token_id for name in PAD_FIELDS}, "routed_experts": NO_EXPERT},
    )
    rows_first = lambda k: outs[k].swapaxes(0, 1) if k in outs else None
    return GenerateOutput(
        sequences=state.ctx.sequences,
        lengths=state.lengths,
        **{name: rows_first(name) for name in FIELDS if name != "tokens"},
        trace=trace_outputs(plan, outs),
    )
