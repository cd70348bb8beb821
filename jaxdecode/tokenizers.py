"""Tokenizers and chat templates.

`load_tokenizer(directory)` reads `tokenizer.json`, or `vocab.json` + `merges.txt`
(GPT-2's byte-level BPE), plus the chat template and special tokens of
`tokenizer_config.json` / `chat_template.jinja`; `tokenizer_from_gguf(metadata)`
builds the same from a GGUF file's vocabulary, merges and template. Both return
a `Tokenizer` with `encode` / `decode` / `apply_chat_template`.

Over ~500 lines: one `Tokenizer` and every way one is read (tokenizer.json, GPT-2's
vocab + merges, GGUF's BPE and SentencePiece vocabularies) and rendered (chat
templates), kept together so that each reader builds the same object.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "Tokenizer",
    "byte_to_unicode",
    "byte_tokenizer",
    "load_tokenizer",
    "render_chat_template",
    "tokenizer_from_gguf",
]

# llama.cpp's token types (`tokenizer.ggml.token_type`).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_SPACE = "\u2581"  # SentencePiece's space

# The special-token names transformers passes to chat templates.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer`, equal and hashing by content
    (its serialisation, chat template and special tokens).

    Attributes:
        backend: the `tokenizers.Tokenizer`.
        name: where it came from.
        chat_template: the model's Jinja chat template, or None.
        special_tokens: `{"bos_token": "<s>", ...}` as the template sees them.
    """

    def __init__(
        self,
        backend: object,
        name: str = "",
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.name = name
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        """The conversation rendered by the model's chat template, as
        transformers' `apply_chat_template(..., tokenize=False)` renders it.

        Args:
            messages: `[{"role": "user", "content": "..."}, ...]`.
            add_generation_prompt: end with the header of an assistant turn.
            **kwargs: extra template variables (they override special tokens).

        Raises:
            ValueError: when the tokenizer has no chat template, or the template
                raises (`raise_exception`) or fails to render.
        """
        if self.chat_template is None:
            raise ValueError(f"{self!r} has no chat template")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, also the ones the
        tokenizer adds around a text, as transformers' `tokenizer(text)` does:
        `tokenizer.json`'s post-processor, else `tokenizer_config.json`'s
        `add_bos_token` / `add_eos_token` (vocab.json + merges.txt), or a GGUF
        file's `tokenizer.ggml.add_bos_token` / `add_eos_token`.

        A prompt given as plain text is encoded with `add_special_tokens=True`
        (the CLI, `Engine.submit`, `generate_many`); text rendered by a chat
        template with `False`, since the template writes its own BOS, as
        transformers' `apply_chat_template` tokenizes."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

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
        """Writes `tokenizer.json` into `directory`, and `tokenizer_config.json`
        (special tokens, chat template) when the tokenizer has either."""
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, "tokenizer.json"))
        if self.chat_template is not None or self.special_tokens:
            config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
            config.update(self.special_tokens)
            if self.chat_template is not None:
                config["chat_template"] = self.chat_template
            with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)

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

    @functools.cached_property
    def _content(self) -> tuple[Any, ...]:
        # The backend's full serialisation (vocabulary, merges, normalizers, ...),
        # hashed once: a tokenizer is treated as immutable once built.
        text = self.backend.to_str() if hasattr(self.backend, "to_str") else repr(self.backend)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return (digest, self.chat_template, tuple(sorted(self.special_tokens.items())))

    def __eq__(self, other: object) -> bool:
        # By content, so that a model loaded twice is one static value for jit
        # (its `CausalLM` pytrees compare equal and nothing recompiles).
        if self is other:
            return True
        return isinstance(other, Tokenizer) and self._content == other._content

    def __hash__(self) -> int:
        return hash(self._content)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name or 'bpe'}, vocab_size={self.vocab_size})"


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def byte_to_unicode() -> dict[int, str]:
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

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
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
        template, named, flags = _chat_template_and_specials(directory)
        if os.path.isfile(tok_json):
            # As transformers 5: with a tokenizer.json its post-processor decides
            # what `add_special_tokens` adds; tokenizer_config.json's flags are ignored.
            return Tokenizer(HFTokenizer.from_file(tok_json), "tokenizer.json", template, named)
        if os.path.isfile(vocab) and os.path.isfile(merges):
            backend = HFTokenizer(models.BPE.from_file(vocab, merges))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            # GPT-2's vocab.json holds <|endoftext|>; as in transformers it is a
            # special token: one id when encoded, dropped when decoding.
            specials = [t for t in _special_tokens(directory) if backend.token_to_id(t) is not None]
            backend.add_special_tokens([AddedToken(t, special=True) for t in specials])
            # GPT2Tokenizer's defaults: neither BOS nor EOS unless the config says so.
            _add_bos_eos(
                backend,
                named,
                flags.get("add_bos_token", False),
                flags.get("add_eos_token", False),
            )
            return Tokenizer(backend, "vocab.json+merges.txt", template, named)
    except Exception as e:  # tokenizers raises its own exception types
        raise ValueError(
            f"cannot load the tokenizer in {directory}: {type(e).__name__}: {e}"
        ) from None
    return None


def _chat_template_and_specials(
    directory: str,
) -> tuple[str | None, dict[str, str], dict[str, bool]]:
    """The chat template (`chat_template.jinja`, else tokenizer_config.json's
    `chat_template`: a string, or a list of named templates whose "default" is
    used), the special tokens of tokenizer_config.json and its `add_bos_token` /
    `add_eos_token` flags (those given)."""
    config: dict[str, Any] = {}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    specials = {}
    for key in SPECIAL_TOKEN_NAMES:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    flags = {k: bool(config[k]) for k in ("add_bos_token", "add_eos_token") if k in config}
    return (template if isinstance(template, str) else None), specials, flags


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    **variables: Any,
) -> str:
    """Renders a Hugging Face chat template with jinja2 the way transformers does:
    a sandboxed environment with `trim_blocks` and `lstrip_blocks`, the
    `loopcontrols` extension, a `tojson` filter that keeps non-ASCII text, and
    the globals `raise_exception` and `strftime_now`; the template sees
    `messages`, `add_generation_prompt`, `tools=None`, `documents=None` and
    `variables` (special tokens such as `bos_token`, `eos_token`).

    Raises:
        ValueError: for a message that is not a mapping, or a template that
            fails to render (its `raise_exception` message included).
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(
                f"chat messages must be mappings with role and content, got {message!r}"
            )

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=[dict(m) for m in messages],
            tools=variables.pop("tools", None),
            documents=variables.pop("documents", None),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from None
    except Exception as e:  # the template's own code failed (1/0, a type error, a huge range)
        where = _template_line(e)
        raise ValueError(
            f"the chat template failed{where}: {type(e).__name__}: {e}".replace("\n", " ")
        ) from None


def _template_line(error: BaseException) -> str:
    """The " at line N" of the template where `error` was raised (jinja2 rewrites its
    traceback to the template's lines, in frames named "<template>"), else ""."""
    line, tb = None, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return "" if line is None else f" at line {line}"


# llama.cpp's `tokenizer.ggml.pre` values whose regexes split every digit on its
# own before GPT-2's regex (llama.cpp applies its regexes in sequence).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2_ONLY = ("gpt-2", "gpt2", "default")


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """A `Tokenizer` from a GGUF file's `tokenizer.ggml.*` fields: byte-level BPE
    (`tokenizer.ggml.model` "gpt2"), or SentencePiece ("llama", `_spm_from_gguf`).

    The pre-tokenizer is rebuilt from `tokenizer.ggml.pre` as llama.cpp (and the
    model's training) splits text: for "smollm" and its kin every digit is its
    own piece, then GPT-2's regex applies (transformers' GGUF converter uses
    GPT-2's regex alone and so tokenizes digits differently). CONTROL tokens
    (type 3) become special tokens, USER_DEFINED ones (type 4) added tokens; the
    chat template and the BOS / EOS / UNK / pad token strings come along.

    Raises:
        ValueError: for a tokenizer model other than "gpt2" (byte-level BPE) and
            "llama" (SentencePiece), or a pre-tokenizer type it does not know.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = metadata.get("tokenizer.ggml.model")
    if kind == "llama":
        return _spm_from_gguf(metadata)
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer.ggml.model {kind!r} is not supported (jaxdecode reads byte-level "
            "BPE, 'gpt2', and SentencePiece, 'llama')"
        )
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _GPT2_ONLY:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre {pre!r} is not supported (known: "
            f"{', '.join(_DIGITS_THEN_GPT2 + _GPT2_ONLY)})"
        )
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    pairs = list(zip(tokens, types, strict=True))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in pairs if k == 3]
    )
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in pairs if k == 4])
    specials = _gguf_specials(metadata, tokens)
    _gguf_bos_eos(backend, metadata, specials, bos_default=False)
    return Tokenizer(backend, f"gguf ({pre})", metadata.get("tokenizer.chat_template"), specials)


def _add_bos_eos(backend: Any, specials: Mapping[str, str], bos: bool, eos: bool) -> None:
    """Makes `backend.encode(text, add_special_tokens=True)` put the BOS token
    before the text when `bos`, and the EOS token after it when `eos` (each only
    when `specials` names it and the vocabulary holds it), as transformers'
    `update_post_processor` does; neither: the backend is left as it is."""
    from tokenizers import processors

    vocab = backend.get_vocab(with_added_tokens=True)
    bos_eos = [
        [specials[name]] if on and specials.get(name) in vocab else []
        for name, on in (("bos_token", bos), ("eos_token", eos))
    ]
    first, last = bos_eos
    if first or last:
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join([*first, "$A", *last]),
            pair=" ".join([*first, "$A", *last, *first, "$B", *last]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(first + last)],
        )


def _gguf_bos_eos(
    backend: Any, metadata: Mapping[str, Any], specials: Mapping[str, str], bos_default: bool
) -> None:
    """`_add_bos_eos` by the file's `tokenizer.ggml.add_bos_token` (when absent,
    `bos_default`) and `tokenizer.ggml.add_eos_token` (when absent, off): what
    transformers' GGUF reader and llama.cpp add to a prompt."""
    _add_bos_eos(
        backend,
        specials,
        bool(metadata.get("tokenizer.ggml.add_bos_token", bos_default)),
        bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    )


def _gguf_specials(metadata: Mapping[str, Any], tokens: Sequence[str]) -> dict[str, str]:
    """The BOS / EOS / UNK / pad token strings a GGUF file names by id."""
    specials = {}
    for key, name in (
        ("bos", "bos_token"),
        ("eos", "eos_token"),
        ("unknown", "unk_token"),
        ("padding", "pad_token"),
    ):
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if index is not None and 0 <= int(index) < len(tokens):
            specials[name] = tokens[int(index)]
    return specials


def _spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's (and llama.cpp's) score-driven
    merging: every way of writing a token as two vocabulary pieces, ranked by the
    token's score, best first (ties: the longer left piece first, then by the
    pieces' ids). llama.cpp merges the adjacent pair whose join is the
    best-scoring token; BPE applies the best-ranked merge: the same order."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, score in zip(tokens, scores, strict=True):
        splits = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((float(score), left, right) for left, right in splits)
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in ranked]


def _spm_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """A SentencePiece `Tokenizer` (`tokenizer.ggml.model == "llama"`: Llama 2,
    Mistral, Gemma, Phi-3 files) as llama.cpp tokenizes: BPE over the vocabulary
    with merges from the file, or else from the pieces' scores (`_spm_merges`),
    "▁" for a space, unknown characters as their UTF-8 bytes `<0xNN>` (byte
    fallback), a "▁" before the text unless `tokenizer.ggml.add_space_prefix`
    is false, and BOS / EOS added around a text (`encode(...,
    add_special_tokens=True)`) by `add_bos_token` (default true, as llama.cpp)
    / `add_eos_token`. Gemma's vocabulary spells runs of spaces with real
    spaces and ranks merges by position (no scores): both as transformers'
    GGUF reader; Phi-3 prepends "▁" by a normalizer. CONTROL tokens (and the
    unknown token) become special tokens, USER_DEFINED ones added tokens."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    architecture = str(metadata.get("general.architecture", ""))
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    scores = list(metadata.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
    gemma = architecture.startswith("gemma")
    if gemma:
        tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    else:
        merges = _spm_merges(tokens, scores)
    specials = _gguf_specials(metadata, tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=specials.get("unk_token"),
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", not gemma))
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma or architecture == "phi3":
        rules = [normalizers.Replace(" ", _SPACE)]
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend(_SPACE), *rules] if prefix else rules
        )
    else:
        scheme = "first" if prefix else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPACE, prepend_scheme=scheme, split=False
        )
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    pairs = list(zip(tokens, types, strict=True))
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in pairs
            if k in (_UNKNOWN, _CONTROL)
        ]
    )
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in pairs if k == _USER_DEFINED])
    # Older files have no flag; llama.cpp and transformers then add BOS.
    _gguf_bos_eos(backend, metadata, specials, bos_default=True)
    name = f"gguf (sentencepiece, {architecture or 'llama'})"
    return Tokenizer(backend, name, metadata.get("tokenizer.chat_template"), specials)
