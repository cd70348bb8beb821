"""Gemma 2 (`gemma2`): an adapter onto the skeleton (`models.transformer`)."""

from jaxdecode.models.gemma2.config import Gemma2Config
from jaxdecode.models.gemma2.gguf import from_gguf
from jaxdecode.models.transformer.family import adapter_family

__all__ = ["FAMILY", "Gemma2Config"]

FAMILY = adapter_family(
    "Gemma2", ("gemma2",), Gemma2Config, gguf_architectures=("gemma2",), from_gguf=from_gguf
)
