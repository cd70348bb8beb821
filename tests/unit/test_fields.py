"""The option table (`jaxdecode.fields`): every `GenerationConfig` field has a
complete entry, and validation, the static part, per-row packing, the CLI flags
and the docs' table are all read from it."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode import config as C
from jaxdecode import fields, rows
from jaxdecode.cli import flags
from jaxdecode.validation import Joint, OneOf

GC = jd.GenerationConfig


def test_every_field_has_a_complete_entry():
    for f in dataclasses.fields(GC):
        entry = fields.spec(f)
        assert isinstance(entry, fields.Spec), f.name
        assert entry.doc and entry.doc.endswith((".", ")")), f.name
        assert callable(entry.check), f.name
        assert entry.varies in fields.VARIES, f.name
        assert isinstance(entry.hf, bool) and isinstance(entry.cli, bool), f.name
        if isinstance(entry.check, OneOf) and not entry.check.values:
            assert C.FIELD_CHOICES[f.name], f"{f.name}: OneOf() needs a Literal type"
        if entry.static is not None:
            assert entry.static.type is not None, f.name
        if entry.per_row:  # a traced value: packs as a number per row
            assert C.ROW_DTYPES[f.name] in (np.int32, np.float64), f.name
            assert entry.static is None, f"{f.name}: a per-row value keys no program"


def test_an_entry_without_a_doc_or_with_an_unknown_varies_is_refused():
    with pytest.raises(ValueError, match="doc"):
        fields.option(0, doc="", check=OneOf((0,)))
    with pytest.raises(ValueError, match="varies"):
        fields.option(0, doc="x.", check=OneOf((0,)), varies="sometimes")


def test_static_config_is_the_tables_static_entries():
    names = tuple(n for n, s in fields.specs(GC).items() if s.static is not None)
    assert tuple(f.name for f in dataclasses.fields(jd.StaticConfig)) == names
    assert {
        "do_sample", "num_beams", "num_return_sequences", "early_stopping", "output_scores",
        "output_logits", "output_raw_logprobs", "logprobs", "logprobs_mode",
        "prompt_logprobs", "output_routed_experts", "pad_token_id", "eos_token_id",
    } == set(names)  # fmt: skip
    static = GC(eos_token_id=[4, 5], logprobs=2, num_beams=1, early_stopping=True).static()
    assert static.pad_token_id == 4 and static.eos_token_id == (4, 5)
    assert static.early_stopping is False  # read by beam search only
    assert static.logprobs == 2 and static.prompt_logprobs == -1
    assert hash(static) == hash(GC(eos_token_id=(4, 5), logprobs=2).static())
    for f in dataclasses.fields(jd.StaticConfig):
        assert f.name in jd.StaticConfig.__doc__


def test_validation_reads_each_fields_check():
    """Every field's own check runs: a bad value of each checked field is refused
    with its name."""
    bad = {
        "max_length": 0, "max_new_tokens": 0, "min_length": -1, "min_new_tokens": -1,
        "do_sample": 1, "num_beams": 0, "early_stopping": "sometimes",
        "length_penalty": [1.0, 2.0], "num_return_sequences": 0, "temperature": -1.0,
        "top_h": 0.0, "top_k": -1, "top_p": 0.0, "min_p": 2.0, "typical_p": 0.0,
        "epsilon_cutoff": 1.0, "eta_cutoff": 1.0, "repetition_penalty": 0.0,
        "prompt_ignore_length": -1, "no_repeat_ngram_size": -1, "bad_words_ids": [[]],
        "sequence_bias": {}, "forced_bos_token_id": -1, "forced_eos_token_id": [],
        "remove_invalid_values": "yes", "exponential_decay_length_penalty": (1,),
        "suppress_tokens": [[1]], "begin_suppress_tokens": [-1], "renormalize_logits": 0,
        "guidance_scale": float("nan"), "watermarking_config": {"bias": "x"},
        "output_scores": None, "output_logits": "no", "return_dict_in_generate": 2,
        "pad_token_id": [1], "bos_token_id": -2, "eos_token_id": [], "stop_strings": "",
        "prompt_lookup_num_tokens": 0, "max_matching_ngram_size": 0,
        "num_assistant_tokens": 0, "num_assistant_tokens_schedule": "sometimes",
        "assistant_confidence_threshold": 1.5, "frequency_penalty": 3.0,
        "presence_penalty": -3.0, "seed": -1, "repetition_penalty_form": "x",
        "top_k_method": "x", "top_p_method": "x", "regex": "", "json_schema": "[",
        "choices": [], "output_raw_logprobs": "x", "logprobs": -1, "logprobs_mode": "x",
        "prompt_logprobs": -1, "output_routed_experts": "x", "cache_implementation": "offloaded",
        "cache_config": 5,
    }  # fmt: skip
    assert set(bad) == {f.name for f in dataclasses.fields(GC)}, "a field without a bad value"
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            GC(eos_token_id=2 if name != "eos_token_id" else value, **(
                {} if name == "eos_token_id" else {name: value}
            )).validate()  # fmt: skip


def test_a_checks_range_is_the_tables():
    """Changing a field's check in the table changes what validate() accepts (the
    check is read, not copied)."""
    assert isinstance(C.FIELD_CHECKS["top_p"], type(fields.specs(GC)["top_p"].check))
    assert C.FIELD_CHECKS["logprobs_mode"] == OneOf(("processed", "raw"))
    for name in C.CONSTRAINT_FIELDS:
        assert isinstance(fields.specs(GC)[name].check, Joint)


def test_row_packing_and_grouping_follow_the_table():
    assert set(rows.per_prompt_fields(lengths_per_row=False)) == {
        n for n, s in fields.specs(GC).items() if s.varies in ("row", "prompt")
    }
    assert set(rows.per_prompt_fields(lengths_per_row=True)) - set(
        rows.per_prompt_fields(lengths_per_row=False)
    ) == {"max_length", "max_new_tokens"}
    packed = rows.row_values(
        [GC(top_k=3, temperature=0.5), GC(top_k=4, temperature=0.25)], ("top_k", "temperature")
    )
    assert packed["top_k"].dtype == np.int32 and packed["temperature"].dtype == np.float64


def test_cli_flags_follow_the_table():
    parser = argparse.ArgumentParser()
    flags.add_config_flags(parser)
    assert set(vars(parser.parse_args([]))) == {n for n, s in fields.specs(GC).items() if s.cli}
    assert "return_dict_in_generate" not in vars(parser.parse_args([]))
    for name in C.PER_ROW_FIELDS:  # a per-row value is one number on the command line
        value = getattr(parser.parse_args([f"--{name}", "3"]), name)
        assert value == 3 and isinstance(value, (int, float)), name
