"""Phi-3 (`phi3`): an adapter onto the skeleton (`models.transformer`)."""

from jaxdecode.models.phi3.config import Phi3Config
from jaxdecode.models.phi3.gguf import from_gguf
from jaxdecode.models.transformer.family import adapter_family

__all__ = ["FAMILY", "Phi3Config"]

FAMILY = adapter_family(
    "Phi3", ("phi3",), Phi3Config, gguf_architectures=("phi3",), from_gguf=from_gguf
)
