"""`CausalLM`: a model you can decode with, and pass through `jax.jit` as a pytree.

The parameters are the pytree's leaves; the config, the decoder functions, the
generation config and the tokenizer are static. So `lm.generate(...)` can be
called inside a user's jitted training step with the *current* params traced,
never baked in as constants, and `jax.grad` / optax see only the params.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import checkpoints, pytree
from jaxdecode.config import GenerationConfig
from jaxdecode.generation import generate
from jaxdecode.models import lora, registry
from jaxdecode.models.base import Decoder, positions_from_mask
from jaxdecode.tokenizers import Tokenizer, load_tokenizer, tokenizer_from_gguf

Array = jax.Array

__all__ = ["CausalLM", "from_pretrained"]


@pytree.dataclass
class CausalLM:
    """A decoder with its parameters.

    Attributes:
        params: the parameter pytree (leaves).
        decoder: the `Decoder` (pure `init_cache` / `apply`), static.
        config: the model config (e.g. `GPT2Config`), static; `save_pretrained`
            finds the model family from its `model_type`.
        generation_config: defaults for `generate`, static.
        tokenizer: a `Tokenizer` or None, static.
    """

    params: Any
    decoder: Decoder = pytree.field(pytree_node=False)
    config: Any = pytree.field(pytree_node=False, default=None)
    generation_config: GenerationConfig = pytree.field(
        pytree_node=False, default=GenerationConfig()
    )
    tokenizer: Tokenizer | None = pytree.field(pytree_node=False, default=None)

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    def logits(self, input_ids: Any, attention_mask: Any = None) -> Array:
        """A full forward pass: `input_ids [B, T]` -> logits `[B, T, vocab]` float32.

        Positions come from `attention_mask` (0 = left padding), as in `generate`.
        """
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
        mask = (
            jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        )
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask shape {mask.shape} must equal input_ids shape {ids.shape}"
            )
        self.decoder.check_length(ids.shape[1])
        return _forward(self, ids, mask)

    def save_pretrained(self, directory: str, *, dtype: str = "float32") -> None:
        """Writes a Hugging Face checkpoint that transformers loads: config.json,
        model.safetensors (stored as `dtype`, "float32" or "float16"),
        generation_config.json, and tokenizer.json when the model has a tokenizer.

        Works for any registered model family (`jaxdecode.models.registry`).
        A model with an unmerged LoRA adapter is refused: `merge_and_unload()` first."""
        if lora.has_lora(self.params):
            raise ValueError(
                "save_pretrained writes the base model's weights; this model carries an "
                "unmerged LoRA adapter (params['lora']): call lm.merge_and_unload() first"
            )
        if dtype not in checkpoints.STORAGE_DTYPES:
            raise ValueError(
                f"dtype must be one of {sorted(checkpoints.STORAGE_DTYPES)}, got {dtype!r}"
            )
        family = registry.family_for_config(self.config)
        state = family.state_dict_from_params(self.params, self.config)
        checkpoints.write_checkpoint(
            directory, state, self.config.to_hf(), self.generation_config.to_hf(), dtype=dtype
        )
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    def load_adapter(
        self,
        adapter: str | os.PathLike[str] | list[str | os.PathLike[str]],
        *,
        revision: str | None = None,
    ) -> CausalLM:
        """This model with a PEFT LoRA adapter (a directory with
        `adapter_config.json` and `adapter_model.safetensors`, or a hub id)
        attached unmerged, as `params["lora"]` (see `from_pretrained`'s
        `adapter`). A model that already has one gets the new one instead.

        A list of adapters is stacked (`lora.stack`): `generate(...,
        adapter_ids=[...])` then gives each row the adapter at its index (-1:
        none), vLLM's multi-LoRA."""
        family = registry.family_for_config(self.config)
        if family.param_path is None:
            raise ValueError(f"the {family.name} family cannot load LoRA adapters")
        base, _ = lora.split(self.params)
        dtype = jax.tree_util.tree_leaves(base)[0].dtype
        view = _adapter_view(family, base, self.config)
        trees = []
        for one in adapter if isinstance(adapter, (list, tuple)) else [adapter]:
            directory, config, state = checkpoints.read_adapter(one, revision=revision)
            trees.append(lora.from_peft(config, state, view, family.param_path, dtype, directory))
        tree = lora.stack(trees) if isinstance(adapter, (list, tuple)) else trees[0]
        return self.replace(params={**base, lora.LORA: tree})

    def add_adapter(
        self,
        target_modules: Any,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        use_rslora: bool = False,
        key: Any = None,
    ) -> CausalLM:
        """This model with a fresh LoRA adapter to train, as PEFT's
        `get_peft_model(model, LoraConfig(...))` initialises one: `a` uniform in
        `±1/sqrt(in)`, `b` zero (so the model starts as the base model), as
        `params["lora"]`; `save_adapter` writes it in PEFT's format.

        Args:
            target_modules: transformers module names as PEFT takes them: a list
                matched by their last components (`["q_proj", "v_proj"]`,
                GPT-2's `["c_attn"]`), a regular expression over the full name,
                or "all-linear" (every projection but the LM head).
            r: the rank.
            lora_alpha: the update's scale is `lora_alpha / r`.
            use_rslora: scale `lora_alpha / sqrt(r)` instead.
            key: a PRNG key for `a` (default `jax.random.key(0)`).
        """
        family = registry.family_for_config(self.config)
        if family.param_path is None:
            raise ValueError(f"the {family.name} family cannot take LoRA adapters")
        base, _ = lora.split(self.params)
        view = _adapter_view(family, base, self.config)
        # The family's checkpoint names, from a tree of scalars (no weight copied).
        names = family.state_dict_from_params(
            jax.tree_util.tree_map(lambda _: np.zeros((), np.float32), view), self.config
        )
        modules = lora.projections(view, names, family.param_path)
        dtype = jax.tree_util.tree_leaves(base)[0].dtype
        key = jax.random.key(0) if key is None else key
        tree = lora.init_adapter(
            view, modules, target_modules, r, lora_alpha, use_rslora, key, dtype
        )
        return self.replace(params={**base, lora.LORA: tree})

    def save_adapter(self, directory: str | os.PathLike[str]) -> None:
        """Writes the model's LoRA adapter (`params["lora"]`, e.g. after training
        it) as a PEFT adapter directory, `adapter_config.json` and
        `adapter_model.safetensors`, that PEFT (`PeftModel.from_pretrained`), vLLM
        and `load_adapter` read back with the same logits. Each entry needs the
        transformers module name it adapts (`LoraWeights.module`, set when the
        adapter was read from PEFT)."""
        _, adapter = lora.split(self.params)
        if adapter is None:
            raise ValueError("save_adapter: the model has no LoRA adapter (params['lora'])")
        config, tensors = lora.to_peft(adapter)
        checkpoints.write_adapter(os.fspath(directory), config, tensors)

    def merge_and_unload(self) -> CausalLM:
        """This model with its LoRA adapter folded into the weights
        (`W + scale * B A`) and removed, as PEFT's `merge_and_unload`: the same
        logits (to rounding) at the base model's speed. Pure (usable inside
        `jit`); a model without an adapter is returned as is. Projections fused
        at load come back separate, as the adapter names them."""
        base, adapter = lora.split(self.params)
        if adapter is None:
            return self
        family = registry.family_for_config(self.config)
        view = _adapter_view(family, base, self.config)
        return self.replace(params=lora.merge({**view, lora.LORA: adapter}))

    def apply_chat_template(
        self, messages: Any, add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """The tokenizer's chat template rendered for `messages`
        (`[{"role": "user", "content": "..."}]`), as transformers'
        `apply_chat_template(..., tokenize=False)`; encode it with
        `lm.tokenizer.encode(text)` (no special tokens added: the template writes
        its own BOS, as transformers' `apply_chat_template` tokenizes). See
        `Tokenizer.apply_chat_template`."""
        if self.tokenizer is None:
            raise ValueError("apply_chat_template needs a model with a tokenizer")
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def generate(
        self, input_ids: Any, attention_mask: Any = None, config: Any = None, **kwargs: Any
    ):
        """`jaxdecode.generate(self, ...)`: see there."""
        return generate(self, input_ids, attention_mask, config, **kwargs)


def _adapter_view(family: registry.Family, base: Any, config: Any) -> Any:
    """`base` params in the layout a LoRA adapter's module names address
    (`Family.adapter_params`: projections fused at load separate again), for
    the adapter's shapes; the model keeps its own layout (a fused product
    adds each part's update to its slice)."""
    return base if family.adapter_params is None else family.adapter_params(base, config)


@jax.jit
def _forward(lm: CausalLM, ids: Array, mask: Array) -> Array:
    cache = lm.decoder.init_cache(ids.shape[0], ids.shape[1], None)
    logits, _ = lm.decoder.apply(lm.params, ids, positions_from_mask(mask), cache, mask)
    return logits


def from_pretrained(
    path_or_repo_id: str | os.PathLike[str],
    *,
    dtype: Any = jnp.float32,
    allow_pickle: bool = False,
    revision: str | None = None,
    max_positions: int | None | str = "config",
    adapter: str | os.PathLike[str] | None = None,
) -> CausalLM:
    """Loads a Hugging Face checkpoint (local directory or hub id) of any
    registered model family, chosen by `config.json`'s `model_type`, or a GGUF
    file (chosen by its `general.architecture`; weights dequantized to `dtype`,
    tokenizer and chat template from the file).

    Args:
        path_or_repo_id: a directory with `config.json` and `model.safetensors`
            (or sharded safetensors), a `.gguf` file, "bundled", or a hub id
            such as "gpt2".
        dtype: parameter and cache dtype (float32 or bfloat16).
        allow_pickle: read `pytorch_model.bin` when no safetensors exist.
        revision: hub revision.
        max_positions: the context length `generate`, `score` and the engine
            enforce (prompt + new tokens): "config" (default) reads it from the
            checkpoint (`max_position_embeddings`, GGUF `<arch>.context_length`,
            GPT-2 `n_positions`); an int raises or lowers it, e.g. for a RoPE
            model used past its trained length (with rope scaling in its
            config); None removes it. GPT-2's learned positions end at
            `n_positions`: it cannot be raised there.
        adapter: a PEFT LoRA adapter for this base model (a directory with
            `adapter_config.json` and `adapter_model.safetensors`, or a hub id),
            applied unmerged: each targeted projection computes
            `x W^T + scale * (x A^T) B^T` (`scale = lora_alpha / r`, rsLoRA
            `lora_alpha / sqrt(r)`), with `A`, `B` in `params["lora"]`, their own
            subtree, so a training step can differentiate through them and decode
            with their current values. `lm.merge_and_unload()` folds them in.
            Options beyond plain LoRA (DoRA, LoRA biases, modules_to_save, ...)
            are refused, naming the option.

    Returns:
        A `CausalLM` with params, decoder, generation config and tokenizer.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    path = os.fspath(path_or_repo_id)
    if checkpoints.is_gguf(path):
        lm = _from_gguf(path, dtype)
    else:
        lm = _from_directory(path, dtype, allow_pickle, revision)
    if max_positions != "config":
        lm = lm.replace(decoder=lm.decoder.with_max_positions(max_positions))
    if adapter is not None:
        lm = lm.load_adapter(adapter)
    return lm


def _from_directory(path: str, dtype: Any, allow_pickle: bool, revision: str | None) -> CausalLM:
    directory = checkpoints.resolve_checkpoint_dir(
        path, revision=revision, allow_pickle=allow_pickle
    )
    data = checkpoints.read_config(directory)
    family = registry.family_for_hf_config(data)
    try:
        config = family.config_class.from_hf(data)
    except TypeError as e:
        raise ValueError(f"{os.path.join(directory, checkpoints.CONFIG)}: {e}") from None
    state = checkpoints.read_state_dict(directory, allow_pickle=allow_pickle)
    params = family.params_from_state_dict(state, config, dtype)
    decoder = family.decoder(config, dtype)
    tokenizer = load_tokenizer(directory)
    gen_path = os.path.join(directory, checkpoints.GENERATION_CONFIG)
    if os.path.isfile(gen_path):
        gen = GenerationConfig.from_hf(gen_path)
        gen = gen.replace(**checkpoints.special_token_ids(data, gen.to_hf(), tokenizer))
    else:
        gen = GenerationConfig(**checkpoints.special_token_ids(data, None, tokenizer))
    gen.validate(vocab_size=decoder.vocab_size)
    return CausalLM(
        params=params,
        decoder=decoder,
        config=config,
        generation_config=gen,
        tokenizer=tokenizer,
    )


def _from_gguf(path: str, dtype: Any) -> CausalLM:
    gguf = checkpoints.read_gguf(path)
    family = registry.lookup_gguf(gguf.architecture)
    if family.from_gguf is None:
        raise ValueError(f"the {family.name} family cannot read GGUF files")
    config, state = family.from_gguf(gguf.metadata, gguf.tensors)
    params = family.params_from_state_dict(state, config, dtype)
    decoder = family.decoder(config, dtype)
    if decoder.max_positions is not None and not decoder.fixed_limit:
        # Where the context length came from (GGUF metadata), for the length check's message.
        decoder = dataclasses.replace(decoder, limit_name=f"{gguf.architecture}.context_length")
    tokenizer = tokenizer_from_gguf(gguf.metadata)
    fields = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gen = GenerationConfig(**checkpoints.special_token_ids(fields, None, tokenizer))
    gen.validate(vocab_size=decoder.vocab_size)
    return CausalLM(
        params=params,
        decoder=decoder,
        config=config,
        generation_config=gen,
        tokenizer=tokenizer,
    )
