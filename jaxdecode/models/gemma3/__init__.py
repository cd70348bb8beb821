"""Gemma 3's text model (`gemma3_text`, transformers' `Gemma3ForCausalLM`): an
adapter onto the skeleton, sharing Gemma 2's (`models.gemma2.config`)."""

from jaxdecode.models.gemma2.config import Gemma3TextConfig
from jaxdecode.models.gemma2.gguf import from_gguf
from jaxdecode.models.transformer.family import adapter_family

__all__ = ["FAMILY", "Gemma3TextConfig"]

FAMILY = adapter_family(
    "Gemma3",
    ("gemma3_text",),
    Gemma3TextConfig,
    gguf_architectures=("gemma3",),
    from_gguf=from_gguf,
)
