"""The unit tier runs under strict dtype promotion (as equinox's tests do): an
implicit promotion between dtypes (an int32 array plus a float32 one, a float64
NumPy value into a float32 computation) is an error, so silent upcasts surface
here. Python scalars stay weakly typed and mix freely."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield
