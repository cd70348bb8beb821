"""Every way into a decode gives a prompt the same tokens: `generate` on the prompt
alone, `stream`, the `Engine`, and the CLI's `eval` on the engine and in static
batches, for 32 prompts with random per-row values (temperature, top_p, min_p,
penalties) and seeds, sampled and greedy.

A row's tokens depend only on its prompt, its values and its seed (DESIGN.md), so
any difference is one entry point packing, chaining or seeding differently.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params

EOS = 256
CFG = GPT2Config(
    vocab_size=257, n_positions=128, n_embd=32, n_layer=1, n_head=2, bos_token_id=EOS,
    eos_token_id=EOS,
)  # fmt: skip
N = 32


def _lm() -> jd.CausalLM:
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: x * 3.0, params)  # fewer greedy ties
    defaults = jd.GenerationConfig(
        max_new_tokens=6, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS
    )
    return jd.CausalLM(
        params=params, decoder=gpt2_decoder(CFG), config=CFG, generation_config=defaults,
        tokenizer=jd.byte_tokenizer(),
    )  # fmt: skip


def _lines(rng: np.random.Generator) -> list[dict]:
    """Eval lines: a prompt and its own options; sampled lines share which
    processors are present (one group), with random values and seeds."""
    lines = []
    for i in range(N):
        text = "".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(2, 12))))
        line = {"id": f"p{i}", "prompt": text}
        if i % 4 == 3:
            line.update(do_sample=False, repetition_penalty=float(rng.uniform(1.0, 1.5)))
        else:
            line.update(
                do_sample=True,
                seed=int(rng.integers(0, 2**31 - 1)),
                temperature=float(rng.uniform(0.5, 1.5)),
                top_p=float(rng.uniform(0.5, 0.99)),
                min_p=float(rng.uniform(0.0, 0.1)),
                repetition_penalty=float(rng.uniform(1.0, 1.5)),
                frequency_penalty=float(rng.uniform(-0.5, 0.5)),
                top_k=0,
            )
        lines.append(line)
    return lines


def _options(line: dict) -> dict:
    return {k: v for k, v in line.items() if k not in ("id", "prompt")}


def _eval(model_dir: str, lines: list[dict], tmp: Path, *flags: str) -> dict[str, list[int]]:
    """`jaxdecode eval` in this process (`cli.main`; the process end to end is
    tests/integration/test_cli.py's): each line's tokens by id."""
    from jaxdecode.cli import main

    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp / f"out{len(flags)}.jsonl"
    args = ["eval", "--model", model_dir, str(prompts), "-o", str(out), "--batch_size", "8"]
    assert main([*args, "--quiet", "--no-compilation-cache", *flags]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines() if x]
    return {r["id"]: r["outputs"][0]["tokens"] for r in records}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    lm = _lm()
    model_dir = tmp_path_factory.mktemp("tiny")
    lm.save_pretrained(str(model_dir))
    lines = _lines(np.random.default_rng(7))
    return lm, str(model_dir), lines


def test_generate_stream_engine_and_eval_agree(setup, tmp_path):
    lm, model_dir, lines = setup
    want = {}
    for line in lines:
        ids = np.asarray([lm.tokenizer.encode(line["prompt"])])
        out = lm.generate(ids, **_options(line))
        n = int(out.lengths[0])
        want[line["id"]] = np.asarray(out.sequences)[0, ids.shape[1] : ids.shape[1] + n].tolist()
    assert len({tuple(v) for v in want.values()}) > N // 2  # the rows really differ

    streamed = {}
    for line in lines[:8]:  # stream shares generate's program; a few rows suffice
        ids = np.asarray([lm.tokenizer.encode(line["prompt"])])
        steps = list(jd.stream(lm, ids, **_options(line)))
        tokens = [int(s.tokens[0]) for s in steps if bool(s.active[0])]
        streamed[line["id"]] = tokens
    assert streamed == {k: want[k] for k in streamed}

    # The engine: one per group of options that can share slots.
    results = jd.generate_many(
        lm, [lm.tokenizer.encode(x["prompt"]) for x in lines], [_options(x) for x in lines],
        slots=8, max_len=32,
    )  # fmt: skip
    engine_tokens = {x["id"]: r.tokens.tolist() for x, r in zip(lines, results, strict=True)}
    assert engine_tokens == want

    assert _eval(model_dir, lines, tmp_path) == want
    assert _eval(model_dir, lines, tmp_path, "--static-batching") == want
