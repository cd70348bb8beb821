"""What every command shares: the one-line user error, loading the model and its
assistant, the mesh, the config from the flags, prompt encoding and seeds."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence
from typing import Any


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def load_model(args: argparse.Namespace, why: str | None = ""):
    """`--model` (with `--adapter`, `--max_positions`); refused without a
    tokenizer unless `why` is None (every eval line gives `prompt_ids`); `why`
    says what needs one."""
    import jaxdecode

    name, adapter = args.model, getattr(args, "adapter", None)
    try:
        limit = "config" if args.max_positions is None else args.max_positions
        lm = jaxdecode.from_pretrained(name, max_positions=limit)
    except ValueError as e:
        raise CLIError(f"cannot load model {name!r}: {e}") from None
    if adapter is not None:
        try:
            lm = lm.load_adapter(adapter)
        except ValueError as e:
            raise CLIError(f"cannot load --adapter {adapter!r}: {e}") from None
    if lm.tokenizer is None and why is not None:
        raise CLIError(
            f"model {name!r} has no tokenizer (tokenizer.json or vocab.json + merges.txt){why}"
        )
    return lm


def decode(lm, tokens: list[int]) -> str | None:
    """The text of `tokens`, or None for a model without a tokenizer (eval lines
    with `prompt_ids`: records keep `tokens`)."""
    return None if lm.tokenizer is None else lm.tokenizer.decode(tokens)


def load_assistant(args: argparse.Namespace):
    """`--assistant_model PATH`: the draft model for speculative decoding, or None."""
    path = getattr(args, "assistant_model", None)
    if path is None:
        return None
    import jaxdecode

    try:
        return jaxdecode.from_pretrained(path)
    except ValueError as e:
        raise CLIError(f"cannot load --assistant_model {path!r}: {e}") from None


def mesh_and_model(args: argparse.Namespace, lm):
    """`--mesh data=4,model=2`: the mesh, and the model with its weights placed on it
    once (instead of at every batch)."""
    if not getattr(args, "mesh", None):
        return None, lm
    import jax

    from jaxdecode.sharding import parse_mesh, shard_params

    # Several processes (eval's --num_processes): each one's mesh is its own devices.
    devices = jax.local_devices() if jax.process_count() > 1 else None
    try:
        mesh = parse_mesh(args.mesh, devices)
    except ValueError as e:
        raise CLIError(f"--mesh: {e}") from None
    return mesh, lm.replace(params=shard_params(lm.params, mesh, lm.decoder.param_specs))


_NOT_PRINTED = ("output_scores", "output_logits")


def check_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Options the CLI cannot honour are refused; `max_length` given without
    `max_new_tokens` replaces the model's default `max_new_tokens` (which would
    otherwise take precedence, as in transformers)."""
    for name in _NOT_PRINTED:
        if overrides.get(name):
            raise CLIError(
                f"{name} is not printed by the command line (a [steps, vocab] table per "
                "output); --json gives each token's log-probability (token_logprobs), "
                f"Python's jaxdecode.generate({name}=True) the full table"
            )
    if "max_length" in overrides and "max_new_tokens" not in overrides:
        overrides = {**overrides, "max_new_tokens": None}
    return overrides


def make_config(lm, overrides: dict[str, Any]):
    try:
        config = lm.generation_config.replace(
            **check_overrides(overrides), output_scores=False, output_logits=False
        )
        return config.validate(vocab_size=lm.vocab_size)
    except ValueError as e:
        raise CLIError(str(e)) from None


def prompt_ids(lm, text: str, chat: bool) -> list[int]:
    """The ids of a prompt: plain text with the tokens the tokenizer adds around a
    text (BOS per the file's `add_bos_token`, as transformers' `tokenizer(text)`),
    text rendered by the chat template (`chat`) without them, since the template
    writes its own (as transformers' `apply_chat_template` tokenizes)."""
    return lm.tokenizer.encode(text, add_special_tokens=not chat)


def encode_batch(lm, prompts: Sequence[str], pad_id: int, chat: bool = False):
    """Left-padded ids and mask for a list of prompts (`prompt_ids` each)."""
    encoded = [prompt_ids(lm, p, chat) for p in prompts]
    empty = [i for i, e in enumerate(encoded) if not e]
    if empty:
        raise CLIError(f"prompt {empty[0] + 1} is empty; give at least one character")
    return left_pad(encoded, pad_id)


def left_pad(encoded: Sequence[Sequence[int]], pad_id: int):
    import numpy as np

    width = max(len(e) for e in encoded)
    ids = np.full((len(encoded), width), pad_id, np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = e
        mask[i, width - len(e) :] = 1
    return ids, mask


def sampling_seed(config) -> tuple[Any, bool]:
    """(config with a seed when sampling, whether the CLI drew the seed itself)."""
    if config.do_sample and config.seed is None:
        return config.replace(seed=secrets.randbits(31)), True
    return config, False


def tell_seed(config, drawn: bool) -> None:
    """A seed the CLI drew itself goes to stderr, so that the run can be repeated."""
    if drawn:
        seed = config.seed
        print(f"jaxdecode: sampled with seed {seed} (repeat with --seed {seed})", file=sys.stderr)


def chat_text(lm, prompt: str, system: str | None) -> str:
    """`prompt` as the user's turn of a chat, rendered with the model's chat template."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    try:
        return lm.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as e:
        raise CLIError(f"--chat: {e}") from None


def release_memory() -> None:
    """Between two engines of one `eval` (option groups that cannot share
    slots): drops the compiled programs of the finished group (another group
    has another static config, so none of them runs again) and returns freed
    heap to the system. Without it each finished group kept ~170 MiB of programs
    and glibc kept ~580 MiB of freed buffers (issue 23: three groups peaked at
    1.42x `generate`'s RSS)."""
    import contextlib
    import ctypes
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    # glibc only: elsewhere the allocator keeps what it keeps.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# Byte-order marks: UTF-16 is what Windows PowerShell's `>` writes.
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def read_text(path: str) -> str:
    """A JSONL file's text (eval's prompts, detect's texts): UTF-8, or UTF-8/16/32 with a byte-order mark (read
    as what the mark says).

    Raises:
        CLIError: for a file that cannot be read or is not UTF-8 text, naming the
            line and column of the first bad byte.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}") from None
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        name = encoding.upper().removesuffix("-SIG")
        if name == "UTF-8":  # one byte per column up to the bad one: say where it is
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            where = f"byte {data[e.start : e.start + 1]!r} at line {line}, column {column}"
        else:
            where = f"at byte offset {e.start}"
        raise CLIError(
            f"{path} is not {name} text: {where} ({e.reason}); save it as UTF-8 (in "
            "PowerShell: Out-File -Encoding utf8)"
        ) from None
