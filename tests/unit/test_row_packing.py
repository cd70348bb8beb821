"""One set of rules for per-row values and batch sharing (`jaxdecode.rows`), used
by the engine's slots and the CLI's static batches alike."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdecode as jd
from jaxdecode import rows


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6))
def test_packed_top_p_cutoffs_equal_each_scalar_ones(ps):
    """A row's top-p cutoff `1 - p` is the one `generate` computes for that p alone:
    packing through float32 first would round p, then the cutoff, differently."""
    configs = [jd.GenerationConfig(do_sample=True, top_p=p) for p in ps]
    packed = rows.row_values(configs, ("top_p",))["top_p"]
    batch = np.asarray(jd.top_p(packed).cutoff)
    alone = np.asarray([jd.top_p(p).cutoff for p in ps])
    np.testing.assert_array_equal(batch, alone)


def test_float32_packing_would_change_a_cutoff():
    """The premise of the test above: some p has a different cutoff once rounded
    to float32 (so a float32 row table is not good enough)."""
    ps = np.random.default_rng(0).uniform(0.01, 1.0, 2000)
    from_f32 = np.asarray(jd.top_p(ps.astype(np.float32)).cutoff)
    from_f64 = np.asarray(jd.top_p(ps).cutoff)
    assert (from_f32 != from_f64).any()


def test_engine_and_static_batches_group_alike():
    """The engine lets lengths differ per slot; a static batch does not. Every
    other rule is the same."""
    base = jd.GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=8)
    other_values = base.replace(temperature=1.3, top_p=0.5, seed=3, regex="[ab]+")
    longer = base.replace(max_new_tokens=16)
    no_top_p = base.replace(top_p=1.0)  # the processor is absent: another program
    for per_row in (True, False):
        key = rows.group_key(base, lengths_per_row=per_row)
        assert rows.group_key(other_values, lengths_per_row=per_row) == key
        assert (rows.group_key(longer, lengths_per_row=per_row) == key) is per_row
        assert rows.group_key(no_top_p, lengths_per_row=per_row) != key
    # top_k=50; prompt_ignore_length and assistant_confidence_threshold (0.4) are
    # per-row values whose arrays change no processor (the repetition penalty is
    # absent; no speculation): they pack too.
    assert rows.arrayed_fields(base, 4) == (
        "temperature",
        "top_k",
        "top_p",
        "prompt_ignore_length",
        "assistant_confidence_threshold",
    )


def test_greedy_batches_array_no_value_validate_refuses():
    """Greedy search has no warpers, so their neutral values would not change the
    chain; but a per-row typical_p of 1.0 is refused by `validate()`: such a field
    stays a scalar (a static batch of greedy eval lines must still run)."""
    greedy = jd.GenerationConfig(do_sample=False, max_new_tokens=4)
    arrayed = rows.arrayed_fields(greedy, 4)
    assert "typical_p" not in arrayed
    packed = greedy.replace(**rows.row_values([greedy] * 4, arrayed))
    packed.validate()
