"""GGUF files of the qwen2moe, qwen3moe and llama (Mixtral) architectures.

Each test converts a tiny random transformers MoE checkpoint to GGUF the way
llama.cpp's `convert_hf_to_gguf.py` lays it out (stacked `ffn_*_exps` experts,
the router `ffn_gate_inp`, Qwen2-MoE's `ffn_*_shexp` shared expert and its
`[hidden]` gate, Mixtral's permuted Q/K rows, `<arch>.expert_*` metadata),
written with the `gguf` package's `GGUFWriter`; loads it with
`jd.from_pretrained` (the real reading code) and compares the weights (bitwise)
and the logits of a left-padded batch through a prefill and cached steps
(within 1e-4) with the transformers model the file was made from. Routing
follows llama.cpp (renormalised for qwen3moe and Mixtral, not for qwen2moe),
so the checkpoints are made with those values.
"""

from __future__ import annotations

import dataclasses

import gguf
import jax
import numpy as np
import pytest
from support.hf_models import hf_step_logits, left_padded_batch, make_moe_model

import jaxdecode as jd
from jaxdecode.models.llama.from_gguf import unpermute_rotary_rows

ATOL = 1e-4
V = 96
LENGTH, PREFILL = 10, 4
PADS = [0, 3, 6]

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
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
_EXPERT = {
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# name -> (model_type, GGUF architecture, overrides on support.hf_models.MOE_TINY)
CASES = {
    "qwen2moe": (
        "qwen2_moe",
        "qwen2moe",
        dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    ),
    "qwen3moe": (
        "qwen3_moe",
        "qwen3moe",
        dict(num_experts=8, moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[0]),
    ),
    "mixtral": ("mixtral", "llama", dict(num_local_experts=4)),
}


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (the inverse of `unpermute_rotary_rows`)."""
    d = weight.shape[0] // heads
    w = weight.reshape(heads, 2, d // 2, *weight.shape[1:])
    out = np.ascontiguousarray(w.swapaxes(1, 2).reshape(weight.shape))
    assert np.array_equal(unpermute_rotary_rows(out, heads), weight)
    return out


def _write_gguf(path: str, directory: str, hf, arch: str) -> None:
    """The saved checkpoint in `directory` as llama.cpp's converter writes it (float32)."""
    from safetensors.numpy import load_file

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
    u32("attention.key_length", cfg.head_dim)
    u32("attention.value_length", cfg.head_dim)
    f32("attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    f32("rope.freq_base", cfg.rope_parameters["rope_theta"])
    u32("expert_used_count", cfg.num_experts_per_tok)
    if arch == "llama":
        u32("expert_count", cfg.num_local_experts)
    else:
        u32("expert_count", cfg.num_experts)
        u32("expert_feed_forward_length", cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        u32("expert_shared_feed_forward_length", cfg.shared_expert_intermediate_size)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(cfg.vocab_size)])
    writer.add_array("tokenizer.ggml.token_type", [1] * cfg.vocab_size)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, array in load_file(f"{directory}/model.safetensors").items():
        array = array.astype(np.float32)
        stem, leaf = name.rsplit(".", 1)
        if not stem.startswith("model.layers."):
            writer.add_tensor(f"{_TOP[stem]}.{leaf}", array)
            continue
        _, _, i, module = stem.split(".", 3)
        if ".experts." in module:
            _, _, j, proj = module.split(".")
            stacks.setdefault(f"blk.{i}.{_EXPERT[proj]}.{leaf}", {})[int(j)] = array
            continue
        if arch == "llama" and module == "self_attn.q_proj":
            array = _permute(array, cfg.num_attention_heads)
        elif arch == "llama" and module == "self_attn.k_proj":
            array = _permute(array, cfg.num_key_value_heads)
        elif module == "mlp.shared_expert_gate":
            array = array.reshape(-1)  # llama.cpp's `[hidden]`
        writer.add_tensor(f"blk.{i}.{_BLOCK[module]}.{leaf}", array)
    for out, arrays in stacks.items():
        writer.add_tensor(out, np.stack([arrays[j] for j in range(len(arrays))]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_gguf_weights_and_logits_match_the_checkpoint(name, tmp_path):
    model_type, arch, overrides = CASES[name]
    hf = make_moe_model(model_type, seed=30, **overrides)
    directory = str(tmp_path / "hf")
    hf.save_pretrained(directory)
    path = str(tmp_path / f"{name}.gguf")
    _write_gguf(path, directory, hf, arch)
    lm = jd.from_pretrained(path)
    assert lm.config.model_type == model_type
    # Every field of the skeleton (expert count, width, routing, dense layers,
    # biases, norms) read from the metadata as from config.json; the epsilon is
    # stored in float32.
    ours, ref = lm.config.transformer(), jd.from_pretrained(directory).config.transformer()
    assert ours.norm_eps == pytest.approx(ref.norm_eps, rel=1e-6)
    assert dataclasses.replace(ours, norm_eps=ref.norm_eps) == ref
    from safetensors.numpy import load_file

    ours = jd.models.registry.lookup(model_type).state_dict_from_params(lm.params, lm.config)
    theirs = load_file(f"{directory}/model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, array in ours.items():
        np.testing.assert_array_equal(array, theirs[key], err_msg=key)
    # Logits of every real position, through a prefill and cached steps (the full
    # pass of the same checkpoint is tests/parity/test_moe.py's: with the weights
    # bitwise and the skeleton equal, it would compile a third program for nothing).
    ids, mask = left_padded_batch(np.random.default_rng(0), V, LENGTH, PADS)
    real = np.asarray(mask) == 1
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
    assert np.abs(np.concatenate(out, axis=1) - steps)[real].max() <= ATOL
