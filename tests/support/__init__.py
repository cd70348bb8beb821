"""Test helpers shared by the test files (imported as `support`, never from
`conftest`): the XLA compilation counter and the score comparison; the live
transformers references are in `support.hf_models`."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator

import numpy as np
from jax import monitoring

_COMPILES = [0]
_NAMES: list[str] = []  # the compiled functions' names, in order


def _on_event(name: str, _duration: float, fun_name: str = "", **_: object) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1
        _NAMES.append(fun_name)


monitoring.register_event_duration_secs_listener(_on_event)


class CompileCount:
    """Number of XLA backend compilations seen inside a `count_compiles()` block."""

    def __init__(self) -> None:
        self.start = _COMPILES[0]

    @property
    def count(self) -> int:
        return _COMPILES[0] - self.start

    @property
    def names(self) -> list[str]:
        """The names of the functions compiled in the block, in order (a jitted
        function's `__name__`, e.g. `"generate_program"`)."""
        return _NAMES[self.start : _COMPILES[0]]

    def of(self, function: str) -> int:
        """Compilations of the jitted function named `function` in the block
        (one per new program in its cache: a new shape or static value)."""
        return self.names.count(f"jit({function})")


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
    """`with count_compiles() as c: ...; assert c.count == 0`."""
    yield CompileCount()


def assert_same_scores(
    ours: np.ndarray, ref: np.ndarray, atol: float = 1e-6, rtol: float = 0.0
) -> None:
    """Identical -inf masks (and NaN positions) and finite values within
    `atol + rtol * |ref|`."""
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref), err_msg="-inf masks differ")
    np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(ref), err_msg="+inf differ")
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg="NaN positions differ")
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=rtol, atol=atol)


def backend_optimizations_off() -> None:
    """XLA's backend optimizations off for a compile-bound tier (its conftest
    calls this): `jax_disable_most_optimizations`, LLVM at -O0, the HLO passes
    still run. `JAX_DISABLE_MOST_OPTIMIZATIONS=0` keeps them on. The flag is not
    part of jit's cache key: flip it only around `jax.clear_caches()`."""
    import jax

    off = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "1") == "1"
    jax.config.update("jax_disable_most_optimizations", off)


@contextlib.contextmanager
def loading_once() -> Iterator[None]:
    """Inside the block `jaxdecode.from_pretrained` loads each (path, options) once
    and returns that same immutable `CausalLM` again, so in-process runs of the
    CLI (`cli.main`, one load per run) and the test's own reference share one
    model, as one CLI process does: the checkpoint (a GGUF file: every tensor
    de-quantized) is read and converted once per module. A call spelling out a default (the CLI's
    `max_positions="config"`) is the same load; a load that raises is not kept."""
    import jaxdecode

    real, cache = jaxdecode.from_pretrained, {}
    signature = inspect.signature(real)

    def load(path, *args, **kwargs):
        bound = signature.bind(str(path), *args, **kwargs)
        bound.apply_defaults()
        key = tuple((k, repr(v)) for k, v in bound.arguments.items())
        if key not in cache:
            cache[key] = real(path, *args, **kwargs)
        return cache[key]

    jaxdecode.from_pretrained = load
    try:
        yield
    finally:
        jaxdecode.from_pretrained = real


# Scripts the integration tests run in subprocesses (meshes of forced host devices,
# jax.distributed processes).
WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")

__all__ = [
    "WORKERS",
    "CompileCount",
    "assert_same_scores",
    "backend_optimizations_off",
    "count_compiles",
    "loading_once",
]
