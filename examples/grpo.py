"""GRPO on the bundled byte-level KJV GPT-2: sample, score, ratio, all in one jitted step.

What this shows (issue 18's recipe):

* **Sample** R completions per prompt with `jaxdecode.generate` inside the
  jitted train step, from the *current* params (a `CausalLM` is a pytree whose
  leaves are the params). Shared-prefix sampling prefills each prompt once.
* **Score** them with `jaxdecode.score` under the params being trained: one
  forward pass, then exactly the processor chain the sampler applied (here
  temperature, top-k), so `score(...).logprobs` are the log-probabilities the
  sampler drew from. The step reports the largest gap between the sampler's
  `token_logprobs` and the trainer's: it is float rounding (~1e-6).
* **Ratio**: `exp(logprobs - old_logprobs)`, a clipped surrogate loss
  (PPO/GRPO) and group-normalised advantages (each completion's reward minus the
  mean of its prompt's R completions, over their standard deviation). The first
  inner step runs under the sampling params: its own log-probabilities (without
  gradient) are `old_logprobs`, so its ratio is exactly 1 and its gradient is
  the policy gradient; the later inner steps reuse them, and clipping keeps the
  updated policy near the sampler.

The reward is verifiable and simple: 1 when the completion contains the word
"LORD", else 0 (the pretrained model writes it in ~10% of 24-byte
completions). Within a few hundred steps the mean reward climbs towards 1.

Usage:
    python examples/grpo.py [--steps 300] [--samples 8] [--lr 5e-5] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdecode as jd

PROMPTS = [b"And God said", b"In the beginning", b"The LORD is my", b"Blessed are the"]
TARGET = b"LORD"
NEW_TOKENS = 24


def encode(prompts: list[bytes], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte prompts, left-padded: `ids, mask: [batch, width]`."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = list(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def contains_reward(target: bytes) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`(completions [rows, N], lengths [rows]) -> [rows]`: 1.0 where the
    completion (before its end) contains `target`, else 0.0. Pure JAX, so it runs
    inside the jitted step."""
    word = jnp.asarray(list(target), jnp.int32)
    k = len(target)

    def reward(completions: jax.Array, lengths: jax.Array) -> jax.Array:
        n = completions.shape[1]
        windows = jnp.stack([completions[:, i : n - k + 1 + i] for i in range(k)], axis=-1)
        inside = jnp.arange(n - k + 1)[None, :] + k <= lengths[:, None]
        return jnp.any(jnp.all(windows == word, axis=-1) & inside, axis=-1).astype(jnp.float32)

    return reward


def group_advantages(rewards: jax.Array, group: int) -> jax.Array:
    """`[batch * group]` rewards -> advantages normalised within each prompt's group."""
    r = rewards.reshape(-1, group)
    adv = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + 1e-4)
    return adv.reshape(-1)


def make_train_step(
    lm: jd.CausalLM,
    optimizer: optax.GradientTransformation,
    config: jd.GenerationConfig,
    ids: np.ndarray,
    mask: np.ndarray,
    reward_fn: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    inner_steps: int = 2,
    clip_eps: float = 0.2,
    mesh: jax.sharding.Mesh | None = None,
    train_shardings: Any = None,
):
    """The jitted GRPO step `(params, opt_state, key) -> (params, opt_state, metrics)`.

    With `mesh`, the sampler decodes on it (`generate(mesh=...)`: the params are
    resharded to the family's decoding layout inside the step); with
    `train_shardings` (`(params, opt_state)` trees of `NamedSharding`s) the
    updated params and optimizer state keep that training layout (e.g. FSDP;
    the next call then compiles nothing), see examples/grpo_mesh.py."""
    group = config.num_return_sequences
    prompt_len = ids.shape[1]
    row_mask = np.repeat(mask, group, axis=0)  # the prompt mask of every completion

    def logprobs(params: Any, sequences: jax.Array) -> jd.ScoreOutput:
        return jd.score(
            lm.replace(params=params),
            sequences,
            config,
            prompt_length=prompt_len,
            attention_mask=row_mask,
        )

    def loss_fn(params, sequences, old, adv):
        s = logprobs(params, sequences)
        if old is None:  # first inner step: the params are the sampling params
            old = jax.lax.stop_gradient(s.logprobs)
        ratio = jnp.exp(s.logprobs - old)
        unclipped = ratio * adv[:, None]
        clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv[:, None]
        m = s.mask.astype(jnp.float32)
        loss = -jnp.sum(jnp.minimum(unclipped, clipped) * m) / jnp.maximum(jnp.sum(m), 1.0)
        return loss, (ratio, s)

    @jax.jit
    def train_step(params, opt_state, key):
        out = jd.generate(lm.replace(params=params), ids, mask, config, key=key, mesh=mesh)
        sequences = out.sequences
        rewards = reward_fn(sequences[:, prompt_len:], out.lengths)
        adv = group_advantages(rewards, group)
        metrics = {"reward": rewards.mean(), "length": out.lengths.mean()}
        old = None
        for i in range(inner_steps):
            (loss, (ratio, s)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, sequences, old, adv
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if train_shardings is not None:
                params, opt_state = jax.lax.with_sharding_constraint(
                    (params, opt_state), train_shardings
                )
            if i == 0:
                # The behaviour policy's log-probabilities, by the trainer's own
                # function under the sampling params; the sampler's agree.
                old = jax.lax.stop_gradient(s.logprobs)
                gap = jnp.abs(out.token_logprobs - old)
                metrics["loss"] = loss
                metrics["sampler_gap"] = jnp.max(jnp.where(s.mask, gap, 0.0))
                metrics["first_ratio_dev"] = jnp.max(jnp.where(s.mask, jnp.abs(ratio - 1.0), 0.0))
            else:
                metrics[f"ratio_range_{i}"] = jnp.max(jnp.where(s.mask, jnp.abs(ratio - 1.0), 0.0))
        return params, opt_state, metrics

    return train_step


def train(
    steps: int = 300,
    samples: int = 8,
    lr: float = 5e-5,
    seed: int = 0,
    new_tokens: int = NEW_TOKENS,
    log_every: int = 10,
    print_fn: Callable[[str], None] | None = print,
) -> list[dict[str, float]]:
    """Runs GRPO; returns the metrics of every step."""
    lm = jd.from_pretrained("bundled")
    config = lm.generation_config.replace(
        do_sample=True,
        temperature=1.0,
        top_k=40,
        top_p=1.0,
        max_new_tokens=new_tokens,
        num_return_sequences=samples,
    )
    ids, mask = encode(PROMPTS, config.pad_id)
    optimizer = optax.adam(lr)
    step_fn = make_train_step(lm, optimizer, config, ids, mask, contains_reward(TARGET))
    params, opt_state = lm.params, optimizer.init(lm.params)
    base = jax.random.key(seed)
    history = []
    start = time.perf_counter()
    for step in range(steps):
        params, opt_state, metrics = step_fn(params, opt_state, jax.random.fold_in(base, step))
        history.append({k: float(v) for k, v in metrics.items()})
        if print_fn and (step % log_every == 0 or step == steps - 1):
            recent = np.mean([h["reward"] for h in history[-log_every:]])
            h = history[-1]
            print_fn(
                f"step {step:4d}  reward {recent:.3f}  loss {h['loss']:+.4f}  "
                f"len {h['length']:.1f}  sampler-trainer gap {h['sampler_gap']:.1e}  "
                f"first ratio - 1 {h['first_ratio_dev']:.1e}  {time.perf_counter() - start:.0f}s"
            )
    if print_fn:
        out = jd.generate(lm.replace(params=params), ids, mask, config, key=jax.random.key(seed))
        rows = np.asarray(out.sequences)[:, ids.shape[1] :]
        for i, p in enumerate(PROMPTS):
            text = bytes(t for t in rows[i * samples] if t < 256).decode("latin-1")
            print_fn(f"{p.decode()!r} -> {text!r}")
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt (R)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args.steps, args.samples, args.lr, args.seed)


if __name__ == "__main__":
    main()
