"""SentencePiece GGUF tokenizers (`tokenizer.ggml.model == "llama"`: Llama 2,
Mistral, Gemma, Phi-3 files) against transformers' own GGUF reader
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`).

A small vocabulary written with `gguf`'s `GGUFWriter`: control tokens, the
256 byte-fallback pieces `<0xNN>`, scored merged pieces (no merges in the file:
they follow from the scores), single characters and a user-defined `<think>`.
Token ids (BOS added by `add_bos_token`, default on) and decoded text equal
transformers' on strings with unicode outside the vocabulary, runs of spaces,
digits, tabs and newlines, for the llama, gemma2 and phi3 architectures (each
with its own space handling). Byte-level GGUF files honour the same flags; the
CLI (`generate`, `--chat`, `eval`) and `generate_many` feed a model a text prompt
with the BOS its file asks for, and a chat template's own BOS once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
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


def _write(
    path: str, arch: str, weights: bool = False, template: str | None = None, **flags: bool
) -> None:
    """The vocabulary, and with `weights` a random one-layer model of `arch`
    "llama" (hidden 8, 2 heads, feed-forward 16) and the chat `template`."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in dict(block_count=1, context_length=64, embedding_length=8).items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_uint32(f"{arch}.feed_forward_length", 16)
    writer.add_uint32(f"{arch}.attention.head_count", 2)
    pieces = _vocab()
    if weights:
        rng = np.random.default_rng(0)
        shapes = {"token_embd": (len(pieces), 8), "output_norm": (8,), "output": (len(pieces), 8)}
        block = dict(attn_norm=(8,), attn_q=(8, 8), attn_k=(8, 8), attn_v=(8, 8))
        block.update(attn_output=(8, 8), ffn_norm=(8,), ffn_gate=(16, 8), ffn_up=(16, 8))
        shapes.update({f"blk.0.{k}": v for k, v in {**block, "ffn_down": (8, 16)}.items()})
        for name, shape in shapes.items():
            writer.add_tensor(f"{name}.weight", rng.normal(0, 0.5, shape).astype(np.float32))
    if template is not None:
        writer.add_string("tokenizer.chat_template", template)
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


@pytest.mark.parity
def test_byte_level_gguf_bos_eos_flags(tmp_path):
    """A byte-level BPE file (`tokenizer.ggml.model` "gpt2") with
    `add_bos_token` / `add_eos_token`: what transformers' GGUF reader adds
    (nothing without the flags)."""
    from jaxdecode.tokenizers import byte_to_unicode

    alphabet = list(byte_to_unicode().values())
    tokens = ["<|bos|>", "<|eos|>", *alphabet, "He", "ll", "Hell", "Hello"]
    merges = ["H e", "l l", "He ll", "Hell o"]
    for flags in ({}, {"add_bos_token": True}, {"add_bos_token": True, "add_eos_token": True}):
        directory = tmp_path / str(len(flags))
        directory.mkdir()
        writer = gguf.GGUFWriter(str(directory / "t.gguf"), "llama")
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_string("tokenizer.ggml.pre", "default")
        writer.add_array("tokenizer.ggml.tokens", tokens)
        writer.add_array("tokenizer.ggml.token_type", [3, 3] + [1] * (len(tokens) - 2))
        writer.add_array("tokenizer.ggml.merges", merges)
        writer.add_uint32("tokenizer.ggml.bos_token_id", 0)
        writer.add_uint32("tokenizer.ggml.eos_token_id", 1)
        for key, value in flags.items():
            writer.add_bool(f"tokenizer.ggml.{key}", value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        theirs = transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file="t.gguf")
        ours = tokenizer_from_gguf(read_gguf(str(directory / "t.gguf")).metadata)
        for text in ("Hello", "Hello world", ""):
            assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"], flags
        assert ours.encode("Hello") == [len(tokens) - 1]


TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def _prompt_ids_of_cli(capsys, path: str, *argv: str) -> int:
    """How many prompt tokens `jaxdecode generate --json` fed the model (its
    `prompt_logprobs` has one entry per real prompt token), and its tokens."""
    from jaxdecode.cli import main

    capsys.readouterr()
    flags = ["--model", path, "--json", "--max_new_tokens", "2", "--prompt_logprobs", "0"]
    assert main(["generate", *argv, *flags]) == 0
    (output,) = json.loads(capsys.readouterr().out)["outputs"]
    return len(output["prompt_logprobs"]), output["tokens"]


@pytest.mark.parity
def test_prompts_get_bos_by_the_file_and_chat_templates_do_not_twice(tmp_path, capsys, monkeypatch):
    """A Llama-2-style SentencePiece GGUF model: the CLI's plain prompts and
    `generate_many`'s text get BOS per `add_bos_token` (transformers'
    `tokenizer(text)`); a chat template that writes `{{ bos_token }}` gets no
    second one (transformers' `apply_chat_template`, tokenized)."""
    import jaxdecode as jd
    from jaxdecode.cli import main

    monkeypatch.setenv("JAXDECODE_COMPILATION_CACHE", "off")
    text = "Hello world"
    messages = [{"role": "user", "content": text}]
    for bos in (True, False):
        directory = tmp_path / f"bos-{bos}"
        directory.mkdir()
        path = str(directory / "m.gguf")
        _write(path, "llama", weights=True, template=TEMPLATE, add_bos_token=bos)
        theirs = transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file="m.gguf")
        want = theirs(text)["input_ids"]
        assert (want[0] == 1) == bos
        lm = jd.from_pretrained(path)
        greedy = jd.generate(lm, np.asarray([want]), max_new_tokens=2, do_sample=False)
        assert _prompt_ids_of_cli(capsys, path, text) == (
            len(want),
            np.asarray(greedy.sequences)[0, len(want) :].tolist(),
        )
        chat = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        chat = chat["input_ids"] if isinstance(chat, Mapping) else chat
        assert chat.count(1) == 1  # the template's BOS alone
        assert _prompt_ids_of_cli(capsys, path, text, "--chat")[0] == len(chat)
        (many,) = jd.generate_many(lm, [text], max_new_tokens=2, do_sample=False)
        assert list(many.tokens) == list(greedy.sequences[0, len(want) :])
        if bos:  # eval: a prompt line as `generate`, a messages line as `generate --chat`
            lines = [{"id": 0, "prompt": text}, {"id": 1, "messages": messages}]
            prompts, out = directory / "p.jsonl", directory / "o.jsonl"
            prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
            flags = ["--max_new_tokens", "2", "--prompt_logprobs", "0", "--model", path]
            assert main(["eval", str(prompts), "-o", str(out), *flags]) == 0
            records = sorted(map(json.loads, out.read_text().splitlines()), key=lambda r: r["id"])
            got = [len(r["outputs"][0]["prompt_logprobs"]) for r in records]
            assert got == [len(want), len(chat)]
