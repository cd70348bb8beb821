"""Runs with 4 CPU devices (`run(dir)`, from tests/support/workers/engine_mesh_worker.py,
which tests/integration/test_engine_mesh.py starts): `jaxdecode eval --mesh data=2,model=2` on the bundled model against the
same eval on one device, counting which way each served the prompts (engines
built, on which mesh; `generate` calls for static batches). Prints one JSON object.

Usage: python tests/support/workers/eval_mesh_worker.py DIR  (XLA_FLAGS set by the caller)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import jaxdecode  # noqa: E402
from jaxdecode.cli import main  # noqa: E402
from jaxdecode.serving import scheduler  # noqa: E402

TEXTS = ["In the beginning", "And God said", "The LORD is my", "Blessed", "Let there be"]


def lines() -> list[dict]:
    """12 lines: greedy and sampled (a seed each), lengths and max_new_tokens mixed."""
    out = []
    for i in range(12):
        line = {"id": i, "prompt": TEXTS[i % len(TEXTS)] * (1 + i % 3)}
        line["max_new_tokens"] = (4, 7, 10)[i % 3]
        if i % 2:
            line.update(do_sample=True, temperature=0.8, top_k=20, seed=100 + i)
        else:
            line["do_sample"] = False
        out.append(line)
    return out


def run(tmp: str) -> dict:
    """Each eval's exit code, records and the engines / generate calls it made."""
    assert jax.device_count() == 4, jax.devices()
    prompts = os.path.join(tmp, "p.jsonl")
    with open(prompts, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines())
    seen: dict = {"engines": [], "generate": 0}
    init = scheduler.Engine.__init__

    def spy_init(self, *args, **kwargs):
        mesh = kwargs.get("mesh")
        seen["engines"].append(None if mesh is None else dict(mesh.shape))
        init(self, *args, **kwargs)

    generate = jaxdecode.generate

    def spy_generate(*args, **kwargs):
        seen["generate"] += 1
        return generate(*args, **kwargs)

    scheduler.Engine.__init__ = spy_init
    jaxdecode.generate = spy_generate
    out: dict = {}
    try:
        for name, extra in (("mesh", ["--mesh", "data=2,model=2"]), ("one", [])):
            seen["engines"], seen["generate"] = [], 0
            path = os.path.join(tmp, f"{name}.jsonl")
            argv = ["eval", prompts, "-o", path, "--batch_size", "4", "--quiet"] + extra
            code = main(argv)
            with open(path) as f:
                records = [json.loads(line) for line in f]
            out[name] = {"code": code, "records": records, **seen}
    finally:  # the spies go (the calling worker goes on)
        scheduler.Engine.__init__ = init
        jaxdecode.generate = generate
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["eval", prompts, "-o", os.path.join(tmp, "x.jsonl"), "--batch_size", "3"]
                    + ["--mesh", "data=2,model=2", "--quiet"])  # fmt: skip
    out["odd"] = {"code": code, "stderr": err.getvalue()}
    return out


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])), flush=True)
