"""Greedy vs beam search vs top-k vs top-p vs temperature vs repetition penalty,
side by side on the bundled model (the README's table comes from this script).

    python examples/decoding_strategies.py "And God said" --max-new-tokens 60
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import jaxdecode as jd

STRATEGIES: list[tuple[str, dict]] = [
    ("greedy", dict(do_sample=False)),
    ("greedy + repetition_penalty=1.3", dict(do_sample=False, repetition_penalty=1.3)),
    ("beam search, 4 beams", dict(do_sample=False, num_beams=4)),
    ("top-k 10", dict(do_sample=True, top_k=10, top_p=1.0)),
    ("top-p 0.9", dict(do_sample=True, top_k=0, top_p=0.9)),
    ("temperature 0.5", dict(do_sample=True, top_k=0, top_p=1.0, temperature=0.5)),
    ("temperature 1.5", dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.5)),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt", nargs="?", default="And God said")
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)

    lm = jd.from_pretrained(args.model)
    ids = np.array([lm.tokenizer.encode(args.prompt)])
    if args.markdown:
        print("| strategy | output |\n|---|---|")
    for name, options in STRATEGIES:
        out = lm.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            key=jax.random.key(args.seed),
            temperature=options.pop("temperature", 1.0),
            **options,
        )
        n = int(np.asarray(out.lengths)[0])
        tokens = np.asarray(out.sequences)[0, ids.shape[1] : ids.shape[1] + n]
        text = lm.tokenizer.decode([t for t in tokens if t not in lm.generation_config.eos_ids])
        if args.markdown:
            shown = (args.prompt + text).replace("\n", " / ").replace("|", "\\|")
            print(f"| {name} | {shown} |")
        else:
            print(f"== {name}\n{args.prompt}{text}\n")


if __name__ == "__main__":
    main()
