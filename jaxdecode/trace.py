"""`trace`: what every processor did to the next-token distribution, step by step.

`trace` runs `generate`'s own program (same prefill, same loop body, same
processors) with one static switch on, which makes each step also output the
scores after every processor of the chain and, for beam search, every candidate
with its running score, the beams kept and the finished set. With the switch
off (`generate`) none of it is computed or compiled.

Everything is returned as NumPy arrays in a `Trace`, with helpers that the
pictures of `jaxdecode.explain` (and a user's notebook) read:

    tr = jd.trace(model, ids, jd.GenerationConfig(do_sample=True, top_k=20), key=key)
    tr.stage_names                      # ["raw", "TopK"]
    tr.top(step=0, stage="TopK", m=5)   # [(token, probability), ...]
    tr.chosen(step=0)                   # the token generate chose
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxdecode.config import GenerationConfig
from jaxdecode.generation import GenerateOutput, drop_bucket, prepare
from jaxdecode.models.base import Decoder, Model
from jaxdecode.processors import stage_names
from jaxdecode.search import generate_program

__all__ = ["Trace", "Hypothesis", "trace"]


def softmax64(x: np.ndarray) -> np.ndarray:
    """Softmax of one row in float64 on the host; -inf entries get 0 (all -inf: zeros)."""
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros_like(x)
    e = np.where(finite, np.exp(x - x[finite].max()), 0.0)
    return e / e.sum()


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """A beam-search candidate that ended (EOS or the last step).

    Attributes:
        step: the step (0-based) at which it ended.
        tokens: the generated tokens (prompt excluded), EOS included.
        score: its running sum of processed log-probabilities.
        normalized: `score / len ** length_penalty`, what beam search ranks.
        entered: True if it entered the finished set (it was among the top
            `num_beams` candidates and could still improve the set).
    """

    step: int
    tokens: tuple[int, ...]
    score: float
    normalized: float
    entered: bool


@dataclasses.dataclass(frozen=True)
class Trace:
    """The record of one generation.

    Attributes:
        config: the `GenerationConfig` used.
        stage_names: `["raw", <processor class names in order>]`.
        stages: `[steps, S + 1, rows, V]` float32: the raw logits (log-softmax for
            beam search, which processes log-probabilities), then the scores after
            each processor.
        tokens: `[steps, rows]` the token each row took at each step (greedy and
            sampling); for beam search the tokens of the kept beams.
        output: `generate`'s `GenerateOutput` for the same call.
        prompt: `[batch, prompt_len]` the prompt (without bucket padding).
        beam: for beam search, `[steps, batch, ...]` arrays: `cand_tokens`,
            `cand_parent`, `cand_scores`, `cand_normalized`, `cand_finishing`,
            `cand_eos` (`[., ., K]`), `kept` (`[., ., num_beams]`), `fin_scores`,
            `fin_flag`, `unsatisfied`. None otherwise.
    """

    config: GenerationConfig
    stage_names: list[str]
    stages: np.ndarray
    tokens: np.ndarray
    output: GenerateOutput
    prompt: np.ndarray
    beam: dict[str, np.ndarray] | None = None

    @property
    def steps(self) -> int:
        return self.stages.shape[0]

    def stage_index(self, stage: int | str) -> int:
        if isinstance(stage, str):
            if stage not in self.stage_names:
                raise ValueError(f"stage must be one of {self.stage_names}, got {stage!r}")
            return self.stage_names.index(stage)
        if not -len(self.stage_names) <= stage < len(self.stage_names):
            raise ValueError(f"stage must be in [0, {len(self.stage_names) - 1}], got {stage}")
        return stage % len(self.stage_names)

    def probs(self, step: int, stage: int | str = -1, row: int = 0) -> np.ndarray:
        """`[V]` softmax of the scores at `stage` (0 where a processor removed a token)."""
        return softmax64(self.stages[step, self.stage_index(stage), row])

    def history(self, step: int, row: int = 0) -> np.ndarray:
        """`[prompt_len + step]` row `row`'s tokens before `step`: prompt, then generated."""
        prompt_row = row // max(1, self.tokens.shape[1] // self.prompt.shape[0])
        return np.concatenate([self.prompt[prompt_row], self.tokens[:step, row]])

    def kept(self, step: int, stage: int | str = -1, row: int = 0) -> np.ndarray:
        """`[V]` bool: tokens still possible after `stage` (finite scores)."""
        return np.isfinite(self.stages[step, self.stage_index(stage), row])

    def top(
        self, step: int, stage: int | str = -1, row: int = 0, m: int = 10
    ) -> list[tuple[int, float]]:
        """The `m` most probable tokens after `stage`, as `(token, probability)`."""
        p = self.probs(step, stage, row)
        order = np.argsort(-p, kind="stable")[:m]
        return [(int(t), float(p[t])) for t in order]

    def chosen(self, step: int, row: int = 0) -> int:
        """The token taken at `step` (greedy/sampling: row `row`'s choice)."""
        return int(self.tokens[step, row])

    def hypotheses(self, row: int = 0) -> list[Hypothesis]:
        """Beam search: every candidate that ended, in step order, for prompt `row`."""
        if self.beam is None:
            raise ValueError("hypotheses() needs a beam-search trace (num_beams > 1)")
        b = self.beam
        nb = b["kept"].shape[-1]
        beams: list[tuple[int, ...]] = [()] * nb  # running beams' generated tokens
        out = []
        for step in range(self.steps):
            tokens, parent = b["cand_tokens"][step, row], b["cand_parent"][step, row]
            seqs = [beams[int(p)] + (int(t),) for p, t in zip(parent, tokens, strict=True)]
            for j, seq in enumerate(seqs):
                if b["cand_eos"][step, row, j]:
                    normalized = float(b["cand_normalized"][step, row, j])
                    entered = bool(b["cand_finishing"][step, row, j]) and bool(
                        np.any(b["fin_scores"][step, row] == np.float32(normalized))
                    )
                    out.append(
                        Hypothesis(
                            step=step,
                            tokens=seq,
                            score=float(b["cand_scores"][step, row, j]),
                            normalized=normalized,
                            entered=entered,
                        )
                    )
            beams = [seqs[int(k)] for k in b["kept"][step, row]]
        return out

    def best(self, row: int = 0) -> Hypothesis:
        """Beam search: the finished hypothesis with the highest normalized score."""
        entered = [h for h in self.hypotheses(row) if h.entered]
        return max(entered, key=lambda h: h.normalized)


def trace(
    model: Model | Decoder,
    input_ids: Any,
    config: GenerationConfig | None = None,
    *,
    attention_mask: Any = None,
    params: Any = None,
    key: Any = None,
    steps: int | None = None,
    prompt_buckets: Any = "pow2",
    **overrides: Any,
) -> Trace:
    """Generates as `generate` does and records every processor's effect.

    The same arguments as `generate` (it runs `generate`'s program with the
    recording switch on), so the output, and the tokens for the same `key`, are
    `generate`'s. It stores `[steps, stages, rows, vocab]` scores: meant for
    short generations (`max_new_tokens` of a few dozen), not for throughput.

    Args:
        model: a `CausalLM`, or a `Decoder` together with `params=`.
        input_ids: `[batch, prompt_len]` int token ids.
        config: a `GenerationConfig` (default: the model's), updated by `overrides`.
        attention_mask: as in `generate`.
        params: as in `generate`.
        key: as in `generate`.
        prompt_buckets: as in `generate`.
        steps: keep only the first `steps` steps of the record (default: all).

    Returns:
        A `Trace`.
    """
    req = prepare(
        model,
        input_ids,
        attention_mask,
        config,
        params=params,
        key=key,
        prompt_buckets=prompt_buckets,
        overrides=overrides,
    )
    if steps is not None and not 1 <= steps <= req.plan.new_tokens:
        raise ValueError(
            f"steps must be in [1, {req.plan.new_tokens}] (max_new_tokens), got {steps}"
        )
    if req.drafter is not None:
        raise ValueError(
            "trace records one token per step; speculative decoding "
            "(prompt_lookup_num_tokens) is for generate()"
        )
    plan = dataclasses.replace(req.plan, record=True)
    out = generate_program(plan, *req.args())
    rec = {k: np.asarray(v) for k, v in jax.device_get(out.trace).items()}
    out = drop_bucket(out, req.extra).replace(trace=None)
    n = steps or plan.new_tokens
    stages = rec.pop("stages")[:n]
    if plan.config.num_beams > 1:
        beam = {k: v[:n] for k, v in rec.items()}
        # The kept beams' tokens, `[steps, batch * num_beams]`.
        tokens = np.take_along_axis(beam["cand_tokens"], beam["kept"], axis=2)
        tokens = tokens.reshape(n, -1)
    else:
        beam = None
        sequences = np.asarray(out.sequences)
        start = sequences.shape[1] - plan.new_tokens
        tokens = sequences[:, start : start + n].T
    return Trace(
        config=req.config,
        stage_names=["raw", *stage_names(req.traced.processor)],
        stages=stages,
        tokens=tokens,
        output=out,
        prompt=np.asarray(input_ids),
        beam=beam,
    )
