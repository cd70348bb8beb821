"""The one compiled program behind `generate`: prefill, then a search strategy."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from jaxdecode.processors import TracedConfig
from jaxdecode.processors.base import expand_rows as expand_processor_rows
from jaxdecode.search.beam import beam_program
from jaxdecode.search.loop import GenerateOutput, Plan, prefill, with_prompt_logprobs
from jaxdecode.search.sample import sample_program
from jaxdecode.sharding import DATA, constrain, fit_spec

Array = jax.Array

__all__ = ["generate_program", "prefill_program"]


def prefill_program(
    plan: Plan,
    params: Any,
    ids: Array,
    mask: Array,
    prompt_len: Array,
    traced: TracedConfig,
    key: Array,
):
    """`(traced with per-row values expanded, the prefilled state)`; `params` must
    be prepared for `plan.rows` (`Decoder.prepared`).

    What `generate_program` runs before its loop; `stream` jits it on its own.
    """
    if plan.mesh is not None:
        rows = fit_spec(P(DATA, None), ids.shape, plan.mesh)
        ids, mask = constrain((ids, mask), plan.mesh, (rows, rows))
    traced = traced.replace(processor=expand_processor_rows(traced.processor, plan.expand))
    if traced.guidance is not None and plan.expand > 1 and jax.numpy.ndim(traced.guidance.scale):
        scale = jax.numpy.repeat(traced.guidance.scale, plan.expand, axis=0)
        traced = traced.replace(guidance=traced.guidance.replace(scale=scale))
    state = prefill(plan, params, ids, mask, prompt_len, key, traced)
    return traced, state


def _search(
    plan: Plan,
    params: Any,
    ids: Array,
    mask: Array,
    prompt_len: Array,
    traced: TracedConfig,
    key: Array,
) -> GenerateOutput:
    """Prefill and the search loop (`plan.loop`), untransformed."""
    params = plan.decoder.prepared(params, plan.rows)
    traced, state = prefill_program(plan, params, ids, mask, prompt_len, traced, key)
    prompt, state = state.prompt, state.replace(prompt=None)  # not carried by the loop
    if plan.config.num_beams > 1:
        out = beam_program(plan, params, traced, state, key)
    else:
        out = sample_program(plan, params, traced, state)
    return with_prompt_logprobs(out, prompt, plan.config.num_return_sequences)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _search_early_stop(plan: Plan, *args: Any) -> GenerateOutput:
    """`_search` with `loop="while"`, differentiable: reverse-mode autodiff
    cannot go through `lax.while_loop`, so its derivative is the fixed-length
    scan's (same tokens; it runs every step)."""
    return _search(plan, *args)


@_search_early_stop.defjvp
def _search_early_stop_jvp(plan: Plan, primals: tuple, tangents: tuple):
    scan = dataclasses.replace(plan, loop="scan")
    return jax.jvp(functools.partial(_search, scan), primals, tangents)


@jax.jit(static_argnums=0)
def generate_program(
    plan: Plan,
    params: Any,
    ids: Array,
    mask: Array,
    prompt_len: Array,
    traced: TracedConfig,
    key: Array,
) -> GenerateOutput:
    """Prefill and the whole search loop as one jitted function of `plan` (static).

    With `plan.loop == "while"` the loop stops once every row has finished;
    differentiated (`jax.grad`, `jax.jvp`, also through a caller's `jit`), the
    program is the `"scan"` one, which reverse mode can go through. A recording
    plan (`trace`) runs the `"scan"` loop."""
    if plan.record:  # `trace` records every step: the fixed-length loop
        plan = dataclasses.replace(plan, loop="scan")
    if plan.loop == "while":
        return _search_early_stop(plan, params, ids, mask, prompt_len, traced, key)
    return _search(plan, params, ids, mask, prompt_len, traced, key)
