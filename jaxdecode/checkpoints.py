"""Hugging Face checkpoints, whatever the model family: find, read, check, write.

Finds a checkpoint (a local directory, the bundled model, or a hub id), reads
`config.json` and `model.safetensors` (or the shards of
`model.safetensors.index.json`) as NumPy arrays, checks tensors against the
shapes a family's converter expects (`checked_tensors`), and writes a
directory transformers loads. It never unpickles: a directory with only
`pytorch_model.bin` is refused unless the caller passes `allow_pickle=True`
(then `torch.load(weights_only=True)` reads it). Names, layouts and shapes
belong to each family's `convert.py` (`jaxdecode.models.<family>`).

GGUF files (llama.cpp's format) are read with the `gguf` package: metadata as
a dict, every tensor dequantized to float32 in PyTorch `Linear`'s `[out, in]`
layout under its llama.cpp name; a family's `gguf.py` maps names and config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxdecode.errors import CheckpointError

__all__ = [
    "special_token_ids",
    "read_config",
    "read_state_dict",
    "checked_tensors",
    "to_storage",
    "write_checkpoint",
    "resolve_checkpoint_dir",
    "GGUFFile",
    "is_gguf",
    "read_gguf",
    "read_adapter",
    "write_adapter",
]

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
GENERATION_CONFIG = "generation_config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# The model shipped inside the package (see examples/train_bundled_model.py).
BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", "kjv-gpt2")
BUNDLED_NAMES = ("bundled", "kjv-gpt2")


def read_config(directory: str) -> dict[str, Any]:
    """The `config.json` of a checkpoint directory as a dict (a model family's
    config class reads it)."""
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} has no {CONFIG}; is it a Hugging Face model directory?")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def special_token_ids(
    model_config: Mapping[str, Any], generation_config: Mapping[str, Any] | None, tokenizer: Any
) -> dict[str, Any]:
    """`bos_token_id` / `eos_token_id` / `pad_token_id` for a loaded model's
    generation config, the same rule for a Hugging Face directory and a GGUF file.

    As transformers loads them: from `generation_config.json` when the checkpoint
    has one, else from the model config (`config.json`; a GGUF file's metadata).
    A pad id still unset comes from the tokenizer's pad token (what transformers'
    pipelines pass to `generate`; a GGUF file's `tokenizer.ggml.padding_token_id`);
    still unset, `generate` pads with the first EOS id, as transformers does.

    Args:
        model_config: the model config's fields (`config.json` as a dict).
        generation_config: `generation_config.json` as a dict, or None.
        tokenizer: the model's `Tokenizer`, or None.
    """
    source = model_config if generation_config is None else generation_config
    ids = {name: source.get(name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if ids["pad_token_id"] is None and tokenizer is not None:
        pad = tokenizer.special_tokens.get("pad_token")
        ids["pad_token_id"] = None if pad is None else tokenizer.token_to_id(pad)
    return ids


def _load_safetensors_file(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"cannot read {path}: {type(e).__name__}: {e} (truncated or corrupt?)"
        ) from None


def read_state_dict(directory: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as NumPy arrays.

    Order of preference: `model.safetensors`, then `model.safetensors.index.json`
    (sharded), then `pytorch_model.bin` only with `allow_pickle=True`.
    """
    single = os.path.join(directory, SAFETENSORS)
    index = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return _load_safetensors_file(single)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(directory, shard)
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"shard {shard} listed in {SAFETENSORS_INDEX} is missing from {directory}"
                )
            state.update(_load_safetensors_file(path))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(
                f"tensor {missing[0]} is listed in {SAFETENSORS_INDEX} but absent from its shard"
            )
        return state
    pickle_path = os.path.join(directory, PICKLE)
    if os.path.isfile(pickle_path):
        if not allow_pickle:
            raise CheckpointError(
                f"{directory} has only {PICKLE} (a pickle, which can run code when loaded); "
                "jaxdecode reads safetensors. Convert it once with transformers: "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)`, "
                "or pass allow_pickle=True if you trust the file"
            )
        import torch  # only for this opt-in path

        try:
            state = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {pickle_path}: {type(e).__name__}: {e}") from None
        return {
            k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in state.items()
        }
    raise CheckpointError(
        f"{directory} holds no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE})"
    )


def checked_tensors(
    state: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    normalize: Callable[[str], str | None],
    context: str,
) -> dict[str, np.ndarray]:
    """The tensors of `state` under their normalized names, each checked.

    Args:
        state: checkpoint name -> array, as read.
        expected: normalized name -> shape, from the config.
        normalize: checkpoint name -> normalized name, or None for a tensor to
            skip (a buffer, a tied head already checked by the caller).
        context: what the checkpoint should be, for the unexpected-tensor
            message (e.g. "a GPT-2 with n_layer=2").

    Raises:
        CheckpointError: naming the first unexpected, misshapen, non-floating or
            missing tensor.
    """
    found: dict[str, np.ndarray] = {}
    for raw_name, tensor in state.items():
        name = normalize(raw_name)
        if name is None:
            continue
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {raw_name} for {context}")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(
                f"tensor {raw_name} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[name])} from config.json"
            )
        array = np.asarray(tensor)
        if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            raise CheckpointError(
                f"tensor {name} has dtype {array.dtype}, expected a floating type"
            )
        found[name] = array
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(
            f"checkpoint is missing tensor {missing[0]} ({len(missing)} missing in all)"
        )
    return found


STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def to_storage(array: Any, dtype: str) -> np.ndarray:
    """`array` as a contiguous NumPy array of storage type `dtype` (a key of
    `STORAGE_DTYPES`), going through float32 (bfloat16 params included)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    out = np.asarray(np.asarray(array, dtype=np.float32), dtype=STORAGE_DTYPES[dtype])
    return np.ascontiguousarray(out)


def write_checkpoint(
    directory: str,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    generation_config: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> None:
    """Writes `config.json`, `model.safetensors` (every tensor of `state` stored
    as `dtype`) and, when given, `generation_config.json`: a directory
    transformers loads."""
    from safetensors.numpy import save_file

    tensors = {name: to_storage(array, dtype) for name, array in state.items()}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2)
    save_file(tensors, os.path.join(directory, SAFETENSORS), {"format": "pt"})
    if generation_config is not None:
        with open(os.path.join(directory, GENERATION_CONFIG), "w", encoding="utf-8") as f:
            json.dump(dict(generation_config), f, indent=2)


def resolve_checkpoint_dir(
    path_or_repo_id: str, *, revision: str | None = None, allow_pickle: bool = False
) -> str:
    """ "bundled" (the model inside the package), a local directory as is, or a
    hub repo id fetched by huggingface_hub (config, safetensors, generation
    config and tokenizer files only)."""
    path = os.fspath(path_or_repo_id)
    if path in BUNDLED_NAMES:
        if not os.path.isfile(os.path.join(BUNDLED_DIR, CONFIG)):
            raise CheckpointError(
                f"the bundled model is missing from {BUNDLED_DIR} (broken install?)"
            )
        return BUNDLED_DIR
    if os.path.isdir(path):
        return path
    if path.endswith(".gguf") and not os.path.exists(path):
        raise CheckpointError(f"GGUF file {path} does not exist")
    if os.path.exists(path):
        raise CheckpointError(
            f"{path} is a file; from_pretrained needs a model directory, a GGUF file or a hub id"
        )
    looks_like_repo = (
        path.count("/") <= 1 and not path.startswith((".", "/", "~")) and path.strip() == path
    )
    if not looks_like_repo or not path:
        raise CheckpointError(
            f"model {path!r} is neither a local directory nor a Hugging Face hub id"
        )
    from huggingface_hub import snapshot_download

    patterns = [
        CONFIG,
        GENERATION_CONFIG,
        SAFETENSORS,
        SAFETENSORS_INDEX,
        "model-*.safetensors",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ]
    if allow_pickle:
        patterns.append(PICKLE)
    try:
        return snapshot_download(path, revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, auth: one clear message, on one line
        raise CheckpointError(
            f"cannot fetch model {path!r} from the Hugging Face hub: {type(e).__name__}: "
            + " ".join(str(e).split())
        ) from None


def read_adapter(
    path: str, *, revision: str | None = None
) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """A PEFT adapter directory (local, or a hub id fetched by huggingface_hub):
    `(directory, adapter_config.json as a dict, adapter_model.safetensors's
    tensors)`. Like model weights, a pickled `adapter_model.bin` is refused."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
            raise CheckpointError(
                f"adapter {path!r} is not a directory (a PEFT adapter directory holds "
                f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}) nor a hub id"
            )
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                path, revision=revision, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS]
            )
        except Exception as e:  # offline, unknown repo, auth
            raise CheckpointError(
                f"cannot fetch adapter {path!r} from the Hugging Face hub: {type(e).__name__}: "
                + " ".join(str(e).split())
            ) from None
    config_path = os.path.join(path, ADAPTER_CONFIG)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"adapter directory {path} has no {ADAPTER_CONFIG}")
    if not os.path.isfile(weights):
        other = " (it has adapter_model.bin, a pickle: re-save it with peft)"
        found = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        raise CheckpointError(
            f"adapter directory {path} has no {ADAPTER_WEIGHTS}{other if found else ''}"
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    return path, config, _load_safetensors_file(weights)


def write_adapter(directory: str, config: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
    """Writes a PEFT adapter directory: `adapter_config.json` and
    `adapter_model.safetensors` (contiguous float32 tensors)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2)
    arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
    save_file(arrays, os.path.join(directory, ADAPTER_WEIGHTS), {"format": "pt"})


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's contents.

    Attributes:
        path: the file.
        metadata: every key-value field (`general.architecture`,
            `llama.block_count`, `tokenizer.ggml.tokens`, ...), decoded.
        tensors: llama.cpp tensor name -> float32 array, dequantized, in
            `[out, in]` layout (NumPy order of the GGUF shape).
    """

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def is_gguf(path: str) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class _TruncatedGGUF(Exception):
    """The file ends before the data its header describes."""


def _checked_gguf_reader(gguf: Any, path: str) -> Any:
    """A `gguf.GGUFReader` of `path` that first checks the file holds every
    tensor its header describes (the reader itself fails on a short file with
    "cannot reshape array ...").

    Raises:
        _TruncatedGGUF: naming the expected and actual sizes.
    """

    class Reader(gguf.GGUFReader):
        # The one hook between the parsed header (tensor offsets and shapes) and
        # the views of the tensors' bytes.
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            end, last = 0, None
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_type[0])]
                n_bytes = int(np.prod(dims)) * type_size // block
                if start_offs + int(offset[0]) + n_bytes > end:
                    end, last = start_offs + int(offset[0]) + n_bytes, bytes(name).decode()
            if end > len(self.data):
                raise _TruncatedGGUF(
                    f"its header describes {len(fields)} tensors ending at byte {end} "
                    f"(tensor {last}), but the file has {len(self.data)} bytes"
                )
            super()._build_tensors(start_offs, fields)

    return Reader(path)


def read_gguf(path: str) -> GGUFFile:
    """Reads and dequantizes a GGUF file (`gguf.quants.dequantize`, float32).

    Raises:
        CheckpointError: for an unreadable file or a tensor type the gguf package
            cannot dequantize, naming the file and the tensor.
    """
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            "reading GGUF files needs the gguf package (pip install gguf)"
        ) from None
    try:
        reader = _checked_gguf_reader(gguf, path)
    except _TruncatedGGUF as e:
        raise ValueError(f"{path} is truncated: {e}; download it again") from None
    except Exception as e:  # the reader raises assorted errors on damaged files
        size = os.path.getsize(path)
        raise CheckpointError(
            f"cannot read {path} as GGUF ({size} bytes; truncated or corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from None
    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        try:
            metadata[name] = field.contents()
        except Exception as e:
            raise CheckpointError(f"{path}: cannot decode GGUF field {name}: {e}") from None
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:
            raise CheckpointError(
                f"{path}: cannot dequantize tensor {tensor.name} of type "
                f"{tensor.tensor_type.name}: {type(e).__name__}: {e}"
            ) from None
        tensors[tensor.name] = np.asarray(array, dtype=np.float32)
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)
