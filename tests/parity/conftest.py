"""The parity tier compares tiny random models with transformers and peft. It is
compile-bound like the unit tier (hundreds of small programs, each run a few
times), so, as in tests/unit/conftest.py:

* XLA's backend optimizations are off (`jax_disable_most_optimizations`: LLVM at
  -O0; the HLO passes still run). Every check keeps its tolerance: the generated
  code may round a last bit differently, far inside the 1e-4 / 1e-5 / 1e-6 the
  tests allow against transformers. `JAX_DISABLE_MOST_OPTIMIZATIONS=0` turns
  them on for all.
* transformers runs on one torch thread: the tiny models gain nothing from more,
  and torch's spinning worker threads slow XLA's compilations several times.
"""

from __future__ import annotations

import torch
from support import backend_optimizations_off

backend_optimizations_off()
torch.set_num_threads(1)
