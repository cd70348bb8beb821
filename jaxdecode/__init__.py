"""jaxdecode: pure, jit-compiled text decoding for JAX.

Processors compose like optax transforms (`chain(temperature(0.7), top_p(0.9))`),
choosers pick tokens, and `GenerationConfig` names every option as transformers
does. See the README for the order in which `generate` applies processors.
"""

from jaxdecode import sampling
from jaxdecode.cache import (
    Cache,
    KVCache,
    cache_nbytes,
    cache_specs,
    gather_beams,
    gather_rows,
    init_cache,
    put_rows,
    rewind_rows,
    take_rows,
    visible_slots,
)
from jaxdecode.config import GenerationConfig, StaticConfig
from jaxdecode.context import DecodeContext
from jaxdecode.errors import CheckpointError, ConfigError, MemoryBudgetError, UnsupportedModelError
from jaxdecode.generation import GenerateOutput, StreamStep, bucket_length, generate, stream
from jaxdecode.lm import CausalLM, from_pretrained
from jaxdecode.models.adapters import from_linen, from_nnx
from jaxdecode.models.base import Decoder, Model, positions_from_mask
from jaxdecode.models.gpt2 import GPT2Config, GPT2LMHeadModel, gpt2_decoder
from jaxdecode.models.lora import LoraWeights
from jaxdecode.processors import (
    Chain,
    Grammar,
    LogitsProcessor,
    TracedConfig,
    bad_words_ids,
    begin_suppress_tokens,
    chain,
    choice,
    epsilon_cutoff,
    eta_cutoff,
    exponential_decay_length_penalty,
    forced_bos_token_id,
    forced_eos_token_id,
    frequency_penalty,
    frequency_presence_penalty,
    grammar,
    json_schema,
    logits_processor,
    min_length,
    min_new_tokens,
    min_p,
    no_repeat_ngram_size,
    presence_penalty,
    process_logits,
    regex,
    remove_invalid_values,
    renormalize_logits,
    repetition_penalty,
    sequence_bias,
    split_config,
    suppress_tokens,
    temperature,
    top_k,
    top_p,
    typical_p,
)
from jaxdecode.pytree import dataclass as pytree_dataclass
from jaxdecode.pytree import field as pytree_field
from jaxdecode.ring_cache import RingCache, init_ring
from jaxdecode.sampling import categorical, greedy, split_keys
from jaxdecode.score import ScoreOutput, score
from jaxdecode.serving import Engine, EngineResult, generate_many
from jaxdecode.sharding import make_mesh, parse_mesh, shard_params
from jaxdecode.tokenizers import Tokenizer, byte_tokenizer, load_tokenizer
from jaxdecode.trace import Hypothesis, Trace, trace

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MemoryBudgetError",
    "UnsupportedModelError",
    "pytree_dataclass",
    "pytree_field",
    "Engine",
    "EngineResult",
    "generate_many",
    "GenerateOutput",
    "StreamStep",
    "stream",
    "trace",
    "make_mesh",
    "parse_mesh",
    "shard_params",
    "Trace",
    "Hypothesis",
    "bucket_length",
    "byte_tokenizer",
    "generate",
    "bad_words_ids",
    "begin_suppress_tokens",
    "categorical",
    "CausalLM",
    "LoraWeights",
    "Chain",
    "chain",
    "choice",
    "DecodeContext",
    "Decoder",
    "Model",
    "epsilon_cutoff",
    "eta_cutoff",
    "exponential_decay_length_penalty",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "frequency_penalty",
    "frequency_presence_penalty",
    "from_linen",
    "from_nnx",
    "from_pretrained",
    "gather_beams",
    "GenerationConfig",
    "gpt2_decoder",
    "GPT2Config",
    "GPT2LMHeadModel",
    "Grammar",
    "grammar",
    "greedy",
    "init_cache",
    "json_schema",
    "KVCache",
    "RingCache",
    "init_ring",
    "load_tokenizer",
    "logits_processor",
    "LogitsProcessor",
    "min_length",
    "min_new_tokens",
    "min_p",
    "no_repeat_ngram_size",
    "positions_from_mask",
    "presence_penalty",
    "process_logits",
    "regex",
    "remove_invalid_values",
    "renormalize_logits",
    "repetition_penalty",
    "sampling",
    "score",
    "ScoreOutput",
    "sequence_bias",
    "split_config",
    "split_keys",
    "StaticConfig",
    "suppress_tokens",
    "temperature",
    "Tokenizer",
    "top_k",
    "top_p",
    "TracedConfig",
    "typical_p",
    "visible_slots",
    # The cache protocol (cache.py).
    "Cache",
    "cache_nbytes",
    "cache_specs",
    "gather_rows",
    "put_rows",
    "rewind_rows",
    "take_rows",
]
