"""Llama-style families (llama, mistral, qwen2, qwen3 and gemma `model_type`s):
`LlamaConfig` is their adapter onto the skeleton (`models.transformer`)."""

from typing import Any

import jax.numpy as jnp

from jaxdecode.models.base import Decoder
from jaxdecode.models.layers import ATTENTION_BLOCK
from jaxdecode.models.llama.config import MODEL_TYPES, LlamaConfig
from jaxdecode.models.llama.from_gguf import ARCHITECTURES, from_gguf
from jaxdecode.models.transformer.family import (
    adapter_decoder,
    adapter_family,
    adapter_init_params,
)
from jaxdecode.models.transformer.sharding import transformer_param_specs

__all__ = ["FAMILY", "LlamaConfig", "init_params", "llama_decoder", "llama_param_specs"]


def llama_decoder(
    config: LlamaConfig, dtype: Any = jnp.float32, *, attention_block: int = ATTENTION_BLOCK
) -> Decoder:
    """The `Decoder` of a Llama-style model (the skeleton's, for `config.transformer()`)."""
    return adapter_decoder(config, dtype, attention_block=attention_block)


init_params = adapter_init_params
llama_param_specs = transformer_param_specs

FAMILY = adapter_family(
    "Llama", MODEL_TYPES, LlamaConfig, gguf_architectures=ARCHITECTURES, from_gguf=from_gguf
)
