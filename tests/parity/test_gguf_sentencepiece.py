"""SentencePiece GGUF tokenizers (`tokenizer.ggml.model == "llama"`: Llama 2,
Mistral, Gemma, Phi-3 files) against transformers' own GGUF reader
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`).

A small vocabulary written with `gguf`'s `GGUFWriter`: control tokens, the
256 byte-fallback pieces `<0xNN>`, scored merged pieces (no merges in the file:
they follow from the scores), single characters and a user-defined `<think>`.
Token ids (BOS added by `add_bos_token`, default on) and decoded text equal
transformers' on strings with unicode outside the vocabulary, runs of spaces,
digits, tabs and newlines, for the llama, gemma2 and phi3 architectures (each
with its own space handling).
"""

from __future__ import annotations

import os

import pytest

from jaxdecode.checkpoints import read_gguf
from jaxdecode.tokenizers import tokenizer_from_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

S = "\u2581"
# Merged pieces, best first (score -rank): each splits into two vocabulary pieces.
MERGED = [
    S + "t", "he", S + "the", "in", S + "a", "er", S + "w", "or", "ld", S + "wor",
    S + "world", "ll", "He", "Hell", "Hello", S + "in", "ing", S + S, S + S + S + S,
    "12", "123", S + "1", "hé", S + "s", "es", "pa", "ce", "ces", S + "spa", S + "spaces",
]  # fmt: skip
TEXTS = [
    "Hello world",
    "Hello, world!",
    "  spaces  and   more ",
    "in the heading",
    "123 1234 12 1",
    "héllo wörld 日本語 🙂",
    "tabs\tand\nnewlines\n\n",
    "<think>in the</think>",
    "the<s>end</s>",
    "",
    " ",
]


def _vocab() -> list[tuple[str, float, int]]:
    """`(piece, score, llama.cpp token type)`: 2 unknown, 3 control, 6 byte, 4 user-defined."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces += [(m, -float(i), 1) for i, m in enumerate(MERGED)]
    chars = sorted(set("".join(MERGED)) | set("abcdefghijklmnopqrstuvwxyzHW0123456789.,!?"))
    pieces += [(c, -1000.0 - i, 1) for i, c in enumerate(chars)]
    return pieces + [("<think>", 0.0, 4)]


def _write(path: str, arch: str, **flags: bool) -> None:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in dict(block_count=1, context_length=64, embedding_length=8).items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_uint32(f"{arch}.feed_forward_length", 16)
    writer.add_uint32(f"{arch}.attention.head_count", 2)
    pieces = _vocab()
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", [p for p, _, _ in pieces])
    writer.add_array("tokenizer.ggml.scores", [s for _, s, _ in pieces])
    writer.add_array("tokenizer.ggml.token_type", [k for _, _, k in pieces])
    for key, index in (("bos", 1), ("eos", 2), ("unknown", 0)):
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", index)
    for key, value in flags.items():
        writer.add_bool(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _both(tmp_path, arch: str, **flags: bool):
    directory = str(tmp_path / arch)
    os.makedirs(directory, exist_ok=True)
    _write(os.path.join(directory, "t.gguf"), arch, **flags)
    theirs = transformers.AutoTokenizer.from_pretrained(directory, gguf_file="t.gguf")
    ours = tokenizer_from_gguf(read_gguf(os.path.join(directory, "t.gguf")).metadata)
    return ours, theirs


@pytest.mark.parity
@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_ids_and_text_equal_transformers(arch, tmp_path):
    ours, theirs = _both(tmp_path, arch)
    bytes_seen = False
    for text in TEXTS:
        want = theirs(text)["input_ids"]
        got = ours.encode(text, add_special_tokens=True)
        assert got == want, (arch, text)
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(got) == theirs.decode(want, skip_special_tokens=True), (arch, text)
        bytes_seen |= any(3 <= t < 259 for t in got)  # a <0xNN> byte piece
    assert bytes_seen, "no byte fallback exercised"
    # The merges follow the scores: "Hello" ends as one piece, not five characters.
    assert ours.encode("Hello")[-1] == ours.token_to_id("Hello")


@pytest.mark.parity
def test_bos_eos_flags_and_no_space_prefix(tmp_path):
    """`add_bos_token=False`, `add_eos_token=True` and `add_space_prefix=False`
    are honoured (llama.cpp's flags; transformers reads the first two)."""
    ours, theirs = _both(tmp_path, "llama", add_bos_token=False, add_eos_token=True)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"], text
    assert ours.encode("Hello", add_special_tokens=True)[-1] == 2
    directory = tmp_path / "bare"
    directory.mkdir()
    _write(str(directory / "t.gguf"), "llama", add_space_prefix=False)
    bare = tokenizer_from_gguf(read_gguf(str(directory / "t.gguf")).metadata)
    assert bare.encode("the") != ours.encode("the")  # no leading "▁"
    assert bare.decode(bare.encode("in the")) == "in the"


def test_unknown_tokenizer_model_is_refused():
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'bert'.*'gpt2'.*'llama'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
