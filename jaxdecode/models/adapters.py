"""Adapters: turn a user's Flax decoder (linen or NNX) into a `Decoder`.

The calling convention a module must follow (the one `GPT2LMHeadModel` follows):

    __call__(ids [B, T], positions [B, T], cache, attention_mask [B, T])
        -> (logits [B, T, vocab], new cache)

where `cache` is any pytree of static-shape arrays the module reads and returns
(typically a `jaxdecode.KVCache`: write each layer with `cache.write(layer, k, v)`
and get the attention pattern and advanced cache from
`jaxdecode.cache.visible_slots(cache, attention_mask)`), and a function
`init_cache(batch, max_len, dtype) -> cache` builds an empty one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxdecode.models import lora
from jaxdecode.models.base import Bound, Decoder

Array = jax.Array

__all__ = ["from_linen", "from_nnx"]


def _check_common(init_cache: Any, vocab_size: Any) -> None:
    if not callable(init_cache):
        raise ValueError(
            f"init_cache must be a callable (batch, max_len, dtype) -> cache, got {init_cache!r}"
        )
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")


# Module-level, bound with `Bound`: adapting the same module twice gives equal
# decoders (one compiled program), as a closure per call would not.
def _linen_apply(
    module: Any, method: Any, params: Any, ids: Array, positions: Array, cache: Any, mask: Array
) -> tuple[Array, Any]:
    return module.apply(lora.flax_variables(params), ids, positions, cache, mask, method=method)


def _nnx_apply(
    graphdef: Any, params: Any, ids: Array, positions: Array, cache: Any, mask: Array
) -> tuple[Array, Any]:
    from flax import nnx

    return nnx.merge(graphdef, params)(ids, positions, cache, mask)


def from_linen(
    module: Any,
    *,
    init_cache: Callable[[int, int, Any], Any],
    vocab_size: int,
    max_positions: int | None = None,
    method: str | Callable[..., Any] | None = None,
) -> Decoder:
    """A `Decoder` for a `flax.linen.Module` following the calling convention.

    Params stay outside: `decoder.apply(params, ...)` runs
    `module.apply({"params": params}, ids, positions, cache, attention_mask)`.

    Args:
        module: the linen module (unbound).
        init_cache: `(batch, max_len, dtype) -> cache`.
        vocab_size: size of the logits' last axis.
        max_positions: longest supported sequence (checked by `generate`).
        method: a method name or function to call instead of `__call__`.
    """
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise ValueError(f"from_linen needs a flax.linen.Module, got {type(module).__name__}")
    _check_common(init_cache, vocab_size)

    return Decoder(
        init_cache=init_cache,
        apply=Bound(_linen_apply, (module, method)),
        vocab_size=vocab_size,
        max_positions=max_positions,
        name=type(module).__name__,
    )


def from_nnx(
    model: Any,
    *,
    init_cache: Callable[[int, int, Any], Any],
    vocab_size: int,
    max_positions: int | None = None,
) -> tuple[Decoder, Any]:
    """A `Decoder` and its params for a `flax.nnx.Module` following the convention.

    The model is split once (`nnx.split`) into a static graph definition and a
    state; the state is the params pytree the loops trace, and each call merges
    them back into a fresh module, so nothing is mutated.

    Returns:
        `(decoder, params)`; use `CausalLM(params=params, decoder=decoder)`.
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise ValueError(f"from_nnx needs a flax.nnx.Module, got {type(model).__name__}")
    _check_common(init_cache, vocab_size)
    graphdef, state = nnx.split(model)

    decoder = Decoder(
        init_cache=init_cache,
        apply=Bound(_nnx_apply, (graphdef,)),
        vocab_size=vocab_size,
        max_positions=max_positions,
        name=type(model).__name__,
    )
    return decoder, state
