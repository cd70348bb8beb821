"""Continuous batching: the engine's device programs (`programs`) and its host
scheduler (`scheduler`, `Engine`)."""

from jaxdecode.serving.programs import SlotState
from jaxdecode.serving.scheduler import (
    Engine,
    EngineResult,
    EngineStats,
    generate_many,
    slot_memory,
)

__all__ = ["Engine", "EngineResult", "EngineStats", "SlotState", "generate_many", "slot_memory"]
