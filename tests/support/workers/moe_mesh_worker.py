"""Runs in its own process with 2 CPU devices (tests/parity/test_moe.py starts it): a
tiny Qwen2-MoE (8 experts, top 2, a shared expert) decoded greedily on a
(data=1, model=2) mesh, whose `model` axis splits the experts (the logical
`expert` axis), against the single-device run. Prints one JSON object.

Usage: python tests/support/workers/moe_mesh_worker.py  (XLA_FLAGS set by the caller)
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxdecode as jd  # noqa: E402
from jaxdecode.models.qwen_moe import FAMILY, QwenMoeConfig  # noqa: E402
from jaxdecode.sharding import make_mesh, shard_params  # noqa: E402


def main() -> None:
    assert jax.device_count() == 2, jax.devices()
    cfg = QwenMoeConfig(
        model_type="qwen2_moe",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        qkv_bias=True,
        layer_types=("full_attention",) * 2,
    )
    params = FAMILY.init_params(cfg, jax.random.key(0))
    # Peaked logits and routing: no near-tie flips between reduction orders.
    params = jax.tree_util.tree_map(lambda x: x * 15.0 if x.ndim >= 2 else x, params)
    lm = jd.CausalLM(params=params, decoder=FAMILY.decoder(cfg), config=cfg)
    ids = np.random.default_rng(0).integers(1, 128, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    config = jd.GenerationConfig(max_new_tokens=8, pad_token_id=0)
    single = np.asarray(jd.generate(lm, ids, mask, config).sequences).tolist()
    mesh = make_mesh(1, 2)
    placed = shard_params(lm.params, mesh, lm.decoder.param_specs)
    experts = placed["layers_0"]["mlp"]["experts"]["gate_proj"]
    sharded_lm = jd.CausalLM(params=placed, decoder=lm.decoder, config=cfg)
    sharded = np.asarray(jd.generate(sharded_lm, ids, mask, config, mesh=mesh).sequences)
    print(
        json.dumps(
            {
                "single": single,
                "sharded": sharded.tolist(),
                "experts_spec": str(experts.sharding.spec),
                "experts_shard_shape": list(experts.addressable_shards[0].data.shape),
            }
        )
    )


if __name__ == "__main__":
    main()
