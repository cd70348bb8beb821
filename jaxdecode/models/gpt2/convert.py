"""GPT-2 checkpoints <-> jaxdecode parameters: names, Conv1D transposes, shapes.

transformers names GPT-2's tensors `transformer.h.3.attn.c_attn.weight` (the
prefix is optional in older files) and stores its projections as Conv1D
`[in, out]`; jaxdecode's tree is `h_3/attn/c_attn/weight` stored `[out, in]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdecode.checkpoints import checked_tensors
from jaxdecode.errors import CheckpointError
from jaxdecode.models.gpt2.config import GPT2Config

__all__ = ["expected_shapes", "param_path", "params_from_state_dict", "state_dict_from_params"]

# Buffers that older GPT-2 checkpoints carry (causal-mask constants): not parameters.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names (without the `transformer.` prefix) -> shapes."""
    e, inner = config.n_embd, config.inner_dim
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, e),
        "wpe.weight": (config.n_positions, e),
        "ln_f.weight": (e,),
        "ln_f.bias": (e,),
    }
    for i in range(config.n_layer):
        h = f"h.{i}."
        shapes.update(
            {
                h + "ln_1.weight": (e,),
                h + "ln_1.bias": (e,),
                h + "attn.c_attn.weight": (e, 3 * e),
                h + "attn.c_attn.bias": (3 * e,),
                h + "attn.c_proj.weight": (e, e),
                h + "attn.c_proj.bias": (e,),
                h + "ln_2.weight": (e,),
                h + "ln_2.bias": (e,),
                h + "mlp.c_fc.weight": (e, inner),
                h + "mlp.c_fc.bias": (inner,),
                h + "mlp.c_proj.weight": (inner, e),
                h + "mlp.c_proj.bias": (e,),
            }
        )
    return shapes


def _is_conv1d(name: str) -> bool:
    """GPT-2's Conv1D weights are `[in, out]`; jaxdecode stores them `[out, in]`."""
    return name.endswith(".weight") and name.split(".")[-2] in ("c_attn", "c_proj", "c_fc")


def _flax_path(name: str) -> tuple[str, ...]:
    """`h.3.attn.c_attn.weight` -> `("h_3", "attn", "c_attn", "weight")`."""
    parts = name.split(".")
    if parts[0] == "h":
        parts = [f"h_{parts[1]}", *parts[2:]]
    leaf = parts[-1]
    module = parts[-2]
    if module in ("wte", "wpe"):
        parts[-1] = "embedding"
    elif module.startswith("ln"):
        parts[-1] = "scale" if leaf == "weight" else "bias"
    else:
        parts[-1] = leaf  # projections: `weight` (stored transposed) / `bias`
    return tuple(parts)


def param_path(name: str) -> tuple[str, ...]:
    """A checkpoint tensor name (with or without the `transformer.` prefix) ->
    its path in the params tree (`transformer.h.3.attn.c_attn.weight` ->
    `("h_3", "attn", "c_attn", "weight")`, a weight stored `[out, in]`)."""
    return _flax_path(name.removeprefix("transformer."))


def params_from_state_dict(
    state: Mapping[str, np.ndarray], config: GPT2Config, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Checks names and shapes, then builds the Flax parameter tree.

    Raises:
        CheckpointError: naming the first missing, unexpected or misshapen tensor.
    """
    expected = expected_shapes(config)
    head = state.get("lm_head.weight")
    if head is not None and tuple(head.shape) != expected["wte.weight"]:
        raise CheckpointError(
            f"tensor lm_head.weight has shape {tuple(head.shape)}, expected "
            f"{expected['wte.weight']} (tied to wte.weight)"
        )

    def normalize(raw_name: str) -> str | None:
        name = raw_name.removeprefix("transformer.")
        if name.endswith(_BUFFER_SUFFIXES) or name == "lm_head.weight":
            return None  # buffers; the tied head (checked above, then unused)
        return name

    found = checked_tensors(state, expected, normalize, f"a GPT-2 with n_layer={config.n_layer}")
    params: dict[str, Any] = {}
    for name, array in found.items():
        node = params
        *parents, leaf = _flax_path(name)
        for p in parents:
            node = node.setdefault(p, {})
        if _is_conv1d(name):
            array = array.T
        node[leaf] = jnp.asarray(array, dtype=dtype)
    return params


def state_dict_from_params(params: Mapping[str, Any], config: GPT2Config) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state_dict` (float32), with transformers'
    `transformer.` names."""
    out = {}
    for name in expected_shapes(config):
        node: Any = params
        for p in _flax_path(name):
            node = node[p]
        array = np.asarray(node, dtype=np.float32)
        if _is_conv1d(name):
            array = array.T
        out["transformer." + name] = np.ascontiguousarray(array)
    return out
