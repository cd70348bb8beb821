"""Train a tiny byte-level GPT-2 and sample from it inside the jitted training step.

What this shows:

* `jaxdecode.generate` is an ordinary JAX function: it runs inside a user's
  `jax.jit`, here the training step itself, on the *current* (traced) params.
  `jaxdecode.CausalLM` is a pytree whose leaves are the params (the decoder and
  the configs are static), so building one from the traced params inside the
  step costs nothing and bakes nothing in as a constant.
* ONE compiled step does the optax (AdamW) update and, every `--sample-every`
  steps, also samples a continuation of a few prompts: `jax.lax.cond` on the
  step counter selects the sampling branch, so the other steps do not pay for
  generation. Both branches of a `cond` must return the same shapes, so the
  no-sample branch returns a dummy array of -1s. The sampling key is derived
  from the step (`jax.random.fold_in`), so there is no host round trip either.
* The Python loop only prints the loss and, when the step returned a sample,
  decodes its bytes.

The data is a few English sentences repeated, tokenised byte by byte (token =
byte value, vocabulary 257, 256 = EOS ends each sentence). Within a few hundred
steps the loss falls from ln(257) ~ 5.5 to well under 1 and the samples go from
random bytes to the training sentences.

Usage:
    python examples/train_and_sample.py [--steps 300] [--sample-every 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdecode
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "All that glitters is not gold.",
    "The early bird catches the worm.",
    "A journey of a thousand miles begins with a single step.",
]
EOS = 256  # byte tokens are 0..255
VOCAB = 257
SEQ_LEN = 64  # training window (tokens)
BATCH = 16
PROMPTS = [b"The", b"All", b"A j"]  # sampled every --sample-every steps (same length)
MAX_NEW_TOKENS = 56


def encode_corpus() -> np.ndarray:
    """The sentences as one byte stream, each followed by EOS, repeated."""
    one_pass = []
    for sentence in SENTENCES:
        one_pass += list(sentence.encode("utf-8")) + [EOS]
    repeats = -(-4 * SEQ_LEN // len(one_pass)) + 1
    return np.array(one_pass * repeats, np.int32)


def decode(tokens: np.ndarray) -> str:
    """Bytes up to the first EOS (or pad), as text."""
    out = []
    for t in tokens.tolist():
        if t >= EOS or t < 0:
            break
        out.append(t)
    return bytes(out).decode("utf-8", errors="replace")


def make_train_step(config, optimizer, corpus, *, total_steps, sample_every, seed):
    decoder = gpt2_decoder(config)
    generation_config = jaxdecode.GenerationConfig(eos_token_id=EOS, pad_token_id=EOS)
    corpus = jnp.asarray(corpus)
    prompts = np.array([list(p) for p in PROMPTS], np.int32)
    base_key = jax.random.key(seed)

    def loss_fn(params, batch):
        lm = jaxdecode.CausalLM(params=params, decoder=decoder, config=config)
        logits = lm.logits(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    def sample(params, key):
        lm = jaxdecode.CausalLM(
            params=params, decoder=decoder, config=config, generation_config=generation_config
        )
        out = lm.generate(
            prompts,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=True,
            temperature=0.6,
            top_k=0,
            key=key,
        )
        return out.sequences

    def no_sample(params, key):
        return jnp.full((len(PROMPTS), prompts.shape[1] + MAX_NEW_TOKENS), -1, jnp.int32)

    @jax.jit
    def train_step(params, opt_state, step):
        data_key, sample_key = jax.random.split(jax.random.fold_in(base_key, step))
        starts = jax.random.randint(data_key, (BATCH,), 0, corpus.shape[0] - SEQ_LEN - 1)
        batch = jax.vmap(lambda s: jax.lax.dynamic_slice(corpus, (s,), (SEQ_LEN + 1,)))(starts)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        sample_now = (step % sample_every == 0) | (step == total_steps - 1)
        samples = jax.lax.cond(sample_now, sample, no_sample, params, sample_key)
        return params, opt_state, loss, samples

    return train_step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument(
        "--sample-every", type=int, default=100, help="sample inside the step every N steps"
    )
    parser.add_argument("--seed", type=int, default=0, help="init, data and sampling seed")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.sample_every < 1 or args.log_every < 1:
        parser.error("--steps, --sample-every and --log-every must be >= 1")

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ_LEN,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    # Jitted: an eager Flax init dispatches (and compiles) op by op.
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, 3e-3, warmup_steps=min(20, args.steps), decay_steps=max(args.steps, 21)
    )
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    opt_state = optimizer.init(params)
    train_step = make_train_step(
        config,
        optimizer,
        encode_corpus(),
        total_steps=args.steps,
        sample_every=args.sample_every,
        seed=args.seed,
    )

    start = time.perf_counter()
    for step in range(args.steps):
        params, opt_state, loss, samples = train_step(params, opt_state, jnp.int32(step))
        last = step == args.steps - 1
        if step % args.log_every == 0 or last:
            print(f"step {step:5d}  loss {float(loss):.4f}", flush=True)
        samples = np.asarray(samples)
        if samples[0, 0] >= 0:  # the no-sample branch returns -1s
            for prompt, row in zip(PROMPTS, samples, strict=True):
                text = prompt.decode() + decode(row[len(prompt) :])
                print(f"  sample @ step {step}: {text!r}", flush=True)
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f}s (compilation included)")


if __name__ == "__main__":
    main()
