"""Sharded decoding: meshes of 8 CPU devices, and two processes on loopback.

The mesh runs happen in subprocesses (`XLA_FLAGS=--xla_force_host_platform_
device_count=8` must be set before JAX starts, and the rest of the suite keeps
its single device): tests/support/workers/mesh_worker.py decodes a tiny GPT-2 (8 heads,
vocabulary 512, so every axis divides) on meshes (8,1), (4,2), (2,4), (1,8) with
greedy search, beam search and top-k/top-p sampling, and reads how many bytes
each device holds, and in the same process a tiny GQA Llama on meshes and
`jaxdecode eval --mesh` against one device; tests/support/workers/multihost_worker.py
is one of two `jax.distributed` processes that decode a global batch assembled
from per-host rows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from support import WORKERS

import jaxdecode as jd
from jaxdecode.sharding import fit_spec

EIGHT = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    """The 8-device worker's results: "gpt2", "llama" and "cli" (one process)."""
    tmp = tmp_path_factory.mktemp("mesh_worker")
    res = subprocess.run(
        [sys.executable, os.path.join(WORKERS, "mesh_worker.py"), str(tmp)],
        env=EIGHT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return _last_json(res.stdout)


@pytest.fixture(scope="module")
def mesh_runs(worker_runs):
    return worker_runs["gpt2"]


MESHES = ["8x1", "4x2", "2x4", "1x8"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_mesh_output_equals_single_device(mesh_runs, mesh, strategy):
    single = np.asarray(mesh_runs["single"][strategy])
    sharded = np.asarray(mesh_runs["meshes"][mesh][strategy])
    assert single.shape == sharded.shape == (8 if strategy != "beam" else 8, single.shape[1])
    np.testing.assert_array_equal(sharded, single)


def test_per_device_bytes_follow_the_mesh(mesh_runs):
    runs, params, cache = (
        mesh_runs["meshes"],
        mesh_runs["param_bytes_total"],
        mesh_runs["cache_bytes_total"],
    )
    # The cache [L, B, H, S, D] is split over data (rows) and model (heads): each
    # device holds exactly 1/8 of it on every mesh.
    for mesh in MESHES:
        assert runs[mesh]["cache_bytes"] * 8 == cache, mesh
    assert runs["8x1"]["cache_spec"] == "P(None, 'data')"
    assert runs["4x2"]["cache_spec"] == "P(None, 'data', 'model')"
    assert runs["1x8"]["logits_spec"] == "P(None, 'model')"  # vocabulary-sharded
    # Weights: replicated over data, split over model except the small replicated
    # leaves (layer norms, biases of the row-parallel projections, positions).
    assert runs["8x1"]["param_bytes"] == params
    by_model = [runs[m]["param_bytes"] for m in ("8x1", "4x2", "2x4", "1x8")]
    assert by_model == sorted(by_model, reverse=True)
    for mesh, m in (("4x2", 2), ("2x4", 4), ("1x8", 8)):
        replicated = (m * runs[mesh]["param_bytes"] - params) / (m - 1)
        assert 0 < replicated < 0.1 * params, (mesh, replicated)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_decode_a_global_batch():
    port = str(_free_port())
    worker = os.path.join(WORKERS, "multihost_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(pid), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(_last_json(out))
    for pid, r in enumerate(results):
        assert r == {"pid": pid, "devices": 4, "local": 2, "greedy": True, "beam": True}


def test_mesh_validation():
    assert jd.make_mesh(1, 1).shape == {"data": 1, "model": 1}
    assert jd.parse_mesh("data=1").shape == {"data": 1, "model": 1}
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"data=2 x model=1 = 2 devices, but {n} are"):
        jd.make_mesh(2, 1)
    with pytest.raises(ValueError, match="axis model must be an int >= 1, got 0"):
        jd.make_mesh(1, 0)
    with pytest.raises(ValueError, match="mesh must look like 'data=4,model=2'"):
        jd.parse_mesh("batch=2")
    with pytest.raises(ValueError, match="mesh axis data must be an integer, got 'x'"):
        jd.parse_mesh("data=x")
    lm = jd.from_pretrained("bundled")
    bad = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1), ("batch",))
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with axes"):
        jd.generate(lm, np.ones((1, 3), np.int32), mesh=bad)


def test_mesh_of_one_device_equals_no_mesh():
    lm = jd.from_pretrained("bundled")
    ids = np.asarray([lm.tokenizer.encode("In the beginning")])
    cfg = jd.GenerationConfig(max_new_tokens=8, pad_token_id=256)
    a = jd.generate(lm, ids, config=cfg, mesh=jd.make_mesh(1, 1))
    b = jd.generate(lm, ids, config=cfg)
    np.testing.assert_array_equal(np.asarray(a.sequences), np.asarray(b.sequences))


def test_cli_eval_on_a_mesh(worker_runs):
    outs = worker_runs["cli"]
    assert outs["mesh"]["code"] == outs["single"]["code"] == 0
    outs = {name: outs[name]["records"] for name in ("mesh", "single")}
    assert len(outs["mesh"]) == 4
    # Same records, tokens and text exactly; the log-probabilities within float32
    # rounding (the model axis splits the reductions, so the last printed digit of a
    # logprob may differ: -1.399989 vs -1.39999).
    for a, b in zip(outs["mesh"], outs["single"], strict=True):
        oa, ob = a.pop("outputs"), b.pop("outputs")
        assert a == b
        for x, y in zip(oa, ob, strict=True):
            np.testing.assert_allclose(x.pop("token_logprobs"), y.pop("token_logprobs"), atol=1e-5)
            assert x == y
    odd = worker_runs["cli"]["odd"]
    assert odd["code"] == 2 and "--mesh: mesh data=3 x model=1 = 3 devices, but 8" in odd["stderr"]


@pytest.mark.parametrize(
    ("spec", "shape", "want"),
    [
        # GPT-2 small's cache: 12 heads do not divide by 8, the 64-wide head dim does.
        (
            P(None, "data", "model", None, None),
            (12, 8, 12, 160, 64),
            P(None, "data", None, None, "model"),
        ),
        (
            P(None, "data", "model", None, None),
            (12, 8, 16, 160, 64),
            P(None, "data", "model", None, None),
        ),
        # GPT-2's vocabulary of 50 257 is prime to 8: split the 768 columns instead.
        (P("model", None), (50257, 768), P(None, "model")),
        (P("model", None), (50257, 7), P(None, None)),  # nothing divides: replicated
        (P("data", None), (3, 5), P(None, None)),
    ],
)
def test_fit_spec(spec, shape, want):
    mesh = AbstractMesh((2, 8), ("data", "model"))
    assert fit_spec(spec, shape, mesh) == want


@pytest.fixture(scope="module")
def llama_mesh_runs(worker_runs):
    return worker_runs["llama"]


@pytest.mark.parametrize("mesh", ["4x2", "2x4", "1x8"])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_gqa_llama_on_a_mesh_equals_single_device(llama_mesh_runs, mesh, strategy):
    """8 query heads over 2 KV heads: on model axes of 4 and 8 the KV heads do not
    divide, the cache splits its head dimension instead; the tokens never change."""
    single = np.asarray(llama_mesh_runs["single"][strategy])
    np.testing.assert_array_equal(np.asarray(llama_mesh_runs["meshes"][mesh][strategy]), single)
    assert single.shape[0] == 8


def test_gqa_llama_placements(llama_mesh_runs):
    runs = llama_mesh_runs["meshes"]
    assert runs["4x2"]["cache_spec"] == "P(None, 'data', 'model', None, None)"
    assert runs["1x8"]["cache_spec"] == "P(None, 'data', None, None, 'model')"
    assert runs["2x4"]["k_proj_spec"] == "P('model', None)"
