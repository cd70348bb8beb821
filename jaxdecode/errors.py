"""jaxdecode's exceptions: one small hierarchy, so callers can tell a bad option
from an unsupported model, a broken checkpoint or a request that cannot fit.

Every class derives from `ValueError`, which is what jaxdecode raised before
they existed, so `except ValueError` keeps catching them. An argument of the
wrong type (a config that is not a `GenerationConfig`, a model that is not a
model) raises a plain `TypeError`.

    try:
        jd.generate(lm, ids, top_p=1.5)
    except jd.ConfigError as e:
        print(e)  # top_p must be in (0.0, 1.0], got 1.5
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "MemoryBudgetError", "UnsupportedModelError"]


class ConfigError(ValueError):
    """A decoding option's value is not allowed (raised by
    `GenerationConfig.validate()` and the processor factories, before anything
    is traced); the message names the option, its value and what is allowed."""


class UnsupportedModelError(ValueError):
    """No registered model family reads this model (`config.json`'s
    `model_type`, a GGUF `general.architecture`)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read: a missing or malformed file, a missing,
    unexpected or misshapen tensor."""


class MemoryBudgetError(ValueError):
    """What a request needs (KV cache, per-step buffers) exceeds the device's
    free memory; raised before anything is allocated."""
