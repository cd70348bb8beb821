"""Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) on the skeleton, against
transformers.

Tiny random checkpoints (2 layers, hidden 32, 4-8 experts, top 2; eager
attention; wide weights, so routing varies across tokens) saved with
`save_pretrained` (per-expert tensor names) and loaded with `jd.from_pretrained`
(stacked `[experts, ...]`): logits of a full pass and of prefill + one-token
cache steps within 1e-4 on left-padded batches (the prefill takes the grouped
`ragged_dot` path, steps with fewer token-expert pairs than experts the
gathered one, or on CPU with the host's per-expert views the switched one),
greedy and beam search token for token with transformers'
`generate`, `save_pretrained` round trips, expert-sharded specs, and refused
config values.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P
from support import WORKERS
from support.hf_models import (
    MOE_CLASSES as CLASSES,
)
from support.hf_models import (
    hf_logits,
    hf_step_logits,
    left_padded_batch,
    make_llama_model,
    make_moe_model,
)

import jaxdecode as jd
from jaxdecode import generation
from jaxdecode.models.moe import PER_EXPERT, gathered, grouped, route, switched
from jaxdecode.sharding import MODEL

ATOL = 1e-4
V = 96
LENGTH, PREFILL = 10, 4
PADS = [0, 3, 6]

# name -> (model_type, overrides on support.hf_models.MOE_TINY)
CASES: dict[str, tuple[str, dict]] = {
    "mixtral-window": ("mixtral", dict(num_local_experts=8, sliding_window=4)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_experts=8,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            norm_topk_prob=False,
        ),
    ),
    "qwen2_moe-dense-layer": (
        "qwen2_moe",
        dict(
            num_experts=4,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        ),
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(num_experts=8, moe_intermediate_size=16, norm_topk_prob=True),
    ),
    "qwen3_moe-sparse-step": (
        "qwen3_moe",
        dict(num_experts=4, moe_intermediate_size=16, decoder_sparse_step=2, attention_bias=True),
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, its directory, jaxdecode CausalLM), built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model_type, overrides = CASES[name]
            hf = make_moe_model(model_type, seed=20 + len(cache), **overrides)
            directory = str(tmp_path_factory.mktemp(name))
            hf.save_pretrained(directory)
            cache[name] = (hf, directory, jd.from_pretrained(directory))
        return cache[name]

    return get


def _batch(seed: int = 0):
    return left_padded_batch(np.random.default_rng(seed), V, LENGTH, PADS)


def _max_real_diff(ours, ref, mask) -> float:
    return float(np.abs(np.asarray(ours) - ref)[np.asarray(mask) == 1].max())


def _prefill_then_steps(lm: jd.CausalLM, ids, mask, prefill: int) -> np.ndarray:
    apply = jax.jit(lm.decoder.apply)
    cache = lm.decoder.init_cache(ids.shape[0], ids.shape[1] + 2, None)
    pos = np.asarray(jd.positions_from_mask(mask))
    out = []
    for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
        logits, cache = apply(
            lm.params, ids[:, start:stop], pos[:, start:stop], cache, mask[:, start:stop]
        )
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


# --------------------------------------------------------------------------- #
def test_grouped_and_gathered_match_a_numpy_reference():
    """Both products equal a per-token loop over the chosen experts, with and
    without renormalisation; tokens route to varied experts."""
    rng = np.random.default_rng(0)
    n, e, hidden, experts, k = 7, 6, 5, 4, 2
    x = rng.normal(size=(n, e)).astype(np.float32)
    logits = rng.normal(size=(n, experts)).astype(np.float32) * 2
    gate, up = (rng.normal(size=(experts, hidden, e)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(experts, e, hidden)).astype(np.float32)
    for norm in (False, True):
        weights, chosen = route(jnp.asarray(logits), k, norm)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ref_chosen = np.argsort(-probs, axis=-1)[:, :k]
        np.testing.assert_array_equal(np.asarray(chosen), ref_chosen)
        ref = np.zeros_like(x)
        for i in range(n):
            w = probs[i, ref_chosen[i]]
            w = w / w.sum() if norm else w
            for j, ex in zip(ref_chosen[i], w, strict=True):
                g, u = gate[j] @ x[i], up[j] @ x[i]
                ref[i] += ex * (down[j] @ (g / (1 + np.exp(-g)) * u))
        assert len(np.unique(ref_chosen)) == experts
        for compute in (grouped, gathered):
            out = jax.jit(compute, static_argnums=6)(x, weights, chosen, gate, up, down, "silu")
            np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
        parts = tuple(tuple(jnp.asarray(w[i]) for i in range(experts)) for w in (gate, up, down))
        for columns in (1, 2):
            out = jax.jit(switched, static_argnums=(4, 5))(
                x, weights, chosen, parts, "silu", columns
            )
            np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_grouped_product_lowers_for_tpu_and_cuda():
    n, e, hidden, experts, k = 6, 8, 4, 4, 2
    args = (
        jnp.zeros((n, e)),
        jnp.zeros((n, k)),
        jnp.zeros((n, k), jnp.int32),
        jnp.zeros((experts, hidden, e)),
        jnp.zeros((experts, hidden, e)),
        jnp.zeros((experts, e, hidden)),
    )
    fn = jax.jit(lambda *a: grouped(*a, "silu"))
    exported = jax.export.export(fn, platforms=("tpu", "cuda"))(*args)
    assert "ragged_dot" in exported.mlir_module()


def test_moe_decoder_lowers_for_tpu_and_cuda(checkpoints):
    """A prefill (grouped product) and a decode step (gathered) of a MoE model
    export for TPU and GPU."""
    _, _, lm = checkpoints("qwen2_moe")
    for t in (LENGTH, 1):
        ids = jnp.zeros((3, t), jnp.int32)
        cache = lm.decoder.init_cache(3, LENGTH + 1, None)
        exported = jax.export.export(jax.jit(lm.decoder.apply), platforms=("tpu", "cuda"))(
            lm.params, ids, ids, cache, jnp.ones_like(ids)
        )
        assert ("ragged_dot" in exported.mlir_module()) == (t == LENGTH)
        routed = jax.export.export(
            jax.jit(lm.decoder.apply_routed, static_argnames="last"), platforms=("tpu", "cuda")
        )(lm.params, ids, ids, cache, jnp.ones_like(ids), last=t > 1)
        assert routed.out_avals[-1].shape == (3, t, 2, 2)  # [B, T, MoE layers, k]
    # A step over the host's per-expert views (the switched form).
    ids = jnp.zeros((1, 1), jnp.int32)
    cache = lm.decoder.init_cache(1, LENGTH + 1, None)
    jax.export.export(jax.jit(lm.decoder.apply), platforms=("tpu", "cuda"))(
        lm.decoder.host_views(lm.params), ids, ids, cache, jnp.ones_like(ids)
    )


# --------------------------------------------------------------------------- #
@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_full_forward_matches_transformers(name, checkpoints):
    hf, _, lm = checkpoints(name)
    ids, mask = _batch()
    assert _max_real_diff(lm.logits(ids, mask), hf_logits(hf, ids, mask), mask) <= ATOL


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_prefill_then_steps_match_transformers(name, checkpoints):
    hf, _, lm = checkpoints(name)
    ids, mask = _batch(seed=1)
    ref = hf_step_logits(hf, ids, mask, PREFILL)
    assert _max_real_diff(_prefill_then_steps(lm, ids, mask, PREFILL), ref, mask) <= ATOL


def _switches(lm: jd.CausalLM, params, t: int) -> int:
    """How many `lax.switch`es over every expert a call of one row of `t`
    tokens traces."""
    ids = jnp.zeros((1, t), jnp.int32)
    cache = lm.decoder.init_cache(1, LENGTH + 1, None)
    jaxpr = jax.make_jaxpr(lm.decoder.apply)(params, ids, ids, cache, jnp.ones_like(ids))
    experts = lm.params["layers_1"]["mlp"]["experts"]["gate_proj"].shape[0]

    def count(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "cond" and len(eqn.params["branches"]) == experts:
                n += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    return count(jaxpr.jaxpr)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["mixtral-window", "qwen2_moe", "qwen3_moe-sparse-step"])
def test_expert_views_alias_the_stack_and_match_transformers(name, checkpoints):
    """On CPU the host adds one array per expert that aliases the stacked
    weights (no copy); one-token steps over them take the switched form (one
    switch per MoE layer, none without the views or for the prefill) and stay
    within 1e-4 of transformers; traced params get no views."""
    hf, _, lm = checkpoints(name)
    views = lm.decoder.host_views(lm.params)
    layers = [k for k in views if "mlp" in views[k] and "experts" in views[k]["mlp"]]
    assert layers
    for layer in layers:
        experts = views[layer]["mlp"]["experts"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            stack, parts = experts[proj], experts[PER_EXPERT][proj]
            assert stack is lm.params[layer]["mlp"]["experts"][proj]
            step = stack[0].size * stack.dtype.itemsize
            assert [p.unsafe_buffer_pointer() for p in parts] == [
                stack.unsafe_buffer_pointer() + i * step for i in range(stack.shape[0])
            ]
            np.testing.assert_array_equal(np.asarray(parts[-1]), np.asarray(stack[-1]))
    assert _switches(lm, views, 1) == len(layers)
    assert _switches(lm, lm.params, 1) == 0
    assert _switches(lm, views, LENGTH) == 0
    traced = jax.eval_shape(lm.decoder.host_views, lm.params)
    assert PER_EXPERT not in traced[layers[0]]["mlp"]["experts"]
    # generate hands its program the views (and the caller's params are unchanged).
    req = generation.prepare(lm, np.ones((1, 4), np.int32), overrides=dict(max_new_tokens=2))
    assert PER_EXPERT in req.params[layers[0]]["mlp"]["experts"]
    assert PER_EXPERT not in lm.params[layers[0]]["mlp"]["experts"]
    # Made once per model, and let go with it (with the arrays they alias).
    own = lm.replace(params=jax.tree.map(jnp.copy, lm.params))
    first, again = (
        generation.prepare(own, np.ones((1, 4), np.int32), overrides=dict(max_new_tokens=2))
        for _ in range(2)
    )
    assert first.params is again.params
    stack = weakref.ref(own.params[layers[0]]["mlp"]["experts"]["gate_proj"])
    del own, first, again
    gc.collect()
    assert stack() is None
    ids, mask = _batch(seed=1)
    ref = hf_step_logits(hf, ids, mask, PREFILL)
    steps = _prefill_then_steps(lm.replace(params=views), ids, mask, PREFILL)
    assert _max_real_diff(steps, ref, mask) <= ATOL


def test_case_fields_change_transformers_logits(checkpoints):
    """norm_topk_prob, the shared expert and decoder_sparse_step move the logits
    far beyond the tolerance, so ignoring one fails the parity tests."""
    ids, mask = _batch()
    for name, other in [
        ("qwen3_moe", dict(norm_topk_prob=False)),
        ("qwen2_moe-dense-layer", dict(norm_topk_prob=False)),
        ("mixtral-window", dict(sliding_window=None)),
    ]:
        hf, _, _ = checkpoints(name)
        model_type, overrides = CASES[name]
        twin = make_moe_model(model_type, **{**overrides, **other})
        twin.load_state_dict(hf.state_dict())
        diff = _max_real_diff(hf_logits(hf, ids, mask), hf_logits(twin, ids, mask), mask)
        assert diff > 10 * ATOL, (name, other, diff)
    hf, _, _ = checkpoints("qwen2_moe")
    with torch.no_grad():
        base = hf_logits(hf, ids, mask)
        saved = {n: p.clone() for n, p in hf.named_parameters() if "shared_expert_gate" in n}
        for n, p in hf.named_parameters():
            if "shared_expert_gate" in n:
                p.add_(1.0)
        moved = hf_logits(hf, ids, mask)
        for n, p in hf.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    assert _max_real_diff(base, moved, mask) > 10 * ATOL


# --------------------------------------------------------------------------- #
NEW = 12
PAD = 3  # not 0: transformers' beam search fills finished beams with `pad or eos`


def _generate_hf(hf, ids, mask, eos, **options):
    with torch.no_grad():
        return hf.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=PAD,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_scores=True,
            **options,
        )


@pytest.mark.parity
@pytest.mark.parametrize("name", ["mixtral-window", "qwen2_moe"])
def test_greedy_and_beam_match_generate(name, checkpoints):
    hf, _, lm = checkpoints(name)
    ids, mask = _batch(seed=2)
    ids = ids.astype(np.int64)
    free = _generate_hf(hf, ids, mask, eos=V + 1)
    gen = free.sequences.numpy()[:, LENGTH:]
    eos = int(np.bincount(gen[:, 2:-2].ravel(), minlength=V).argmax())
    for options in (
        dict(num_beams=1),
        dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
    ):
        h = _generate_hf(hf, ids, mask, eos, **options)
        o = jd.generate(
            lm,
            ids,
            mask,
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=PAD,
            eos_token_id=eos,
            **options,
        )
        hs, os_ = h.sequences.numpy(), np.asarray(o.sequences)
        np.testing.assert_array_equal(os_[:, : hs.shape[1]], hs, err_msg=str(options))
        assert np.all(os_[:, hs.shape[1] :] == PAD)
        if options["num_beams"] > 1:
            np.testing.assert_allclose(
                np.asarray(o.sequences_scores), h.sequences_scores.numpy(), rtol=0, atol=ATOL
            )
        assert (hs[:, LENGTH:] == eos).any(), "EOS never generated: the test lost its point"


# --------------------------------------------------------------------------- #
@pytest.mark.parity
@pytest.mark.parametrize(
    "name", ["mixtral-window", "qwen2_moe-dense-layer", "qwen3_moe-sparse-step"]
)
def test_save_pretrained_round_trip(name, checkpoints, tmp_path):
    """Stacked experts are written back one tensor per expert under the hub's
    names (the same file transformers wrote), and both libraries reload them."""
    from safetensors.numpy import load_file

    hf, directory, lm = checkpoints(name)
    lm.save_pretrained(str(tmp_path))
    theirs = load_file(os.path.join(directory, "model.safetensors"))
    ours = load_file(os.path.join(str(tmp_path), "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        np.testing.assert_array_equal(ours[key], tensor, err_msg=key)
    model_cls = getattr(transformers, CLASSES[CASES[name][0]][1])
    again_hf = model_cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = _batch()
    # transformers' own reload is within float32 rounding, not bit-equal, on some
    # CPUs (AMD EPYC: 1 ulp at 18 of 2880 logits, the same weights laid out
    # otherwise after loading); ours below is bit-equal.
    np.testing.assert_allclose(
        hf_logits(again_hf, ids, mask), hf_logits(hf, ids, mask), rtol=1e-5, atol=1e-5
    )
    again = jd.from_pretrained(tmp_path)
    assert again.config == lm.config
    np.testing.assert_array_equal(
        np.asarray(again.logits(ids, mask)), np.asarray(lm.logits(ids, mask))
    )


def test_sharding_specs_split_experts(checkpoints):
    _, _, lm = checkpoints("qwen2_moe")
    specs = lm.decoder.param_specs(lm.params)
    assert jax.tree_util.tree_structure(specs, is_leaf=lambda x: isinstance(x, P)) == (
        jax.tree_util.tree_structure(lm.params)
    )
    mlp = specs["layers_1"]["mlp"]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert mlp["experts"][proj] == P(MODEL, None, None)
        assert lm.params["layers_1"]["mlp"]["experts"][proj].shape[0] == 8
    assert mlp["gate"]["weight"] == P()
    assert mlp["shared_expert"]["gate_proj"]["weight"] == P(MODEL, None)
    assert mlp["shared_expert"]["down_proj"]["weight"] == P(None, MODEL)
    assert mlp["shared_expert_gate"]["weight"] == P()


def test_experts_split_over_a_two_device_mesh():
    """On a (data=1, model=2) host mesh each device holds half the experts, and
    greedy tokens equal the single-device run (tests/support/workers/moe_mesh_worker.py)."""
    res = subprocess.run(
        [sys.executable, os.path.join(WORKERS, "moe_mesh_worker.py")],
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    assert out["experts_spec"] == str(P(MODEL, None, None))
    assert out["experts_shard_shape"] == [4, 16, 32]
    np.testing.assert_array_equal(np.asarray(out["sharded"]), np.asarray(out["single"]))


# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("mixtral-window", dict(num_experts_per_tok=9), "num_experts_per_tok"),
        ("mixtral-window", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        ("qwen3_moe", dict(num_experts=0, num_local_experts=0), "num_experts"),
        ("qwen3_moe", dict(mlp_only_layers=[2]), "mlp_only_layers"),
        ("qwen2_moe", dict(decoder_sparse_step=0), "decoder_sparse_step"),
        ("qwen2_moe", dict(quantization_config={"quant_method": "gptq"}), "quantization"),
    ],
)
def test_refused_config_values(checkpoints, tmp_path, name, change, match):
    _, directory, _ = checkpoints(name)
    with open(os.path.join(directory, "config.json")) as f:
        data = json.load(f)
    data.update(change)
    for file in os.listdir(directory):
        if file != "config.json":
            os.link(os.path.join(directory, file), tmp_path / file)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        jd.from_pretrained(tmp_path)


def test_routed_experts_are_sown(checkpoints):
    """The layer sows each token's chosen experts, best first, as the router picks them."""
    from jaxdecode.cache import init_cache
    from jaxdecode.models.transformer import Transformer

    hf, _, lm = checkpoints("qwen3_moe-sparse-step")
    cfg = lm.config.transformer()
    ids, mask = _batch()
    pos = jd.positions_from_mask(mask)
    cache = init_cache(
        layers=cfg.num_layers,
        batch=ids.shape[0],
        max_len=ids.shape[1],
        heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        dtype=jnp.float32,
    )
    apply = jax.jit(
        lambda params: Transformer(cfg).apply(
            {"params": params}, ids, pos, cache, mask, mutable=["intermediates"]
        )
    )
    _, state = apply(lm.params)
    sown = state["intermediates"]
    assert "layers_0" not in sown  # decoder_sparse_step=2: layer 0 is dense
    (chosen,) = sown["layers_1"]["mlp"]["routed_experts"]
    assert chosen.shape == (3, LENGTH, 2) and chosen.dtype == jnp.int32
    with torch.no_grad():
        out = hf(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(np.array(pos), dtype=torch.long),
            output_router_logits=True,
        )
    ref = torch.topk(out.router_logits[-1], 2, dim=-1).indices.numpy().reshape(3, LENGTH, 2)
    real = np.asarray(mask) == 1
    np.testing.assert_array_equal(np.asarray(chosen)[real], ref[real])


# --------------------------------------------------------------------------- #
def _hf_routed(hf, sequences, mask, start: int, k: int) -> np.ndarray:
    """transformers' router choice (`output_router_logits=True`, the top k of
    each MoE layer's logits) at columns `start - 1 ..` of `sequences`, the
    positions whose logits chose the generated tokens: `[B, N, layers, k]`."""
    b, total = sequences.shape
    with torch.no_grad():
        out = hf(
            torch.as_tensor(np.array(sequences), dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            output_router_logits=True,
        )
    layers = [torch.topk(r.reshape(b, total, -1), k, dim=-1).indices for r in out.router_logits]
    return torch.stack(layers, dim=2).numpy()[:, start - 1 : total - 1]


@pytest.mark.parity
@pytest.mark.parametrize("name", ["mixtral-window", "qwen2_moe-dense-layer", "qwen3_moe"])
def test_routed_experts_equal_transformers_router_top_k(name, checkpoints):
    """`output_routed_experts`: each generated token's `[MoE layers, k]` experts
    equal transformers' router top-k at the position that chose it, on a
    left-padded batch (the window layers' ring cache included). On Qwen3-MoE
    (the path is the same for every family): asking for them changes no token,
    and stream and the engine return the same ones."""
    hf, _, lm = checkpoints(name)
    ids, mask = _batch(seed=4)
    n, k = 6, 2
    out = jd.generate(
        lm, ids, mask, max_new_tokens=n, eos_token_id=None, output_routed_experts=True
    )
    routed = np.asarray(out.routed_experts)
    layers = len(hf(torch.zeros((1, 1), dtype=torch.long), output_router_logits=True).router_logits)
    assert routed.shape == (len(PADS), n, layers, k) and routed.dtype == np.int32
    full = np.concatenate([mask, np.ones((len(PADS), n), mask.dtype)], axis=1)
    ref = _hf_routed(hf, np.asarray(out.sequences), full, LENGTH, k)
    np.testing.assert_array_equal(routed, ref)
    assert len(np.unique(routed)) > k, "routing never varied: the test lost its point"
    if name != "qwen3_moe":
        return  # the routing path is one for every family: one checks the rest
    # Asking for the experts changes no token (the prefill's last-position logits).
    plain = jd.generate(lm, ids, mask, max_new_tokens=n, eos_token_id=None)
    np.testing.assert_array_equal(out.sequences, plain.sequences)
    # EOS off as in `generate` above: a random model may emit the config's EOS.
    steps = list(
        jd.stream(lm, ids, mask, max_new_tokens=n, eos_token_id=None, output_routed_experts=True)
    )
    np.testing.assert_array_equal(np.stack([s.routed_experts for s in steps], axis=1), routed)
    from jaxdecode.serving import generate_many

    prompts = [ids[i, p:] for i, p in enumerate(PADS)]
    results = generate_many(
        lm, prompts, None, slots=2, max_new_tokens=n, eos_token_id=None, output_routed_experts=True
    )
    for r in results:  # a prompt's experts do not depend on the rows around it
        np.testing.assert_array_equal(r.routed_experts, routed[r.index])


def test_routed_experts_after_a_row_finishes_and_refusals(checkpoints, tmp_path):
    """A finished row records -1; beam search, speculative decoding and a dense
    model refuse the option, naming it, before tracing."""
    _, _, lm = checkpoints("qwen3_moe")
    ids, mask = _batch(seed=4)
    free = jd.generate(lm, ids, mask, max_new_tokens=6, eos_token_id=None)
    eos = int(np.asarray(free.sequences)[0, LENGTH + 1])
    out = jd.generate(lm, ids, mask, max_new_tokens=6, eos_token_id=eos, output_routed_experts=True)
    routed, lengths = np.asarray(out.routed_experts), np.asarray(out.lengths)
    assert lengths[0] == 2
    for row, n in enumerate(lengths):
        assert (routed[row, :n] >= 0).all() and (routed[row, n:] == -1).all()
    with pytest.raises(jd.ConfigError, match="output_routed_experts.*num_beams"):
        jd.generate(lm, ids, mask, num_beams=2, output_routed_experts=True)
    with pytest.raises(ValueError, match="output_routed_experts.*speculative"):
        jd.generate(lm, ids, mask, prompt_lookup_num_tokens=2, output_routed_experts=True)
    make_llama_model(vocab_size=V, num_hidden_layers=1).save_pretrained(tmp_path)
    dense = jd.from_pretrained(str(tmp_path))
    for call in (
        lambda: jd.generate(dense, ids, mask, output_routed_experts=True),
        lambda: jd.stream(dense, ids, mask, output_routed_experts=True),
        lambda: jd.Engine(dense, slots=2, max_len=32, config=dense.generation_config.replace(
            output_routed_experts=True)),
    ):  # fmt: skip
        with pytest.raises(ValueError, match="output_routed_experts=True needs a mixture-of"):
            call()
