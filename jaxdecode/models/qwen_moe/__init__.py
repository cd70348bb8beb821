"""Qwen2-MoE (`qwen2_moe`) and Qwen3-MoE (`qwen3_moe`): mixture-of-experts
adapters onto the skeleton (`models.transformer`, "moe" layers)."""

from jaxdecode.models.qwen_moe.config import MODEL_TYPES, QwenMoeConfig
from jaxdecode.models.qwen_moe.gguf import ARCHITECTURES, from_gguf
from jaxdecode.models.transformer.family import adapter_family

__all__ = ["FAMILY", "QwenMoeConfig"]

FAMILY = adapter_family(
    "QwenMoE",
    MODEL_TYPES,
    QwenMoeConfig,
    gguf_architectures=tuple(ARCHITECTURES),
    from_gguf=from_gguf,
)
