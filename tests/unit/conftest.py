"""The unit tier runs under strict dtype promotion (as equinox's tests do): an
implicit promotion between dtypes (an int32 array plus a float32 one, a float64
NumPy value into a float32 computation) is an error, so silent upcasts surface
here. Python scalars stay weakly typed and mix freely.

The tier is compile-bound (tiny models, many distinct programs), so XLA's backend
optimizations are off here (`jax_disable_most_optimizations`: LLVM at -O0; the
HLO passes still run). test_score.py: 143 -> 100 CPU seconds. The generated code
may round a last bit differently; a test whose check hinges on one bit (the int8
cache's codes of score and generate in test_quantized_cache.py) turns them back on
with `full_optimizations`, which also clears JAX's compiled programs around the
test (the flag is not in jit's cache key). `JAX_DISABLE_MOST_OPTIMIZATIONS=0` turns
them on for all."""

from __future__ import annotations

import jax
import pytest
from support import backend_optimizations_off

backend_optimizations_off()


@pytest.fixture
def full_optimizations():
    """XLA's backend optimizations on for one test (see the module docstring)."""
    previous = jax.config.read("jax_disable_most_optimizations")
    # The flag is not part of jit's cache key: without clearing, a program an
    # earlier test compiled at -O0 would be reused here (and this test's -O2
    # programs by later tests).
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(autouse=True)
def _strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield
