"""One of two processes of a `jax.distributed` run on this machine (loopback):
each host has 2 CPU devices and 2 of the 4 prompts; together they decode the
global batch on a data=2 x model=2 mesh over the 4 devices, then compare with a
single-device run of the whole batch. Started by tests/integration/test_sharding.py.

Usage: python tests/support/workers/multihost_worker.py PROCESS_ID PORT
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

pid, port = int(sys.argv[1]), int(sys.argv[2])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
# Generous timeouts: on a loaded 2-core machine one process can reach the shutdown
# barrier minutes after the other (the 300 s default failed there once).
jax.distributed.initialize(
    f"127.0.0.1:{port}",
    num_processes=2,
    process_id=pid,
    heartbeat_timeout_seconds=600,
    shutdown_timeout_seconds=1200,
)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxdecode as jd  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from mesh_worker import CONFIGS, tiny_model  # noqa: E402


def main() -> None:
    lm = tiny_model()
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 512, (4, 9)).astype(np.int32)  # the global batch
    mesh = jd.make_mesh(data=2, model=2)  # over jax.devices(): both hosts
    rows = NamedSharding(mesh, P("data", None))
    local = prompts[2 * pid : 2 * pid + 2]  # this host's rows
    ids = jax.make_array_from_process_local_data(rows, local)
    result = {"pid": pid, "devices": jax.device_count(), "local": jax.local_device_count()}
    key = jax.random.key(3)
    for name in ("greedy", "beam"):
        out = jd.generate(lm, ids, config=CONFIGS[name], key=key, mesh=mesh)
        sharded = np.asarray(multihost_utils.process_allgather(out.sequences, tiled=True))
        alone = jd.generate(lm, prompts, config=CONFIGS[name], key=key)  # one local device
        result[name] = bool(np.array_equal(sharded, np.asarray(alone.sequences)))
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
