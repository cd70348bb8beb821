"""Mixtral (`mixtral`): a mixture-of-experts adapter onto the skeleton
(`models.transformer`, "moe" layers)."""

from jaxdecode.models.mixtral.config import MixtralConfig
from jaxdecode.models.transformer.family import adapter_family

__all__ = ["FAMILY", "MixtralConfig"]

FAMILY = adapter_family("Mixtral", ("mixtral",), MixtralConfig)
