"""Tokenizers: Hugging Face `tokenizers` for GPT-2 BPE checkpoints.

`load_tokenizer(directory)` reads `tokenizer.json`, or `vocab.json` + `merges.txt`
(GPT-2's byte-level BPE), and returns a `Tokenizer` with `encode` / `decode`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

__all__ = ["Tokenizer", "byte_tokenizer", "load_tokenizer"]


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` (hashable by identity)."""

    def __init__(self, backend: object, name: str = "") -> None:
        self.backend = backend
        self.name = name

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. An id the tokenizer does not know (a model whose vocabulary
        is larger than its tokenizer's) is written `<unk:ID>`, never dropped."""
        ids = [int(i) for i in ids]
        unknown = [i for i, t in enumerate(ids) if t < 0 or self.backend.id_to_token(t) is None]
        if not unknown:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        parts, start = [], 0
        for i in unknown:  # decode the known runs between unknown ids
            parts.append(self.backend.decode(ids[start:i], skip_special_tokens=skip_special_tokens))
            parts.append(f"<unk:{ids[i]}>")
            start = i + 1
        parts.append(self.backend.decode(ids[start:], skip_special_tokens=skip_special_tokens))
        return "".join(parts)

    def save(self, directory: str) -> None:
        """Writes `tokenizer.json` into `directory`."""
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, "tokenizer.json"))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for in decoded text (b"" for an unknown id).

        Byte-level BPE pieces map back through GPT-2's byte alphabet; added and
        special tokens are their text; SentencePiece pieces turn "▁" into a space
        and byte-fallback pieces `<0xNN>` into that byte.
        """
        piece = self.backend.id_to_token(int(token_id))
        if piece is None:
            return b""
        if int(token_id) in self._added_ids:
            return piece.encode("utf-8")
        if self._byte_level:
            decoder = _unicode_to_byte()
            if all(c in decoder for c in piece):
                return bytes(decoder[c] for c in piece)
            return piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        added = getattr(self.backend, "get_added_tokens_decoder", lambda: {})()
        return frozenset(int(i) for i in added)

    @functools.cached_property
    def _byte_level(self) -> bool:
        return "ByteLevel" in repr(getattr(self.backend, "decoder", None))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name or 'bpe'}, vocab_size={self.vocab_size})"


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters: printable
    Latin-1 bytes map to themselves, the others to code points from 256 on."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


BYTE_EOS = "<|endoftext|>"


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer: token id = byte value (0-255), EOS = 256.

    Built as a standard `tokenizers` BPE with no merges over GPT-2's byte
    alphabet, so `tokenizer.json` loads anywhere the `tokenizers` library does.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(BYTE_EOS, special=True)])
    return Tokenizer(backend, "bytes")


def _special_tokens(directory: str) -> list[str]:
    """Special tokens named by special_tokens_map.json / tokenizer_config.json,
    plus GPT-2's <|endoftext|>."""
    import json

    found = {BYTE_EOS}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found.add(value)
    return sorted(found)


def load_tokenizer(directory: str) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when the directory has none."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok_json = os.path.join(directory, "tokenizer.json")
    vocab = os.path.join(directory, "vocab.json")
    merges = os.path.join(directory, "merges.txt")
    try:
        if os.path.isfile(tok_json):
            return Tokenizer(HFTokenizer.from_file(tok_json), "tokenizer.json")
        if os.path.isfile(vocab) and os.path.isfile(merges):
            backend = HFTokenizer(models.BPE.from_file(vocab, merges))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            # GPT-2's vocab.json holds <|endoftext|>; as in transformers it is a
            # special token: one id when encoded, dropped when decoding.
            specials = [t for t in _special_tokens(directory) if backend.token_to_id(t) is not None]
            backend.add_special_tokens([AddedToken(t, special=True) for t in specials])
            return Tokenizer(backend, "vocab.json+merges.txt")
    except Exception as e:  # tokenizers raises its own exception types
        raise ValueError(
            f"cannot load the tokenizer in {directory}: {type(e).__name__}: {e}"
        ) from None
    return None
