"""Watermarking against transformers 5: the green lists (torch's CPU randperm,
reproduced on the device), the processor on random histories, generate with a
`watermarking_config`, and the detector's scores (WatermarkDetector)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from support import assert_same_scores, count_compiles
from support.hf_models import load_in_jaxdecode, make_hf_model
from transformers.generation import logits_process as hf
from transformers.generation.watermarking import WatermarkDetector

import jaxdecode as jd
from jaxdecode.processors.watermark import (
    green_lists,
    lefthash_seeds,
    selfhash_seeds,
)

pytestmark = pytest.mark.parity

SCHEMES = [("lefthash", 1), ("lefthash", 3), ("selfhash", 1), ("selfhash", 2), ("selfhash", 4)]


def torch_randperm(n: int, seed: int) -> np.ndarray:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return torch.randperm(n, generator=gen).numpy()


def test_green_lists_are_torch_randperm_host_and_device():
    rng = np.random.default_rng(0)
    for n, g in [(7, 6), (96, 24), (1000, 250), (5000, 4999)]:
        seeds = rng.integers(0, 2**32, 5, dtype=np.uint64).astype(np.uint32)
        ref = np.stack([torch_randperm(n, int(s))[:g] for s in seeds])
        np.testing.assert_array_equal(green_lists(seeds, n, g, np), ref)
        device = jax.jit(lambda s, n=n, g=g: green_lists(s, n, g))(jnp.asarray(seeds))
        np.testing.assert_array_equal(np.asarray(device), ref)
    # Seeds above 2**32: torch keeps the low 32 bits.
    assert (torch_randperm(50, 2**40 + 7)[:49] == green_lists(np.uint32([7]), 50, 49, np)[0]).all()


def test_transformers_unit_values():
    """transformers' test_watermarking_processor: vocab 20, last token 10, uniform
    scores: token 1 is green (on the CPU) and gets the bias; bad values raise."""
    scores = np.full((3, 20), 1 / 20, np.float32)
    ids = np.random.default_rng(0).integers(0, 20, (3, 5))
    ids[:, -1] = 10
    out = np.asarray(jd.process_logits(scores, ids, jd.watermark()))
    np.testing.assert_allclose(out[:, 1], scores[:, 1] + 2.0)
    with pytest.raises(ValueError, match="seeding_scheme"):
        jd.watermark(seeding_scheme="hash")
    with pytest.raises(ValueError, match="greenlist_ratio"):
        jd.watermark(greenlist_ratio=1.2)
    with pytest.raises(ValueError, match="context_width"):
        jd.GenerationConfig(watermarking_config={"context_width": 0}).validate()
    with pytest.raises(ValueError, match="unknown key"):
        jd.GenerationConfig(watermarking_config={"gamma": 0.5})


@pytest.mark.parametrize("scheme,width", [s for s in SCHEMES if s != ("selfhash", 2)])
def test_processor_matches_transformers(scheme, width):
    """Random histories and logits, batch 4, vocabularies 50 and 1000; the bias is
    a leaf (one compilation for every bias and history)."""
    run = jax.jit(lambda p, s, ids: p(s, jd.DecodeContext.from_ids(ids, vocab_size=s.shape[-1])))
    for vocab in (50, 1000):
        rng = np.random.default_rng(vocab + width)
        cases = [
            (rng.standard_normal((4, vocab)).astype(np.float32), rng.integers(0, vocab, (4, 9)))
            for _ in range(2)
        ]
        for bias, ratio in [(2.0, 0.25), (0.7, 0.5)]:
            cfg = dict(bias=bias, greenlist_ratio=ratio, seeding_scheme=scheme, context_width=width)
            for scores, ids in cases:
                proc = hf.WatermarkLogitsProcessor(vocab_size=vocab, device="cpu", **cfg)
                ref = proc(torch.as_tensor(ids), torch.tensor(scores)).numpy()
                got = run(jd.watermark(**cfg), jnp.asarray(scores), jnp.asarray(ids))
                assert_same_scores(np.asarray(got), ref)
                assert (ref != scores).any()
        # Another bias (a traced leaf): no new program.
        cfg["bias"] = 1.25
        leaf = jd.watermark(**cfg)
        with count_compiles() as compiles:
            run(leaf, jnp.asarray(scores), jnp.asarray(ids)).block_until_ready()
        assert compiles.count == 0


def test_per_row_bias_and_short_rows():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((3, 60)).astype(np.float32)
    ids = rng.integers(0, 60, (3, 4))
    out = np.asarray(jd.process_logits(scores, ids, jd.watermark(bias=[0.0, 1.0, 3.0])))
    np.testing.assert_array_equal(out[0], scores[0])
    for r, b in ((1, 1.0), (2, 3.0)):
        ref = hf.WatermarkLogitsProcessor(vocab_size=60, device="cpu", bias=b)(
            torch.as_tensor(ids[r : r + 1]), torch.tensor(scores[r : r + 1])
        )
        np.testing.assert_allclose(out[r], ref.numpy()[0], atol=1e-6)
    # Fewer tokens than context_width: transformers leaves the scores alone.
    short = jd.process_logits(scores, ids[:, :2], jd.watermark(context_width=3))
    np.testing.assert_array_equal(np.asarray(short), scores)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model = make_hf_model(seed=3)
    return model, load_in_jaxdecode(model, tmp_path_factory.mktemp("gpt2_wm"))


@pytest.mark.parametrize("scheme,width", [("lefthash", 1), ("selfhash", 2)])
def test_generate_matches_transformers(models, scheme, width):
    """Greedy generate with a watermarking_config, token for token."""
    model, lm = models
    ids = np.random.default_rng(5).integers(0, 90, (2, 6))
    config = {"bias": 3.0, "seeding_scheme": scheme, "context_width": width}
    with torch.no_grad():
        ref = model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=95,
            watermarking_config=transformers.WatermarkingConfig(**config),
        ).numpy()
        plain = model.generate(
            torch.as_tensor(ids), max_new_tokens=12, do_sample=False, pad_token_id=95
        ).numpy()
    out = jd.generate(lm, ids, max_new_tokens=12, pad_token_id=95, watermarking_config=config)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    assert (ref != plain).any()  # the watermark changed the text


def _hf_detect(config, vocab, bos, seqs, ignore):
    model_config = transformers.GPT2Config(vocab_size=vocab, bos_token_id=bos)
    detector = WatermarkDetector(
        model_config=model_config,
        device="cpu",
        watermarking_config=transformers.WatermarkingConfig(**config),
        ignore_repeated_ngrams=ignore,
    )
    return detector(torch.as_tensor(seqs), z_threshold=2.0, return_dict=True)


@pytest.mark.parametrize("scheme,width", SCHEMES)
def test_detector_matches_transformers(scheme, width):
    """Random texts and watermarked ones (each token green-biased, drawn from
    random logits through our processor), with and without BOS and repeats."""
    vocab, bos = 80, 79
    rng = np.random.default_rng(width)
    config = {"seeding_scheme": scheme, "context_width": width, "bias": 4.0}
    texts = rng.integers(0, 30, (3, 24))  # few ids: n-grams repeat
    marked = list(rng.integers(0, 78, 3))
    key, size = 15485863, vocab // 4
    while len(marked) < 23:  # a fully green text, drawn on the host
        c = int(rng.integers(0, vocab))
        if scheme == "lefthash":
            seed = lefthash_seeds(np.asarray([marked[-1]]), key, vocab, np)
        else:
            window = np.asarray([[*marked[len(marked) - width + 1 :], c]])[:, -width:]
            seed = selfhash_seeds(window, key, vocab, np)
        if c in green_lists(seed, vocab, size, np)[0]:
            marked.append(c)
    marked = [marked]
    seqs = np.concatenate([texts[:, :23], np.asarray(marked)], axis=0)
    for with_bos in (False, True):
        batch = np.concatenate([np.full((4, 1), bos), seqs], 1) if with_bos else seqs
        for ignore in (False, True):
            ref = _hf_detect(config, vocab, bos, batch, ignore)
            got = jd.watermark_detect(
                batch,
                config,
                vocab_size=vocab,
                bos_token_id=bos,
                z_threshold=2.0,
                ignore_repeated_ngrams=ignore,
            )
            for name in ("num_tokens_scored", "num_green_tokens", "prediction"):
                np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), name)
            for name in ("green_fraction", "z_score", "p_value", "confidence"):
                np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-12)
    assert got.prediction.tolist() == [False, False, False, True]


def test_detector_errors():
    with pytest.raises(ValueError, match="at least 3 tokens"):
        jd.watermark_detect([[1, 2]], {"context_width": 2}, vocab_size=10)
    with pytest.raises(ValueError, match="bos_token_id"):
        jd.watermark_detect([[9, 1, 2], [1, 2, 3]], {}, vocab_size=10, bos_token_id=9)
    with pytest.raises(ValueError, match="token ids"):
        jd.watermark_detect([[1, 2, 30]], {}, vocab_size=10)


def test_lowers_for_tpu_and_cuda():
    procs = [jd.watermark(seeding_scheme=s, context_width=2) for s in ("lefthash", "selfhash")]
    procs.append(jd.watermark({"ngram_len": 3, "keys": [654, 400, -5]}))
    for proc in procs:

        def f(p, s, ids):
            return p(s, jd.DecodeContext.from_ids(ids, vocab_size=s.shape[-1]))

        args = (proc, jnp.zeros((2, 64), jnp.float32), jnp.zeros((2, 5), jnp.int32))
        jax.export.export(jax.jit(f), platforms=("tpu", "cuda"))(*args)
