"""The error hierarchy (issue 24): every class a `ValueError` (existing callers
keep working), each raised where its kind of problem is found; wrong argument
types are `TypeError`s."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode import generation
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params

ERRORS = (jd.ConfigError, jd.UnsupportedModelError, jd.CheckpointError, jd.MemoryBudgetError)


def _tiny() -> jd.CausalLM:
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=32)
    return jd.CausalLM(params=init_params(config, jax.random.key(0)), decoder=gpt2_decoder(config))


def test_errors_are_value_errors_exported_at_the_top():
    for error in ERRORS:
        assert issubclass(error, ValueError) and error.__name__ in jd.__all__


def test_each_kind_is_raised_where_it_is_found(tmp_path, monkeypatch):
    with pytest.raises(jd.ConfigError, match="top_p"):
        jd.GenerationConfig(top_p=1.5).validate()
    with pytest.raises(jd.ConfigError, match="bad_words_ids"):
        jd.GenerationConfig(bad_words_ids=[[]]).validate()

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(jd.UnsupportedModelError, match="'bert' is not supported"):
        jd.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(jd.CheckpointError, match="not valid JSON"):
        jd.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(jd.CheckpointError, match="config.json"):
        jd.from_pretrained(tmp_path)

    lm = _tiny()
    monkeypatch.setattr(generation, "available_bytes", lambda: 1000)
    with pytest.raises(jd.MemoryBudgetError, match="GiB free"):
        jd.generate(lm, np.array([[1, 2, 3]]), max_new_tokens=4)


def test_wrong_argument_types_are_type_errors():
    lm = _tiny()
    ids = np.array([[1, 2, 3]])
    with pytest.raises(TypeError, match="config must be a GenerationConfig"):
        jd.generate(lm, ids, config={"top_p": 0.9})
    with pytest.raises(TypeError, match="model must be a CausalLM or a Decoder"):
        jd.generate("gpt2", ids)
    with pytest.raises(TypeError, match="logits_processor must be a jaxdecode LogitsProcessor"):
        jd.generate(lm, ids, logits_processor=lambda scores: scores)
    with pytest.raises(TypeError, match="logits_processor must be a jaxdecode LogitsProcessor"):
        jd.score(lm, np.array([[1, 2, 3, 4]]), prompt_length=3, logits_processor=print)
