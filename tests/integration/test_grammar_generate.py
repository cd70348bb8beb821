"""Constrained decoding end to end on the bundled byte-level model (moved from
tests/unit/test_grammar.py, whose unit checks of the automaton stay there): beam
search with the grammar's state gathered by parent beam, a batch of mixed
constraints equal to each row alone, and speculative decoding keeping the
constraints. Each case compiles whole generate programs (beam, speculative with a
draft model), seconds each: the integration tier."""

from __future__ import annotations

import json
import re

import jax
import jsonschema
import numpy as np
import pytest
from support.constraints import NESTED, PERSON, REGEXES, decoded_rows, prompt_rows

import jaxdecode as jd


@pytest.fixture(scope="module")
def bundled():
    return jd.from_pretrained("bundled")


@jd.pytree_dataclass
class FromHistory(jd.LogitsProcessor):
    """Stateless reference: the automaton state rebuilt from the buffer every step."""

    grammar: jd.Grammar

    def apply(self, logits, ctx, state):
        return self.grammar.apply(logits, ctx, self.grammar.init(ctx))


@pytest.mark.parametrize("options", [dict(), dict(do_sample=True)], ids=["beam", "beam-sample"])
def test_beam_search_state_follows_parent_beams(bundled, options):
    """Beam search with the stateful grammar equals the stateless reference (state
    gathered by parent beam), and every returned sequence is valid."""
    g = jd.json_schema(NESTED, bundled.tokenizer, eos_token_id=256)
    prompt = prompt_rows(bundled, "And God said", 2)
    run = lambda proc: jd.generate(
        bundled, prompt, logits_processor=proc, num_beams=4, num_return_sequences=4,
        max_new_tokens=80, key=jax.random.key(3), **options,
    )  # fmt: skip
    out = run(g)
    np.testing.assert_array_equal(
        np.asarray(out.sequences), np.asarray(run(FromHistory(g)).sequences)
    )
    texts = decoded_rows(bundled, out, prompt.shape[1])
    assert all(ended for _, ended in texts)
    for text, _ in texts:
        jsonschema.validate(json.loads(text), NESTED)


def test_mixed_constraints_each_row_as_alone(bundled):
    """One batch, three rows: a JSON schema, a regex and a free row (the union
    table); pad_token_id is not EOS (finished rows feed pad into the automaton).
    Each row equals its prompt generated alone (sampling, per-row keys), the
    free row its prompt generated without any constraint."""
    prompts = ["And God said", "Unto the", "In the beginning"]
    encoded = [bundled.tokenizer.encode(p) for p in prompts]
    width = max(map(len, encoded))
    ids = np.array([[0] * (width - len(e)) + e for e in encoded], np.int32)
    mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded], np.int32)
    per_row = dict(json_schema=[PERSON, None, None], regex=[None, REGEXES[0], None])
    keys = jax.random.split(jax.random.key(5), 3)
    cfg = dict(max_new_tokens=60, pad_token_id=0, do_sample=True, top_k=20)
    out = jd.generate(bundled, ids, mask, key=keys, **per_row, **cfg)
    assert np.all(np.isfinite(np.asarray(out.token_logprobs)))
    for r, p in enumerate(prompts):
        alone = {k: v[r] for k, v in per_row.items() if v[r] is not None}
        one = jd.generate(bundled, prompt_rows(bundled, p), key=keys[r : r + 1], **alone, **cfg)
        n = int(one.lengths[0])
        assert int(out.lengths[r]) == n
        np.testing.assert_array_equal(
            np.asarray(out.sequences)[r, width : width + n],
            np.asarray(one.sequences)[0, len(encoded[r]) : len(encoded[r]) + n],
        )
    texts = decoded_rows(bundled, out, width)
    assert texts[0][1] and texts[1][1]
    jsonschema.validate(json.loads(texts[0][0]), PERSON)
    assert re.fullmatch(REGEXES[0], texts[1][0])


@pytest.mark.parametrize("speculation", ["prompt_lookup", "draft_model"])
def test_speculative_decoding_keeps_the_constraints(bundled, speculation):
    """Constraints inside speculative decoding (issue 15/17): the automaton state is
    advanced token by token across the drafted positions. Greedy: every row (a JSON
    schema, a regex, choices and a free row in one ragged batch) equals plain greedy
    decoding with the same constraints; sampled outputs still match their constraint."""
    prompts = ["And God said", "Unto the", "In the beginning", "Amen"]
    encoded = [bundled.tokenizer.encode(p) for p in prompts]
    width = max(map(len, encoded))
    ids = np.array([[0] * (width - len(e)) + e for e in encoded], np.int32)
    mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded], np.int32)
    per_row = dict(
        json_schema=[PERSON, None, None, None],
        regex=[None, REGEXES[2], None, None],
        choices=[None, None, ["Zion", "Moab", "Zebulun"], None],
    )
    if speculation == "prompt_lookup":
        spec = dict(prompt_lookup_num_tokens=4, max_matching_ngram_size=2)
    else:  # the model itself as its draft: every draft token is accepted
        spec = dict(assistant_model=bundled, num_assistant_tokens=3)
    cfg = dict(max_new_tokens=60, pad_token_id=0, **per_row)
    plain = jd.generate(bundled, ids, mask, do_sample=False, **cfg)
    fast = jd.generate(bundled, ids, mask, do_sample=False, **cfg, **spec)
    np.testing.assert_array_equal(np.asarray(fast.sequences), np.asarray(plain.sequences))
    np.testing.assert_array_equal(np.asarray(fast.lengths), np.asarray(plain.lengths))
    np.testing.assert_allclose(
        np.asarray(fast.token_logprobs), np.asarray(plain.token_logprobs), atol=1e-5
    )
    assert int(np.asarray(fast.accepted).sum()) > 0
    keys = jax.random.split(jax.random.key(3), 4)
    sampled = jd.generate(bundled, ids, mask, key=keys, do_sample=True, top_k=20, **cfg, **spec)
    texts = decoded_rows(bundled, sampled, width)
    assert all(ended for ended in (texts[0][1], texts[1][1], texts[2][1]))
    jsonschema.validate(json.loads(texts[0][0]), PERSON)
    assert re.fullmatch(REGEXES[2], texts[1][0])
    assert texts[2][0] in ("Zion", "Moab", "Zebulun")
