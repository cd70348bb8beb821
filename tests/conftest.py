"""Test set-up: CPU only, the persistent compilation cache off, derandomized
hypothesis in CI, small random inputs. Helpers are in `tests/support`."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI turns on JAX's persistent compilation cache (in the user's cache directory)
# for its process; tests that run `jaxdecode.cli.main` in-process must not turn it on
# for the whole pytest worker (a worker then compiled through the cache-writing path
# and crashed once in XLA). The cache tests set their own directory explicitly.
os.environ.setdefault("JAXDECODE_COMPILATION_CACHE", "off")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import support  # noqa: E402, F401  (registers the compile counter before any test compiles)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


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
