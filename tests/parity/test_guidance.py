"""Classifier-free guidance against transformers 5's generate (its
UnbatchedClassifierFreeGuidanceLogitsProcessor): greedy tokens and processed
scores, with and without a negative prompt, left padding, per-row scales, and
transformers' own unit values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support import count_compiles
from support.hf_models import load_in_jaxdecode, make_hf_model

import jaxdecode as jd
from jaxdecode.search.loop import guided_logits

pytestmark = pytest.mark.parity

NEW = 10
PAD = 95


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model = make_hf_model(seed=3, spread=0.5)
    return model, load_in_jaxdecode(model, tmp_path_factory.mktemp("gpt2_cfg"))


def hf_generate(model, ids, mask, **options):
    with torch.no_grad():
        return model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_scores=True,
            **options,
        )


def test_transformers_unit_values():
    """transformers' test_classifier_free_guidance: 1.5 * (lsm(cond) - lsm(uncond))
    + lsm(uncond)."""
    cond = jnp.asarray([[1.0, 1.0, 1.0]])
    uncond = jnp.asarray([[1.0, 0.0, 1.5]])
    lsm = jax.nn.log_softmax
    want = lsm(uncond) + 1.5 * (lsm(cond) - lsm(uncond))
    np.testing.assert_allclose(guided_logits(cond, uncond, 1.5), want, rtol=1e-6)


@pytest.mark.parametrize(
    "case", ["negative", "negative-padded", "default-negative", "left-padded-prompt"]
)
def test_greedy_matches_transformers(models, case):
    model, lm = models
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 90, (2, 6))
    mask = np.ones_like(ids)
    neg = rng.integers(0, 90, (2, 4))
    neg_mask = np.ones_like(neg)
    if case == "negative-padded":
        neg[1, :2], neg_mask[1, :2] = PAD, 0
    if case == "left-padded-prompt":
        ids[0, :2], mask[0, :2] = PAD, 0
    options = {}
    if case != "default-negative":
        options = {"negative_prompt_ids": neg, "negative_prompt_attention_mask": neg_mask}
    plain = hf_generate(model, ids, mask).sequences.numpy()
    for scale in (1.5, 3.0, 0.5) if case == "negative" else (3.0,):
        ref = hf_generate(
            model,
            ids,
            mask,
            guidance_scale=scale,
            **{k: torch.as_tensor(v) for k, v in options.items()},
        )
        out = jd.generate(
            lm,
            ids,
            mask,
            max_new_tokens=NEW,
            pad_token_id=PAD,
            do_sample=False,
            guidance_scale=scale,
            output_scores=True,
            **options,
        )
        np.testing.assert_array_equal(np.asarray(out.sequences), ref.sequences.numpy())
        scores = np.stack([s.numpy() for s in ref.scores], axis=1)
        np.testing.assert_allclose(np.asarray(out.scores), scores, atol=1e-4)
        assert (ref.sequences.numpy() != plain).any() or scale == 0.5


def test_per_row_scale_and_one_compilation(models):
    """Per-row scales equal each row alone; another scale does not recompile."""
    _, lm = models
    rng = np.random.default_rng(8)
    ids = rng.integers(0, 90, (2, 6))
    neg = rng.integers(0, 90, (2, 3))
    run = lambda scale, rows=slice(None): (
        jd.generate(
            lm,
            ids[rows],
            max_new_tokens=NEW,
            do_sample=False,
            guidance_scale=scale,
            negative_prompt_ids=neg[rows],
        ).sequences
    )
    both = np.asarray(run([1.5, 4.0]))
    np.testing.assert_array_equal(both[0], np.asarray(run(1.5, slice(0, 1)))[0])
    np.testing.assert_array_equal(both[1], np.asarray(run(4.0, slice(1, 2)))[0])
    run([2.0, 2.5])
    with count_compiles() as compiles:
        run([3.0, 0.7])
    assert compiles.count == 0


def test_per_row_negative_prompts_of_different_lengths(models):
    """A list of per-row negative prompts of different lengths: each row's tokens
    equal transformers' generate on that row alone with its own negative prompt
    (greedy), and each row's sampled sequences equal that row alone (two
    sequences per prompt: the per-row lengths follow the expanded rows)."""
    model, lm = models
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 90, (3, 6))
    negs = [rng.integers(0, 90, n).tolist() for n in (2, 5, 3)]
    options = dict(max_new_tokens=NEW, pad_token_id=PAD, guidance_scale=3.0)
    out = jd.generate(lm, ids, do_sample=False, negative_prompt_ids=negs, **options)
    for i, neg in enumerate(negs):
        ref = hf_generate(
            model,
            ids[i : i + 1],
            np.ones((1, 6), int),
            guidance_scale=3.0,
            negative_prompt_ids=torch.as_tensor([neg]),
        )
        want = ref.sequences.numpy()[0]  # alone it may stop early: the rest is padding
        got = np.asarray(out.sequences)[i]
        np.testing.assert_array_equal(got[: len(want)], want)
        assert (got[len(want) :] == PAD).all()
    # Other per-row negative prompts in the same bucket (equal lengths too): no compilation.
    with count_compiles() as compiles:
        jd.generate(lm, ids, do_sample=False, negative_prompt_ids=[[7] * 6] * 3, **options)
        jd.generate(lm, ids, do_sample=False, negative_prompt_ids=[[8], [9] * 7, [3]], **options)
    assert compiles.count == 0
    sampled = dict(do_sample=True, num_return_sequences=2, **options)
    keys = jax.random.split(jax.random.key(4), 3)
    both = jd.generate(lm, ids, negative_prompt_ids=negs, key=keys, **sampled).sequences
    for i, neg in enumerate(negs):
        alone = jd.generate(
            lm, ids[i : i + 1], negative_prompt_ids=[neg], key=keys[i : i + 1], **sampled
        ).sequences
        np.testing.assert_array_equal(np.asarray(both)[2 * i : 2 * i + 2], alone)


def test_sampling_and_stream_run_guided(models):
    """Sampling draws from the guided distribution (same key, same tokens
    through generate and stream)."""
    _, lm = models
    ids = np.random.default_rng(9).integers(0, 90, (1, 5))
    options = dict(max_new_tokens=6, do_sample=True, guidance_scale=2.0, key=jax.random.key(3))
    out = jd.generate(lm, ids, loop="scan", **options)
    streamed = [int(step.tokens[0]) for step in jd.stream(lm, ids, **options)]
    assert np.asarray(out.sequences)[0, 5:].tolist()[: len(streamed)] == streamed


def test_guided_program_lowers_for_tpu_and_cuda(models):
    from jaxdecode.generation import prepare

    _, lm = models
    ids = np.zeros((2, 3), int)
    req = prepare(
        lm,
        ids,
        overrides={"max_new_tokens": 3, "guidance_scale": 2.0},
        negative_prompt_ids=np.ones((2, 2), int),
    )
    program, static, dynamic = req.program()
    jax.export.export(program, platforms=("tpu", "cuda"))(*static, *dynamic)


def test_errors(models):
    _, lm = models
    ids = np.zeros((2, 3), int)
    with pytest.raises(ValueError, match="negative_prompt_ids .*guidance_scale"):
        jd.generate(lm, ids, max_new_tokens=2, negative_prompt_ids=ids)
    with pytest.raises(ValueError, match="num_beams"):
        jd.generate(lm, ids, max_new_tokens=2, guidance_scale=2.0, num_beams=2)
    with pytest.raises(ValueError, match="negative_prompt_ids has 3 rows"):
        jd.generate(
            lm, ids, max_new_tokens=2, guidance_scale=2.0, negative_prompt_ids=np.zeros((3, 2), int)
        )
    with pytest.raises(ValueError, match="negative_prompt_ids must be in"):
        jd.generate(lm, ids, max_new_tokens=2, guidance_scale=2.0, negative_prompt_ids=[[500]])
    with pytest.raises(ValueError, match="guidance_scale"):
        jd.GenerationConfig(guidance_scale=float("nan")).validate()
    ragged = dict(max_new_tokens=2, guidance_scale=2.0, negative_prompt_ids=[[1], [2, 3]])
    with pytest.raises(ValueError, match="needs no mask"):
        jd.generate(lm, ids, negative_prompt_attention_mask=[[1], [1, 1]], **ragged)
    with pytest.raises(ValueError, match="2 rows of different lengths; it needs one per prompt"):
        jd.generate(lm, np.zeros((3, 3), int), **ragged)
    with pytest.raises(ValueError, match="row 0 is empty"):
        jd.generate(lm, ids, **{**ragged, "negative_prompt_ids": [[], [2, 3]]})
    with pytest.raises(ValueError, match="negative_prompt_ids must be in"):
        jd.generate(lm, ids, **{**ragged, "negative_prompt_ids": [[1], [2, 500]]})
