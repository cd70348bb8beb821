"""The decoder protocol: what the decoding loops know about a model.

A model is two pure functions over explicit params and an explicit cache:

    init_cache(batch, max_len, dtype) -> cache
    apply(params, ids [B, T], positions [B, T], cache, attention_mask [B, T])
        -> (logits [B, T, V], cache)

`apply` serves both prefill (T = prompt length) and one-token steps (T = 1);
`attention_mask` marks which of the T new tokens are real (0 = left padding), and
the cache remembers it for later steps. The loops never see Flax, files or
tokenizers; adapters (`from_linen`, `from_nnx`, GPT-2) produce a `Decoder`.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from jaxdecode.arrays import is_traced
from jaxdecode.errors import ConfigError
from jaxdecode.paged_cache import PagedCache
from jaxdecode.quantized_cache import init_quantized

if TYPE_CHECKING:  # the config never imports models; only the annotation needs it
    from jaxdecode.config import GenerationConfig, PagedCacheConfig, QuantizedCacheConfig

Array = jax.Array

__all__ = ["Bound", "Decoder", "last_real", "positions_from_mask"]


# `Decoder.viewed`'s results by owner id: (the owner's params, the hook, the
# params with their views), dropped when the owner is collected.
_VIEWED: dict[int, tuple[Any, Any, Any]] = {}


@dataclasses.dataclass(frozen=True)
class Bound:
    """`fn(*args, *call_args)`: a module-level function with its leading arguments
    fixed, equal (and hashing) by `(fn, args)`.

    A closure made per call is a new object each time, so two `Decoder`s built
    from one config would differ as static jit arguments and a reloaded model
    would compile every program again; two `Bound`s over equal (hashable)
    arguments are equal.

    Attributes:
        fn: a function with a stable identity (module-level, not a closure).
        args: its leading arguments, hashable (configs, dtypes, Flax modules).
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()

    def __call__(self, *call_args: Any, **kwargs: Any) -> Any:
        return self.fn(*self.args, *call_args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A model as pure functions, equal and hashing by value (so it is a static jit
    argument, and a model loaded twice is the same one: nothing recompiles).

    The functions compare by identity: build them as module-level functions,
    or `Bound(fn, (config, dtype, ...))` over hashable arguments, not as
    closures made per call (those make every `Decoder` a new program).

    Attributes:
        init_cache: `(batch, max_len, dtype) -> cache` pytree.
        apply: `(params, ids, positions, cache, attention_mask) -> (logits, cache)`.
        vocab_size: size of the logits' last axis.
        max_positions: longest sequence the model supports, prompt and new
            tokens together (its context length; None: unbounded). `generate`,
            `score`, the engine and the CLI refuse longer requests up front.
        name: for error messages.
        prepare: optional `(params, rows) -> params`, called once per decoding
            program outside its loop with the number of cache rows; returns the
            params to decode with (e.g. a weight layout that suits that batch).
        host_views: optional `params -> params` the host applies to concrete
            params placed on no mesh before a program runs (`generate`,
            `stream`, the engine; never inside a program): arrays added beside
            the params that alias their memory (`moe.expert_views`: one per
            expert, which XLA:CPU reads in place where it copies a slice of the
            stack). The programs give the same results with or without them.
        param_specs: optional `params -> PartitionSpec tree` over the mesh axes
            `data` / `model`, for `generate(..., mesh=...)` (default: replicated).
        apply_last: optional `apply` that returns the logits of the last
            real position only (`[B, 1, vocab]`, `last_real`: the last column
            under left padding, the last real token under right padding): a prefill that needs no other
            position's logits skips the LM head there (on a CPU a fifth of a
            small model's prefill). `generate` and the engine use it.
        limit_name: where `max_positions` comes from, for messages (e.g.
            "max_position_embeddings").
        fixed_limit: True when no position past `max_positions` exists (a
            learned position table): `with_max_positions` cannot raise it.
        init_paged: optional `(batch, max_len, pages, page_size, dtype) ->
            cache`, a `PagedCache` (pages from one pool, `max_len` a per-row
            bound; `pages` None: each row owns its pages, in order): the
            engine's paged mode (`Engine(page_size=...)`) and
            `cache_implementation="paged"` need it.
        activation_bytes: optional `(batch, T, S) -> bytes`, an estimate of the
            activations and attention scratch live during one call over T new
            tokens and S cache slots (logits and the cache excluded), for the
            memory pre-checks (`prefill_bytes`).
        apply_routed: for a mixture-of-experts model, `apply` that also returns
            the experts each token was routed to: `(params, ids, positions,
            cache, attention_mask, last=False) -> (logits, cache, experts [B, T,
            routed_shape[0], routed_shape[1]] int32)` (`last`: the logits of the
            last position only, as `apply_last`); None for a dense model.
        routed_shape: `(MoE layers, experts per token)` of `apply_routed`'s
            experts, else None.
        quantized_cache: optional `(quantized, batch, max_len, dtype) -> cache`:
            an empty cache whose keys and values are stored quantized as
            `quantized` (a `QuantizedCacheConfig`) says, read by `apply` like
            `init_cache`'s. Models without it refuse
            `cache_implementation="quantized"` (`with_cache`).
    """

    init_cache: Callable[[int, int, Any], Any]
    apply: Callable[[Any, Array, Array, Any, Array], tuple[Array, Any]]
    vocab_size: int
    max_positions: int | None = None
    name: str = "decoder"
    prepare: Callable[[Any, int], Any] | None = None
    host_views: Callable[[Any], Any] | None = None
    param_specs: Callable[[Any], Any] | None = None
    apply_last: Callable[[Any, Array, Array, Any, Array], tuple[Array, Any]] | None = None
    limit_name: str = "max_positions"
    fixed_limit: bool = False
    activation_bytes: Callable[[int, int, int], int] | None = None
    apply_routed: Callable[..., tuple[Array, Any, Array]] | None = None
    routed_shape: tuple[int, int] | None = None
    init_paged: Callable[..., Any] | None = None
    quantized_cache: Callable[..., Any] | None = None

    def __hash__(self) -> int:
        # A static jit argument is hashed at every dispatch (each streamed token),
        # and hashing a model config costs tens of microseconds: computed once.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def with_cache(self, quantized: QuantizedCacheConfig | PagedCacheConfig | None) -> Decoder:
        """This decoder with `init_cache` building the cache `quantized` asks for
        (`GenerationConfig.kv_cache()`: a quantized cache, or a `PagedCache` whose
        rows own their pages, `PagedCacheConfig`; None: this decoder). Equal for
        equal settings, so a program compiles once per bit width or page size.

        Raises:
            ConfigError: when the model has no quantized (or paged) cache, or
                cannot hold these settings (e.g. a `q_group_size` that does not
                divide its head_dim), before anything is traced.
        """
        if quantized is None:
            return self
        page_size = getattr(quantized, "page_size", None)
        if page_size is not None:
            if self.init_paged is None:
                raise ConfigError(
                    f"cache_implementation='paged' needs a model with a paged cache; the "
                    f"{self.name} decoder has none (Decoder.init_paged)"
                )
            return dataclasses.replace(
                self, init_cache=Bound(_bound_paged, (self.init_paged, page_size))
            )
        if self.quantized_cache is None:
            raise ConfigError(
                f"cache_implementation='quantized' needs a model with a quantized KV cache; "
                f"the {self.name} decoder has none (Decoder.quantized_cache)"
            )
        build = Bound(_bound_quantized, (self.quantized_cache, quantized))
        try:  # shapes only: checks the settings against the model now
            jax.eval_shape(lambda: build(1, 1, None))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        paged = None
        if self.init_paged is not None:  # a pool of code and scale pages
            paged = Bound(_bound_quantized_paged, (self.init_paged, quantized))
            try:  # a paged cache other than one PagedCache has no quantized pool
                jax.eval_shape(lambda: paged(1, 1, 1, 1, None))
            except ValueError:
                paged = None
        return dataclasses.replace(self, init_cache=build, init_paged=paged)

    def prefill_last(
        self, params: Any, ids: Array, positions: Array, cache: Any, mask: Array
    ) -> tuple[Array, Any]:
        """`(logits of the last position [B, vocab] float32, cache)`, through
        `apply_last` when the model has it."""
        if self.apply_last is None:
            logits, cache = self.apply(params, ids, positions, cache, mask)
            logits = last_real(logits, mask)
        else:
            logits, cache = self.apply_last(params, ids, positions, cache, mask)
        return logits[:, -1, :].astype(jnp.float32), cache

    def check_routed(self, wanted: bool) -> None:
        """ValueError when `output_routed_experts` is asked of a model without
        routed experts (`apply_routed` None: a dense model)."""
        if wanted and self.apply_routed is None:
            raise ValueError(
                f"output_routed_experts=True needs a mixture-of-experts model; the {self.name} "
                "model has no routed experts (got output_routed_experts=True, allowed: False)"
            )

    def prepared(self, params: Any, rows: int) -> Any:
        """`prepare(params, rows)`, or params unchanged without a hook (inside a
        compiled program)."""
        return params if self.prepare is None else self.prepare(params, rows)

    def prepared_outside(self, params: Any, rows: int) -> Any:
        """`prepared`, for a host that keeps the result beside `params` (the
        engine, `stream`): never a copy of the weights. Without a hook, `params`
        themselves; with one, the hook runs op by op (not as one jitted
        program, whose outputs would all be new buffers), so every leaf it
        passes through is the caller's own array and only what it derives is
        new. `host_views` first, when the params are concrete."""
        params = self.viewed(params)
        if self.prepare is None:
            return params
        return self.prepare(params, rows)

    def viewed(self, params: Any, owner: Any = None) -> Any:
        """`host_views(params)` for concrete params (else `params`). With an
        `owner` whose `params` they are (the `CausalLM` given to `generate`),
        the result is kept until the owner is collected: making the views costs
        ~0.2-0.8 ms per expert and layer (768 arrays: 0.15-0.6 s), once per model
        rather than per call. The views hold the owner's arrays, never the owner."""
        if self.host_views is None or is_traced(params):
            return params
        if owner is None or params is not getattr(owner, "params", None):
            return self.host_views(params)
        hit = _VIEWED.get(id(owner))
        if hit is not None and hit[0] is params and hit[1] == self.host_views:
            return hit[2]
        viewed = self.host_views(params)
        try:
            weakref.finalize(owner, _VIEWED.pop, id(owner), None)
        except TypeError:  # an owner without weak references: not kept
            return viewed
        _VIEWED[id(owner)] = (params, self.host_views, viewed)
        return viewed

    def prefill_bytes(self, batch: int, t: int, s: int, all_logits: bool) -> int:
        """Bytes a prefill of `batch` x `t` tokens into `s` cache slots needs
        besides the cache and the weights: activations (`activation_bytes`) and
        the logits (every position's with `all_logits`, else the last one's)."""
        logits = batch * (t if all_logits else 1) * self.vocab_size * 4
        extra = 0 if self.activation_bytes is None else self.activation_bytes(batch, t, s)
        return int(logits + extra)

    def check_length(self, total: int, new_tokens: int | None = None) -> None:
        """ValueError when `total` tokens (prompt + `new_tokens`) exceed `max_positions`.

        Args:
            total: prompt length + new tokens.
            new_tokens: the `max_new_tokens` part of `total`, for the message.
        """
        if self.max_positions is None or total <= self.max_positions:
            return
        lengths = f"prompt length + max_new_tokens = {total}"
        if new_tokens is not None:
            lengths = f"prompt length {total - new_tokens} + max_new_tokens {new_tokens} = {total}"
        hint = "shorten the prompt or max_new_tokens"
        if not self.fixed_limit:
            hint += (
                "; a model that handles longer inputs (e.g. with rope scaling) can be loaded with "
                "from_pretrained(..., max_positions=N) (CLI: --max_positions N)"
            )
        raise ValueError(
            f"{lengths} exceeds the {self.name} model's context length "
            f"{self.limit_name}={self.max_positions}; {hint}"
        )

    def with_max_positions(self, max_positions: int | None) -> Decoder:
        """This decoder with another context length (None: unbounded).

        Raises:
            ValueError: for a value that is not a positive int, or one past a
                fixed limit (learned positions).
        """
        if max_positions is not None and (
            isinstance(max_positions, bool)
            or not isinstance(max_positions, int)
            or max_positions < 1
        ):
            raise ValueError(
                f"max_positions must be an integer >= 1 or None, got {max_positions!r}"
            )
        if self.fixed_limit and (max_positions is None or max_positions > self.max_positions):
            raise ValueError(
                f"max_positions={max_positions} exceeds the {self.name} model's "
                f"{self.limit_name}={self.max_positions}: it has no position past that"
            )
        return dataclasses.replace(self, max_positions=max_positions, limit_name="max_positions")


def _bound_quantized(
    quantized_cache: Callable[..., Any],
    quantized: QuantizedCacheConfig,
    batch: int,
    max_len: int,
    dtype: Any = None,
) -> Any:
    """`Decoder.init_cache` of `Decoder.with_cache`."""
    return quantized_cache(quantized, batch, max_len, dtype)


def _bound_paged(
    init_paged: Callable[..., Any], page_size: int, batch: int, max_len: int, dtype: Any = None
) -> Any:
    """`Decoder.init_cache` of `Decoder.with_cache` with a paged setting: each
    row owns its pages (`search.loop.prefill` lays out shared prompt pages)."""
    return init_paged(batch, max_len, None, page_size, dtype)


def _bound_quantized_paged(
    init_paged: Callable[..., Any],
    quantized: QuantizedCacheConfig,
    batch: int,
    max_len: int,
    pages: int,
    page_size: int,
    dtype: Any = None,
) -> Any:
    """`Decoder.init_paged` of `Decoder.with_cache`: the float pool's layout
    (`init_paged`'s shapes, nothing allocated) as a pool of codes and scales.

    Raises:
        ValueError: when the model's paged cache is not one `PagedCache`.
    """
    pool = jax.eval_shape(lambda: init_paged(batch, max_len, pages, page_size, dtype))
    if not isinstance(pool, PagedCache):
        raise ValueError(
            f"cache_implementation='quantized' on pages needs a model whose paged cache is "
            f"one PagedCache, got {type(pool).__name__}"
        )
    layers, _, heads, _, head_dim = pool.k.shape
    return init_quantized(
        layers=layers, batch=batch, max_len=max_len, heads=heads, head_dim=head_dim,
        nbits=quantized.nbits, group=quantized.q_group_size, dtype=pool.k.dtype,
        pages=pages, page_size=page_size,
    )  # fmt: skip


@runtime_checkable
class Model(Protocol):
    """What the entry points take as `model` (`generate`, `stream`, `score`,
    `trace`, `Engine`, `generate_many`, an `assistant_model`): a `CausalLM`, or
    any object with these attributes (a bare `Decoder` with `params=` is
    accepted too where the signature says `Model | Decoder`).

    Attributes:
        decoder: the model as pure functions.
        params: its parameters, a pytree of arrays (traced when the model is
            passed through `jax.jit`).
        generation_config: the default decoding options.
        tokenizer: optional (`getattr(model, "tokenizer", None)`): needed for
            text prompts, stop strings and constraints.
    """

    decoder: Decoder
    params: Any
    generation_config: GenerationConfig


def positions_from_mask(attention_mask: Array, offset: Array | int = 0) -> Array:
    """Position ids from a left-padding mask, as transformers computes them.

    `cumsum(mask) - 1`, with padding positions set to 1 (their outputs are never
    used). `offset: [batch]` adds the number of real tokens already in the cache.

    Args:
        attention_mask: `[batch, T]` with 1 for real tokens.
        offset: `[]` or `[batch]` real tokens before these T.

    Returns:
        `[batch, T]` int32 positions.
    """
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    pos = jnp.cumsum(mask, axis=-1) - 1 + jnp.asarray(offset, jnp.int32).reshape(-1, 1)
    return jnp.where(mask == 0, 1, pos).astype(jnp.int32)


def last_real(x: Array, attention_mask: Array) -> Array:
    """`x: [batch, T, ...]` at each row's last real column (`attention_mask`
    `[batch, T]` 1 there), as `[batch, 1, ...]`: column `T - 1` under left
    padding, the last token of a right-padded row (a paged prefill's chunk);
    a row with no real token gives column `T - 1`."""
    t = attention_mask.shape[1]
    flipped = jnp.asarray(attention_mask)[:, ::-1] != 0
    col = (t - 1 - jnp.argmax(flipped, axis=1)).astype(jnp.int32)
    col = jnp.where(jnp.any(flipped, axis=1), col, t - 1)
    at = col.reshape((-1, 1) + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, at, axis=1)
