"""Shared test helpers: CPU only, a compilation counter, small random inputs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI turns on JAX's persistent compilation cache (in the user's cache directory)
# for its process; tests that run `jaxdecode.cli.main` in-process must not turn it on
# for the whole pytest worker (a worker then compiled through the cache-writing path
# and crashed once in XLA). The cache tests set their own directory explicitly.
os.environ.setdefault("JAXDECODE_COMPILATION_CACHE", "off")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import monitoring  # noqa: E402

_COMPILES = [0]


def _on_event(name: str, _duration: float, **_: object) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


monitoring.register_event_duration_secs_listener(_on_event)


class CompileCount:
    """Number of XLA backend compilations seen inside a `count_compiles()` block."""

    def __init__(self) -> None:
        self.start = _COMPILES[0]

    @property
    def count(self) -> int:
        return _COMPILES[0] - self.start


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
    """`with count_compiles() as c: ...; assert c.count == 0`."""
    yield CompileCount()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def assert_same_scores(ours: np.ndarray, ref: np.ndarray, atol: float = 1e-6) -> None:
    """Identical -inf masks (and NaN positions) and finite values within atol."""
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref), err_msg="-inf masks differ")
    np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(ref), err_msg="+inf differ")
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg="NaN positions differ")
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=0, atol=atol)


jax.config.update("jax_numpy_rank_promotion", "allow")

# Hypothesis: derandomized in CI (CI=true) so that a run is reproducible.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _persistent_cache_stays_off():
    """A test that turns on JAX's persistent compilation cache for the whole worker
    fails here (every later compilation in that worker would go through the cache)."""
    yield
    directory = jax.config.jax_compilation_cache_dir
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", None)
        pytest.fail(f"the test left JAX's persistent compilation cache on ({directory})")
