"""Search strategies over the functional KV cache.

`loop` (plan, state, prefill, model step, the scan-or-while runner), `sample`
(greedy and sampling), `beam` (beam search), `program` (the jitted program that
`generate` calls).
"""

from jaxdecode.search.beam import BeamState
from jaxdecode.search.loop import DecodeState, GenerateOutput, Plan
from jaxdecode.search.program import generate_program, prefill_program

__all__ = [
    "BeamState",
    "DecodeState",
    "GenerateOutput",
    "Plan",
    "generate_program",
    "prefill_program",
]
