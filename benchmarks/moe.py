"""Mixture-of-experts decoding: a scaled-down Qwen3-MoE vs a dense model of its
active size vs transformers, one run.

Shape (defaults): Qwen3-MoE's block (q/k norms, GQA) with `--layers` layers,
hidden `--hidden`, `--experts` experts of width `--expert_width`, top
`--top_k`, random weights (float32). Its total parameters are several times its
active ones (`--experts / --top_k` times for the experts). The dense twin is a
Qwen3 (`qwen3`) with the same attention and one MLP of width `top_k *
expert_width`: the parameters one MoE decode step reads. transformers runs the
same MoE checkpoint (`Qwen3MoeForCausalLM`, eager attention, its default
experts implementation). On CPU the MoE decodes over the host's per-expert
views of its stacked experts (`Decoder.host_views`); `moe_stacked` is the same
model without them (the gathered form, which copies each routed expert's slice).

Each contender generates `--new` tokens greedily from a batch of `--batch`
random prompts of `--prompt` tokens (no EOS: every step runs); the first call
compiles/warms up, then `--repeats` timed rounds (the best of each kept); the
three jaxdecode contenders are timed in turn within each round, so load drift
hits their ratio alike. ms/step is
(time of a `--new`-token call - time of a 1-token call) / (`--new` - 1): decode
steps only, prefill excluded. Reported: ms/step per contender, the MoE / dense
ratio (target <= 1.5: the grouped product reads only the routed experts'
weights) and the MoE / transformers ratio.

    python benchmarks/moe.py --json benchmarks/results/moe_cpu.json
    python benchmarks/moe.py --tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import host_info, report  # noqa: E402


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--expert_width", type=int, default=512)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_hf", action="store_true", help="skip transformers")
    p.add_argument("--tiny", action="store_true", help="a tiny smoke run")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    a.hf_new = a.new
    if a.tiny:
        a.layers, a.hidden, a.heads, a.kv_heads = 2, 256, 4, 2
        a.experts, a.expert_width, a.top_k, a.vocab = 8, 128, 2, 1024
        # A per-step time is a difference of two calls' times. With hidden 64 a
        # step cost ~0.02 ms, so 16 steps (best of 3, timed apart) stayed under a
        # call's noise on a loaded machine (negative twice, in CI): a wider model,
        # 256 steps, best of 5, the two call lengths timed alternately.
        a.prompt, a.new, a.repeats = 8, 256, 5
        a.hf_new = 32  # transformers' eager step costs ~20 ms here: 32 are plenty
    return a


def _configs(a: argparse.Namespace) -> tuple[dict, dict]:
    common = dict(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        max_position_embeddings=a.prompt + a.new + 8,
        tie_word_embeddings=False,
    )
    moe = dict(
        common,
        model_type="qwen3_moe",
        intermediate_size=a.top_k * a.expert_width,
        num_experts=a.experts,
        num_experts_per_tok=a.top_k,
        moe_intermediate_size=a.expert_width,
        norm_topk_prob=True,
    )
    dense = dict(common, model_type="qwen3", intermediate_size=a.top_k * a.expert_width)
    return moe, dense


def _count(params) -> int:
    import jax

    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def _per_step_ms(runs: dict, new: int, repeats: int) -> dict[str, float]:
    """ms per decode step of each contender in `runs` (name -> `run(n)`): its
    best `run(new)` minus its best `run(1)`, over `new - 1` steps. Every
    contender and both call lengths are timed in turn, `repeats` rounds (after
    one warm-up each), so a change in the machine's load hits all alike; the
    minimum is kept because other work only adds time."""
    for run in runs.values():
        run(new)  # compile / warm up
        run(1)
    best = {(name, n): float("inf") for name in runs for n in (new, 1)}
    for _ in range(repeats):
        for name, run in runs.items():
            for n in (new, 1):
                t0 = time.perf_counter()
                run(n)
                best[name, n] = min(best[name, n], time.perf_counter() - t0)
    return {name: 1000 * (best[name, new] - best[name, 1]) / (new - 1) for name in runs}


def _jaxdecode(config: dict, ids: np.ndarray, a: argparse.Namespace, directory: str):
    """jaxdecode on a random checkpoint of `config` (saved to `directory` for
    transformers): `run(n)` functions (name -> run; an MoE also gets `stacked`,
    the same parameters without the host's per-expert views) and the model's
    (total, active) parameter counts."""
    import dataclasses

    import jax

    import jaxdecode as jd
    from jaxdecode.models import registry

    family = registry.lookup(config["model_type"])
    cfg = family.config_class.from_hf(config)
    params = family.init_params(cfg, jax.random.key(0))
    decoder = family.decoder(cfg)
    lm = jd.CausalLM(params=params, decoder=decoder, config=cfg)
    lm.save_pretrained(directory)
    total = _count(params)
    inactive = 0
    models = {"": lm}
    if cfg.model_type == "qwen3_moe":
        inactive = 3 * a.layers * (a.experts - a.top_k) * a.expert_width * a.hidden
        stacked = dataclasses.replace(decoder, host_views=None)
        models["stacked"] = jd.CausalLM(params=params, decoder=stacked, config=cfg)

    def runner(model):
        def run(new: int):
            out = jd.generate(model, ids, max_new_tokens=new, do_sample=False, eos_token_id=None)
            jax.block_until_ready(out.sequences)

        return run

    return {name: runner(model) for name, model in models.items()}, total, total - inactive


def _transformers(directory: str, ids: np.ndarray, a: argparse.Namespace) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    ).eval()
    prompt = torch.as_tensor(ids, dtype=torch.long)

    def run(new: int):
        with torch.no_grad():
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

    return _per_step_ms({"hf": run}, a.hf_new, a.repeats)["hf"]


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    moe, dense = _configs(a)
    ids = np.random.default_rng(0).integers(3, a.vocab, size=(a.batch, a.prompt)).astype(np.int32)
    result: dict = {"host": host_info(), "args": vars(a)}
    with tempfile.TemporaryDirectory() as tmp:
        moe_dir, dense_dir = os.path.join(tmp, "moe"), os.path.join(tmp, "dense")
        moe_runs, moe_total, moe_active = _jaxdecode(moe, ids, a, moe_dir)
        dense_runs, dense_total, _ = _jaxdecode(dense, ids, a, dense_dir)
        # The three jaxdecode contenders interleaved (their ratio is the target).
        ms = _per_step_ms(
            {"moe": moe_runs[""], "dense": dense_runs[""], "stacked": moe_runs["stacked"]},
            a.new,
            a.repeats,
        )
        moe_ms, dense_ms, stacked_ms = ms["moe"], ms["dense"], ms["stacked"]
        result.update(
            moe_params_total=moe_total,
            moe_params_active=moe_active,
            dense_params=dense_total,
            total_over_active=round(moe_total / moe_active, 2),
            jaxdecode_moe_ms_per_step=round(moe_ms, 3),
            jaxdecode_dense_ms_per_step=round(dense_ms, 3),
            moe_over_dense=round(moe_ms / dense_ms, 3),
            jaxdecode_moe_stacked_ms_per_step=round(stacked_ms, 3),
            moe_stacked_over_dense=round(stacked_ms / dense_ms, 3),
        )
        if not a.no_hf:
            hf_ms = _transformers(moe_dir, ids, a)
            result.update(
                transformers_moe_ms_per_step=round(hf_ms, 3),
                moe_over_transformers=round(moe_ms / hf_ms, 3),
            )
    report(result, a.json)


if __name__ == "__main__":
    main()
