"""SynthID-Text against transformers 5: g-values (its int64 hashing and sampling
table), the stateful processor step by step, greedy generate, and the detection
masks and scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from support.hf_models import load_in_jaxdecode, make_hf_model
from transformers.generation import logits_process as hf

import jaxdecode as jd
from jaxdecode.processors.watermark import synthid_g_values

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model = make_hf_model(seed=3)
    return model, load_in_jaxdecode(model, tmp_path_factory.mktemp("gpt2_synthid"))


# --------------------------------------------------------------------------- #
# SynthID-Text.
# --------------------------------------------------------------------------- #

KEYS = [654, 400, 836, 123, 340, -5, 2**62 + 11]


def hf_synthid(**config):
    return hf.SynthIDTextWatermarkLogitsProcessor(device="cpu", **config)


def test_synthid_g_values_match_transformers():
    """transformers' integer hashing (int64, wrapping) and sampling table, for
    power-of-two and other table sizes, on the host and on the device."""
    rng = np.random.default_rng(0)
    ngrams = rng.integers(0, 50000, (64, 5))
    for size, seed in [(2**16, 0), (1000, 3), (2**24, 7)]:
        config = dict(ngram_len=5, keys=KEYS, sampling_table_size=size, sampling_table_seed=seed)
        ref = hf_synthid(context_history_size=8, **config).compute_g_values(
            torch.as_tensor(ngrams)
        )[:, 0]
        np.testing.assert_array_equal(synthid_g_values(ngrams, config, np), ref.numpy())
        device = jax.jit(lambda x, c=config: synthid_g_values(x, c, jnp))(jnp.asarray(ngrams))
        np.testing.assert_array_equal(np.asarray(device), ref.numpy())


def test_synthid_g_values_uniform():
    """transformers' test_synthidtext_watermarking_processor_bias_uniformity (a
    smaller batch): the g-values' mean is 0.5."""
    rng = np.random.default_rng(0)
    for ngram_len, layers, vocab in [(5, 3, 10000), (10, 5, 1000)]:
        config = dict(ngram_len=ngram_len, keys=rng.integers(0, 2**16, layers).tolist())
        g = synthid_g_values(rng.integers(0, vocab, (20000, ngram_len)), config, np)
        assert abs(g.mean() - 0.5) < 0.01


@pytest.mark.parametrize(
    "options",
    [{}, {"skip_first_ngram_calls": True}, {"debug_mode": True}],
    ids=["plain", "skip-first", "debug"],
)
def test_synthid_processor_matches_transformers_step_by_step(options):
    """12 steps of one stateful processor: contexts repeat (tokens from 3 ids), the
    history holds 4 contexts, and the state is carried by init / update."""
    config = dict(
        ngram_len=3,
        keys=KEYS[:4],
        sampling_table_size=2**16,
        sampling_table_seed=0,
        context_history_size=4,
        **options,
    )
    rng = np.random.default_rng(1)
    batch, vocab = 3, 40
    ids = rng.integers(0, vocab, (batch, 4))
    ref_proc = hf_synthid(**config)
    ours = jd.watermark(config)
    ctx = jd.DecodeContext.from_ids(ids, vocab_size=vocab)
    state = ours.init(ctx)
    step = jax.jit(lambda p, s, st: p(s, ctx, st))
    update = jax.jit(lambda p, st, t: p.update(st, t))
    changed = unchanged = 0
    for _ in range(12):
        scores = (rng.standard_normal((batch, vocab)) * 2).astype(np.float32)
        ref = ref_proc(torch.as_tensor(ids), torch.tensor(scores)).numpy()
        got = np.asarray(step(ours, jnp.asarray(scores), state))
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
        base = np.ones_like(scores) if options.get("debug_mode") else scores
        rows_same = np.all(ref == base, axis=1)
        unchanged += rows_same.sum()
        changed += (~rows_same).sum()
        tokens = rng.integers(0, 3, batch)
        ids = np.concatenate([ids, tokens[:, None]], axis=1)
        state = update(ours, state, jnp.asarray(tokens, jnp.int32))
    assert changed and unchanged  # both watermarked and repeated-context steps


def test_synthid_generate_matches_transformers(models):
    model, lm = models
    ids = np.random.default_rng(7).integers(0, 90, (2, 5))
    config = {"ngram_len": 3, "keys": KEYS[:5], "context_history_size": 64}
    with torch.no_grad():
        ref = model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=95,
            watermarking_config=transformers.SynthIDTextWatermarkingConfig(**config),
        ).numpy()
    out = jd.generate(lm, ids, max_new_tokens=12, pad_token_id=95, watermarking_config=config)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)


def test_synthid_detect_matches_transformers_masks_and_scores():
    """g-values, the repetition and EOS masks as transformers computes them, and
    the Mean / Weighted Mean scores of the SynthID paper over them."""
    config = dict(ngram_len=3, keys=KEYS[:5], context_history_size=6)
    rng = np.random.default_rng(2)
    seqs = rng.integers(0, 4, (3, 30))  # few ids: contexts repeat
    seqs[1, 20] = 9  # an EOS mid-row
    proc = hf_synthid(sampling_table_size=2**16, sampling_table_seed=0, **config)
    t = torch.as_tensor(seqs)
    g = proc.compute_g_values(t).numpy()
    mask = (
        proc.compute_context_repetition_mask(t) * proc.compute_eos_token_mask(t, 9)[:, 2:]
    ).numpy()
    got = jd.watermark_detect(seqs, config, vocab_size=10, eos_token_id=9)
    for r in range(3):
        np.testing.assert_array_equal(got.g_values[r], g[r])
        np.testing.assert_array_equal(got.mask[r], mask[r].astype(bool))
    depth = len(KEYS[:5])
    weights = np.linspace(10, 1, depth)
    weights *= depth / weights.sum()
    denom = depth * mask.sum(1)
    np.testing.assert_allclose(got.mean, (g * mask[..., None]).sum((1, 2)) / denom, rtol=1e-12)
    np.testing.assert_allclose(
        got.weighted_mean, (g * weights * mask[..., None]).sum((1, 2)) / denom, rtol=1e-12
    )
    assert mask.sum(1).min() > 0 and mask.sum(1).max() < 28  # some masked, some scored


def test_synthid_config_round_trip_and_errors():
    cfg = jd.GenerationConfig(watermarking_config={"ngram_len": 4, "keys": [1, 2]})
    assert isinstance(cfg.watermarking_config, jd.SynthIDTextWatermarkingConfig)
    hf_cfg = transformers.GenerationConfig(**cfg.to_hf())
    assert jd.GenerationConfig.from_hf(hf_cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="sampling_table_size"):
        jd.GenerationConfig(
            watermarking_config={"ngram_len": 4, "keys": [1], "sampling_table_size": 2**25}
        ).validate()
    with pytest.raises(ValueError, match="keys"):
        jd.synthid_text({"ngram_len": 4, "keys": []})
