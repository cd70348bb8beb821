"""GRPO on one device mesh with FSDP-sharded params: sample, score and update in one jitted step.

What this shows (issue 28), on 8 host-platform CPU devices by default
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set here unless given)
or any 8 accelerators:

* The params live in a **training layout**: every weight split over the mesh's
  `data` axis (FSDP: along its largest dimension that divides), the optimizer
  state with them, and the step keeps them so (`train_shardings`).
* **Sample** inside the step with `jaxdecode.generate(..., mesh=mesh)`: the
  traced params are resharded to the family's decoding layout (heads and MLP
  units over `model`, rows over `data`) inside the program with
  `with_sharding_constraint`, no host round trip; the sampled tokens equal one
  device's for the same key.
* **Score** with `jaxdecode.score` and **update** with optax on the same mesh:
  the GRPO step of examples/grpo.py (`make_train_step`), reused.
* The step's program has no host callbacks and lowers with `jax.export` for TPU
  and CUDA.

Usage:
    python examples/grpo_mesh.py [--steps 20] [--samples 4] [--new-tokens 16]
"""

from __future__ import annotations

import os

# Before JAX starts: 8 CPU devices (an accelerator platform ignores it).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from grpo import PROMPTS, TARGET, contains_reward, encode, make_train_step  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxdecode as jd  # noqa: E402

# Custom-call targets of host callbacks (jax.pure_callback / io_callback / debug).
HOST_CALLBACKS = ("xla_python_cpu_callback", "xla_ffi_python_cpu_callback", "callback")


def fsdp_shardings(params: Any, mesh: jax.sharding.Mesh) -> Any:
    """A training layout: each leaf split over `data` along its largest dimension
    that the axis divides (replicated when none does)."""
    n = mesh.shape["data"]

    def one(leaf: Any) -> NamedSharding:
        spec = [None] * np.ndim(leaf)
        for i in sorted(range(np.ndim(leaf)), key=lambda i: -np.shape(leaf)[i]):
            if np.shape(leaf)[i] % n == 0:
                spec[i] = "data"
                break
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map(one, params)


def run(
    steps: int = 20,
    samples: int = 4,
    new_tokens: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    data: int = 4,
    model: int = 2,
    print_fn=print,
) -> dict[str, Any]:
    """Checks the step (callbacks, export, tokens vs one device), runs `steps`
    GRPO steps, and returns what it found and the rewards."""
    mesh = jd.make_mesh(data=data, model=model)
    lm = jd.from_pretrained("bundled")
    config = lm.generation_config.replace(
        do_sample=True, top_k=40, max_new_tokens=new_tokens, num_return_sequences=samples
    )
    ids, mask = encode(PROMPTS, config.pad_id)
    optimizer = optax.adam(lr)
    shardings = fsdp_shardings(lm.params, mesh)
    params = jax.device_put(lm.params, shardings)
    opt_state = jax.jit(optimizer.init)(params)  # moments laid out as the params
    # ... and its scalars (Adam's count) replicated over the mesh.
    opt_shardings = jax.tree_util.tree_map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else NamedSharding(mesh, P()),
        opt_state,
    )
    opt_state = jax.device_put(opt_state, opt_shardings)
    step = make_train_step(
        lm,
        optimizer,
        config,
        ids,
        mask,
        contains_reward(TARGET),
        mesh=mesh,
        train_shardings=(shardings, opt_shardings),
    )
    key = jax.random.key(seed)
    found: dict[str, Any] = {}

    t0 = time.perf_counter()
    text = step.lower(params, opt_state, key).as_text()
    found["host_callbacks"] = sum(text.count(name) for name in HOST_CALLBACKS)
    exported = jax.export.export(step, platforms=("tpu", "cuda"))(params, opt_state, key)
    found["exported"] = ",".join(exported.platforms)

    @jax.jit
    def sample(params: Any, key: jax.Array) -> jax.Array:
        lm_now = lm.replace(params=params)
        return jd.generate(lm_now, ids, mask, config, key=key, mesh=mesh).sequences

    on_mesh = np.asarray(sample(params, key))
    one_device = np.asarray(jd.generate(lm, ids, mask, config, key=key).sequences)
    found["tokens_equal_one_device"] = bool(np.array_equal(on_mesh, one_device))
    found["check_seconds"] = round(time.perf_counter() - t0, 1)

    rewards, gaps = [], []
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, jax.random.fold_in(key, i))
        rewards.append(float(metrics["reward"]))
        gaps.append(float(metrics["sampler_gap"]))
        if print_fn:
            print_fn(
                f"step {i:3d}  reward {rewards[-1]:.3f}  loss {float(metrics['loss']):+.4f}  "
                f"sampler-trainer gap {float(metrics['sampler_gap']):.1e}  "
                f"{time.perf_counter() - start:.0f}s"
            )
    found["params_stay_fsdp"] = all(
        leaf.sharding.is_equivalent_to(s, leaf.ndim)
        for leaf, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True)
    )
    found["rewards"] = rewards
    found["sampler_gap"] = max(gaps, default=0.0)
    if print_fn:
        print_fn(f"mesh data={data} x model={model} on {jax.devices()[0].platform}")
        names = ("host_callbacks", "exported", "tokens_equal_one_device", "params_stay_fsdp")
        for name in (*names, "sampler_gap"):
            print_fn(f"{name}: {found[name]}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt (R)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(args.steps, args.samples, args.new_tokens, args.lr, args.seed)


if __name__ == "__main__":
    main()
