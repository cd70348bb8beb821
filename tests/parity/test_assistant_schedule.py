"""Speculative decoding's assistant options against transformers 5:
`num_assistant_tokens_schedule` (each row's K after every round, transformers'
`update_candidate_strategy` rule) and `assistant_confidence_threshold`
(transformers' ConfidenceCriteria on the draft), per row."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from support.hf_models import make_llama_model, target_and_draft
from transformers.generation.candidate_generator import AssistedCandidateGenerator

import jaxdecode as jd
from jaxdecode.search.drafters import next_assistant_tokens

pytestmark = pytest.mark.parity

VOCAB = 96
EOS = 2
NEW = 24
PROMPTS = [[5, 17, 33, 5, 17, 40, 9], [61, 8, 8, 23], [44, 3, 71, 44, 3, 71, 12, 30, 7]]


def test_rule_matches_transformers_update_candidate_strategy():
    """Random rounds (candidates, matches): the K sequence of transformers'
    AssistedCandidateGenerator.update_candidate_strategy, for every schedule."""
    rng = np.random.default_rng(0)
    for schedule in ("constant", "heuristic", "heuristic_transient"):
        gen = object.__new__(AssistedCandidateGenerator)
        gen.assistant_generation_config = transformers.GenerationConfig(
            num_assistant_tokens_schedule=schedule, assistant_confidence_threshold=None
        )
        gen.num_assistant_tokens = 5
        k = np.int32([5])
        for _ in range(60):
            cand = int(rng.integers(0, int(k[0]) + 1))
            matches = cand if rng.random() < 0.5 else int(rng.integers(0, cand + 1))
            gen.update_candidate_strategy(None, torch.zeros((1, cand + 1, 3)), matches)
            k = np.asarray(
                next_assistant_tokens(k, np.int32([matches]), np.int32([cand]), schedule)
            )
            assert int(k[0]) == gen.num_assistant_tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = make_llama_model("llama", seed=3, spread=1.0, vocab_size=VOCAB, tie_word_embeddings=True)
    return target_and_draft(tmp_path_factory, hf)


def _hf_final_k(hf, hf_draft, prompt, schedule, start):
    """transformers at batch 1: the assistant's K after the last round."""
    draft = copy.deepcopy(hf_draft)
    draft.generation_config.num_assistant_tokens = start
    draft.generation_config.num_assistant_tokens_schedule = schedule
    draft.generation_config.assistant_confidence_threshold = 0.0
    record = {}
    original = AssistedCandidateGenerator.update_candidate_strategy

    def spy(self, input_ids, scores, num_matches):
        original(self, input_ids, scores, num_matches)
        record["k"] = self.num_assistant_tokens

    AssistedCandidateGenerator.update_candidate_strategy = spy
    try:
        with torch.no_grad():
            hf.generate(
                torch.tensor([prompt]),
                assistant_model=draft,
                max_new_tokens=NEW,
                do_sample=False,
                pad_token_id=0,
            )
    finally:
        AssistedCandidateGenerator.update_candidate_strategy = original
    return record["k"]


def _hf_rounds(hf, hf_draft, prompt, schedule, start, eos):
    """transformers at batch 1: each round's (K, candidates, matches)."""
    draft = copy.deepcopy(hf_draft)
    draft.generation_config.num_assistant_tokens = start
    draft.generation_config.num_assistant_tokens_schedule = schedule
    draft.generation_config.assistant_confidence_threshold = 0.0
    rounds = []
    original = AssistedCandidateGenerator.update_candidate_strategy

    def spy(self, input_ids, scores, num_matches):
        rounds.append((self.num_assistant_tokens, scores.shape[1] - 1, int(num_matches)))
        original(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.update_candidate_strategy = spy
    try:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                assistant_model=draft,
                max_new_tokens=NEW,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=eos,
            )
    finally:
        AssistedCandidateGenerator.update_candidate_strategy = original
    return rounds, out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("schedule", ["constant", "heuristic", "heuristic_transient"])
def test_rounds_equal_transformers_over_a_call(models, schedule):
    """A real (1-layer) draft that is sometimes wrong, EOS on: per row, the
    drafted and accepted counts over the whole call and the K after it equal
    transformers' (its rounds start at the first new token, as ours), and the
    tokens are its tokens. Each row of one batch adapts its own K (a one-token
    prompt too: the draft has no token before it in its first round)."""
    lm, draft, hf, hf_draft = models
    start = 3
    prompts = [*PROMPTS, [19]]
    ids = np.zeros((len(prompts), max(map(len, prompts))), int)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, ids.shape[1] - len(p) :], mask[i, ids.shape[1] - len(p) :] = p, 1
    out = jd.generate(
        lm,
        ids,
        mask,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=EOS,
        assistant_model=draft,
        num_assistant_tokens=start,
        num_assistant_tokens_schedule=schedule,
        assistant_confidence_threshold=0.0,
    )
    rejected = False
    for i, prompt in enumerate(prompts):
        rounds, tokens = _hf_rounds(hf, hf_draft, prompt, schedule, start, EOS)
        n = int(out.lengths[i])
        assert np.asarray(out.sequences)[i, ids.shape[1] : ids.shape[1] + n].tolist() == tokens
        want_k = rounds[-1][0]
        if schedule != "constant":  # the rule after the last round
            want_k = want_k + 2 if rounds[-1][1] == rounds[-1][2] else max(1, want_k - 1)
        got = (int(out.drafted[i]), int(out.accepted[i]), int(out.num_assistant_tokens[i]))
        want = (sum(r[1] for r in rounds), sum(r[2] for r in rounds), want_k)
        assert got == want, (i, rounds)
        rejected |= any(r[2] < r[1] for r in rounds)
        if schedule == "heuristic":
            assert len({r[0] for r in rounds}) > 1, rounds  # K moved
    assert rejected, "the draft must be wrong sometimes"


def _final_k_all_accepted(start: int, tokens: int, schedule: str) -> int:
    """K after decoding `tokens` tokens in rounds that accept every candidate:
    each round drafts min(K, tokens left - 1) candidates, emits them and one
    more, then applies the rule."""
    k = np.int32([start])
    left = tokens
    while left > 0:
        cand = min(int(k[0]), left - 1)
        k = np.asarray(next_assistant_tokens(k, np.int32([cand]), np.int32([cand]), schedule))
        left -= cand + 1
    return int(k[0])


@pytest.mark.parametrize("schedule,start", [("heuristic", 2), ("heuristic_transient", 3)])
def test_k_after_generate_with_a_perfect_draft(models, schedule, start):
    """The target as its own draft accepts every candidate, so K follows the rule
    through every round; the rounds start at the first new token in both."""
    lm, _, hf, _ = models
    prompt = PROMPTS[1]
    out = jd.generate(
        lm,
        np.asarray([prompt]),
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        assistant_model=lm,
        num_assistant_tokens=start,
        num_assistant_tokens_schedule=schedule,
        assistant_confidence_threshold=0.0,  # transformers' run below: 0 too
    )
    assert int(out.lengths[0]) == NEW  # no EOS: every round is a full one
    assert int(out.num_assistant_tokens[0]) == _final_k_all_accepted(start, NEW, schedule)
    assert _hf_final_k(hf, hf, prompt, schedule, start) == _final_k_all_accepted(
        start, NEW, schedule
    )


def test_threshold_cuts_drafts_per_row(models):
    """A per-row threshold: 1.0 stops every draft after one token (K drafts only
    with threshold 0); counts differ, tokens do not."""
    lm, draft, _, _ = models
    ids = np.asarray([PROMPTS[0], PROMPTS[0]])
    options = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    out = jd.generate(
        lm,
        ids,
        assistant_model=draft,
        num_assistant_tokens=4,
        assistant_confidence_threshold=[0.0, 1.0],
        **options,
    )
    seq = np.asarray(out.sequences)
    np.testing.assert_array_equal(seq[0], seq[1])
    drafted = np.asarray(out.drafted)
    assert drafted[1] < drafted[0]
    with pytest.raises(ValueError, match="assistant_confidence_threshold"):
        jd.GenerationConfig(assistant_confidence_threshold=1.5).validate()
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule"):
        jd.GenerationConfig(num_assistant_tokens_schedule="adaptive").validate()


def test_heuristic_round_width_is_capped(models):
    """A heuristic schedule's static round width: max_new_tokens - 1 for short
    outputs, HEURISTIC_MAX_TOKENS for long ones (unless the first K is larger);
    constant: K. The capped program still lowers for TPU and CUDA."""
    import jax

    from jaxdecode.generation import prepare
    from jaxdecode.search.drafters import HEURISTIC_MAX_TOKENS

    lm, draft, _, _ = models
    ids = np.asarray([PROMPTS[1]])

    def width(new, schedule, start=3):
        options = dict(
            max_new_tokens=new,
            num_assistant_tokens=start,
            num_assistant_tokens_schedule=schedule,
            do_sample=False,
        )
        req = prepare(lm, ids, overrides=options, assistant_model=draft)
        return req.drafter.k, req

    assert width(10, "heuristic")[0] == 9
    assert width(50, "heuristic")[0] == HEURISTIC_MAX_TOKENS
    assert width(50, "heuristic_transient", start=40)[0] == 40
    assert width(50, "constant")[0] == 3
    _, req = width(50, "heuristic")
    program, static, dynamic = req.program()
    jax.export.export(program, platforms=("tpu", "cuda"))(*static, *dynamic)
