"""The one decoder skeleton: `TransformerConfig` (fields), `Transformer` (the
Flax module), its decoder, checkpoint name table and sharding specs. Families
(`models/llama`, `models/gemma2`, `models/phi3`) are adapters onto it."""

from jaxdecode.models.transformer import convert
from jaxdecode.models.transformer.config import LAYER_TYPES, MLP_KINDS, TransformerConfig
from jaxdecode.models.transformer.model import Transformer, init_params, transformer_decoder
from jaxdecode.models.transformer.sharding import transformer_param_specs

__all__ = [
    "LAYER_TYPES",
    "MLP_KINDS",
    "Transformer",
    "TransformerConfig",
    "convert",
    "init_params",
    "transformer_decoder",
    "transformer_param_specs",
]
