"""Runs in its own process with 4 CPU devices (tests/parity/test_lora.py starts it): a
tiny Llama with a LoRA adapter on every projection decoded greedily on a
(data 2, model 2) mesh, against the single-device run; and where the
adapter of a column- and a row-parallel projection is placed. Prints one JSON
object.

Usage: python tests/support/workers/lora_mesh_worker.py  (XLA_FLAGS set by the caller)
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxdecode as jd  # noqa: E402
from jaxdecode.models import lora  # noqa: E402
from jaxdecode.models.llama import LlamaConfig, init_params, llama_decoder  # noqa: E402
from jaxdecode.models.lora import LoraWeights  # noqa: E402
from jaxdecode.sharding import param_shardings  # noqa: E402

MESHES = [(2, 2)]


def tiny_model() -> jd.CausalLM:
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: x * 15.0 if x.ndim == 2 else x, params)
    keys = iter(jax.random.split(jax.random.key(1), 64))

    def adapter(node):
        if "weight" in node and node["weight"].ndim == 2:
            out, inp = node["weight"].shape
            a = jax.random.normal(next(keys), (4, inp)) / np.sqrt(inp)
            b = jax.random.normal(next(keys), (out, 4))
            return LoraWeights(a=a, b=b, scale=2.0)
        return {k: adapter(v) for k, v in node.items() if isinstance(v, dict)}

    layers = {k: adapter(v) for k, v in params.items() if k.startswith("layers_")}
    return jd.CausalLM(params={**params, "lora": layers}, decoder=llama_decoder(cfg), config=cfg)


def main() -> None:
    assert jax.device_count() == 4, jax.devices()
    lm = tiny_model()
    ids = np.random.default_rng(0).integers(1, 256, (4, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    cfg = jd.GenerationConfig(max_new_tokens=8, pad_token_id=0)
    out = {"single": np.asarray(jd.generate(lm, ids, mask, cfg).sequences).tolist()}
    base = lm.replace(params={k: v for k, v in lm.params.items() if k != "lora"})
    out["base"] = np.asarray(jd.generate(base, ids, mask, cfg).sequences).tolist()
    out["meshes"] = {}
    for d, m in MESHES:
        mesh = jd.make_mesh(data=d, model=m)
        seqs = jd.generate(lm, ids, mask, cfg, mesh=mesh).sequences
        out["meshes"][f"{d}x{m}"] = np.asarray(seqs).tolist()
    # Two stacked adapters (the second: the first negated), a per-row choice.
    other = jax.tree_util.tree_map(lambda x: -x, lm.params["lora"])
    stacked = lm.replace(params={**base.params, "lora": lora.stack([lm.params["lora"], other])})
    choice = [0, -1, 1, 0]
    one = jd.generate(stacked, ids, mask, cfg, adapter_ids=choice).sequences
    two = jd.generate(stacked, ids, mask, cfg, adapter_ids=choice, mesh=jd.make_mesh(2, 2))
    out["stacked"] = [np.asarray(one).tolist(), np.asarray(two.sequences).tolist()]
    mesh = jd.make_mesh(data=1, model=4)
    shardings = param_shardings(lm.params, mesh, lm.decoder.param_specs)["lora"]["layers_0"]
    out["specs"] = {
        name: [str(s.spec) for s in (w.a, w.b)]
        for name, w in (
            ("q_proj", shardings["self_attn"]["q_proj"]),
            ("down_proj", shardings["mlp"]["down_proj"]),
        )
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
