"""jaxdecode owns what it keeps: a caller may reuse its NumPy buffers at once.

On CPU, `jnp.asarray(numpy_array, dtype)` wraps a 64-byte-aligned array without
copying it, so a library that keeps (or computes later from) such an array sees
the caller's later writes. `aligned` makes every buffer here aligned, so without
the copy at the boundary each test fails every time, not only by chance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd


def aligned(values, dtype) -> np.ndarray:
    """A copy of `values` in a 64-byte-aligned buffer (the alignment JAX wraps)."""
    values = np.asarray(values, dtype)
    raw = np.empty(values.nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    out = raw[start : start + values.nbytes].view(dtype).reshape(values.shape)
    out[...] = values
    return out


def test_aligned_buffers_are_aliased_by_jax_here():
    """The premise: without a copy, JAX would see the caller's later writes."""
    buf = aligned([0.3, 0.3], np.float32)
    wrapped = jnp.asarray(buf, jnp.float32)
    buf[:] = 0.5
    assert float(wrapped[0]) == 0.5


@pytest.mark.parametrize(
    "make, field, dtype, first, later",
    [
        (jd.epsilon_cutoff, "epsilon", np.float32, 0.3, 0.5),
        (jd.temperature, "temperature", np.float32, 0.7, 2.0),
        (jd.top_k, "k", np.int32, 5, 9),
        (jd.repetition_penalty, "penalty", np.float32, 1.2, 3.0),
    ],
)
def test_processor_values_are_copied(make, field, dtype, first, later):
    buf = aligned([first] * 4, dtype)
    proc = make(buf)
    buf[:] = later
    np.testing.assert_array_equal(np.asarray(getattr(proc, field)), aligned([first] * 4, dtype))


def test_token_ids_are_copied():
    buf = aligned([3, 4], np.int32)
    proc = jd.suppress_tokens(buf)
    buf[:] = 7
    np.testing.assert_array_equal(np.asarray(proc.token_ids), [3, 4])


def test_process_logits_scores_are_copied():
    rng = np.random.default_rng(0)
    ids = aligned(rng.integers(0, 32, (2, 5)), np.int32)
    for _ in range(20):
        scores = aligned(rng.normal(size=(2, 32)), np.float32)
        want = np.asarray(jd.process_logits(scores.copy(), ids.copy(), jd.top_k(4)))
        out = jd.process_logits(scores, ids, jd.top_k(4))
        scores[:] = 0.0  # refilled before the result is read
        ids[:] = 0
        np.testing.assert_array_equal(np.asarray(out), want)
        ids = aligned(rng.integers(0, 32, (2, 5)), np.int32)


def test_decode_context_copies_ids_and_appended_tokens():
    ids = aligned([[1, 2, 3, 0, 0]], np.int32)
    ctx = jd.DecodeContext.from_ids(ids, vocab_size=8, cur_len=3)
    ids[:] = 6
    tokens = aligned([4], np.int32)
    ctx = ctx.append(tokens)
    tokens[:] = 6
    np.testing.assert_array_equal(np.asarray(ctx.sequences), [[1, 2, 3, 4, 0]])


# The generate tests share one model, one prompt and one length: one greedy and one
# sampling program for the whole file.
PROMPT, NEW = "And God said", 8


@pytest.fixture(scope="module")
def lm():
    return jd.from_pretrained("bundled")


def test_generate_copies_prompt_and_mask(lm):
    ids = aligned([lm.tokenizer.encode(PROMPT)], np.int32)
    mask = aligned(np.ones(ids.shape), np.int32)
    want = np.asarray(
        lm.generate(ids.copy(), mask.copy(), max_new_tokens=NEW, do_sample=False).sequences
    )
    out = lm.generate(ids, mask, max_new_tokens=NEW, do_sample=False)
    ids[:] = 0
    mask[:, :-1] = 0
    np.testing.assert_array_equal(np.asarray(out.sequences), want)


def test_seed_and_key_errors_name_the_argument(lm):
    ids = np.array([lm.tokenizer.encode(PROMPT)])
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\]"):
        lm.generate(ids, do_sample=True, seed=99999999999999999999)
    with pytest.raises(ValueError, match=r"key \(an int seed\) must be an integer"):
        lm.generate(ids, do_sample=True, key=-1)
    with pytest.raises(ValueError, match=r"key must be a jax.random.key"):
        lm.generate(ids, do_sample=True, key=np.zeros(3, np.uint32))
    # An int key is a seed: the same draws as jax.random.key(seed).
    a = lm.generate(ids, do_sample=True, key=0, max_new_tokens=NEW)
    b = lm.generate(ids, do_sample=True, key=jax.random.key(0), max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(a.sequences), np.asarray(b.sequences))


def test_a_drawn_seed_is_reported_and_reproduces(lm):
    ids = np.array([lm.tokenizer.encode(PROMPT)])
    out = lm.generate(ids, do_sample=True, max_new_tokens=NEW)
    assert isinstance(out.seed, int)
    again = lm.generate(ids, do_sample=True, max_new_tokens=NEW, seed=out.seed)
    np.testing.assert_array_equal(np.asarray(again.sequences), np.asarray(out.sequences))
    assert again.seed is None  # the caller chose it


def test_num_beams_beyond_memory_is_refused_before_allocating(lm):
    ids = np.array([lm.tokenizer.encode("And")])
    with pytest.raises(ValueError, match=r"batch=1 x num_beams=100000.*GiB free"):
        lm.generate(ids, num_beams=100000, do_sample=False, max_new_tokens=50)
