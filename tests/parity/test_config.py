"""`jaxdecode.GenerationConfig`: defaults, validation, transformers I/O, split, order."""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from support import count_compiles

import jaxdecode as jd
from jaxdecode import processors as P
from jaxdecode.config import FIELD_CHOICES, FIELD_TYPES, HF_FIELDS, PER_ROW_FIELDS
from jaxdecode.fields import spec

GC = jd.GenerationConfig


# --------------------------------------------------------------------------- #
# Defaults
# --------------------------------------------------------------------------- #


def test_defaults_equal_transformers_effective_defaults():
    hf = transformers.GenerationConfig._get_default_generation_params()
    ours = GC()
    common = sorted({f.name for f in dataclasses.fields(GC)} & set(hf))
    assert len(common) >= 20, common
    mismatched = {n: (getattr(ours, n), hf[n]) for n in common if getattr(ours, n) != hf[n]}
    # max_length=None means transformers' default of 20 *new* tokens (generate()
    # adds the prompt length to an unset max_length of 20).
    assert mismatched.pop("max_length", None) in (None, (None, 20))
    assert GC().resolve_max_length(7) == 7 + 20
    assert not mismatched


def test_defaults_of_fields_without_a_transformers_global_default_are_unset():
    hf_defaults = transformers.GenerationConfig._get_default_generation_params()
    hf = transformers.GenerationConfig()
    rest = [n for n in HF_FIELDS if n not in hf_defaults]
    assert rest
    for name in rest:
        assert getattr(hf, name) is None, name
        assert getattr(GC(), name) in (None, False), name


def test_default_config_validates_and_writes_nothing():
    assert GC().validate() == GC()
    assert GC().to_hf() == {}
    assert len(jd.logits_processor(GC()).processors) == 0


# --------------------------------------------------------------------------- #
# One list of fields: types and metadata drive the HF names and the CLI flags
# --------------------------------------------------------------------------- #


def test_fields_are_typed_precisely_and_carry_their_metadata():
    from typing import Any

    hf_fields = set(vars(transformers.GenerationConfig()))
    for f in dataclasses.fields(GC):
        assert FIELD_TYPES[f.name] is not Any and "Any" not in str(FIELD_TYPES[f.name]), f.name
        assert set(f.metadata) == {"spec"}, f.name
        # `hf` says exactly whether transformers has the field.
        assert spec(f).hf == (f.name in hf_fields), f.name
    assert tuple(f.name for f in dataclasses.fields(GC) if spec(f).hf) == HF_FIELDS
    assert set(PER_ROW_FIELDS) == {
        "temperature", "top_h", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
        "eta_cutoff", "repetition_penalty", "prompt_ignore_length", "frequency_penalty",
        "presence_penalty", "guidance_scale", "assistant_confidence_threshold",
    }  # fmt: skip
    assert FIELD_CHOICES == {
        "num_assistant_tokens_schedule": ("constant", "heuristic", "heuristic_transient"),
        "repetition_penalty_form": ("hf", "ctrl"),
        "top_k_method": ("exact", "fast"),
        "top_p_method": ("exact", "fast"),
        "logprobs_mode": ("processed", "raw"),
    }
    for name, allowed in FIELD_CHOICES.items():  # validate() reads the same list
        GC(**{name: allowed[-1]}).validate()
        with pytest.raises(ValueError, match=name):
            GC(**{name: "other"}).validate()


def test_per_row_fields_take_one_value_per_row():
    ints = {"top_k": [3, 5], "prompt_ignore_length": [0, 4]}
    values = ints | {n: [0.5, 0.6] for n in PER_ROW_FIELDS if n not in ints}
    GC(do_sample=True, **values).validate()


# Every CLI flag, derived from the field's type, parses into a valid config.
CLI_VALUES = {
    "max_length": (["9"], 9),
    "max_new_tokens": (["4"], 4),
    "min_length": (["2"], 2),
    "min_new_tokens": (["1"], 1),
    "do_sample": ([], True),
    "num_beams": (["2"], 2),
    "early_stopping": (["never"], "never"),
    "length_penalty": (["0.5"], 0.5),
    "num_return_sequences": (["1"], 1),
    "temperature": (["0.7"], 0.7),
    "top_h": (["0.4"], 0.4),
    "top_k": (["5"], 5),
    "top_p": (["0.9"], 0.9),
    "min_p": (["0.1"], 0.1),
    "typical_p": (["0.8"], 0.8),
    "epsilon_cutoff": (["0.001"], 0.001),
    "eta_cutoff": (["0.002"], 0.002),
    "repetition_penalty": (["1.2"], 1.2),
    "prompt_ignore_length": (["3"], 3),
    "guidance_scale": (["1.5"], 1.5),
    "no_repeat_ngram_size": (["3"], 3),
    "bad_words_ids": (["[[5], [6, 7]]"], ((5,), (6, 7))),
    "sequence_bias": (["[[[5], 1.5]]"], (((5,), 1.5),)),
    "forced_bos_token_id": (["3"], 3),
    "forced_eos_token_id": (["4", "6"], (4, 6)),
    "remove_invalid_values": ([], True),
    "exponential_decay_length_penalty": (["3", "1.5"], (3, 1.5)),
    "suppress_tokens": (["8"], 8),
    "begin_suppress_tokens": (["8", "9"], (8, 9)),
    "renormalize_logits": ([], True),
    "output_scores": ([], True),
    "output_logits": ([], True),
    "pad_token_id": (["0"], 0),
    "bos_token_id": (["1"], 1),
    "eos_token_id": (["2"], 2),
    "frequency_penalty": (["0.3"], 0.3),
    "presence_penalty": (["-0.3"], -0.3),
    "seed": (["7"], 7),
    "repetition_penalty_form": (["ctrl"], "ctrl"),
    "top_k_method": (["fast"], "fast"),
    "top_p_method": (["fast"], "fast"),
    "stop_strings": (["unto", ", and"], ("unto", ", and")),
    "regex": (["[a-z]+"], "[a-z]+"),
    "json_schema": (['{"type": "object"}'], '{"type": "object"}'),  # JSON text
    "choices": (["yes", "no way"], ("yes", "no way")),
    "watermarking_config": (
        ['{"bias": 2.5, "seeding_scheme": "selfhash"}'],
        jd.WatermarkingConfig(bias=2.5, seeding_scheme="selfhash"),
    ),
    "output_raw_logprobs": ([], True),
    "output_routed_experts": ([], True),
    "logprobs": (["3"], 3),
    "logprobs_mode": (["raw"], "raw"),
    "prompt_logprobs": (["0"], 0),
    "prompt_lookup_num_tokens": (["10"], 10),
    "max_matching_ngram_size": (["3"], 3),
    "num_assistant_tokens": (["5"], 5),
    "num_assistant_tokens_schedule": (["heuristic"], "heuristic"),
    "assistant_confidence_threshold": (["0.4"], 0.4),
    "cache_implementation": (["static"], "static"),
    "cache_config": (['{"nbits": 8}'], (("nbits", 8),)),  # a dict, frozen into pairs
}


def test_cli_flags_are_derived_from_the_fields():
    from jaxdecode import cli

    names = {f.name for f in dataclasses.fields(GC)} - {"return_dict_in_generate"}
    assert set(CLI_VALUES) == names, "a field without a CLI test value"
    for name, (argv, want) in CLI_VALUES.items():
        for flag in {f"--{name}", f"--{name.replace('_', '-')}"}:
            args = cli.build_parser().parse_args(["generate", "x", flag, *argv])
            got = cli.flags.config_overrides(args)
            assert set(got) == {name}, (flag, got)
            config = GC(eos_token_id=2).replace(**got)
            assert getattr(config, name) == want, (flag, got)
        if name not in ("max_length", "min_length", "cache_config"):  # cache_config needs
            config.validate(vocab_size=20)  # cache_implementation="quantized"
    args = cli.build_parser().parse_args(["generate", "x", "--no-do_sample"])
    assert cli.flags.config_overrides(args) == {"do_sample": False}


# --------------------------------------------------------------------------- #
# validate()
# --------------------------------------------------------------------------- #

INVALID = [
    # (fields, vocab_size, the field the message must name)
    (dict(do_sample=True, temperature=0.0), None, "temperature"),
    (dict(do_sample=True, temperature=-0.5), None, "temperature"),
    (dict(temperature=-1.0), None, "temperature"),
    (dict(do_sample=True, temperature=[0.7, 0.0]), None, "temperature"),
    (dict(top_p=0.0), None, "top_p"),
    (dict(top_p=1.5), None, "top_p"),
    (dict(do_sample=True, top_p=[0.9, 1.01]), None, "top_p"),
    (dict(top_k=-1), None, "top_k"),
    (dict(top_k=2.5), None, "top_k"),
    (dict(do_sample=True, top_k=[5, 0]), None, "top_k"),
    (dict(num_beams=0), None, "num_beams"),
    (dict(num_beams=2.0), None, "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), None, "num_return_sequences"),
    (dict(num_return_sequences=2), None, "num_return_sequences"),
    (dict(num_return_sequences=0, do_sample=True), None, "num_return_sequences"),
    (dict(repetition_penalty=0.0), None, "repetition_penalty"),
    (dict(repetition_penalty=-1.0), None, "repetition_penalty"),
    (dict(frequency_penalty=2.5), None, "frequency_penalty"),
    (dict(presence_penalty=-3.0), None, "presence_penalty"),
    (dict(length_penalty=float("nan")), None, "length_penalty"),
    (dict(min_p=1.5), None, "min_p"),
    (dict(typical_p=0.0), None, "typical_p"),
    (dict(epsilon_cutoff=1.0), None, "epsilon_cutoff"),
    (dict(eta_cutoff=-0.1), None, "eta_cutoff"),
    (dict(no_repeat_ngram_size=-1), None, "no_repeat_ngram_size"),
    (dict(max_length=0), None, "max_length"),
    (dict(max_new_tokens=0), None, "max_new_tokens"),
    (dict(seed=-1), None, "seed"),
    (dict(eos_token_id=100), 50, "eos_token_id"),
    (dict(eos_token_id=[1, 50]), 50, "eos_token_id"),
    (dict(eos_token_id=[]), None, "eos_token_id"),
    (dict(eos_token_id=-1), None, "eos_token_id"),
    (dict(pad_token_id=50), 50, "pad_token_id"),
    (dict(pad_token_id=[0, 1]), None, "pad_token_id"),
    (dict(bos_token_id=64), 50, "bos_token_id"),
    (dict(forced_bos_token_id=51), 50, "forced_bos_token_id"),
    (dict(forced_eos_token_id=[2, 70]), 50, "forced_eos_token_id"),
    (dict(suppress_tokens=[99]), 50, "suppress_tokens"),
    (dict(begin_suppress_tokens=[1, 64]), 50, "begin_suppress_tokens"),
    (dict(bad_words_ids=[[1, 60]]), 50, "bad_words_ids"),
    (dict(bad_words_ids=[3, 4]), None, "bad_words_ids"),
    (dict(sequence_bias={(70,): 1.0}), 50, "sequence_bias"),
    (dict(sequence_bias=[[[1, 2], 1.0], [[55], -1.0]]), 50, "sequence_bias"),
    (dict(max_new_tokens=3, min_new_tokens=5, eos_token_id=2), None, "min_new_tokens"),
    (dict(min_length=5), None, "min_length"),
    (dict(min_length=30, max_length=20, eos_token_id=2), None, "min_length"),
    (dict(min_new_tokens=2), None, "min_new_tokens"),
    (dict(exponential_decay_length_penalty=(2, 1.5)), None, "exponential_decay_length_penalty"),
    (
        dict(exponential_decay_length_penalty=(2, 0.5), eos_token_id=2),
        None,
        "exponential_decay_length_penalty",
    ),
    (dict(early_stopping="sometimes"), None, "early_stopping"),
    (dict(do_sample="yes"), None, "do_sample"),
    (dict(do_sample=1), None, "do_sample"),
    (dict(output_scores=None), None, "output_scores"),
    (dict(top_k_method="slow"), None, "top_k_method"),
    (dict(top_p_method="sorted"), None, "top_p_method"),
    (dict(repetition_penalty_form="openai"), None, "repetition_penalty_form"),
    (dict(do_sample=True, top_k_method="fast", top_k=5000), None, "top_k"),
    (dict(prompt_lookup_num_tokens=0), None, "prompt_lookup_num_tokens"),
    (dict(prompt_lookup_num_tokens=2.5), None, "prompt_lookup_num_tokens"),
    (dict(max_matching_ngram_size=0), None, "max_matching_ngram_size"),
    (dict(num_assistant_tokens=0), None, "num_assistant_tokens"),
    (dict(num_assistant_tokens=True), None, "num_assistant_tokens"),
    (dict(num_beams=2, prompt_lookup_num_tokens=3), None, "prompt_lookup_num_tokens"),
    # Refused only inside generate before issue 24; validate() catches them now.
    (dict(bad_words_ids=[[]]), None, "bad_words_ids"),
    (dict(bad_words_ids=[[3], []]), None, "bad_words_ids"),
    (dict(suppress_tokens=[[]]), None, "suppress_tokens"),
    (dict(forced_eos_token_id=[[2, 3]]), None, "forced_eos_token_id"),
    (dict(eos_token_id=[[]]), None, "eos_token_id"),
    (dict(regex="[a-z]+"), None, "regex needs eos_token_id"),
    (dict(choices=[["a"], None]), None, "choices needs eos_token_id"),
    (dict(length_penalty=[1.0, 2.0]), None, "length_penalty"),
    (dict(do_sample=True, typical_p=[1.0, 0.5]), None, "typical_p"),
    (dict(do_sample=True, temperature=[0.5, 0.7], top_p=[0.9, 0.8, 0.7]), None, "top_p has 3"),
    (dict(temperature=[0.5, 0.7], regex=["a", None, "b"], eos_token_id=2), None, "choices has 3"),
]


@pytest.mark.parametrize(
    "fields,vocab_size,name", INVALID, ids=[f"{n}-{i}" for i, (_, _, n) in enumerate(INVALID)]
)
def test_validate_names_the_field(fields, vocab_size, name):
    with pytest.raises(jd.ConfigError, match=name):
        GC(**fields).validate(vocab_size=vocab_size)


@pytest.mark.parametrize(
    "fields,vocab_size",
    [
        (dict(temperature=0.0), None),  # greedy ignores the temperature
        (dict(num_beams=4, num_return_sequences=4), None),
        (dict(do_sample=True, num_return_sequences=3), None),
        (dict(eos_token_id=[0, 49], pad_token_id=49, suppress_tokens=[48]), 50),
        (dict(min_length=3, eos_token_id=2, early_stopping="never"), None),
        (dict(do_sample=True, top_k=[5, 7], top_p=[0.5, 1.0], temperature=[0.5, 2.0]), None),
        (dict(top_k=0, top_p=1.0, frequency_penalty=-2.0, presence_penalty=2.0), None),
    ],
)
def test_validate_accepts_valid_settings(fields, vocab_size):
    cfg = GC(**fields)
    assert cfg.validate(vocab_size=vocab_size) is cfg


def test_replace_rejects_unknown_fields():
    with pytest.raises(ValueError, match="temprature"):
        GC().replace(temprature=0.5)
    with pytest.raises(ValueError, match="temprature"):
        jd.logits_processor(GC(), temprature=0.5)
    assert GC().replace(temperature=0.5).temperature == 0.5


def test_process_logits_validates_against_the_vocabulary():
    with pytest.raises(ValueError, match="eos_token_id"):
        jd.process_logits(np.zeros((1, 8)), np.zeros((1, 2), int), GC(eos_token_id=8))


# --------------------------------------------------------------------------- #
# transformers I/O
# --------------------------------------------------------------------------- #


def _rich_config():
    """Many non-default fields, transformers' and ours."""
    return GC(
        max_new_tokens=30,
        min_new_tokens=2,
        min_length=3,
        do_sample=True,
        temperature=0.7,
        top_h=0.6,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        typical_p=0.95,
        epsilon_cutoff=3e-4,
        eta_cutoff=1e-3,
        repetition_penalty=1.2,
        prompt_ignore_length=2,
        no_repeat_ngram_size=3,
        bad_words_ids=[[5], [7, 8]],
        sequence_bias=[[[3], -1.5], [[4, 5], 2.0]],
        watermarking_config={"bias": 1.5, "context_width": 2},
        guidance_scale=1.0,  # 1: off (prompt lookup below excludes guidance)
        eos_token_id=[2, 9],
        pad_token_id=0,
        bos_token_id=1,
        exponential_decay_length_penalty=(5, 1.1),
        suppress_tokens=[11],
        begin_suppress_tokens=[12],
        forced_bos_token_id=13,
        forced_eos_token_id=[2],
        remove_invalid_values=True,
        renormalize_logits=True,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        num_return_sequences=2,
        length_penalty=0.8,
        early_stopping="never",
        frequency_penalty=0.5,
        presence_penalty=0.3,
        cache_implementation="quantized",
        cache_config={"nbits": 8, "q_group_size": 32},
        seed=7,
        repetition_penalty_form="ctrl",
        top_k_method="fast",
        top_p_method="fast",
        stop_strings=["unto", "\n\n"],
        # One constraint per row, each row's in its own field.
        regex=["[a-z]+", None, None],
        json_schema=[None, {"type": "object"}, None],
        choices=[None, None, ["yes", "no"]],
        output_raw_logprobs=True,
        output_routed_experts=True,
        logprobs=4,
        logprobs_mode="raw",
        prompt_logprobs=0,
        prompt_lookup_num_tokens=6,
        max_matching_ngram_size=3,
        num_assistant_tokens=5,
        num_assistant_tokens_schedule="heuristic_transient",
        assistant_confidence_threshold=0.3,  # default 0.4
    ).validate()


def test_round_trip_through_transformers():
    cfg = _rich_config()
    d = cfg.to_hf()
    assert set(d) == {f.name for f in dataclasses.fields(GC)} - {"max_length", "num_beams"}
    json.dumps(d)  # plain JSON types only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.GenerationConfig(**d)
    back = GC.from_hf(hf.to_dict())
    assert back == cfg
    assert GC.from_hf(json.loads(hf.to_json_string())) == cfg


def test_to_hf_writes_sequence_bias_dict_in_transformers_list_form():
    cfg = GC(sequence_bias={(3,): -1.5, (4, 5): 2.0})
    assert cfg.to_hf()["sequence_bias"] == [[[3], -1.5], [[4, 5], 2.0]]
    assert GC.from_hf(cfg.to_hf()) == cfg == GC(sequence_bias=[[[3], -1.5], [[4, 5], 2.0]])


def test_from_hf_dict_file_and_directory(tmp_path):
    data = {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": None,  # None means the default
        "eos_token_id": [1, 2],
        "pad_token_id": 0,
        "max_new_tokens": 10,
        "transformers_version": "5.24.0",  # unknown keys are ignored
        "cache_implementation": None,
    }
    want = GC(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=[1, 2], pad_token_id=0,
              max_new_tokens=10)  # fmt: skip
    assert GC.from_hf(data) == want
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(data))
    assert GC.from_hf(path) == want
    assert GC.from_hf(str(path)) == want
    assert GC.from_hf(tmp_path) == want
    assert GC.from_hf(str(tmp_path)) == want


_SAVED = dict(
    do_sample=True,
    temperature=0.6,
    top_p=0.9,
    top_k=20,
    min_p=0.05,
    repetition_penalty=1.1,
    no_repeat_ngram_size=4,
    eos_token_id=[1, 2],
    pad_token_id=0,
    bos_token_id=1,
    max_new_tokens=64,
    bad_words_ids=[[5], [6, 7]],
    sequence_bias=[[[3], -1.0], [[4, 5], 2.0]],
    exponential_decay_length_penalty=(4, 1.2),
    suppress_tokens=[9],
    num_return_sequences=2,
)


def test_from_hf_reads_a_file_saved_by_transformers(tmp_path):
    transformers.GenerationConfig(**_SAVED).save_pretrained(tmp_path)
    cfg = GC.from_hf(tmp_path)
    assert cfg == GC(**_SAVED)
    # Unset, as in transformers (max_new_tokens decides the length).
    assert cfg.max_length is None and cfg.resolve_max_length(5) == 5 + 64
    assert cfg.eos_ids == (1, 2)
    cfg.validate(vocab_size=16)


def test_from_hf_reads_sequence_bias_saved_as_a_dict(tmp_path):
    """transformers documents `sequence_bias` as `{(ids...): bias}`; `save_pretrained`
    then writes the tuple keys as strings ("(3,)", "(4, 5)"), and
    `transformers.GenerationConfig.from_pretrained` reads the file back."""
    bias = {(3,): -1.0, (4, 5): 2.0}
    transformers.GenerationConfig(sequence_bias=bias).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["sequence_bias"] == {"(3,)": -1.0, "(4, 5)": 2.0}
    assert GC.from_hf(tmp_path) == GC(sequence_bias=bias)


def test_from_hf_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        GC.from_hf(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not found"):
        GC.from_hf(tmp_path)  # a directory without generation_config.json
    bad = tmp_path / "generation_config.json"
    bad.write_text('{"temperature": 0.7,')
    with pytest.raises(ValueError, match="JSON"):
        GC.from_hf(bad)
    with pytest.raises(ValueError, match="top_p"):
        GC.from_hf({"top_p": 2.0})


# --------------------------------------------------------------------------- #
# split(): static part hashable, traced part a pytree with a stable structure
# --------------------------------------------------------------------------- #

_BASE = dict(
    do_sample=True,
    num_beams=3,
    num_return_sequences=2,
    eos_token_id=[2, 5],
    pad_token_id=0,
    max_new_tokens=8,
    min_p=0.05,
    typical_p=0.9,
    epsilon_cutoff=1e-3,
    eta_cutoff=1e-3,
)
_A = dict(
    temperature=0.7,
    top_p=0.9,
    top_k=50,
    repetition_penalty=1.2,
    frequency_penalty=0.1,
    presence_penalty=0.2,
    length_penalty=1.0,
)
_B = dict(
    temperature=1.3,
    top_p=0.4,
    top_k=3,
    repetition_penalty=0.8,
    frequency_penalty=-1.0,
    presence_penalty=1.5,
    length_penalty=-0.5,
    min_p=0.2,
    typical_p=0.5,
    epsilon_cutoff=0.1,
    eta_cutoff=0.02,
)


@functools.partial(jax.jit, static_argnums=0)
def _step(static, traced, logits, ctx):
    out = traced.processor(logits, ctx)
    return out / traced.length_penalty if static.do_sample else out


def test_split_static_part_is_shared_by_numeric_changes(rng):
    (sa, ta), (sb, tb) = jd.split_config(GC(**_BASE, **_A)), jd.split_config(GC(**{**_BASE, **_B}))
    assert isinstance(sa, jd.StaticConfig) and isinstance(ta, jd.TracedConfig)
    assert sa == sb and hash(sa) == hash(sb) and {sa: 1}[sb] == 1
    assert jax.tree_util.tree_structure(ta) == jax.tree_util.tree_structure(tb)
    la, lb = jax.tree_util.tree_leaves(ta), jax.tree_util.tree_leaves(tb)
    assert [(x.shape, x.dtype) for x in la] == [(x.shape, x.dtype) for x in lb]
    assert any(not np.array_equal(x, y) for x, y in zip(la, lb, strict=True))
    # ... hence one compilation serves both.
    x = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
    ctx = jd.DecodeContext.from_ids(rng.integers(0, 16, (2, 5)), vocab_size=16, prompt_length=3)
    _step(sa, ta, x, ctx).block_until_ready()
    with count_compiles() as c:
        out_b = _step(sb, tb, x, ctx).block_until_ready()
    assert c.count == 0
    assert not np.array_equal(out_b, _step(sa, ta, x, ctx))


@pytest.mark.parametrize(
    "change",
    [dict(num_beams=4), dict(output_scores=True), dict(eos_token_id=[2]), dict(do_sample=False)],
)
def test_split_static_part_changes_with_shapes_and_code(change):
    sa, _ = jd.split_config(GC(**_BASE, **_A))
    sb, _ = jd.split_config(GC(**{**_BASE, **_A, **change}))
    assert sa != sb


@pytest.mark.parametrize("change", [dict(max_new_tokens=9), dict(max_length=30)])
def test_static_part_carries_no_length(change):
    """No program reads the config's length (the plan carries the number of new
    tokens): `max_length=prompt+8` and `max_new_tokens=8` share programs."""
    assert GC(**_BASE, **_A).static() == GC(**{**_BASE, **_A, **change}).static()


def test_static_part_ignores_what_the_strategy_does_not_read():
    greedy = GC(eos_token_id=2)
    assert greedy.static() == greedy.replace(early_stopping=True, logprobs_mode="raw").static()
    assert (
        greedy.replace(logprobs=2).static()
        != greedy.replace(logprobs=2, logprobs_mode="raw").static()
    )


def test_split_validates_first():
    with pytest.raises(ValueError, match="top_p"):
        jd.split_config(GC(top_p=3.0))


# --------------------------------------------------------------------------- #
# logits_processor(): transformers' order
# --------------------------------------------------------------------------- #

_EVERYTHING = dict(
    do_sample=True,
    sequence_bias=[[[3], -1.5], [[4, 5], 2.0]],
    repetition_penalty=1.2,
    no_repeat_ngram_size=3,
    bad_words_ids=[[6], [7, 8]],
    min_length=3,
    min_new_tokens=2,
    forced_bos_token_id=13,
    forced_eos_token_id=[2],
    remove_invalid_values=True,
    exponential_decay_length_penalty=(5, 1.1),
    suppress_tokens=[11],
    begin_suppress_tokens=[12],
    temperature=0.7,
    top_k=40,
    top_p=0.9,
    min_p=0.05,
    typical_p=0.95,
    epsilon_cutoff=3e-4,
    eta_cutoff=1e-3,
    renormalize_logits=True,
    eos_token_id=[2, 9],
    pad_token_id=0,
    max_length=20,
)
_WARPERS = {"Temperature", "TopK", "TopP", "MinP", "TypicalP", "EpsilonCutoff", "EtaCutoff"}


def _tag(p):
    """Our processor as a name that tells transformers' classes apart."""
    name = type(p).__name__
    if isinstance(p, P.SequenceBias):
        return "BadWords" if np.all(np.isneginf(np.asarray(p.multi_bias))) else name
    if isinstance(p, P.MinLength):
        return "MinNewTokens" if p.new_tokens else name
    if isinstance(p, P.ForceTokens):
        return f"Forced{p.at.upper()}"
    if isinstance(p, P.SuppressTokens):
        return "SuppressAtBegin" if p.at_begin else name
    return name


_HF_TAG = {
    "SequenceBiasLogitsProcessor": "SequenceBias",
    "RepetitionPenaltyLogitsProcessor": "RepetitionPenalty",
    "NoRepeatNGramLogitsProcessor": "NoRepeatNGram",
    "NoBadWordsLogitsProcessor": "BadWords",
    "MinLengthLogitsProcessor": "MinLength",
    "MinNewTokensLengthLogitsProcessor": "MinNewTokens",
    "ForcedBOSTokenLogitsProcessor": "ForcedBOS",
    "ForcedEOSTokenLogitsProcessor": "ForcedEOS",
    "InfNanRemoveLogitsProcessor": "RemoveInvalidValues",
    "ExponentialDecayLengthPenalty": "ExponentialDecayLengthPenalty",
    "SuppressTokensLogitsProcessor": "SuppressTokens",
    "SuppressTokensAtBeginLogitsProcessor": "SuppressAtBegin",
    "TemperatureLogitsWarper": "Temperature",
    "TopKLogitsWarper": "TopK",
    "TopPLogitsWarper": "TopP",
    "MinPLogitsWarper": "MinP",
    "TypicalLogitsWarper": "TypicalP",
    "EpsilonLogitsWarper": "EpsilonCutoff",
    "EtaLogitsWarper": "EtaCutoff",
    "LogitNormalization": "Renormalize",
}

EXPECTED_ORDER = [
    "SequenceBias",
    "RepetitionPenalty",
    "FrequencyPresencePenalty",  # ours (not in transformers): right after repetition
    "NoRepeatNGram",
    "BadWords",
    # no "MinLength": min_new_tokens is set, and transformers' generate() then
    # replaces min_length with prompt + min_new_tokens (a duplicate of MinNewTokens)
    "MinNewTokens",
    "ForcedBOS",
    "ForcedEOS",
    "RemoveInvalidValues",
    "ExponentialDecayLengthPenalty",
    "SuppressTokens",
    "SuppressAtBegin",
    "Temperature",
    "TopK",
    "TopP",
    "MinP",
    "TypicalP",
    "EpsilonCutoff",
    "EtaCutoff",
    "Renormalize",
]


def test_logits_processor_order_with_everything_enabled():
    chain = jd.logits_processor(GC(**_EVERYTHING, frequency_penalty=0.5, presence_penalty=0.1))
    assert [_tag(p) for p in chain.processors] == EXPECTED_ORDER


def test_warpers_only_when_sampling():
    greedy = jd.logits_processor(GC(**{**_EVERYTHING, "do_sample": False}))
    tags = [_tag(p) for p in greedy.processors]
    assert not _WARPERS & set(tags)
    assert tags == [t for t in EXPECTED_ORDER if t not in _WARPERS | {"FrequencyPresencePenalty"}]
    beam = jd.logits_processor(GC(**{**_EVERYTHING, "do_sample": False, "num_beams": 2}))
    assert not _WARPERS & {_tag(p) for p in beam.processors}
    sampling = jd.logits_processor(GC(do_sample=True))  # transformers' top_k=50 applies
    assert [_tag(p) for p in sampling.processors] == ["Temperature", "TopK"]
    assert int(sampling.processors[1].k) == 50


def _hf_processors(fields):
    import torch

    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=1,
            n_embd=8,
            n_head=2,
            vocab_size=64,
            n_positions=32,
            bos_token_id=1,
            eos_token_id=2,
        )  # fmt: skip
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GenerationConfig(**fields)
        model._prepare_special_tokens(config, True, device="cpu")
        return model._get_logits_processor(
            config,
            input_ids_seq_length=4,
            encoder_input_ids=torch.zeros(1, 4, dtype=torch.long),
            logits_processor=transformers.LogitsProcessorList(),
            device="cpu",
            model_kwargs={"attention_mask": torch.ones(1, 4, dtype=torch.long)},
        )


@pytest.mark.parametrize(
    "change",
    [
        dict(),
        dict(do_sample=False),
        dict(num_beams=3, num_return_sequences=2),  # beam sampling: keep 1 + #EOS
        dict(num_beams=3, eos_token_id=7, temperature=1.0),
        dict(top_k=0, top_p=1.0, typical_p=1.0, min_p=None, sequence_bias=None),
    ],
)
def test_logits_processor_matches_transformers_live(change):
    fields = {k: v for k, v in {**_EVERYTHING, **change}.items() if v is not None}
    hf = _hf_processors(fields)
    ours = jd.logits_processor(GC(**fields)).processors
    hf_tags = [_HF_TAG[type(p).__name__] for p in hf]
    our_tags = [_tag(p) for p in ours]
    if fields.get("do_sample") and fields.get("temperature") == 1.0:
        # We keep temperature 1.0 in the chain (x / 1 is exact) so that sweeping
        # it from 1.0 does not change the compiled program; transformers drops it.
        our_tags.remove("Temperature")
    if fields.get("min_new_tokens") is not None and "MinLength" in hf_tags:
        # generate() sets min_length = prompt + min_new_tokens, which makes its
        # MinLength processor a duplicate of MinNewTokens: we leave it out.
        hf_tags.remove("MinLength")
    assert our_tags == hf_tags
    keep = {
        _HF_TAG[type(p).__name__]: p.min_tokens_to_keep
        for p in hf
        if hasattr(p, "min_tokens_to_keep")
    }
    for p in ours:
        if _tag(p) in keep:
            assert p.min_tokens_to_keep == keep[_tag(p)], _tag(p)
