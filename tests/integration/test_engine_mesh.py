"""The continuous-batching engine on a device mesh (data=2 x model=2 over 4 host
CPU devices, in subprocesses: `XLA_FLAGS` must be set before JAX starts):
tests/support/workers/engine_mesh_worker.py serves 24 mixed prompts (greedy and sampled with
seeds, lengths 1-20, max_new_tokens 3-10) with a tiny GPT-2 and a tiny GQA Llama
on the mesh, on one device and with `generate`; every prompt's tokens agree. It
also serves 12 prompts sharing a system prompt on pages (float and 8-bit pools),
on the mesh and on one device.
tests/support/workers/eval_mesh_worker.py runs `jaxdecode eval --mesh` and checks it serves on
the engine and equals one device (in the same worker process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from support import WORKERS

import jaxdecode as jd

FOUR = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_mesh")
    res = subprocess.run(
        [sys.executable, os.path.join(WORKERS, "engine_mesh_worker.py"), str(tmp)],
        env=FOUR,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_engine_on_a_mesh_equals_one_device_and_generate(runs, model):
    r = runs[model]
    assert runs["prompts"] == len(r["one"]) >= 24
    assert r["one"] == r["generate"]  # the single-device engine is generate's
    assert r["mesh"] == r["one"]  # token for token, every prompt
    if r["compact_tail"] is not None:
        assert r["compact_tail"] == r["one"]
    # The model axis splits the reductions: the last float32 digits may differ.
    assert r["logp_diff"] < 1e-4
    lengths = [len(t) for t in r["one"]]
    assert len(set(lengths)) >= 3 and max(lengths) == 10
    if model == "gpt2":
        assert min(lengths) < 3  # EOS ends some rows before their max_new_tokens


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_slot_state_is_split_over_the_mesh(runs, model):
    r = runs[model]
    assert r["cache_spec"] == "P(None, 'data', 'model')"  # [layers, slots, heads, ...]
    assert r["logits_spec"] == "P('data', 'model')"  # vocabulary-sharded logits
    assert r["max_new_spec"] == "P('data',)"


def test_decode_program_on_a_mesh_lowers_for_tpu_and_gpu(runs):
    assert runs["export_devices"]["decode"] == 4 and set(runs["export_devices"].values()) == {4}
    assert runs["pages"]["export_devices"] == 4  # the paged decode program too


@pytest.mark.parametrize("pool", ["float", "int8"])
def test_paged_engine_on_a_mesh_equals_one_device(runs, pool):
    """Pages on the mesh: 12 prompts sharing a system prompt, in pages of 4
    with chunks of 8, greedy and sampled (the float pool, on the mesh with
    `compact_tail`) and sampled on an 8-bit quantized pool: every token equals
    the one-device paged engine's, and the mesh took as many prompt tokens
    from the prefix cache."""
    r = runs["pages"][pool]
    assert r["rows"] == (12 if pool == "float" else 6)
    assert r["mesh"] == r["one"]
    assert r["prefix"] == r["one_prefix"] >= r["rows"] * 8, "no prefix hit on the mesh"
    assert r["logp_diff"] < 1e-4
    assert len({len(t) for t in r["one"] if t is not None}) >= 2


@pytest.mark.parametrize("pool", ["float", "int8"])
def test_page_pool_heads_over_model_and_replicated_over_data(runs, pool):
    # [layers, pages, kv_heads, page_size, head_dim]: every data shard holds
    # the whole pool of its heads; the page tables [slots, pages] go by rows.
    assert runs["pages"][pool]["specs"] == ["P(None, None, 'model')", "P('data',)"]


def test_slots_must_divide_over_the_data_axis(runs):
    assert runs["odd_slots"] == (
        "slots=3 must be a multiple of the mesh's data axis (2): each data shard holds "
        "the same number of slots"
    )


def test_engine_mesh_validation():
    lm = jd.from_pretrained("bundled")
    bad = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1), ("batch",))
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with axes"):
        jd.Engine(lm, slots=2, max_len=16, mesh=bad)
    # A mesh of one device is no mesh.
    ids = lm.tokenizer.encode("In the beginning")
    options = {"max_new_tokens": 6, "seed": 5, "slots": 2}  # the bundled model samples
    one = jd.generate_many(lm, [ids], mesh=jd.make_mesh(1, 1), **options)
    alone = jd.generate_many(lm, [ids], **options)
    np.testing.assert_array_equal(one[0].tokens, alone[0].tokens)


@pytest.fixture(scope="module")
def eval_runs(runs):
    return runs["eval"]


def test_eval_on_a_mesh_runs_on_the_engine_and_equals_one_device(eval_runs):
    mesh, one = eval_runs["mesh"], eval_runs["one"]
    assert mesh["code"] == one["code"] == 0
    # Greedy and sampled lines: two engines, both on the mesh; no static batch.
    assert mesh["engines"] == [{"data": 2, "model": 2}] * 2 and mesh["generate"] == 0
    assert one["engines"] == [None] * 2 and one["generate"] == 0
    by_id = lambda run: sorted(run["records"], key=lambda r: r["id"])
    a, b = by_id(mesh), by_id(one)
    assert [r["id"] for r in a] == list(range(12))
    for x, y in zip(a, b, strict=True):
        ox, oy = x.pop("outputs"), y.pop("outputs")
        assert x == y
        for p, q in zip(ox, oy, strict=True):
            # The model axis splits the reductions: the last printed digit may differ.
            np.testing.assert_allclose(p.pop("token_logprobs"), q.pop("token_logprobs"), atol=1e-5)
            assert p == q


def test_eval_mesh_needs_slots_divisible_by_data(eval_runs):
    assert eval_runs["odd"]["code"] == 2
    assert eval_runs["odd"]["stderr"] == (
        "jaxdecode: error: --batch_size 3 must be a multiple of --mesh's data axis (2): the "
        "engine's slots split evenly over it (or give --static-batching)\n"
    )
