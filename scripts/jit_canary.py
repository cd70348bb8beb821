"""Pytest plugin that watches for wrongly computing XLA:CPU executables (issue 12).

Rare wrong processor masks were seen in long test processes on a loaded 2-core
machine, persistent inside the process and gone in a fresh one. This plugin
re-checks a fixed set of "victim" programs (softmax-based cutoffs, typical-p,
renormalize) between tests, bitwise:

- after every test, the cached executables (compiled once, at the first teardown)
  are re-run on the same inputs;
- every `JIT_CANARY_EVERY` tests (default 4), one of them is compiled afresh (a new
  `jax.jit` of the same function, so the test's own caches stay) and compared with
  the cached one.

On a mismatch a third compile decides which executable is wrong (two out of three),
and one line goes to `$JIT_CANARY_LOG` (default `/tmp/jit-canary-<pid>.log`) with the
test that ran before it. Usage, from the repository root:

    PYTHONPATH=scripts python -m pytest -p jit_canary tests/test_config.py \
        tests/test_processor_properties.py tests/test_processors_hf.py

It changes no test and no result; it only adds work between tests.
"""

from __future__ import annotations

import os

import jax
import numpy as np

import jaxdecode as jd

_EVERY = int(os.environ.get("JIT_CANARY_EVERY", "4"))
_LOG = os.environ.get("JIT_CANARY_LOG", f"/tmp/jit-canary-{os.getpid()}.log")
_state: dict = {}


def _log(line: str) -> None:
    with open(_LOG, "a") as f:
        f.write(line + "\n")


def _cases() -> list[tuple[str, jd.LogitsProcessor, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(123)
    out = []
    for b, v in [(1, 50), (3, 16), (4, 16), (4, 1000)]:
        x = (rng.normal(size=(b, v)) * 3).astype(np.float32)
        ids = rng.integers(0, v, size=(b, 6)).astype(np.int32)
        procs = {
            "eta": jd.eta_cutoff(np.linspace(1e-4, 0.2, b, dtype=np.float32)),
            "epsilon": jd.epsilon_cutoff(np.linspace(1e-3, 0.1, b, dtype=np.float32)),
            "typical": jd.typical_p(np.linspace(0.2, 0.9, b, dtype=np.float32)),
            "min_p": jd.min_p(0.5),
            "renormalize": jd.chain(jd.temperature(0.7), jd.renormalize_logits()),
        }
        out += [(f"{name}-b{b}-v{v}", p, x, ids) for name, p in procs.items()]
    return out


def _compile(p, x, ids):
    """A new compilation of `p` on these shapes: `(executable, output)`."""
    f = jax.jit(lambda p, s, c: p(s, c))  # a new function object: traced and compiled anew
    ctx = jd.DecodeContext.from_ids(ids, vocab_size=x.shape[-1], prompt_length=3)
    args = (p, jax.numpy.asarray(x), ctx)
    return (f, args), np.asarray(f(*args))


def pytest_runtest_teardown(item, nextitem) -> None:
    if not _state:
        cases = _cases()
        _state.update(cases=cases, n=0)
        _state["exe"], _state["ref"] = {}, {}
        for lab, p, x, ids in cases:
            _state["exe"][lab], _state["ref"][lab] = _compile(p, x, ids)
        _log(f"pid {os.getpid()}: {len(cases)} canaries compiled after {item.nodeid}")
        return
    _state["n"] += 1
    ref = _state["ref"]
    for lab, (f, args) in _state["exe"].items():  # cached executables
        got = np.asarray(f(*args))
        if not np.array_equal(got, ref[lab], equal_nan=True):
            _log(f"CACHED MISMATCH after {item.nodeid}: {lab}")
    if _state["n"] % _EVERY == 0:
        lab, p, x, ids = _state["cases"][(_state["n"] // _EVERY) % len(_state["cases"])]
        exe, new = _compile(p, x, ids)
        if not np.array_equal(new, ref[lab], equal_nan=True):
            _, third = _compile(p, x, ids)
            if np.array_equal(third, new, equal_nan=True):
                wrong = "the first (cached)"
            elif np.array_equal(third, ref[lab], equal_nan=True):
                wrong = "the new one"
            else:
                wrong = "unknown (all three differ)"
            kept = [np.isfinite(a).sum(-1).tolist() for a in (ref[lab], new, third)]
            _log(
                f"COMPILE MISMATCH after {item.nodeid}: {lab}; wrong: {wrong}; "
                f"kept per row first/new/third {kept}"
            )
            if np.array_equal(third, new, equal_nan=True):  # keep watching with a right executable
                _state["exe"][lab], ref[lab] = exe, new
