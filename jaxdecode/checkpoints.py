"""Hugging Face GPT-2 checkpoints: read, check, convert, write.

Reads `config.json` + `model.safetensors` (or the shards of
`model.safetensors.index.json`), checks every tensor's name and shape against the
config, and converts to the Flax parameter tree of `jaxdecode.models.gpt2`. It
never unpickles: a directory with only `pytorch_model.bin` is refused unless the
caller passes `allow_pickle=True` (then `torch.load(weights_only=True)` reads it).
Writing produces a checkpoint that `transformers.GPT2LMHeadModel.from_pretrained`
loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdecode.models.gpt2 import GPT2Config

__all__ = [
    "read_config",
    "read_state_dict",
    "params_from_state_dict",
    "state_dict_from_params",
    "write_checkpoint",
    "resolve_checkpoint_dir",
]

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
GENERATION_CONFIG = "generation_config.json"

# The model shipped inside the package (see examples/train_bundled_model.py).
BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", "kjv-gpt2")
BUNDLED_NAMES = ("bundled", "kjv-gpt2")

# Buffers that older GPT-2 checkpoints carry (causal-mask constants): not parameters.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names (without the `transformer.` prefix) -> shapes."""
    e, inner = config.n_embd, config.inner_dim
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, e),
        "wpe.weight": (config.n_positions, e),
        "ln_f.weight": (e,),
        "ln_f.bias": (e,),
    }
    for i in range(config.n_layer):
        h = f"h.{i}."
        shapes.update(
            {
                h + "ln_1.weight": (e,),
                h + "ln_1.bias": (e,),
                h + "attn.c_attn.weight": (e, 3 * e),
                h + "attn.c_attn.bias": (3 * e,),
                h + "attn.c_proj.weight": (e, e),
                h + "attn.c_proj.bias": (e,),
                h + "ln_2.weight": (e,),
                h + "ln_2.bias": (e,),
                h + "mlp.c_fc.weight": (e, inner),
                h + "mlp.c_fc.bias": (inner,),
                h + "mlp.c_proj.weight": (inner, e),
                h + "mlp.c_proj.bias": (e,),
            }
        )
    return shapes


def _is_conv1d(name: str) -> bool:
    """GPT-2's Conv1D weights are `[in, out]`; jaxdecode stores them `[out, in]`."""
    return name.endswith(".weight") and name.split(".")[-2] in ("c_attn", "c_proj", "c_fc")


def _flax_path(name: str) -> tuple[str, ...]:
    """`h.3.attn.c_attn.weight` -> `("h_3", "attn", "c_attn", "weight")`."""
    parts = name.split(".")
    if parts[0] == "h":
        parts = [f"h_{parts[1]}", *parts[2:]]
    leaf = parts[-1]
    module = parts[-2]
    if module in ("wte", "wpe"):
        parts[-1] = "embedding"
    elif module.startswith("ln"):
        parts[-1] = "scale" if leaf == "weight" else "bias"
    else:
        parts[-1] = leaf  # projections: `weight` (stored transposed, see _CONV1D) / `bias`
    return tuple(parts)


def read_config(directory: str) -> GPT2Config:
    """Reads and checks `config.json` of a GPT-2 checkpoint directory."""
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no {CONFIG}; is it a Hugging Face model directory?")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return GPT2Config.from_hf(data)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None


def _load_safetensors_file(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(
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
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(directory, shard)
            if not os.path.isfile(path):
                raise ValueError(
                    f"shard {shard} listed in {SAFETENSORS_INDEX} is missing from {directory}"
                )
            state.update(_load_safetensors_file(path))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(
                f"tensor {missing[0]} is listed in {SAFETENSORS_INDEX} but absent from its shard"
            )
        return state
    pickle_path = os.path.join(directory, PICKLE)
    if os.path.isfile(pickle_path):
        if not allow_pickle:
            raise ValueError(
                f"{directory} has only {PICKLE} (a pickle, which can run code when loaded); "
                "jaxdecode reads safetensors. Convert it once with transformers: "
                "`GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`, "
                "or pass allow_pickle=True if you trust the file"
            )
        import torch  # only for this opt-in path

        try:
            state = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read {pickle_path}: {type(e).__name__}: {e}") from None
        return {
            k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in state.items()
        }
    raise ValueError(
        f"{directory} holds no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE})"
    )


def params_from_state_dict(
    state: Mapping[str, np.ndarray], config: GPT2Config, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Checks names and shapes, then builds the Flax parameter tree.

    Raises:
        ValueError: naming the first missing, unexpected or misshapen tensor.
    """
    expected = _expected_shapes(config)
    found: dict[str, np.ndarray] = {}
    for raw_name, tensor in state.items():
        name = raw_name.removeprefix("transformer.")
        if name.endswith(_BUFFER_SUFFIXES):
            continue
        if name == "lm_head.weight":  # tied to wte: must agree in shape, then unused
            if tuple(tensor.shape) != expected["wte.weight"]:
                raise ValueError(
                    f"tensor lm_head.weight has shape {tuple(tensor.shape)}, expected "
                    f"{expected['wte.weight']} (tied to wte.weight)"
                )
            continue
        if name not in expected:
            raise ValueError(
                f"unexpected tensor {raw_name} for a GPT-2 with n_layer={config.n_layer}"
            )
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"tensor {raw_name} has shape {tuple(tensor.shape)}, expected {expected[name]} from config.json"
            )
        found[name] = tensor
    missing = [n for n in expected if n not in found]
    if missing:
        raise ValueError(
            f"checkpoint is missing tensor {missing[0]} ({len(missing)} missing in all)"
        )
    params: dict[str, Any] = {}
    for name, tensor in found.items():
        node = params
        *parents, leaf = _flax_path(name)
        for p in parents:
            node = node.setdefault(p, {})
        array = np.asarray(tensor)
        if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            raise ValueError(f"tensor {name} has dtype {array.dtype}, expected a floating type")
        if _is_conv1d(name):
            array = array.T
        node[leaf] = jnp.asarray(array, dtype=dtype)
    return params


_STORAGE = {"float32": np.float32, "float16": np.float16}


def state_dict_from_params(
    params: Mapping[str, Any], config: GPT2Config, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state_dict`, with transformers' `transformer.` names.

    `dtype`: storage type, "float32" or "float16" (half the file size)."""
    if dtype not in _STORAGE:
        raise ValueError(f"dtype must be one of {sorted(_STORAGE)}, got {dtype!r}")
    out = {}
    for name in _expected_shapes(config):
        node: Any = params
        for p in _flax_path(name):
            node = node[p]
        array = np.asarray(np.asarray(node, dtype=np.float32), dtype=_STORAGE[dtype])
        if _is_conv1d(name):
            array = array.T
        out["transformer." + name] = np.ascontiguousarray(array)
    return out


def write_checkpoint(
    directory: str,
    params: Mapping[str, Any],
    config: GPT2Config,
    generation_config: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> None:
    """Writes `config.json`, `model.safetensors` (`dtype`) and, when given,
    `generation_config.json`: a directory transformers loads."""
    from safetensors.numpy import save_file

    state = state_dict_from_params(params, config, dtype)  # validates dtype first
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
        json.dump(config.to_hf(), f, indent=2)
    save_file(state, os.path.join(directory, SAFETENSORS), {"format": "pt"})
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
            raise ValueError(f"the bundled model is missing from {BUNDLED_DIR} (broken install?)")
        return BUNDLED_DIR
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; from_pretrained needs a model directory or a hub id")
    looks_like_repo = (
        path.count("/") <= 1 and not path.startswith((".", "/", "~")) and path.strip() == path
    )
    if not looks_like_repo or not path:
        raise ValueError(f"model {path!r} is neither a local directory nor a Hugging Face hub id")
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
    ]
    if allow_pickle:
        patterns.append(PICKLE)
    try:
        return snapshot_download(path, revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, auth: one clear message
        raise ValueError(
            f"cannot fetch model {path!r} from the Hugging Face hub: {type(e).__name__}: {e}"
        ) from None
