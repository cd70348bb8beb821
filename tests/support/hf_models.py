"""Tiny Hugging Face checkpoints with random weights, for parity tests, and
the shared set-up: one checkpoint saved and loaded on both sides
(`load_in_jaxdecode`), a draft model of a target's first layers
(`target_and_draft`), transformers' logits and processors.

The GPT-2 models are built with `torch.manual_seed`, eager attention (the only
implementation that honours `reorder_and_upcast_attn`) and weights spread wider
than GPT-2's default initializer (std 0.02, zero biases, unit LayerNorms), so
that attention patterns are far from uniform, biases and LayerNorm parameters
matter, and a wrong scale, mask or parameter mapping shows in the logits.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import numpy as np
import torch
import transformers

import jaxdecode as jd

# Small defaults; the parametrized configs override a few fields each.
TINY = dict(
    vocab_size=96,
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    bos_token_id=95,
    eos_token_id=95,
)


def make_hf_model(
    seed: int = 0, spread: float = 1.0, **config: Any
) -> transformers.GPT2LMHeadModel:
    """A `GPT2LMHeadModel` in eval mode, float32, with random weights.

    `spread` scales the random weights: 1.0 gives unit-variance embeddings and
    activations (logits of a few units); smaller is closer to GPT-2's init.
    """
    kwargs = {**TINY, **config}
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(**kwargs, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    spread_weights(model, spread)
    return model


def spread_weights(model: transformers.GPT2LMHeadModel, spread: float) -> None:
    """Re-draws every parameter (in place, from torch's current seed) with the
    wider-than-GPT-2 spread described in the module docstring."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wte.weight", "wpe.weight")):
                p.normal_(0.0, spread)
            elif ".ln_" in name or "ln_f" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.2)
            elif name.endswith("weight"):  # Conv1D: [in, out]
                p.normal_(0.0, spread / math.sqrt(p.shape[0]))
            else:
                p.normal_(0.0, 0.1 * spread)


def generate_processors(
    model: transformers.GPT2LMHeadModel, options: dict, prompt_ids: Any, mask: Any
) -> transformers.LogitsProcessorList:
    """The LogitsProcessorList transformers' `generate` builds for `options` and this
    prompt, prepared as `generate` prepares it (global defaults such as top_k=50,
    special tokens, lengths)."""
    prompt = torch.as_tensor(np.asarray(prompt_ids), dtype=torch.long)
    has_default_max_length = options.get("max_length") is None
    has_default_min_length = options.get("min_length") is None
    config, _ = model._prepare_generation_config(transformers.GenerationConfig(**options))
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device="cpu")
    config = model._prepare_generated_length(
        config,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name="input_ids",
        input_ids_length=prompt.shape[1],
        inputs_tensor=prompt,
    )
    # generate drops an all-ones mask before building the processors.
    mask = np.asarray(mask)
    attention_mask = None if mask.all() else torch.as_tensor(mask)
    return model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt.shape[1],
        encoder_input_ids=prompt,
        logits_processor=None,
        device="cpu",
        model_kwargs={"attention_mask": attention_mask},
    )


def save_hf_model(model: transformers.GPT2LMHeadModel, directory: Any, **kwargs: Any) -> str:
    """`save_pretrained` into `directory`; returns it as a string."""
    directory = os.fspath(directory)
    model.save_pretrained(directory, **kwargs)
    return directory


def load_in_jaxdecode(model: Any, directory: Any, **kwargs: Any) -> jd.CausalLM:
    """The same checkpoint on both sides: `model.save_pretrained(directory)`, then
    `jd.from_pretrained(directory, **kwargs)`."""
    return jd.from_pretrained(save_hf_model(model, directory), **kwargs)


def first_layers(model: Any, layers: int) -> Any:
    """A copy of a Llama-style transformers model that keeps its first `layers`
    decoder layers (a draft model sharing the target's embeddings and head)."""
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:layers]
    small.config.num_hidden_layers = layers
    return small


def target_and_draft(tmp_path_factory: Any, hf: Any, draft_layers: int = 1) -> tuple:
    """`(jaxdecode target, jaxdecode draft, hf target, hf draft)`: the draft is the
    target's first `draft_layers` layers, each saved and loaded once."""
    hf_draft = first_layers(hf, draft_layers)
    target = load_in_jaxdecode(hf, tmp_path_factory.mktemp("target"))
    draft = load_in_jaxdecode(hf_draft, tmp_path_factory.mktemp("draft"))
    return target, draft, hf, hf_draft


def hf_logits(model: transformers.GPT2LMHeadModel, ids: Any, mask: Any = None) -> np.ndarray:
    """transformers' logits with position ids from the mask (as jaxdecode computes them)."""
    ids = np.asarray(ids, np.int64)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int64)
    positions = np.asarray(jd.positions_from_mask(mask), np.int64)
    with torch.no_grad():
        out = model(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
        )
    return out.logits.float().numpy()


def left_padded_batch(
    rng: np.random.Generator, vocab_size: int, length: int, pads: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """`ids, mask: [len(pads), length]` int32: row b has `pads[b]` leading pad tokens
    (id 0, mask 0) followed by random real tokens (mask 1)."""
    ids = rng.integers(0, vocab_size, size=(len(pads), length)).astype(np.int32)
    mask = np.ones_like(ids)
    for b, p in enumerate(pads):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


# --------------------------------------------------------------------------- #
# Llama-style families (llama, mistral, qwen2, qwen3, gemma) and the other
# families on the same skeleton (gemma2, gemma3_text, phi3).
# --------------------------------------------------------------------------- #

LLAMA_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}

# Small defaults (GQA: 4 query heads over 2 KV heads; head_dim 8 != hidden / heads).
LLAMA_TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_llama_model(model_type: str = "llama", seed: int = 0, spread: float = 1.0, **config: Any):
    """A transformers Llama-style model (eager attention, float32, eval) with wide
    random weights: embeddings and heads normal(0, spread), projections
    normal(0, spread / sqrt(fan_in)), biases normal(0, 0.1), norm weights around
    identity with spread 0.2 (Gemma's `(1 + w)` form: around 0)."""
    config_cls, model_cls = (getattr(transformers, n) for n in LLAMA_CLASSES[model_type])
    torch.manual_seed(seed)
    hf_config = config_cls(**{**LLAMA_TINY, **config}, attn_implementation="eager")
    model = model_cls(hf_config).eval()
    identity = 0.0 if model_type.startswith("gemma") else 1.0  # Gemma's `(1 + w)` norms
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, spread)
            elif "norm" in name:
                p.copy_(identity + 0.2 * torch.randn_like(p))
            elif name.endswith("weight"):  # Linear: [out, in]
                p.normal_(0.0, spread / math.sqrt(p.shape[1]))
            else:
                p.normal_(0.0, 0.1 * spread)
    return model


def hf_step_logits(model: Any, ids: Any, mask: Any, prefill: int) -> np.ndarray:
    """transformers' logits from a prefill of `prefill` tokens, then one token per
    call through its own cache (what `generate` does; for dynamic RoPE this
    differs from one full pass)."""
    ids = torch.as_tensor(np.asarray(ids, np.int64))
    mask = torch.as_tensor(np.asarray(mask, np.int64))
    positions = torch.as_tensor(np.asarray(jd.positions_from_mask(np.asarray(mask)), np.int64))
    out, cache = [], None
    with torch.no_grad():
        for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
            res = model(
                ids[:, start:stop],
                attention_mask=mask[:, :stop],
                position_ids=positions[:, start:stop],
                cache=cache,
                use_cache=True,
            )
            cache = res.cache
            out.append(res.logits.float().numpy())
    return np.concatenate(out, axis=1)


# Mixture of experts (tests/parity/test_moe.py, tests/integration/test_moe_gguf.py).
MOE_TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    num_experts_per_tok=2,
)

MOE_CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


def make_moe_model(model_type: str, seed: int = 0, **config):
    """A transformers MoE model (eager, float32, eval) with wide random weights:
    embeddings and head normal(0, 1), projections (experts' stacked ones too)
    normal(0, 1 / sqrt(fan_in)), biases normal(0, 0.1), norms around 1."""
    config_cls, model_cls = (getattr(transformers, n) for n in MOE_CLASSES[model_type])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**MOE_TINY, **config}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 1.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim >= 2:  # [out, in] or stacked [experts, out, in]
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
            else:
                p.normal_(0.0, 0.1)
    return model
