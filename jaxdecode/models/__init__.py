"""Models: the decoder protocol, the model families (by HF `model_type`, see
`registry`), shared layers, and adapters for users' Flax modules."""

from jaxdecode.models.base import Decoder, positions_from_mask
from jaxdecode.models.gpt2 import GPT2Config, GPT2LMHeadModel, gpt2_decoder

__all__ = ["Decoder", "GPT2Config", "GPT2LMHeadModel", "gpt2_decoder", "positions_from_mask"]
