"""`jd.pytree_dataclass` (jaxdecode/pytree.py): tree structures that include the
class, so that `jax.jit` never runs one class's program for another (issue 12)."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode.processors.base import LogitsProcessor


def _classes(register: str, n: int) -> list[type]:
    """`n` classes with the same fields (one leaf, one static), each carrying its
    index as a class attribute that the jitted function below reads."""
    out = []
    for i in range(n):
        fields = [("x", jax.Array), ("k", int, jd.pytree_field(pytree_node=False, default=1))]
        cls = type(f"P{i}", (), {"__annotations__": {"x": jax.Array, "k": int}, "index": i})
        if register == "jaxdecode":
            cls.k = jd.pytree_field(pytree_node=False, default=1)
            cls = jd.pytree_dataclass(cls)
        else:
            cls = dataclasses.make_dataclass(f"P{i}", fields, frozen=True, namespace={"index": i})
            jax.tree_util.register_dataclass(cls, data_fields=["x"], meta_fields=["k"])
        out.append(cls)
    return out


def _wrong_programs(classes: list[type]) -> int:
    @jax.jit
    def f(p):
        return p.x + type(p).index  # the class decides the program

    return sum(int(f(cls(jnp.int32(0)))) != i for _ in range(2) for i, cls in enumerate(classes))


def test_jit_runs_each_class_its_own_program():
    """40 classes with identical fields through one `jax.jit`: every call runs its
    own class's program. The same test with `jax.tree_util.register_dataclass` (what
    `flax.struct.dataclass` uses) finds wrong programs while that registration's tree
    structures of different classes compare equal (jaxlib 0.10.2), so the test can
    see the failure it guards against."""
    ours = _classes("jaxdecode", 40)
    assert _wrong_programs(ours) == 0
    a, b = (jax.tree_util.tree_structure(c(0.0)) for c in ours[:2])
    assert a != b
    theirs = _classes("register_dataclass", 40)
    a, b = (jax.tree_util.tree_structure(c(0.0)) for c in theirs[:2])
    if a == b:  # the jaxlib behaviour jaxdecode works around
        assert _wrong_programs(theirs) > 0


def _all_processors() -> list[LogitsProcessor]:
    v = np.full(4, 0.5, np.float32)
    return [
        jd.temperature(v), jd.top_p(v), jd.min_p(v), jd.typical_p(v), jd.epsilon_cutoff(v),
        jd.eta_cutoff(v), jd.repetition_penalty(v + 1), jd.frequency_penalty(v),
        jd.top_k(np.full(4, 2, np.int32)), jd.renormalize_logits(),
        jd.min_new_tokens(2, eos_token_id=1),
    ]  # fmt: skip


def test_processor_structures_differ_by_class():
    """Processors with the same leaves and static values (e.g. min-p and typical-p:
    one `[batch]` value, `min_tokens_to_keep=1`) have different tree structures,
    alone and inside a chain."""
    procs = _all_processors()
    for p, q in itertools.combinations(procs, 2):
        assert jax.tree_util.tree_structure(p) != jax.tree_util.tree_structure(q), (p, q)
        assert jax.tree_util.tree_structure(jd.chain(p)) != jax.tree_util.tree_structure(
            jd.chain(q)
        )


def test_dataclass_keeps_fields_replace_and_paths():
    p = jd.typical_p(np.array([0.2, 0.9], np.float32), min_tokens_to_keep=2)
    leaves, treedef = jax.tree_util.tree_flatten(p)
    assert len(leaves) == 1 and jax.tree_util.tree_unflatten(treedef, leaves) == p
    q = p.replace(mass=jnp.array([0.5, 0.5]))
    assert q.min_tokens_to_keep == 2 and type(q) is type(p)
    np.testing.assert_array_equal(q.mass, [0.5, 0.5])
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
    assert paths == [".mass"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.mass = 1.0
