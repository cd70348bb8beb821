"""LoRA adapters (`from_pretrained(base, adapter=...)`) against peft, live.

A tiny Llama and a tiny GPT-2 with random weights get PEFT adapters with
`init_lora_weights=False` (B nonzero, so the update shows in the logits); the
adapter is applied unmerged and must give peft's logits and greedy tokens,
differentiate, decode inside a user's jit with the values passed in, merge,
shard, and refuse what it cannot honour, by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support import WORKERS, count_compiles
from support.hf_models import hf_logits, left_padded_batch, make_hf_model, make_llama_model

import jaxdecode as jd
from jaxdecode.models import lora

peft = pytest.importorskip("peft")

ATOL = 1e-4
V = 96
PADS = [0, 2, 5]
LENGTH = 9


def _adapter(model, directory, **options):
    """`get_peft_model(model, LoraConfig(**options))` saved to `directory`."""
    options = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **options}
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**options)).eval()
    peft_model.save_pretrained(directory)
    return peft_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(peft model, base dir, adapter dir) for an adapter on q/v/down."""
    base = str(tmp_path_factory.mktemp("llama"))
    hf = make_llama_model()
    hf.save_pretrained(base)
    adapter = str(tmp_path_factory.mktemp("llama-lora"))
    peft_model = _adapter(hf, adapter, target_modules=["q_proj", "v_proj", "down_proj"])
    return peft_model, base, adapter


def _batch(seed=0):
    return left_padded_batch(np.random.default_rng(seed), V, LENGTH, PADS)


def _max_real_diff(ours, ref, mask) -> float:
    return float(np.abs(np.asarray(ours) - ref)[np.asarray(mask) == 1].max())


@pytest.mark.parity
def test_llama_logits_match_peft(llama):
    peft_model, base, adapter = llama
    lm = jd.from_pretrained(base, adapter=adapter)
    ids, mask = _batch()
    ref = hf_logits(peft_model, ids, mask)
    assert _max_real_diff(lm.logits(ids, mask), ref, mask) < ATOL
    # The adapter matters: the base model is far from peft's logits.
    assert _max_real_diff(jd.from_pretrained(base).logits(ids, mask), ref, mask) > 0.1
    q = lm.params["lora"]["layers_1"]["self_attn"]["q_proj"]
    chex.assert_shape([q.a, q.b], [(4, 32), (32, 4)])
    assert q.scale == 2.0  # lora_alpha / r


@pytest.mark.parity
def test_llama_greedy_matches_peft_generate(llama):
    peft_model, base, adapter = llama
    lm = jd.from_pretrained(base, adapter=adapter)
    ids, mask = _batch(seed=3)
    with torch.no_grad():
        ref = peft_model.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=0,
            eos_token_id=2,
        ).numpy()
    options = dict(do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=2)
    out = np.asarray(jd.generate(lm, ids, mask, **options).sequences)
    np.testing.assert_array_equal(out[:, : ref.shape[1]], ref)
    assert np.all(out[:, ref.shape[1] :] == 0)
    base_out = np.asarray(jd.generate(jd.from_pretrained(base), ids, mask, **options).sequences)
    assert not np.array_equal(base_out, out), "the adapter changed nothing"


@pytest.mark.parity
@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules="all-linear", use_rslora=True, r=8, lora_alpha=4),
        dict(
            target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
            rank_pattern={"o_proj": 2},
            alpha_pattern={"up_proj": 32},
        ),
    ],
    ids=["rslora-all-linear", "rank-alpha-patterns"],
)
def test_llama_variants_match_peft(options, tmp_path):
    hf = make_llama_model(seed=5)
    hf.save_pretrained(tmp_path / "base")
    peft_model = _adapter(hf, tmp_path / "lora", **options)
    lm = jd.from_pretrained(tmp_path / "base", adapter=tmp_path / "lora")
    ids, mask = _batch(seed=1)
    assert _max_real_diff(lm.logits(ids, mask), hf_logits(peft_model, ids, mask), mask) < ATOL


@pytest.mark.parity
def test_gpt2_conv1d_adapter_matches_peft(tmp_path):
    # GPT-2's Conv1D projections: peft sets fan_in_fan_out; A and B are stored
    # as for Linear, and c_proj names both the attention's and the MLP's output.
    hf = make_hf_model(seed=2)
    hf.save_pretrained(tmp_path / "base")
    peft_model = _adapter(
        hf, tmp_path / "lora", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    with open(tmp_path / "lora" / "adapter_config.json") as f:
        assert json.load(f)["fan_in_fan_out"] is True
    lm = jd.from_pretrained(tmp_path / "base", adapter=tmp_path / "lora")
    assert set(lm.params["lora"]["h_0"]["mlp"]) == {"c_fc", "c_proj"}
    ids, mask = _batch(seed=2)
    ref = hf_logits(peft_model, ids, mask)
    assert _max_real_diff(lm.logits(ids, mask), ref, mask) < ATOL
    merged = lm.merge_and_unload()
    assert _max_real_diff(merged.logits(ids, mask), ref, mask) < ATOL
    # One row: GPT-2's decoder adds a transposed LM head beside the adapter (prepare).
    row = ids[:1, PADS[0] :]
    with torch.no_grad():
        want = peft_model.generate(
            input_ids=torch.as_tensor(row, dtype=torch.long),
            do_sample=False,
            max_new_tokens=6,
            eos_token_id=V + 1,
            pad_token_id=0,
        ).numpy()
    got = jd.generate(lm, row, do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(got.sequences), want)


@pytest.mark.parity
def test_merge_and_unload_matches_peft(llama, tmp_path):
    peft_model, base, adapter = llama
    lm = jd.from_pretrained(base, adapter=adapter)
    merged = lm.merge_and_unload()
    assert "lora" not in merged.params
    ids, mask = _batch(seed=4)
    ref = hf_logits(peft_model, ids, mask)
    assert _max_real_diff(merged.logits(ids, mask), ref, mask) < ATOL
    # The merged weight is peft's merged weight.
    hf_merged = peft.PeftModel.from_pretrained(
        type(peft_model.get_base_model()).from_pretrained(base), adapter
    ).merge_and_unload()
    q = hf_merged.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    ours = np.asarray(merged.params["layers_0"]["self_attn"]["q_proj"]["weight"])
    np.testing.assert_allclose(ours, q, rtol=0, atol=1e-6)
    # merged models save; unmerged ones are refused, naming the fix.
    with pytest.raises(ValueError, match="merge_and_unload"):
        lm.save_pretrained(str(tmp_path / "unmerged"))
    merged.save_pretrained(str(tmp_path / "merged"))
    assert (
        _max_real_diff(jd.from_pretrained(tmp_path / "merged").logits(ids, mask), ref, mask) < ATOL
    )


def test_grad_through_score_wrt_lora_params(llama):
    _, base, adapter = llama
    lm = jd.from_pretrained(base, adapter=adapter)
    ids, mask = _batch(seed=5)

    def loss(adapter_params):
        model = lm.replace(params={**lm.params, "lora": adapter_params})
        out = jd.score(model, ids, prompt_length=6, attention_mask=mask)
        return -jnp.sum(jnp.where(out.mask, out.logprobs, 0.0))

    grads = jax.jit(jax.grad(loss))(lm.params["lora"])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        assert float(jnp.abs(g).max()) > 0, f"zero gradient at {jax.tree_util.keystr(path)}"
    # The gradient is that of the loss: a small step along it lowers the loss.
    stepped = jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, lm.params["lora"], grads)
    assert float(loss(stepped)) < float(loss(lm.params["lora"]))


def test_decode_inside_jit_with_current_adapter_values(llama):
    _, base, adapter = llama
    lm = jd.from_pretrained(base, adapter=adapter)
    ids, mask = _batch(seed=6)

    @jax.jit
    def sample(adapter_params):
        model = lm.replace(params={**lm.params, "lora": adapter_params})
        return jd.generate(model, ids, mask, do_sample=False, max_new_tokens=6).sequences

    first = sample(lm.params["lora"])
    np.testing.assert_array_equal(
        first, jd.generate(lm, ids, mask, do_sample=False, max_new_tokens=6).sequences
    )
    # New adapter values (B times 3): other tokens, read from the argument, no recompile.
    tripled = jax.tree_util.tree_map(
        lambda w: w.replace(b=3.0 * w.b), lm.params["lora"], is_leaf=lambda x: hasattr(x, "b")
    )
    with count_compiles() as compiles:
        second = sample(tripled)
    assert compiles.count == 0
    assert not np.array_equal(first, second)
    eager = jd.generate(
        lm.replace(params={**lm.params, "lora": tripled}),
        ids,
        mask,
        do_sample=False,
        max_new_tokens=6,
    ).sequences
    np.testing.assert_array_equal(second, eager)


def test_program_lowers_for_tpu_and_cuda(llama):
    _, base, adapter = llama
    lm = jd.from_pretrained(base, adapter=adapter)
    ids, mask = _batch()

    def sample(params):
        return jd.generate(lm.replace(params=params), ids, mask, max_new_tokens=3).sequences

    exported = jax.export.export(jax.jit(sample), platforms=("tpu", "cuda"))(lm.params)
    assert exported.platforms == ("tpu", "cuda")


def test_merge_inside_jit_equals_eager(llama):
    _, base, adapter = llama
    lm = jd.from_pretrained(base, adapter=adapter)
    eager = lora.merge(lm.params)
    jitted = jax.jit(lora.merge)(lm.params)
    chex.assert_trees_all_close(eager, jitted, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(use_dora=True), "use_dora=True"),
        (dict(lora_bias=True), "lora_bias=True"),
        (dict(bias="all"), "bias='all'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        (dict(peft_type="IA3"), "peft_type 'IA3'"),
        (dict(r=0), "r must be a positive integer"),
    ],
)
def test_refused_options_are_named(llama, tmp_path, change, match):
    _, base, adapter = llama
    directory = tmp_path / "changed"
    directory.mkdir()
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    with open(directory / "adapter_config.json", "w") as f:
        json.dump({**config, **change}, f)
    os.symlink(
        os.path.join(adapter, "adapter_model.safetensors"), directory / "adapter_model.safetensors"
    )
    with pytest.raises(ValueError, match=match):
        jd.from_pretrained(base, adapter=directory)


def test_refused_targets_and_files(tmp_path):
    hf = make_llama_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "base")
    _adapter(hf, tmp_path / "embed", target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="embedding"):
        jd.from_pretrained(tmp_path / "base", adapter=tmp_path / "embed")
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        jd.from_pretrained(tmp_path / "base", adapter=tmp_path / "base")
    with pytest.raises(ValueError, match="is not a directory"):
        jd.from_pretrained(tmp_path / "base", adapter=tmp_path / "base" / "config.json")


def test_adapter_for_another_shape_is_refused(llama, tmp_path):
    _, _, adapter = llama
    other = make_llama_model(hidden_size=16, head_dim=4)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"down_proj has lora_A \(4, 48\) .* \[out=16, in=48\]"):
        jd.from_pretrained(tmp_path / "other", adapter=adapter)


def test_adapter_on_a_mesh_equals_one_device():
    # 4 host-platform devices in a subprocess (XLA_FLAGS must precede JAX's start).
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    worker = os.path.join(WORKERS, "lora_mesh_worker.py")
    res = subprocess.run(
        [sys.executable, worker], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    assert out["base"] != out["single"], "the adapter changed no token"
    for mesh, seqs in out["meshes"].items():
        assert seqs == out["single"], mesh
    # Stacked adapters with a per-row choice: the mesh gives one device's tokens,
    # row 0 the single adapter's, row 1 the base model's.
    one_device, on_mesh = out["stacked"]
    assert on_mesh == one_device
    assert one_device[0] == out["single"][0] and one_device[1] == out["base"][1]
    # B follows a column-parallel projection's output split, A a row-parallel one's input.
    assert out["specs"] == {
        "q_proj": ["P(None, None)", "P('model', None)"],
        "down_proj": ["P(None, 'model')", "P(None, None)"],
    }


def test_cli_eval_with_adapter(llama, tmp_path, capsys, monkeypatch):
    """`jaxdecode eval --model BASE --adapter DIR`: the adapted model's greedy tokens
    (token-id lines: the tiny checkpoint has no tokenizer); records name the adapter,
    and resuming without it is refused."""
    from jaxdecode.cli import main

    monkeypatch.setenv("JAXDECODE_COMPILATION_CACHE", "off")
    _, base, adapter = llama
    ids, mask = _batch(seed=7)
    rows = [
        [int(t) for t, m in zip(r, k, strict=True) if m] for r, k in zip(ids, mask, strict=True)
    ]
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": i, "prompt_ids": r}) + "\n" for i, r in enumerate(rows))
    )
    common = ["eval", str(prompts), "-o", str(out), "--model", base, "--quiet"]
    flags = ["--max_new_tokens", "5", "--no-do_sample", "--eos_token_id", str(V - 1)]
    assert main([*common, "--adapter", adapter, *flags]) == 0, capsys.readouterr().err
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    lm = jd.from_pretrained(base, adapter=adapter)
    want = jd.generate(lm, ids, mask, max_new_tokens=5, do_sample=False, eos_token_id=V - 1)
    for i in range(len(rows)):
        tokens = np.asarray(want.sequences)[i, LENGTH : LENGTH + int(want.lengths[i])]
        assert records[i]["outputs"][0]["tokens"] == tokens.tolist()
        assert records[i]["adapter"] == os.path.abspath(adapter)
    capsys.readouterr()
    assert main([*common, *flags]) == 2
    err = capsys.readouterr().err
    assert "made with other options: --adapter" in err, err
    assert main([*common, "--adapter", base, *flags]) == 2
    assert "cannot load --adapter" in capsys.readouterr().err


@pytest.mark.parity
@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(target_modules="all-linear", use_rslora=True, r=8, lora_alpha=4),
        dict(
            target_modules=["k_proj", "o_proj", "up_proj"],
            rank_pattern={"o_proj": 2},
            alpha_pattern={"up_proj": 32},
        ),
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_save_adapter_round_trips_through_peft(options, tmp_path):
    # A trained adapter (here: changed values) written back in PEFT's format:
    # peft loads it and gives our logits; load_adapter reads back the same tree.
    hf = make_llama_model(seed=6)
    hf.save_pretrained(tmp_path / "base")
    _adapter(hf, tmp_path / "lora", **options)
    lm = jd.from_pretrained(tmp_path / "base", adapter=tmp_path / "lora")
    trained = jax.tree_util.tree_map(
        lambda w: w.replace(a=w.a + 0.05, b=-2.0 * w.b),
        lm.params["lora"],
        is_leaf=lambda x: isinstance(x, jd.LoraWeights),
    )
    lm = lm.replace(params={**lm.params, "lora": trained})
    lm.save_adapter(tmp_path / "saved")
    base = type(hf).from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "saved").eval()
    ids, mask = _batch(seed=8)
    assert _max_real_diff(lm.logits(ids, mask), hf_logits(reloaded, ids, mask), mask) < ATOL
    again = jd.from_pretrained(tmp_path / "base", adapter=tmp_path / "saved")
    chex.assert_trees_all_close(again.params["lora"], trained, rtol=0, atol=1e-6)
    assert jax.tree_util.tree_structure(again.params) == jax.tree_util.tree_structure(lm.params)


def test_save_adapter_needs_module_names(llama, tmp_path):
    _, base, adapter = llama
    lm = jd.from_pretrained(base, adapter=adapter)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lm.merge_and_unload().save_adapter(tmp_path / "none")
    q = lm.params["lora"]["layers_0"]["self_attn"]["q_proj"].replace(module=None)
    nameless = {"layers_0": {"self_attn": {"q_proj": q}}}
    with pytest.raises(ValueError, match=r"layers_0.*q_proj.* has no module name"):
        lm.replace(params={**lm.params, "lora": nameless}).save_adapter(tmp_path / "x")


@pytest.mark.parity
@pytest.mark.parametrize(
    "family, targets",
    [
        ("llama", ["q_proj", "v_proj"]),
        ("llama", r".*\.layers\.1\..*_proj"),
        ("llama", "all-linear"),
        ("gpt2", ["c_attn", "c_fc"]),
    ],
    ids=["llama-list", "llama-regex", "llama-all-linear", "gpt2"],
)
def test_add_adapter_targets_what_peft_targets(family, targets, tmp_path):
    # A fresh adapter: the modules PEFT's get_peft_model adapts for the same
    # target_modules, B zero (the base model's logits); trained (here: B set),
    # saved, and loaded by peft with our logits.
    hf = make_llama_model(seed=9) if family == "llama" else make_hf_model(seed=9)
    hf.save_pretrained(tmp_path / "base")
    lm = jd.from_pretrained(tmp_path / "base")
    fresh = lm.add_adapter(targets, r=4, lora_alpha=8, key=jax.random.key(2))
    ids, mask = _batch(seed=9)
    np.testing.assert_array_equal(
        np.asarray(fresh.logits(ids, mask)), np.asarray(lm.logits(ids, mask))
    )
    ours = {
        w.module
        for w in jax.tree_util.tree_leaves(
            fresh.params["lora"], is_leaf=lambda x: isinstance(x, jd.LoraWeights)
        )
    }
    peft_model = _adapter(
        hf, tmp_path / "peft", target_modules=targets, fan_in_fan_out=family == "gpt2"
    )
    theirs = {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        for k in peft.get_peft_model_state_dict(peft_model)
        if k.endswith("lora_A.weight")
    }
    assert ours == theirs
    keys = iter(jax.random.split(jax.random.key(3), 64))
    trained = jax.tree_util.tree_map(
        lambda w: w.replace(b=jax.random.normal(next(keys), w.b.shape)),
        fresh.params["lora"],
        is_leaf=lambda x: isinstance(x, jd.LoraWeights),
    )
    trained_lm = fresh.replace(params={**fresh.params, "lora": trained})
    trained_lm.save_adapter(tmp_path / "saved")
    base = type(hf).from_pretrained(tmp_path / "base").eval()
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "saved").eval()
    ref = hf_logits(reloaded, ids, mask)
    assert _max_real_diff(trained_lm.logits(ids, mask), ref, mask) < ATOL
    assert _max_real_diff(lm.logits(ids, mask), ref, mask) > 0.1


def test_add_adapter_refuses_bad_targets(llama):
    _, base, _ = llama
    lm = jd.from_pretrained(base)
    with pytest.raises(ValueError, match=r"matches no linear projection.*'q_proj'"):
        lm.add_adapter(["c_attn"])
    with pytest.raises(ValueError, match="target_modules must be"):
        lm.add_adapter([])
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        lm.add_adapter(["q_proj"], r=0)


@pytest.fixture(scope="module")
def two_adapters(llama, tmp_path_factory):
    """A second adapter on the same base, other targets, rank and alpha: (peft
    models of adapter 0 and 1, base dir, adapter dirs)."""
    peft0, base, adapter0 = llama
    adapter1 = str(tmp_path_factory.mktemp("llama-lora-2"))
    torch.manual_seed(7)
    peft1 = _adapter(
        make_llama_model(), adapter1, target_modules=["k_proj", "up_proj"], r=6, lora_alpha=3
    )
    return (peft0, peft1), base, (adapter0, adapter1)


@pytest.mark.parity
def test_several_adapters_in_one_batch_match_peft_per_row(two_adapters):
    """vLLM's multi-LoRA: two adapters stacked, each row of one batch with its own
    (or none): each row's greedy tokens equal peft's generate with that row's
    adapter alone (the base model for -1); other adapter_ids compile nothing;
    two sampled sequences per prompt equal that prompt alone."""
    peft_models, base, adapters = two_adapters
    lm = jd.from_pretrained(base).load_adapter(list(adapters))
    q = lm.params["lora"]["layers_1"]["self_attn"]["q_proj"]
    chex.assert_shape([q.a, q.b], [(2, 4, 32), (2, 32, 4)])  # adapter 1 has no q: zeros
    ids, mask = left_padded_batch(np.random.default_rng(4), V, LENGTH, [0, 2, 5, 1])
    options = dict(do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=2)
    choice = [0, 1, -1, 1]
    out = np.asarray(jd.generate(lm, ids, mask, adapter_ids=choice, **options).sequences)
    base_model = make_llama_model()
    for row, which in enumerate(choice):
        ref_model = base_model if which < 0 else peft_models[which]
        with torch.no_grad():
            ref = ref_model.generate(
                input_ids=torch.as_tensor(ids[row : row + 1], dtype=torch.long),
                attention_mask=torch.as_tensor(mask[row : row + 1]),
                **options,
            ).numpy()[0]
        np.testing.assert_array_equal(out[row, : len(ref)], ref, err_msg=f"row {row}")
        assert np.all(out[row, len(ref) :] == 0)
    swapped = np.asarray(jd.generate(lm, ids, mask, adapter_ids=[1, 0, 0, -1], **options).sequences)
    assert not np.array_equal(swapped, out), "the adapter choice changed nothing"
    with count_compiles() as compiles:
        jd.generate(lm, ids, mask, adapter_ids=[-1, -1, 1, 0], **options)
    assert compiles.count == 0

    sampled = dict(do_sample=True, num_return_sequences=2, max_new_tokens=6, pad_token_id=0)
    keys = jax.random.split(jax.random.key(2), 4)
    both = jd.generate(lm, ids, mask, adapter_ids=choice, key=keys, **sampled).sequences
    for row, which in enumerate(choice):
        alone = jd.generate(
            lm, ids[row : row + 1], mask[row : row + 1], adapter_ids=[which],
            key=keys[row : row + 1], **sampled,
        ).sequences  # fmt: skip
        np.testing.assert_array_equal(np.asarray(both)[2 * row : 2 * row + 2], alone)


@pytest.mark.parity
def test_several_adapters_errors_and_export(two_adapters):
    _, base, adapters = two_adapters
    lm = jd.from_pretrained(base).load_adapter(list(adapters))
    ids = np.ones((2, 3), np.int32)
    with pytest.raises(ValueError, match="2 stacked LoRA adapters: pass adapter_ids"):
        jd.generate(lm, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 1\]"):
        jd.generate(lm, ids, max_new_tokens=2, adapter_ids=[0, 2])
    with pytest.raises(ValueError, match="adapter_ids must be 2 integers"):
        jd.generate(lm, ids, max_new_tokens=2, adapter_ids=[0])
    with pytest.raises(ValueError, match="this model has none"):
        jd.generate(jd.from_pretrained(base), ids, max_new_tokens=2, adapter_ids=[0, 0])
    with pytest.raises(ValueError, match="cannot be merged"):
        lm.merge_and_unload()
    from jaxdecode.generation import prepare

    req = prepare(lm, ids, overrides={"max_new_tokens": 3}, adapter_ids=[1, -1])
    program, static, dynamic = req.program()
    jax.export.export(program, platforms=("tpu", "cuda"))(*static, *dynamic)


@pytest.mark.parity
def test_adapters_on_projections_fused_at_load(tmp_path):
    """Llama's q/k/v and gate/up load fused (`qkv_proj`, `gate_up_proj`); an
    adapter on every part (GQA: k and v narrower than q) adds to its slice of
    the fused product, and `lora.merge` folds it into those rows in place (the
    layout kept); both, and `merge_and_unload` (separate layout), equal peft."""
    hf = make_llama_model(seed=4)
    hf.save_pretrained(tmp_path / "base")
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    peft_model = _adapter(hf, tmp_path / "lora", target_modules=targets)
    lm = jd.from_pretrained(tmp_path / "base", adapter=tmp_path / "lora")
    attn = lm.params["layers_0"]["self_attn"]
    assert (
        "qkv_proj" in attn
        and "q_proj" not in attn
        and "gate_up_proj" in lm.params["layers_0"]["mlp"]
    )
    ids, mask = _batch(seed=4)
    ref = hf_logits(peft_model, ids, mask)
    merged = lm.replace(params=lora.merge(lm.params))
    assert "qkv_proj" in merged.params["layers_0"]["self_attn"]
    unloaded = lm.merge_and_unload()
    assert "q_proj" in unloaded.params["layers_0"]["self_attn"]
    for model in (lm, merged, unloaded):
        assert _max_real_diff(model.logits(ids, mask), ref, mask) < ATOL
    assert _max_real_diff(jd.from_pretrained(tmp_path / "base").logits(ids, mask), ref, mask) > 0.1
