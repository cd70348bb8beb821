"""GGUF files of the qwen2, qwen3, gemma2, gemma3 and phi3 architectures.

Each test converts a tiny random transformers checkpoint to GGUF the way
llama.cpp's `convert_hf_to_gguf.py` lays it out (its tensor names, `<arch>.*`
metadata, Gemma's norms stored as `1 + w`, Phi-3's fused tensors and LongRoPE
factor tensors), written with the `gguf` package's `GGUFWriter`; loads it with
`jd.from_pretrained` (the real reading code: `checkpoints.read_gguf`, the
family's `from_gguf`, the byte-level tokenizer) and compares the logits of a
left-padded batch, through a prefill and cached steps, with the transformers
model the file was made from, within 1e-4; the weights come back bitwise
(Gemma's norms within the float32 rounding of `1 + w`).
"""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest
from support.hf_models import hf_step_logits, left_padded_batch, make_llama_model

import jaxdecode as jd

ATOL = 1e-4
V = 96
LENGTH, PREFILL = 10, 4
PADS = [0, 3, 6]

# transformers' per-block names -> llama.cpp's, per architecture.
_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA = {
    **_BLOCK,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_PHI3 = {**_BLOCK, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

WINDOW = 4
LONGROPE = dict(rope_type="longrope", short_factor=[1.0, 1.5], long_factor=[2.0, 5.0])

# name -> (model_type, GGUF architecture, overrides on hf_models.LLAMA_TINY)
CASES = {
    "qwen2": ("qwen2", "qwen2", dict(rope_parameters=dict(rope_type="default", rope_theta=1e5))),
    "qwen3": ("qwen3", "qwen3", dict(tie_word_embeddings=True, attention_bias=True)),
    "gemma2": (
        "gemma2",
        "gemma2",
        dict(
            num_hidden_layers=3,
            sliding_window=WINDOW,
            query_pre_attn_scalar=8,  # head_dim: what llama.cpp uses below 27B
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
        ),
    ),
    "gemma3": (
        "gemma3_text",
        "gemma3",
        dict(
            num_hidden_layers=7,  # llama.cpp's pattern: five sliding, one global, one sliding
            sliding_window=WINDOW,
            query_pre_attn_scalar=8,
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
            },
        ),
    ),
    "phi3": (
        "phi3",
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


def _write_gguf(path: str, hf, arch: str) -> None:
    """`hf` as llama.cpp's converter writes it (float32 tensors)."""
    cfg = hf.config
    writer = gguf.GGUFWriter(path, arch)
    u32 = lambda k, v: writer.add_uint32(f"{arch}.{k}", int(v))
    f32 = lambda k, v: writer.add_float32(f"{arch}.{k}", float(v))
    u32("block_count", cfg.num_hidden_layers)
    u32("context_length", cfg.max_position_embeddings)
    u32("embedding_length", cfg.hidden_size)
    u32("feed_forward_length", cfg.intermediate_size)
    u32("attention.head_count", cfg.num_attention_heads)
    u32("attention.head_count_kv", cfg.num_key_value_heads)
    f32("attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    rope = cfg.rope_parameters
    block = _BLOCK
    if arch in ("gemma2", "gemma3"):
        block = _GEMMA
        u32("attention.key_length", head_dim)
        u32("attention.value_length", head_dim)
        u32("attention.sliding_window", cfg.sliding_window)
        if arch == "gemma2":
            f32("rope.freq_base", rope["rope_theta"])
            f32("attn_logit_softcapping", cfg.attn_logit_softcapping)
            f32("final_logit_softcapping", cfg.final_logit_softcapping)
        else:
            f32("rope.freq_base", rope["full_attention"]["rope_theta"])
            writer.add_string(f"{arch}.rope.scaling.type", "linear")
            f32("rope.scaling.factor", rope["full_attention"]["factor"])
    elif arch == "phi3":
        block = _PHI3
        f32("rope.freq_base", rope["rope_theta"])
        u32("rope.dimension_count", int(rope["partial_rotary_factor"] * head_dim))
        u32("rope.scaling.original_context_length", cfg.original_max_position_embeddings)
        u32("attention.sliding_window", cfg.sliding_window)
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
    else:
        f32("rope.freq_base", rope["rope_theta"])
        u32("attention.key_length", head_dim)
        u32("attention.value_length", head_dim)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(cfg.vocab_size)])
    writer.add_array("tokenizer.ggml.token_type", [1] * cfg.vocab_size)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    for name, tensor in hf.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + np.float32(1.0)
        stem, leaf = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            _, _, i, module = stem.split(".", 3)
            out = f"blk.{i}.{block[module]}.{leaf}"
        else:
            out = f"{_TOP[stem]}.{leaf}"
        writer.add_tensor(out, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (transformers model, jaxdecode CausalLM read from its GGUF file)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model_type, arch, overrides = CASES[name]
            hf = make_llama_model(model_type, seed=20 + len(cache), **overrides)
            path = str(tmp_path_factory.mktemp(name) / f"{name}.gguf")
            _write_gguf(path, hf, arch)
            cache[name] = (hf, jd.from_pretrained(path))
        return cache[name]

    return get


def _max_real_diff(ours, ref, mask) -> float:
    return float(np.abs(np.asarray(ours) - ref)[np.asarray(mask) == 1].max())


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_gguf_weights_and_logits_match_the_checkpoint(name, files):
    hf, lm = files(name)
    assert lm.config.model_type == hf.config.model_type
    state = jd.models.registry.lookup(lm.config.model_type).state_dict_from_params(
        lm.params, lm.config
    )
    theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert set(state) == set(theirs)
    for key, array in state.items():
        if name.startswith("gemma") and key.endswith("norm.weight"):
            # stored as 1 + w in float32: w comes back within its rounding
            np.testing.assert_allclose(array, theirs[key], rtol=0, atol=1.2e-7, err_msg=key)
        else:
            np.testing.assert_array_equal(array, theirs[key], err_msg=key)
    # Logits of every real position, through a prefill and cached steps (with the
    # weights bitwise, a full pass is tests/parity/test_families.py's check).
    ids, mask = left_padded_batch(np.random.default_rng(0), V, LENGTH, PADS)
    apply = jax.jit(lm.decoder.apply)
    cache = lm.decoder.init_cache(len(PADS), LENGTH, None)
    pos = np.asarray(jd.positions_from_mask(mask))
    out = []
    for start, stop in [(0, PREFILL)] + [(t, t + 1) for t in range(PREFILL, LENGTH)]:
        logits, cache = apply(
            lm.params, ids[:, start:stop], pos[:, start:stop], cache, mask[:, start:stop]
        )
        out.append(np.asarray(logits))
    steps = hf_step_logits(hf, ids, mask, PREFILL)
    assert _max_real_diff(np.concatenate(out, axis=1), steps, mask) <= ATOL


def test_gguf_refusals(tmp_path):
    """A phi3 file with one LongRoPE factor tensor, a gemma3 file with a layer
    pattern that is neither an int nor one bool per layer: refused, named."""
    hf = make_llama_model("phi3", seed=1, **CASES["phi3"][2])
    path = str(tmp_path / "phi3.gguf")
    _write_gguf(path, hf, "phi3")
    reader = jd.checkpoints.read_gguf(path)
    tensors = {k: v for k, v in reader.tensors.items() if k != "rope_factors_long.weight"}
    family = jd.models.registry.lookup_gguf("phi3")
    with pytest.raises(ValueError, match="rope_factors"):
        family.from_gguf(reader.metadata, tensors)
    hf = make_llama_model("gemma3_text", seed=1, **CASES["gemma3"][2])
    path = str(tmp_path / "gemma3.gguf")
    _write_gguf(path, hf, "gemma3")
    reader = jd.checkpoints.read_gguf(path)
    metadata = {**reader.metadata, "gemma3.attention.sliding_window_pattern": [True, False]}
    with pytest.raises(ValueError, match="sliding_window_pattern"):
        jd.models.registry.lookup_gguf("gemma3").from_gguf(metadata, reader.tensors)
