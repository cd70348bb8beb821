"""Model families by Hugging Face `model_type`.

A `Family` is everything generic code needs to know about an architecture:
its config class (`from_hf(dict)` / `to_hf()`), a decoder builder, the
checkpoint converter both ways, tensor-parallel param specs and a random init.
`from_pretrained` reads `config.json`, looks its `model_type` up here and does
the rest through the family; `save_pretrained` looks the family up from the
config object's `model_type`. Adding a family is a new package under
`jaxdecode/models/` plus one line in `_BUILTIN` (or a `register` call from user
code); generic modules (`lm.py`, `checkpoints.py`, `sharding.py`, the decoding
loops) never change.

Built-in families are imported lazily, on first lookup of one of their model
types, so importing jaxdecode does not build every family.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxdecode.errors import UnsupportedModelError
from jaxdecode.models.base import Decoder

Array = jax.Array

__all__ = [
    "Family",
    "family_for_config",
    "family_for_hf_config",
    "lookup",
    "lookup_gguf",
    "model_types",
    "register",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One architecture (possibly several HF `model_type`s sharing its code).

    Attributes:
        name: for messages, e.g. "GPT-2".
        model_types: the HF `model_type`s this family reads.
        config_class: a class with `from_hf(dict) -> config` (ValueError for a
            value it cannot honour) and `config.to_hf() -> dict`; its instances
            carry `model_type`.
        decoder: `(config, dtype) -> Decoder`.
        params_from_state_dict: `(state {name: ndarray}, config, dtype) -> params`,
            ValueError naming the first missing, unexpected or misshapen tensor.
        state_dict_from_params: `(params, config) -> {name: float32 ndarray}` with
            transformers' names, the inverse of the above.
        param_specs: `params -> PartitionSpec tree` over the mesh axes.
        init_params: `(config, key, dtype) -> params`, random, for tests and
            training from scratch.
        gguf_architectures: GGUF `general.architecture` values this family reads.
        from_gguf: `(metadata, tensors) -> (config, state dict with transformers'
            names)` for a GGUF file (see `checkpoints.read_gguf`), or None.
        param_path: `transformers tensor name -> path in the params tree` (e.g.
            `"model.layers.0.self_attn.q_proj.weight"` -> `("layers_0",
            "self_attn", "q_proj", "weight")`), which places a PEFT LoRA
            adapter's tensors (`models.lora.from_peft`); None: no adapters.
        adapter_params: optional `(params, config) -> params` in the layout
            `param_path` addresses, where an adapter's shapes are read and a
            merge folds it in (the skeleton fuses q/k/v and gate/up at load and
            separates them here); None: the params as they are.
    """

    name: str
    model_types: tuple[str, ...]
    config_class: type
    decoder: Callable[[Any, Any], Decoder]
    params_from_state_dict: Callable[[Mapping[str, np.ndarray], Any, Any], Any]
    state_dict_from_params: Callable[[Any, Any], dict[str, np.ndarray]]
    param_specs: Callable[[Any], Any]
    init_params: Callable[[Any, Array, Any], Any]
    gguf_architectures: tuple[str, ...] = ()
    from_gguf: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], tuple[Any, dict]] | None = (
        None
    )
    param_path: Callable[[str], tuple[str, ...]] | None = None
    adapter_params: Callable[[Any, Any], Any] | None = None


# model_type -> module defining `FAMILY` (imported on first lookup).
_BUILTIN: dict[str, str] = {
    "gpt2": "jaxdecode.models.gpt2",
    **{t: "jaxdecode.models.llama" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
    "gemma2": "jaxdecode.models.gemma2",
    "gemma3_text": "jaxdecode.models.gemma3",
    "phi3": "jaxdecode.models.phi3",
    "mixtral": "jaxdecode.models.mixtral",
    **{t: "jaxdecode.models.qwen_moe" for t in ("qwen2_moe", "qwen3_moe")},
}

# GGUF general.architecture -> module defining `FAMILY`.
_BUILTIN_GGUF: dict[str, str] = {
    **{a: "jaxdecode.models.llama" for a in ("llama", "qwen2", "qwen3")},
    "gemma2": "jaxdecode.models.gemma2",
    "gemma3": "jaxdecode.models.gemma3",
    "phi3": "jaxdecode.models.phi3",
    **{a: "jaxdecode.models.qwen_moe" for a in ("qwen2moe", "qwen3moe")},
}

_REGISTERED: dict[str, Family] = {}
_REGISTERED_GGUF: dict[str, Family] = {}


def register(family: Family) -> None:
    """Makes `family` the one `from_pretrained` uses for its model types."""
    if not isinstance(family, Family):
        raise TypeError(f"register needs a Family, got {type(family).__name__}")
    for model_type in family.model_types:
        _REGISTERED[model_type] = family
    for arch in family.gguf_architectures:
        _REGISTERED_GGUF[arch] = family


def model_types() -> list[str]:
    """Every model_type with a family (built in or registered), sorted."""
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def lookup(model_type: str) -> Family:
    """The family reading `model_type`.

    Raises:
        UnsupportedModelError: for a model_type no family reads, listing those supported.
    """
    if model_type not in _REGISTERED and model_type in _BUILTIN:
        module = importlib.import_module(_BUILTIN[model_type])
        register(module.FAMILY)
    if model_type not in _REGISTERED:
        raise UnsupportedModelError(
            f"config.json model_type {model_type!r} is not supported; jaxdecode reads "
            f"model_type {', '.join(repr(t) for t in model_types())}"
        )
    return _REGISTERED[model_type]


def family_for_hf_config(data: Mapping[str, Any]) -> Family:
    """The family of a `config.json` dict, by its `model_type`.

    Raises:
        ValueError: when `model_type` is missing (as transformers' AutoConfig, no
            family is guessed from the other keys) or no family reads it.
    """
    model_type = data.get("model_type")
    if model_type is None:
        raise ValueError(
            "config.json has no model_type, so its model family is unknown; add one, e.g. "
            f'"model_type": "llama" (jaxdecode reads {", ".join(map(repr, model_types()))})'
        )
    if not isinstance(model_type, str):
        raise ValueError(f"config.json model_type must be a string, got {model_type!r}")
    return lookup(model_type)


def lookup_gguf(architecture: str) -> Family:
    """The family reading GGUF files of `general.architecture` `architecture`.

    Raises:
        UnsupportedModelError: for an architecture no family reads.
    """
    if architecture not in _REGISTERED_GGUF and architecture in _BUILTIN_GGUF:
        register(importlib.import_module(_BUILTIN_GGUF[architecture]).FAMILY)
    if architecture not in _REGISTERED_GGUF:
        known = sorted(set(_BUILTIN_GGUF) | set(_REGISTERED_GGUF))
        raise UnsupportedModelError(
            f"GGUF general.architecture {architecture!r} is not supported; jaxdecode reads "
            f"{', '.join(repr(a) for a in known)}"
        )
    return _REGISTERED_GGUF[architecture]


def family_for_config(config: Any) -> Family:
    """The family of a config object (by its `model_type`), checked to be of
    that family's config class."""
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise UnsupportedModelError(
            f"config {type(config).__name__} names no model_type; save_pretrained needs the "
            "config of a registered model family"
        )
    family = lookup(model_type)
    if not isinstance(config, family.config_class):
        raise UnsupportedModelError(
            f"config {type(config).__name__} has model_type {model_type!r}, whose family "
            f"{family.name} uses {family.config_class.__name__}"
        )
    return family
