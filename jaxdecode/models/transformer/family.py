"""A `registry.Family` for an adapter config: any frozen config class with
`model_type`, `num_hidden_layers`, `from_hf` / `to_hf` and `transformer()`
(its fields for the skeleton). Every family on the skeleton shares these
functions; what differs is the adapter."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode.models.base import Decoder
from jaxdecode.models.layers import ATTENTION_BLOCK
from jaxdecode.models.registry import Family
from jaxdecode.models.transformer import convert
from jaxdecode.models.transformer.model import init_params, transformer_decoder
from jaxdecode.models.transformer.sharding import transformer_param_specs

Array = jax.Array

__all__ = [
    "adapter_decoder",
    "adapter_family",
    "adapter_init_params",
    "adapter_params_from_state_dict",
    "adapter_separate_params",
    "adapter_state_dict_from_params",
]


def adapter_decoder(
    config: Any, dtype: Any = jnp.float32, *, attention_block: int = ATTENTION_BLOCK
) -> Decoder:
    """The skeleton's `Decoder` for an adapter config (equal for equal arguments)."""
    return transformer_decoder(config.transformer(), dtype, attention_block=attention_block)


def adapter_params_from_state_dict(
    state: Mapping[str, np.ndarray], config: Any, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Checked transformers-named tensors -> the skeleton's parameter tree."""
    what = f"a {config.model_type} with num_hidden_layers={config.num_hidden_layers}"
    return convert.params_from_state_dict(state, config.transformer(), dtype, what)


def adapter_state_dict_from_params(params: Mapping[str, Any], config: Any) -> dict[str, np.ndarray]:
    """The skeleton's parameters -> transformers-named float32 tensors."""
    return convert.state_dict_from_params(params, config.transformer())


def adapter_separate_params(params: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """The skeleton's parameters with the projections fused at load separate
    again, as the checkpoint (and a LoRA adapter) names them."""
    return convert.separate_projections(params, config.transformer())


def adapter_init_params(config: Any, key: Array, dtype: Any = jnp.float32) -> Any:
    """Random parameters of the skeleton for an adapter config."""
    return init_params(config.transformer(), key, dtype)


def adapter_family(
    name: str,
    model_types: tuple[str, ...],
    config_class: type,
    gguf_architectures: tuple[str, ...] = (),
    from_gguf: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], tuple[Any, dict]]
    | None = None,
) -> Family:
    """The `Family` of an adapter config class on the skeleton."""
    return Family(
        name=name,
        model_types=model_types,
        config_class=config_class,
        decoder=adapter_decoder,
        params_from_state_dict=adapter_params_from_state_dict,
        state_dict_from_params=adapter_state_dict_from_params,
        param_specs=transformer_param_specs,
        init_params=adapter_init_params,
        gguf_architectures=gguf_architectures,
        from_gguf=from_gguf,
        param_path=convert.param_path,
        adapter_params=adapter_separate_params,
    )
