"""Gemma 2, Gemma 3 (text) and Phi-3 on the skeleton, against transformers.

Tiny random checkpoints (`tests/support/hf_models.make_llama_model`: eager attention,
wide weights) saved with `save_pretrained` and loaded with `jd.from_pretrained`:
logits of a full pass and of prefill + one-token cache steps within 1e-4 of
transformers on left-padded batches whose prompts are longer than the sliding
window, greedy and beam search token for token with transformers' `generate`,
`save_pretrained` round trips, sharding specs, and refused config values. Each
case's distinguishing fields are checked to move transformers' logits far
beyond the tolerance, so a field ignored here would fail the parity tests.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P
from support.hf_models import (
    LLAMA_CLASSES,
    hf_logits,
    hf_step_logits,
    left_padded_batch,
    make_llama_model,
)

import jaxdecode as jd
from jaxdecode.models.gemma2 import Gemma2Config
from jaxdecode.models.gemma3 import Gemma3TextConfig
from jaxdecode.models.phi3 import Phi3Config
from jaxdecode.models.transformer import transformer_decoder
from jaxdecode.sharding import MODEL

ATOL = 1e-4
V = 96
LENGTH, PREFILL = 10, 4
PADS = [0, 3, 6]
WINDOW = 4  # < LENGTH - PADS[0]: every row's prompt outruns the window

LONGROPE = dict(
    rope_type="longrope",
    short_factor=[1.0, 1.5],
    long_factor=[2.0, 5.0],
)

# (model_type, config overrides on hf_models.LLAMA_TINY)
CASES: dict[str, tuple[str, dict]] = {
    "gemma2": (
        "gemma2",
        dict(
            num_hidden_layers=3,
            sliding_window=WINDOW,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
        ),
    ),
    "gemma2-mqa-untied": (
        "gemma2",
        dict(
            num_key_value_heads=1,
            sliding_window=WINDOW,
            tie_word_embeddings=False,
            attention_bias=True,
            hidden_activation="gelu_pytorch_tanh",
        ),
    ),
    "gemma3": (
        "gemma3_text",
        dict(
            num_hidden_layers=3,
            sliding_window=WINDOW,
            sliding_window_pattern=2,
            query_pre_attn_scalar=16,
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=50.0),
            },
        ),
    ),
    "gemma3-softcap-layer-types": (
        "gemma3_text",
        dict(
            layer_types=["full_attention", "sliding_attention"],
            sliding_window=WINDOW,
            final_logit_softcapping=4.0,
        ),
    ),
    "phi3-partial": ("phi3", dict(partial_rotary_factor=0.5)),
    "phi3-longrope-window": (
        "phi3",
        dict(
            partial_rotary_factor=0.5,
            rope_scaling=LONGROPE,
            original_max_position_embeddings=6,
            max_position_embeddings=24,
            sliding_window=WINDOW,
        ),
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, its directory, jaxdecode CausalLM), built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model_type, overrides = CASES[name]
            hf = make_llama_model(model_type, seed=10 + len(cache), **overrides)
            directory = str(tmp_path_factory.mktemp(name))
            hf.save_pretrained(directory)
            cache[name] = (hf, directory, jd.from_pretrained(directory))
        return cache[name]

    return get


def _fresh(hf, directory: str):
    """The checkpoint reloaded (LongRoPE keeps frequencies on the rotary module)."""
    return type(hf).from_pretrained(directory, attn_implementation="eager").eval()


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


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_full_forward_matches_transformers(name, checkpoints):
    hf, directory, lm = checkpoints(name)
    ids, mask = _batch()
    ref = hf_logits(_fresh(hf, directory), ids, mask)
    assert _max_real_diff(lm.logits(ids, mask), ref, mask) <= ATOL


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_prefill_then_steps_match_transformers(name, checkpoints):
    hf, directory, lm = checkpoints(name)
    ids, mask = _batch(seed=1)
    ref = hf_step_logits(_fresh(hf, directory), ids, mask, PREFILL)
    assert _max_real_diff(_prefill_then_steps(lm, ids, mask, PREFILL), ref, mask) <= ATOL


# Field -> the value it is compared against: each changes transformers' logits
# far beyond ATOL (full pass and cached steps), so ignoring it fails the tests above.
_SENSITIVITY = {
    "gemma2": [
        dict(attn_logit_softcapping=None),
        dict(final_logit_softcapping=None),
        dict(query_pre_attn_scalar=8),
        dict(sliding_window=64),
    ],
    "gemma3": [
        dict(sliding_window_pattern=3),
        dict(
            rope_parameters={
                "full_attention": dict(rope_type="default", rope_theta=1000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=50.0),
            }
        ),
        dict(
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=1000.0),
            }
        ),
    ],
    "gemma3-softcap-layer-types": [dict(final_logit_softcapping=None)],
    "phi3-partial": [dict(partial_rotary_factor=1.0)],
    "phi3-longrope-window": [
        dict(rope_scaling={**LONGROPE, "long_factor": LONGROPE["short_factor"]}),
        dict(sliding_window=None),
    ],
}


def test_case_fields_change_transformers_logits(checkpoints):
    ids, mask = _batch()
    for name, others in _SENSITIVITY.items():
        hf, _, _ = checkpoints(name)
        model_type, overrides = CASES[name]
        for other in others:
            twin = make_llama_model(model_type, **{**overrides, **other})
            twin.load_state_dict(hf.state_dict())
            for ref in (hf_logits, lambda m, i, k: hf_step_logits(m, i, k, PREFILL)):
                diff = _max_real_diff(ref(hf, ids, mask), ref(twin, ids, mask), mask)
                assert diff > 10 * ATOL, (name, other, diff)


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
@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3-longrope-window"])
def test_greedy_and_beam_match_generate(name, checkpoints):
    """Greedy and beam search on the sliding layers' smallest ring (`_ring`: the
    prompts and steps wrap it many times; a wider ring is the same program with
    another size), token for token with transformers' `generate`."""
    hf, directory, lm = checkpoints(name)
    lm = _ring(lm)
    ids, mask = _batch(seed=2)
    ids = ids.astype(np.int64)
    free = _generate_hf(_fresh(hf, directory), ids, mask, eos=V + 1)
    gen = free.sequences.numpy()[:, LENGTH:]
    eos = int(np.bincount(gen[:, 2:-2].ravel(), minlength=V).argmax())
    for options in (
        dict(num_beams=1),
        dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
    ):
        h = _generate_hf(_fresh(hf, directory), ids, mask, eos, **options)
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
@pytest.mark.parametrize("name", ["gemma2-mqa-untied", "gemma3", "phi3-longrope-window"])
def test_save_pretrained_round_trip(name, checkpoints, tmp_path):
    hf, _, lm = checkpoints(name)
    lm.save_pretrained(str(tmp_path))
    model_cls = getattr(transformers, LLAMA_CLASSES[CASES[name][0]][1])
    again_hf = model_cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(again_hf) is type(hf)
    for key, tensor in hf.state_dict().items():
        torch.testing.assert_close(again_hf.state_dict()[key], tensor, rtol=0, atol=0)
    ids, mask = _batch()
    np.testing.assert_array_equal(hf_logits(again_hf, ids, mask), hf_logits(hf, ids, mask))
    again = jd.from_pretrained(tmp_path)
    assert again.config == lm.config
    np.testing.assert_array_equal(
        np.asarray(again.logits(ids, mask)), np.asarray(lm.logits(ids, mask))
    )


@pytest.mark.parametrize(
    ("name", "module", "spec"),
    [
        ("phi3-partial", ("self_attn", "qkv_proj"), P(MODEL, None)),
        ("phi3-partial", ("mlp", "gate_up_proj"), P(MODEL, None)),
        ("gemma3", ("self_attn", "o_proj"), P(None, MODEL)),
        ("gemma3", ("self_attn", "q_norm"), P()),
        ("gemma2", ("pre_feedforward_layernorm",), P()),
    ],
)
def test_sharding_specs(checkpoints, name, module, spec):
    _, _, lm = checkpoints(name)
    specs = lm.decoder.param_specs(lm.params)
    assert jax.tree_util.tree_structure(specs, is_leaf=lambda x: isinstance(x, P)) == (
        jax.tree_util.tree_structure(lm.params)
    )
    node = specs["layers_1"]
    for key in module:
        node = node[key]
    assert node["weight"] == spec


# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        ("gemma2", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        ("gemma2", dict(layer_types=["full_attention"] * 2 + ["chunked_attention"]), "chunked"),
        ("gemma2", dict(sliding_window=None), "sliding_window"),
        ("gemma2", dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
        ("gemma3", dict(rope_parameters=dict(rope_type="default", rope_theta=1.0)), "layer type"),
        (
            "gemma3",
            dict(
                rope_parameters={
                    "full_attention": dict(rope_type="longrope", rope_theta=1.0),
                    "sliding_attention": dict(rope_type="default", rope_theta=1.0),
                }
            ),
            "rope_type",
        ),
        ("gemma3", dict(attn_logit_softcapping=3.0), "attn_logit_softcapping"),
        ("phi3-partial", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope_type"),
        (
            "phi3-longrope-window",
            dict(rope_scaling={**LONGROPE, "long_factor": [1.0]}),
            "long_factor",
        ),
        (
            "phi3-partial",
            dict(
                rope_parameters=dict(
                    rope_type="default", rope_theta=1e4, partial_rotary_factor=0.375
                )
            ),
            "partial_rotary_factor",
        ),
        ("phi3-partial", dict(quantization_config={"quant_method": "gptq"}), "quantization"),
    ],
)
def test_refused_config_values(checkpoints, tmp_path, name, change, match):
    _, directory, _ = checkpoints(name)
    with open(os.path.join(directory, "config.json")) as f:
        data = json.load(f)
    for key in change:
        if key == "rope_scaling":
            data.pop("rope_parameters", None)
    data.update(change)
    for file in os.listdir(directory):
        if file != "config.json":
            os.link(os.path.join(directory, file), tmp_path / file)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        jd.from_pretrained(tmp_path)


def test_defaults_and_legacy_keys_read_as_transformers():
    """Omitted keys take transformers' defaults; Gemma 3's legacy rope keys
    (`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`)
    and Phi-3's legacy "su" rope type read as transformers 5 reads them."""
    for ours, ref in (
        (Gemma2Config.from_hf({"model_type": "gemma2"}), transformers.Gemma2Config()),
        (Gemma3TextConfig.from_hf({"model_type": "gemma3_text"}), transformers.Gemma3TextConfig()),
        (Phi3Config.from_hf({"model_type": "phi3"}), transformers.Phi3Config()),
    ):
        for field in ours.to_hf():
            if field in ("architectures", "rope_parameters", "layer_types", "model_type"):
                continue
            if not hasattr(ref, field):  # Phi3Config derives head_dim where it is used
                assert field == "head_dim" and ours.head_dim == ref.hidden_size // 32
                continue
            assert getattr(ours, field) == getattr(ref, field), (type(ours), field)
    legacy = dict(
        num_hidden_layers=4,
        rope_theta=100.0,
        rope_local_base_freq=50.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        sliding_window_pattern=2,
    )
    ours = Gemma3TextConfig.from_hf({"model_type": "gemma3_text", **legacy})
    ref = transformers.Gemma3TextConfig(**legacy)
    assert ours.to_hf()["rope_parameters"] == ref.rope_parameters
    assert list(ours.layer_types) == ref.layer_types
    su = dict(
        hidden_size=32,
        num_attention_heads=4,
        rope_scaling=dict(type="su", short_factor=[1.0] * 2, long_factor=[2.0] * 2),
        partial_rotary_factor=0.5,
    )
    ref_rope = {
        k: v for k, v in transformers.Phi3Config(**su).rope_parameters.items() if k != "type"
    }
    assert Phi3Config.from_hf({"model_type": "phi3", **su}).rope == {
        **ref_rope,
        "short_factor": (1.0, 1.0),
        "long_factor": (2.0, 2.0),
    }


def test_reloaded_decoders_are_equal_and_lower_for_accelerators(checkpoints):
    """A reload is the same static decoder (nothing recompiles); the skeleton's
    program (soft-caps, per-layer ropes, LongRoPE's in-program choice) lowers for
    TPU and GPU."""
    ids, mask = _batch()
    pos = jd.positions_from_mask(mask)
    for name in ("gemma2", "gemma3", "phi3-longrope-window"):
        _, directory, lm = checkpoints(name)
        assert jd.from_pretrained(directory).decoder == lm.decoder
        cache = lm.decoder.init_cache(len(PADS), LENGTH + 2, None)
        exported = jax.export.export(jax.jit(lm.decoder.apply), platforms=("tpu", "cuda"))(
            lm.params, ids, pos, cache, mask
        )
        assert exported.platforms == ("tpu", "cuda")


# --------------------------------------------------------------------------- #
# Sliding layers in a window-sized ring (`RingCache`). With ring_slack=1 a ring
# holds window + 1 = 5 slots: the prompts and the steps wrap it many times.
def _ring(lm: jd.CausalLM, **options) -> jd.CausalLM:
    return lm.replace(decoder=transformer_decoder(lm.config.transformer(), ring_slack=1, **options))


@pytest.mark.parity
@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3-longrope-window"])
def test_window_sized_ring_matches_transformers(name, checkpoints):
    hf, directory, lm = checkpoints(name)
    ring_lm = _ring(lm)
    full, ring = ring_lm.decoder.init_cache(len(PADS), 1000, None)
    sliding = lm.config.transformer().layer_types.count("sliding_attention")
    assert ring.k.shape == (sliding, len(PADS), 2, WINDOW + 1, 8)  # not 1000 slots
    assert full.k.shape[0] == lm.config.num_hidden_layers - sliding
    ids, mask = _batch(seed=1)
    # a prefill shorter and one longer than the ring, the latter also blocked
    for model, prefill in ((ring_lm, PREFILL), (ring_lm, 8), (_ring(lm, attention_block=3), 8)):
        ref = hf_step_logits(_fresh(hf, directory), ids, mask, prefill)
        got = _prefill_then_steps(model, ids, mask, prefill)
        assert _max_real_diff(got, ref, mask) <= ATOL, (prefill, model.decoder.name)
    # Greedy and beam search on this ring: test_greedy_and_beam_match_generate.


def test_ring_under_speculation_and_the_rewind_bound(checkpoints):
    """Prompt-lookup speculation rewinds the ring past rejected drafts and still
    equals plain greedy decoding; a draft longer than the ring's slack is refused
    by name."""
    _, _, lm = checkpoints("gemma2")
    ids, mask = _batch(seed=3)
    ids = np.concatenate([ids, ids[:, -5:], ids[:, -5:]], axis=1)  # something to look up
    mask = np.concatenate([mask, np.ones_like(mask[:, :10])], axis=1)
    options = dict(do_sample=False, max_new_tokens=NEW, pad_token_id=PAD)
    ring_lm = lm.replace(decoder=transformer_decoder(lm.config.transformer(), ring_slack=4))
    plain = jd.generate(ring_lm, ids, mask, **options)
    spec = jd.generate(ring_lm, ids, mask, prompt_lookup_num_tokens=3, **options)
    np.testing.assert_array_equal(np.asarray(spec.sequences), np.asarray(plain.sequences))
    with pytest.raises(ValueError, match="slack=4"):
        jd.generate(ring_lm, ids, mask, prompt_lookup_num_tokens=6, **options)


def test_engine_moves_ring_rows():
    """The engine prefills into a narrower cache (a smaller ring) and puts rows
    into its slots, compacts and refills them: every row equals the same prompt
    decoded alone by `generate` on a full-length ring."""
    config = Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=WINDOW,
        query_pre_attn_scalar=8,
    )
    family = jd.models.registry.lookup("gemma2")
    params = family.init_params(config, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: x * 20 if x.ndim == 2 else x, params)
    ring = jd.CausalLM(
        params=params,
        decoder=transformer_decoder(config.transformer(), ring_slack=8),
        config=config,
    )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, V, int(rng.integers(2, 20))).tolist() for _ in range(7)]
    engine = jd.Engine(  # the dense slots: pages hold every token, not rings
        ring, slots=3, max_len=40, steps_per_call=2, prompt_buckets=[8, 24],
        prefill_rows=2, compact_tail=True, page_size=None,
    )  # fmt: skip
    options = [{"do_sample": False, "max_new_tokens": 4 + i % 5} for i in range(7)]
    engine.submit(prompts, options)
    got = {r.index: r.tokens.tolist() for r in engine}
    for i, prompt in enumerate(prompts):
        alone = jd.generate(ring, np.asarray([prompt]), eos_token_id=None, **options[i]).sequences[
            0, len(prompt) :
        ]
        assert got[i] == np.asarray(alone).tolist()[: len(got[i])], i


def test_put_rows_of_a_smaller_ring(checkpoints):
    """Rows prefilled into a narrower cache (a ring of 10 positions) and put into
    a wider one (12) decode exactly as rows prefilled there, through 8 steps that
    wrap the wider ring."""
    _, _, lm = checkpoints("gemma2")
    decoder = transformer_decoder(lm.config.transformer(), ring_slack=8)
    apply = jax.jit(decoder.apply)
    ids, mask = _batch(seed=4)
    pos = jd.positions_from_mask(mask)
    _, small = apply(lm.params, ids, pos, decoder.init_cache(3, LENGTH, None), mask)
    assert small[1].size == LENGTH
    wide = jd.put_rows(decoder.init_cache(4, 30, None), jnp.asarray([2, 0, 3]), small)
    assert wide[1].size == WINDOW + 8
    _, alone = apply(lm.params, ids, pos, decoder.init_cache(3, 30, None), mask)
    steps = np.random.default_rng(5).integers(0, V, (8, 3))
    last = np.asarray(pos)[:, -1]
    for k, step in enumerate(steps):
        one = jnp.ones((3, 1), jnp.int32)
        ref, alone = apply(lm.params, step[:, None], last[:, None] + 1 + k, alone, one)
        rows = np.asarray([1, 0, 0, 2])  # wide row r holds alone row rows[r]; row 1 is empty
        got, wide = apply(
            lm.params,
            step[rows][:, None],
            (last[rows] + 1 + k)[:, None],
            wide,
            jnp.ones((4, 1), jnp.int32),
        )
        np.testing.assert_allclose(np.asarray(got)[[2, 0, 3]], np.asarray(ref), rtol=0, atol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("name", "targets"),
    [("gemma2", ["q_proj", "v_proj", "down_proj"]), ("phi3-partial", ["qkv_proj", "gate_up_proj"])],
)
def test_lora_adapter_matches_peft(checkpoints, tmp_path, name, targets):
    """A PEFT LoRA adapter loads onto a skeleton family (fused projections
    included) with peft's logits."""
    peft = pytest.importorskip("peft")
    hf, directory, _ = checkpoints(name)
    torch.manual_seed(1)
    options = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    peft_model = peft.get_peft_model(_fresh(hf, directory), peft.LoraConfig(**options)).eval()
    peft_model.save_pretrained(str(tmp_path))
    lm = jd.from_pretrained(directory, adapter=str(tmp_path))
    ids, mask = _batch()
    ref = hf_logits(peft_model, ids, mask)
    assert _max_real_diff(lm.logits(ids, mask), ref, mask) <= ATOL
    assert _max_real_diff(jd.from_pretrained(directory).logits(ids, mask), ref, mask) > 0.1


def test_ring_model_on_a_mesh(checkpoints):
    """`generate(mesh=...)` places the (KVCache, RingCache) pair by its specs and
    decodes the same tokens."""
    _, _, lm = checkpoints("gemma3")
    ring_lm = _ring(lm)
    ids, mask = _batch(seed=6)
    options = dict(do_sample=False, max_new_tokens=6, pad_token_id=PAD)
    specs = jd.cache_specs(ring_lm.decoder.init_cache(3, 20, None), jd.make_mesh(1, 1))
    assert isinstance(specs[1], jd.RingCache) and specs[1].slot == P("data", None)
    plain = jd.generate(ring_lm, ids, mask, **options)
    meshed = jd.generate(ring_lm, ids, mask, mesh=jd.make_mesh(1, 1), **options)
    np.testing.assert_array_equal(np.asarray(meshed.sequences), np.asarray(plain.sequences))
