"""Llama-style decoders: llama, mistral, qwen2, qwen3 and gemma `model_type`s."""

from jaxdecode.models.llama import convert
from jaxdecode.models.llama.config import MODEL_TYPES, LlamaConfig
from jaxdecode.models.llama.from_gguf import from_gguf
from jaxdecode.models.llama.model import LlamaForCausalLM, init_params, llama_decoder
from jaxdecode.models.llama.sharding import llama_param_specs
from jaxdecode.models.registry import Family

__all__ = [
    "FAMILY",
    "LlamaConfig",
    "LlamaForCausalLM",
    "init_params",
    "llama_decoder",
    "llama_param_specs",
]

FAMILY = Family(
    name="Llama",
    model_types=MODEL_TYPES,
    config_class=LlamaConfig,
    decoder=llama_decoder,
    params_from_state_dict=convert.params_from_state_dict,
    state_dict_from_params=convert.state_dict_from_params,
    param_specs=llama_param_specs,
    init_params=init_params,
    param_path=convert.param_path,
    gguf_architectures=("llama",),
    from_gguf=from_gguf,
)
