"""Tiny Hugging Face GPT-2 checkpoints with random weights, for parity tests.

Every model is built with `torch.manual_seed`, eager attention (the only
implementation that honours `reorder_and_upcast_attn`) and weights spread wider
than GPT-2's default initializer (std 0.02, zero biases, unit LayerNorms), so
that attention patterns are far from uniform, biases and LayerNorm parameters
matter, and a wrong scale, mask or parameter mapping shows in the logits.
"""

from __future__ import annotations

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
