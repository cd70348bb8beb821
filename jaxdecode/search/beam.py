"""Beam search: transformers 5's vectorised algorithm, step for step.

Shapes: B prompt rows, nb beams, K = max(2, 1 + #eos) * nb candidates, V vocab,
T buffer columns, N new tokens. Each step scores every (beam, token) pair, keeps
the best nb unfinished candidates as the next running beams, and lets the top nb
candidates that end (EOS or the last step) compete for the nb finished slots.
The context, the KV cache and every processor state are gathered by parent beam
once per step. `beam_step` is long because it is one step of one algorithm,
kept in transformers' order so the two can be read side by side.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdecode import pytree
from jaxdecode.cache import gather_rows
from jaxdecode.context import DecodeContext
from jaxdecode.processors import TracedConfig, processor_stages
from jaxdecode.search.loop import (
    DecodeState,
    GenerateOutput,
    Plan,
    eos_hit,
    model_step,
    row_keys,
    run,
    trace_outputs,
)

Array = jax.Array

__all__ = ["BeamState", "beam_program"]

# transformers' "minus infinity" for beam bookkeeping (a finite number, so that
# arithmetic on it stays exact where transformers' does).
NEG = -1.0e9


@pytree.dataclass
class BeamState:
    """The loop state of beam search.

    Attributes:
        ctx: `DecodeContext` of the running beams (`[B * nb, T]` buffer).
        cache: the model's KV cache for the running beams.
        logits: `[B * nb, V]` float32 raw logits of the running beams' next token.
        positions: `[B * nb]` int32 position id of the next token.
        proc_state: the processor chain's state, rows of the running beams.
        step: `[]` int32 steps taken.
        running_scores: `[B, nb]` running log-probability sums.
        running_beam_idx: `[B, nb, N]` int32 beam index per step (-1 unset).
        running_tok_lp: `[B, nb, N]` float32 chosen tokens' processed log-probs.
        fin_seqs: `[B, nb, T]` finished hypotheses.
        fin_scores: `[B, nb]` their length-normalised scores (NEG when empty).
        fin_beam_idx: `[B, nb, N]` int32.
        fin_tok_lp: `[B, nb, N]` float32.
        fin_flag: `[B, nb]` bool, slot holds a finished hypothesis.
        unsatisfied: `[B]` bool, the row may still improve.
    """

    ctx: DecodeContext
    cache: Any
    logits: Array
    positions: Array
    proc_state: Any
    step: Array
    running_scores: Array
    running_beam_idx: Array
    running_tok_lp: Array
    fin_seqs: Array
    fin_scores: Array
    fin_beam_idx: Array
    fin_tok_lp: Array
    fin_flag: Array
    unsatisfied: Array


def _take(x: Array, idx: Array) -> Array:
    """`x [B, M, ...]`, `idx [B, J]` -> `[B, J, ...]`."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _initial(plan: Plan, state: DecodeState) -> BeamState:
    nb = plan.config.num_beams
    b, n = plan.batch, plan.new_tokens
    total = state.ctx.sequences.shape[1]
    return BeamState(
        ctx=state.ctx,
        cache=state.cache,
        logits=state.logits,
        positions=state.positions,
        proc_state=state.proc_state,
        step=jnp.zeros((), jnp.int32),
        running_scores=jnp.where(jnp.arange(nb)[None, :] == 0, 0.0, NEG) * jnp.ones((b, 1)),
        running_beam_idx=jnp.full((b, nb, n), -1, jnp.int32),
        running_tok_lp=jnp.zeros((b, nb, n), jnp.float32),
        fin_seqs=state.ctx.sequences.reshape(b, nb, total),
        fin_scores=jnp.full((b, nb), NEG, jnp.float32),
        fin_beam_idx=jnp.full((b, nb, n), -1, jnp.int32),
        fin_tok_lp=jnp.zeros((b, nb, n), jnp.float32),
        fin_flag=jnp.zeros((b, nb), bool),
        unsatisfied=jnp.ones((b,), bool),
    )


def beam_step(
    plan: Plan,
    params: Any,
    traced: TracedConfig,
    keys: Array,
    st: BeamState,
    run_model: bool,
) -> tuple[BeamState, dict[str, Array]]:
    """One step of beam search (see the module docstring).

    Long on purpose: one step of transformers' algorithm in its order (score,
    pick candidates, next running beams, finished set, stop test, reorder), so
    that the two read side by side.
    """
    cfg = plan.config
    nb = cfg.num_beams
    vocab = st.logits.shape[-1]
    b, n = plan.batch, plan.new_tokens
    total = st.ctx.sequences.shape[1]
    eos = cfg.eos_token_id
    k_cand = max(2, 1 + len(eos)) * nb
    lp = traced.length_penalty
    early = cfg.early_stopping
    processor = traced.processor
    step = st.step
    batch_offset = (jnp.arange(b) * nb)[:, None]
    top_mask = jnp.arange(k_cand) < nb

    logp = jax.nn.log_softmax(st.logits, axis=-1)
    if plan.record:
        stages = processor_stages(processor, logp, st.ctx, st.proc_state)
        scores = stages[-1] if stages else logp
    else:
        scores = processor(logp, st.ctx, st.proc_state)  # [B*nb, V]
    acc = (scores.reshape(b, nb, vocab) + st.running_scores[:, :, None]).reshape(b, nb * vocab)
    if cfg.do_sample:
        # Sampling K without replacement from softmax(acc) = Gumbel top-K; then
        # sorted by acc, as transformers sorts its multinomial draws.
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (nb * vocab,)))(step_keys)
        _, idx = jax.lax.top_k(acc + gumbel, k_cand)
        vals = jnp.take_along_axis(acc, idx, axis=1)
        order = jnp.argsort(-vals, axis=1, stable=True)
        vals, idx = jnp.take_along_axis(vals, order, 1), jnp.take_along_axis(idx, order, 1)
    else:
        vals, idx = jax.lax.top_k(acc, k_cand)
    parent = idx // vocab  # [B, K]
    tokens = (idx % vocab).astype(jnp.int32)
    flat_scores = scores.reshape(b, nb * vocab)
    tok_lp = jnp.take_along_axis(flat_scores, parent * vocab + tokens, axis=1)
    cand_seqs = _take(st.ctx.sequences.reshape(b, nb, total), parent)
    write_col = st.ctx.write_col.reshape(b, nb)[:, :1, None]  # beams share their length
    at_col = jnp.arange(total)[None, None, :] == write_col
    cand_seqs = jnp.where(at_col, tokens[:, :, None], cand_seqs)
    cand_beam_idx = _take(st.running_beam_idx, parent).at[:, :, step].set(parent + batch_offset)
    cand_tok_lp = _take(st.running_tok_lp, parent).at[:, :, step].set(tok_lp)
    hits = eos_hit(tokens, eos) | (step == n - 1)

    # Running beams for the next step: the best nb candidates that did not finish.
    run_lp = vals + hits.astype(jnp.float32) * NEG
    _, nxt = jax.lax.top_k(run_lp, nb)
    new_running_scores = jnp.take_along_axis(run_lp, nxt, 1)
    new_tokens = jnp.take_along_axis(tokens, nxt, 1).reshape(-1)
    new_parent = (jnp.take_along_axis(parent, nxt, 1) + batch_offset).reshape(-1)

    # Finished hypotheses: only the top nb candidates may enter.
    just = hits & top_mask[None, :]
    gen_len = (step + 1).astype(jnp.float32)
    cand = vals / jnp.power(gen_len, lp)
    if early is True:
        full = jnp.all(st.fin_flag, axis=-1, keepdims=True)
        cand = cand + full.astype(jnp.float32) * NEG
    cand = cand + (~st.unsatisfied)[:, None].astype(jnp.float32) * NEG
    cand = cand + (~just).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([st.fin_scores, cand], axis=1)
    _, best = jax.lax.top_k(merged_scores, nb)
    fin_scores = jnp.take_along_axis(merged_scores, best, 1)
    fin_flag = jnp.take_along_axis(jnp.concatenate([st.fin_flag, just], axis=1), best, 1)

    # Can a running beam still beat the worst finished one?
    # (early_stopping="never" with a positive length penalty: a running beam may
    # still grow to the full length, its best possible normalised score.)
    never = early == "never"
    best_len = jnp.where(lp > 0.0, jnp.float32(n), gen_len + 0.0) if never else gen_len
    best_running = new_running_scores[:, 0] / jnp.power(best_len, lp)
    worst = jnp.where(fin_flag, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
    unsatisfied = st.unsatisfied & jnp.any(best_running[:, None] > worst, axis=1)

    # Reorder everything per row by parent beam, then append the chosen tokens.
    reorder = lambda tree: jax.tree_util.tree_map(lambda x: jnp.take(x, new_parent, axis=0), tree)
    ctx = st.ctx.reorder(new_parent).append(new_tokens)
    proc_state = processor.update(reorder(st.proc_state), new_tokens)
    cache = gather_rows(st.cache, new_parent)
    logits = st.logits
    if run_model:
        logits, cache, _ = model_step(plan, params, cache, new_tokens, st.positions)
    new = BeamState(
        ctx=ctx,
        cache=cache,
        logits=logits,
        positions=st.positions + 1,
        proc_state=proc_state,
        step=step + 1,
        running_scores=new_running_scores,
        running_beam_idx=_take(cand_beam_idx, nxt),
        running_tok_lp=_take(cand_tok_lp, nxt),
        fin_seqs=_take(jnp.concatenate([st.fin_seqs, cand_seqs], axis=1), best),
        fin_scores=fin_scores,
        fin_beam_idx=_take(jnp.concatenate([st.fin_beam_idx, cand_beam_idx], axis=1), best),
        fin_tok_lp=_take(jnp.concatenate([st.fin_tok_lp, cand_tok_lp], axis=1), best),
        fin_flag=fin_flag,
        unsatisfied=unsatisfied,
    )
    out = {}
    if cfg.output_scores:
        out["scores"] = scores
    if cfg.output_logits:
        out["logits"] = st.logits
    if plan.record:
        out.update(
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
    return new, out


def _finished(plan: Plan, st: BeamState) -> Array:
    # transformers stops the whole batch when no row can improve, or (with
    # early_stopping=True) when every row has nb finished hypotheses.
    done = ~jnp.any(st.unsatisfied)
    if plan.config.early_stopping is True:
        done = done | jnp.all(st.fin_flag)
    return done


def beam_program(
    plan: Plan, params: Any, traced: TracedConfig, state: DecodeState, key: Array
) -> GenerateOutput:
    """Beam search from a prefilled state (`plan.rows = batch * num_beams` rows)."""
    cfg = plan.config
    keys = row_keys(key, plan.batch, 1, plan.per_row_keys)  # one stream per prompt
    st, outs = run(
        lambda s, i, run_model: beam_step(plan, params, traced, keys, s, run_model),
        _initial(plan, state),
        plan.new_tokens,
        loop=plan.loop,
        finished=lambda s: _finished(plan, s),
    )
    stacked = {k: v.swapaxes(0, 1) for k, v in outs.items() if not k.startswith("trace/")}
    b, n, r = plan.batch, plan.new_tokens, cfg.num_return_sequences
    total = st.fin_seqs.shape[-1]
    beam_idx = st.fin_beam_idx[:, :r].reshape(b * r, n)
    lengths = jnp.sum(beam_idx >= 0, axis=-1).astype(jnp.int32)
    tok_lp = jnp.where(beam_idx >= 0, st.fin_tok_lp[:, :r].reshape(b * r, n), 0.0)
    return GenerateOutput(
        sequences=st.fin_seqs[:, :r].reshape(b * r, total),
        token_logprobs=tok_lp,
        lengths=lengths,
        scores=stacked.get("scores"),
        logits=stacked.get("logits"),
        sequences_scores=st.fin_scores[:, :r].reshape(b * r),
        beam_indices=beam_idx,
        trace=trace_outputs(plan, outs),
    )
