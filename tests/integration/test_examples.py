"""The examples run end to end (as subprocesses, the way a user runs them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_train_and_sample_runs_and_learns():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_and_sample.py"),
            "--steps",
            "30",
            "--sample-every",
            "10",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    losses = [float(x) for x in re.findall(r"^step\s+\d+\s+loss\s+([0-9.]+)$", out, re.M)]
    assert len(losses) >= 2, out
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    samples = re.findall(r"^\s+sample @ step (\d+): ", out, re.M)
    # Steps 0, 10, 20 (every 10) and 29 (the last), one line per prompt.
    assert {int(s) for s in samples} == {0, 10, 20, 29}, out


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpo_reward_rises_and_ratio_starts_at_one():
    """A short GRPO run (4 prompts x 4 samples x 16 bytes): the reward rises,
    the first inner step's ratio is exactly 1, the sampler's log-probabilities
    equal the trainer's to float rounding, and the second inner step moves."""
    grpo = _load_example("grpo")
    history = grpo.train(steps=14, samples=4, lr=2e-3, new_tokens=16, print_fn=None)
    rewards = [h["reward"] for h in history]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.25, rewards
    assert all(h["first_ratio_dev"] == 0.0 for h in history)
    assert max(h["sampler_gap"] for h in history) <= 1e-5
    assert max(h["ratio_range_1"] for h in history) > 1e-3


def test_grpo_mesh_step_on_eight_devices_with_fsdp_params():
    """examples/grpo_mesh.py at a tiny size on 8 host-platform devices: the GRPO
    step (sample on the mesh from FSDP-sharded params, score, update) has no host
    callbacks, lowers for TPU and CUDA, samples one device's tokens, keeps the
    params in their FSDP layout, and the sampler's log-probabilities are the
    trainer's."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "grpo_mesh.py"), "--steps", "2", "--samples",
         "2", "--new-tokens", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = dict(re.findall(r"^(\w+): (.*)$", proc.stdout, re.M))
    assert found["host_callbacks"] == "0", proc.stdout
    assert found["exported"] == "tpu,cuda"
    assert found["tokens_equal_one_device"] == "True"
    assert found["params_stay_fsdp"] == "True"
    assert float(found["sampler_gap"]) <= 1e-5
    assert len(re.findall(r"^step\s+\d+\s+reward", proc.stdout, re.M)) == 2
