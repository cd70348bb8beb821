"""End-to-end decoding speed of jaxdecode against Hugging Face transformers.

A random-weight GPT-2-small checkpoint (124M parameters, `GPT2Config()` defaults,
`torch.manual_seed(0)`, `save_pretrained`) is created once under `--model-dir`
and decoded by jaxdecode and by transformers 5 (PyTorch) in the same run, the
two alternating, for these workloads (prompt 32 random token ids with a fixed
seed, the same for both; 128 new tokens):

* `greedy_b1`, `greedy_b8`: greedy search at batch 1 and 8;
* `beam4_b1`: beam search, 4 beams, batch 1;
* `sample_b1`, `sample_b8`: sampling with top_k=50, top_p=0.9 at batch 1 and 8.

Optionally a second peer, the Flax `generate` of transformers 4.57 (removed in
transformers 5), runs in its own virtual environment (`--peer hf hf-flax`):

    python -m venv .venv-hfflax
    .venv-hfflax/bin/pip install "transformers==4.57.*" flax jax torch==2.13.0

How each number is taken:

* **Processes.** Every library runs in its own worker process (this script
  with `--_worker KIND`), driven line by line over a pipe, so that the libraries
  never share a heap or thread pools and each one's memory can be measured
  alone. The timed region is inside the worker. By default every workload gets
  fresh workers (`--workers per-workload`); `--quick` shares them across
  workloads (`--workers shared`) to start faster.
* **No early stop.** EOS is switched off for every library (`eos_token_id=None`
  for jaxdecode and transformers 5; an unreachable id, `vocab_size`, for the
  Flax generate, which has no "no EOS" setting), so each runs exactly
  `new_tokens` steps; this is checked on the outputs (shape, and jaxdecode's
  `lengths`). `pad_token_id=0` everywhere.
* **Timing.** Per workload each worker runs generate once untimed (jaxdecode
  and Flax: trace + compile + one run; transformers: warm-up), then the
  libraries alternate `--runs` times (the order rotates every run). A run is
  the wall time of one full generate call, outputs made ready
  (`block_until_ready` for JAX, `torch.cuda.synchronize` on a GPU), after
  `--pause-s` idle seconds (a library's threads may spin-wait for a while after
  a call; on a small CPU that would slow the other library's next run).
  `ms/step` = median run / new_tokens (the prefill is included); tokens/s =
  batch * new_tokens / median run (beam search: the batch's best hypotheses).
  Unless `--no-prefill`, generate with one new token is timed the same way;
  `decode ms/step` = (median full - median one-token) / (new_tokens - 1), the
  step time without the prefill.
* **Compile time** (JAX libraries): the sum of the `jax.monitoring` tracing,
  lowering and XLA compile durations during the first call (measured, not
  inferred); the JSON also has `first_call_s` and the first call minus the
  median run. transformers (eager) has no compile step.
* **Peak memory.** CPU: the worker's peak resident set size during the
  workload. The peak mark is reset (`/proc/self/clear_refs`) after the model
  is loaded and just before the workload's first call, so loading transients
  are left out; the mark then covers interpreter + libraries + model + compile
  + decoding. `rss_before_mb` (the RSS at the reset) lets you subtract the
  baseline. Where the mark cannot be reset, `ru_maxrss` (whole process) is
  reported and `peak_scope` says "process". GPU: the device's peak bytes in use
  (`memory_stats()["peak_bytes_in_use"]`, cumulative over the worker's life, so
  exact with fresh workers; `torch.cuda.max_memory_allocated`, reset per
  workload); the host peak is in the JSON too.
* **Bandwidth.** Measured by the script on the same machine before the
  libraries start: a `--bw-mb` float32 array copied (`np.copyto`) and
  incremented by a jitted `x + 1` (best of 5 each, 20 on a GPU; both read N and write N
  bytes, counted as 2N); on a GPU, the jitted `x + 1` on the device. The best
  figure is the bandwidth.
* **Model bandwidth utilisation** = (weight bytes + KV bytes read per step) /
  (seconds per step) / bandwidth, per library, with seconds per step =
  `ms/step` (`mbu_decode` uses `decode ms/step`). Weight bytes: all parameters
  once (the tied embedding counted once). KV bytes read per step: the average
  over the steps of the keys and values a step must read,
  `2 * layers * rows * (prompt + new_tokens / 2) * n_embd * itemsize` (rows =
  batch * beams) - what the attention needs, not what an implementation with
  a fixed-size cache may actually touch.
* **Parity.** For greedy and beam search the generated token ids of each peer
  are compared with jaxdecode's (all rows, all positions). Sampling uses
  different random streams: no parity, only the length check. (bfloat16, or a
  GPU where XLA's default float32 matmul precision is TF32, may flip a near-tie
  and so break parity without any bug.) `--sampling-method fast` selects
  jaxdecode's sort-free top-k / top-p for the sampling workloads.

`--dtype bfloat16` loads jaxdecode's weights and KV cache in bfloat16;
transformers stays float32 unless `--hf-dtype bfloat16`. On a machine where JAX
sees a GPU, jaxdecode runs there, transformers runs on CUDA when
`torch.cuda.is_available()` (else CPU; the record says which), and bandwidth is
that of the card.

Usage:
    python benchmarks/compare_hf.py                         # full run -> benchmarks/results/
    python benchmarks/compare_hf.py --workloads greedy_b1 beam4_b1 --runs 5
    python benchmarks/compare_hf.py --dtype bfloat16
    python benchmarks/compare_hf.py --peer hf hf-flax --hf-flax-python .venv-hfflax/bin/python
    python benchmarks/compare_hf.py --quick --json /tmp/c.json   # tiny smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from common import (
    current_rss_mb,
    host_info,
    load_avg,
    peak_rss_mb,
    reset_peak_rss,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEFAULT_MODEL_DIR = HERE / ".cache" / "gpt2-small-random"
QUICK_MODEL_DIR = HERE / ".cache" / "gpt2-tiny-random"
DEFAULT_FLAX_PYTHON = ROOT / ".venv-hfflax" / "bin" / "python"
FLAX_VENV_HELP = (
    "python -m venv .venv-hfflax && "
    '.venv-hfflax/bin/pip install "transformers==4.57.*" flax jax torch==2.13.0'
)

# The checkpoint of `--quick`: GPT-2's architecture at toy size.
QUICK_CONFIG = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "vocab_size": 1000,
    "bos_token_id": 999,
    "eos_token_id": 999,
}
TOP_K = 50
TOP_P = 0.9
PAD_ID = 0
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
PEERS = ("hf", "hf-flax")
LIB_NAMES = {"jd": "jaxdecode", "hf": "transformers", "hf-flax": "hf_flax"}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One decoding job.

    Attributes:
        name: e.g. "greedy_b8".
        batch: prompts decoded together.
        num_beams: beams per prompt (1: no beam search).
        do_sample: sample (with top_k=50, top_p=0.9) instead of argmax.
    """

    name: str
    batch: int
    num_beams: int = 1
    do_sample: bool = False

    @property
    def rows(self) -> int:
        """Sequences the model runs on: batch * beams."""
        return self.batch * self.num_beams

    @property
    def has_parity(self) -> bool:
        """Whether the libraries must produce identical tokens (not sampling)."""
        return not self.do_sample


WORKLOADS = {
    w.name: w
    for w in (
        Workload("greedy_b1", 1),
        Workload("greedy_b8", 8),
        Workload("beam4_b1", 1, num_beams=4),
        Workload("sample_b1", 1, do_sample=True),
        Workload("sample_b8", 8, do_sample=True),
    )
}


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """Random prompt token ids, the same for every library.

    Args:
        batch: rows.
        length: tokens per row.
        vocab: ids are drawn from `[0, vocab)`.
        seed: generator seed.

    Returns:
        `[batch, length]` int32 ids.
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (batch, length), dtype=np.int64).astype(np.int32)


def kv_bytes_per_step(
    layers: int, rows: int, prompt_len: int, new_tokens: int, n_embd: int, itemsize: int
) -> float:
    """Keys and values one decode step reads, averaged over the steps.

    At step t the attention reads `prompt_len + t` cached positions per row and
    layer, keys and values, each `n_embd` wide; the average over t in
    `[0, new_tokens)` is taken as `prompt_len + new_tokens / 2`.

    Args:
        layers: transformer blocks.
        rows: sequences decoded (batch * beams).
        prompt_len: prompt tokens.
        new_tokens: generated tokens.
        n_embd: hidden size (= heads * head_dim).
        itemsize: bytes per cache element.

    Returns:
        The bytes.
    """
    return 2.0 * layers * rows * (prompt_len + new_tokens / 2) * n_embd * itemsize


def mbu(bytes_per_step: float, seconds_per_step: float, bandwidth_gbs: float) -> float | None:
    """Model bandwidth utilisation: achieved bytes/s over the measured bandwidth."""
    if seconds_per_step <= 0 or not bandwidth_gbs:
        return None  # e.g. a prefill-free step time lost in the noise of a tiny run
    return bytes_per_step / seconds_per_step / (bandwidth_gbs * 1e9)


# --------------------------------------------------------------------------- #
# Workers: one process per library, commands and replies as JSON lines.
# --------------------------------------------------------------------------- #


class _Worker:
    """Base of the worker processes: memory bookkeeping and the command loop."""

    def __init__(self) -> None:
        self.rss_before: float | None = None
        self.peak_scope = "process"
        self.call: Callable[[int], Any] | None = None  # generate(max_new_tokens=n), set up

    def _first_call(self, fn: Callable[[], Any]) -> tuple[Any, float, dict[str, float] | None]:
        """Runs `fn` once; returns (output, wall seconds, compile seconds by phase or None)."""
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start, None

    def cmd_setup_one(self) -> dict[str, Any]:
        """First call of the one-new-token generate (compiles it where there is a compiler)."""
        _, first, phases = self._first_call(lambda: self.call(1))
        return {
            "first_call_s": first,
            "compile_s": None if phases is None else sum(phases.values()),
        }

    def cmd_run(self, new_tokens: int) -> dict[str, Any]:
        """One timed generate call (outputs ready when it returns)."""
        start = time.perf_counter()
        self.call(new_tokens)
        return {"seconds": time.perf_counter() - start}

    def cmd_begin_workload(self) -> dict[str, Any]:
        """Resets the peak-RSS mark (and the device peak where the library can)."""
        self.peak_scope = "workload" if reset_peak_rss() else "process"
        self.rss_before = current_rss_mb()
        self._reset_device_peak()
        return {}

    def _reset_device_peak(self) -> None:
        pass

    def _device_peak_mb(self) -> tuple[float | None, str | None]:
        return None, None

    def cmd_memory(self) -> dict[str, Any]:
        """Peak memory since `begin_workload`."""
        device_peak, device_scope = self._device_peak_mb()
        return {
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": self.rss_before,
            "peak_scope": self.peak_scope,
            "device_peak_mb": device_peak,
            "device_peak_scope": device_scope,
        }

    def serve(self, proto: TextIO) -> None:
        """Answers commands from stdin until "exit" or end of input."""
        for line in sys.stdin:
            request = json.loads(line)
            cmd = request.pop("cmd")
            if cmd == "exit":
                break
            try:
                reply = {"ok": True, **getattr(self, "cmd_" + cmd)(**request)}
            except Exception:
                reply = {"ok": False, "error": traceback.format_exc()}
            proto.write(json.dumps(reply) + "\n")
            proto.flush()


class _JaxMixin:
    """Compile-time accounting and device memory for the JAX-based workers."""

    def _init_jax(self) -> None:
        import jax
        from jax import monitoring

        self.jax = jax
        self.compile_secs = dict.fromkeys(COMPILE_EVENTS, 0.0)

        def on_event(name: str, secs: float, **_: Any) -> None:
            if name in self.compile_secs:
                self.compile_secs[name] += secs

        monitoring.register_event_duration_secs_listener(on_event)

    def _first_call(self, fn: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
        """Runs `fn` once; returns (output, wall seconds, JAX compile seconds by phase)."""
        before = dict(self.compile_secs)
        start = time.perf_counter()
        out = self.jax.block_until_ready(fn())
        wall = time.perf_counter() - start
        phases = {k.rsplit("/", 1)[1]: self.compile_secs[k] - before[k] for k in COMPILE_EVENTS}
        return out, wall, phases

    def _device_peak_mb(self) -> tuple[float | None, str | None]:
        if self.jax.default_backend() == "cpu":
            return None, None
        stats = self.jax.devices()[0].memory_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            return None, None
        return stats["peak_bytes_in_use"] / 2**20, "process"


class JaxdecodeWorker(_JaxMixin, _Worker):
    """Runs jaxdecode.generate."""

    def __init__(self) -> None:
        super().__init__()
        self._init_jax()
        import jaxdecode

        self.jd = jaxdecode
        self.lm = None

    def cmd_info(self) -> dict[str, Any]:
        import flax
        import jaxlib

        jax = self.jax
        device = jax.devices()[0]
        return {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "jax_device_kind": device.device_kind,
        }

    def cmd_bandwidth(self, mb: int, reps: int) -> dict[str, Any]:
        """Copy bandwidth in GB/s (2N bytes per copy of N bytes), best of `reps`."""
        jax = self.jax
        import jax.numpy as jnp

        n = mb * 2**20 // 4
        nbytes = 2 * n * 4
        if jax.default_backend() != "cpu":
            reps = max(reps, 20)  # a copy takes well under a millisecond on a card
        out: dict[str, Any] = {"array_mb": mb, "reps": reps}
        if jax.default_backend() == "cpu":
            src = np.ones(n, np.float32)
            dst = np.empty_like(src)
            np.copyto(dst, src)  # touch every page first
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                np.copyto(dst, src)
                times.append(time.perf_counter() - start)
            out["numpy_copy_gbs"] = nbytes / min(times) / 1e9
            del src, dst
        x = jnp.ones((n,), jnp.float32)
        inc = jax.jit(lambda a: a + 1.0)
        jax.block_until_ready(inc(x))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            y = jax.block_until_ready(inc(x))
            times.append(time.perf_counter() - start)
            del y
        out["jax_add_gbs"] = nbytes / min(times) / 1e9
        out["device"] = str(jax.devices()[0])
        out["bandwidth_gbs"] = max(v for k, v in out.items() if k.endswith("_gbs"))
        return out

    def cmd_load(self, model_dir: str, dtype: str) -> dict[str, Any]:
        jax = self.jax
        self.lm = self.jd.from_pretrained(model_dir, dtype=dtype)
        leaves = jax.tree_util.tree_leaves(self.lm.params)
        return {
            "weight_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
            "parameters": int(sum(x.size for x in leaves)),
            "dtype": dtype,
            "cache_itemsize": int(np.dtype(leaves[0].dtype).itemsize),
        }

    def cmd_setup(
        self, workload: str, prompts: list[list[int]], new_tokens: int, seed: int, method: str
    ) -> dict[str, Any]:
        jax = self.jax
        w = WORKLOADS[workload]
        ids = np.asarray(prompts, np.int32)
        kwargs: dict[str, Any] = {
            "num_beams": w.num_beams,
            "do_sample": w.do_sample,
            "eos_token_id": None,
            "pad_token_id": PAD_ID,
        }
        if w.do_sample:
            kwargs.update(
                top_k=TOP_K,
                top_p=TOP_P,
                temperature=1.0,
                top_k_method=method,
                top_p_method=method,
            )
        key = jax.random.key(seed) if w.do_sample else None
        lm = self.lm

        def call(n: int) -> Any:
            out = self.jd.generate(lm, ids, max_new_tokens=n, key=key, **kwargs)
            return jax.block_until_ready(out)

        self.call = call
        out, first, phases = self._first_call(lambda: call(new_tokens))
        seqs = np.asarray(out.sequences)
        lengths = np.asarray(out.lengths)
        return {
            "first_call_s": first,
            "compile_s": sum(phases.values()),
            "compile_phases_s": phases,
            "sequences": seqs.tolist(),
            "new_tokens_ok": bool(
                seqs.shape == (w.batch, ids.shape[1] + new_tokens) and np.all(lengths == new_tokens)
            ),
        }


class TransformersWorker(_Worker):
    """Runs transformers' (PyTorch) GPT2LMHeadModel.generate."""

    def __init__(self) -> None:
        super().__init__()
        import torch
        import transformers

        self.torch = torch
        self.transformers = transformers
        torch.set_num_threads(os.cpu_count() or 1)
        self.model = None
        self.device = "cpu"

    def cmd_make_checkpoint(self, model_dir: str, config: dict[str, Any]) -> dict[str, Any]:
        """Creates the random-weight checkpoint unless `model_dir` already has one."""
        torch, transformers = self.torch, self.transformers
        target = Path(model_dir)
        if (target / "config.json").is_file():
            return {"created": False}
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            torch.manual_seed(0)
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
            model.save_pretrained(tmp)
            if target.exists():
                target.rmdir()  # only an empty leftover; a full one returned above
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return {"created": True}

    def cmd_info(self) -> dict[str, Any]:
        torch = self.torch
        info: dict[str, Any] = {
            "torch": torch.__version__,
            "transformers": self.transformers.__version__,
            "torch_num_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(),
        }
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
        return info

    def cmd_load(self, model_dir: str, dtype: str, device: str) -> dict[str, Any]:
        torch = self.torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model = (
            self.transformers.GPT2LMHeadModel.from_pretrained(
                model_dir, dtype=getattr(torch, dtype)
            )
            .to(device)
            .eval()
        )
        params = list(self.model.parameters())  # tied weights appear once
        return {
            "weight_bytes": int(sum(p.numel() * p.element_size() for p in params)),
            "parameters": int(sum(p.numel() for p in params)),
            "dtype": dtype,
            "cache_itemsize": int(params[0].element_size()),
            "device": device,
        }

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def _reset_device_peak(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.reset_peak_memory_stats()

    def _device_peak_mb(self) -> tuple[float | None, str | None]:
        if not self.device.startswith("cuda"):
            return None, None
        return self.torch.cuda.max_memory_allocated() / 2**20, "workload"

    def cmd_setup(
        self, workload: str, prompts: list[list[int]], new_tokens: int, seed: int, method: str
    ) -> dict[str, Any]:
        torch = self.torch
        w = WORKLOADS[workload]
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        kwargs: dict[str, Any] = {
            "num_beams": w.num_beams,
            "do_sample": w.do_sample,
            "eos_token_id": None,
            "pad_token_id": PAD_ID,
        }
        if w.do_sample:
            kwargs.update(top_k=TOP_K, top_p=TOP_P, temperature=1.0)

        def call(n: int) -> Any:
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, **kwargs)
            self._sync()
            return out

        self.call = call
        start = time.perf_counter()
        seqs = call(new_tokens).cpu().numpy()
        first = time.perf_counter() - start
        return {
            "first_call_s": first,
            "compile_s": None,
            "sequences": seqs.tolist(),
            "new_tokens_ok": bool(seqs.shape == (w.batch, ids.shape[1] + new_tokens)),
        }


class FlaxWorker(_JaxMixin, _Worker):
    """Runs transformers 4.57's FlaxGPT2LMHeadModel.generate, under `jax.jit`.

    Meant for its own virtual environment (transformers 5 has no Flax models);
    imports nothing of jaxdecode. Flax generate cannot switch EOS off, so the
    EOS id is `vocab_size`, which no step can produce.
    """

    def __init__(self) -> None:
        super().__init__()
        self._init_jax()
        import transformers

        self.transformers = transformers
        self.model = None
        self.params = None
        self.vocab = 0

    def cmd_info(self) -> dict[str, Any]:
        import flax

        jax = self.jax
        return {
            "transformers": self.transformers.__version__,
            "jax": jax.__version__,
            "flax": flax.__version__,
            "jax_backend": jax.default_backend(),
            "jax_device_kind": jax.devices()[0].device_kind,
        }

    def cmd_load(self, model_dir: str, dtype: str) -> dict[str, Any]:
        import jax.numpy as jnp

        jdtype = jnp.dtype(dtype)
        self.model = self.transformers.FlaxGPT2LMHeadModel.from_pretrained(
            model_dir, from_pt=True, dtype=jdtype
        )
        params = self.model.params
        if jdtype == jnp.bfloat16:
            params = self.model.to_bf16(params)
        self.params = self.jax.device_put(params)
        self.vocab = int(self.model.config.vocab_size)
        leaves = self.jax.tree_util.tree_leaves(self.params)
        return {
            "weight_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
            "parameters": int(sum(x.size for x in leaves)),
            "dtype": dtype,
            "cache_itemsize": int(jdtype.itemsize),
        }

    def cmd_setup(
        self, workload: str, prompts: list[list[int]], new_tokens: int, seed: int, method: str
    ) -> dict[str, Any]:
        jax = self.jax
        w = WORKLOADS[workload]
        ids = jax.numpy.asarray(np.asarray(prompts, np.int32))
        mask = jax.numpy.ones_like(ids)
        key = jax.random.PRNGKey(seed)
        kwargs: dict[str, Any] = {
            "num_beams": w.num_beams,
            "do_sample": w.do_sample,
            "eos_token_id": self.vocab,  # unreachable: never stops early
            "pad_token_id": PAD_ID,
            "early_stopping": False,
            "length_penalty": 1.0,
        }
        if w.do_sample:
            kwargs.update(top_k=TOP_K, top_p=TOP_P, temperature=1.0)
        model = self.model
        programs: dict[int, Callable[..., Any]] = {}

        def call(n: int) -> Any:
            if n not in programs:
                programs[n] = jax.jit(
                    lambda params, ids, mask, key: model.generate(
                        ids, attention_mask=mask, params=params, prng_key=key,
                        max_new_tokens=n, **kwargs,
                    ).sequences
                )  # fmt: skip
            return jax.block_until_ready(programs[n](self.params, ids, mask, key))

        self.call = call
        out, first, phases = self._first_call(lambda: call(new_tokens))
        seqs = np.asarray(out)
        return {
            "first_call_s": first,
            "compile_s": sum(phases.values()),
            "compile_phases_s": phases,
            "sequences": seqs.tolist(),
            "new_tokens_ok": bool(seqs.shape == (w.batch, ids.shape[1] + new_tokens)),
        }


WORKER_KINDS: dict[str, type[_Worker]] = {
    "jd": JaxdecodeWorker,
    "hf": TransformersWorker,
    "hf-flax": FlaxWorker,
}


def worker_main(kind: str) -> int:
    """Entry point of a worker process (`compare_hf.py --_worker KIND`).

    Replies go to the original stdout; anything the libraries print is sent to
    stderr so that it cannot corrupt the protocol.

    Args:
        kind: "jd", "hf" or "hf-flax".

    Returns:
        The exit status.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        worker = WORKER_KINDS[kind]()
    except Exception:
        proto.write(json.dumps({"ok": False, "error": traceback.format_exc()}) + "\n")
        return 1
    proto.write(json.dumps({"ok": True, "ready": kind}) + "\n")
    proto.flush()
    worker.serve(proto)
    return 0


class WorkerProcess:
    """The parent's handle on one worker process."""

    def __init__(self, kind: str, python: str = sys.executable) -> None:
        env = dict(os.environ)
        # Two JAX processes may share a GPU with torch: allocate on demand.
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.kind = kind
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--_worker", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self._ready = False

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the {self.kind} worker exited (status {code}); see its stderr")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"the {self.kind} worker failed:\n{reply['error']}")
        return reply

    def call(self, cmd: str, **payload: Any) -> dict[str, Any]:
        """Sends one command and waits for its reply.

        Args:
            cmd: the command (a `cmd_*` method of the worker).
            **payload: its keyword arguments (JSON-serialisable).

        Returns:
            The reply.
        """
        if not self._ready:
            self._read()
            self._ready = True
        self.proc.stdin.write(json.dumps({"cmd": cmd, **payload}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Asks the worker to exit and waits for it."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- #
# The benchmark.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Settings:
    """What one run measures (see `parse_args` for the meanings)."""

    model_dir: str
    workloads: tuple[str, ...]
    peers: tuple[str, ...]
    prompt_len: int
    new_tokens: int
    runs: int
    seed: int
    dtype: str
    hf_dtype: str
    hf_device: str
    sampling_method: str
    prefill: bool
    workers: str
    bw_mb: int
    pause_s: float
    quick: bool
    hf_flax_python: str


class Libraries:
    """The worker processes of one workload (fresh) or of the whole run (shared)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: dict[str, WorkerProcess] = {}
        self.loaded: dict[str, dict[str, Any]] = {}
        self.info: dict[str, dict[str, Any]] = {}

    def start(self) -> dict[str, Any]:
        """Starts every library's worker (their imports run in parallel), creates the
        checkpoint if it is missing, and loads it in each.

        Returns:
            The checkpoint's `config.json`.
        """
        s = self.settings
        self.workers = {"jd": WorkerProcess("jd")}
        for peer in s.peers:
            python = s.hf_flax_python if peer == "hf-flax" else sys.executable
            self.workers[peer] = WorkerProcess(peer, python)
        config = ensure_checkpoint(s, self.workers.get("hf"))
        for name, worker in self.workers.items():
            self.info[name] = worker.call("info")
            if name == "hf":
                self.loaded[name] = worker.call(
                    "load", model_dir=s.model_dir, dtype=s.hf_dtype, device=s.hf_device
                )
            elif name == "hf-flax":
                self.loaded[name] = worker.call("load", model_dir=s.model_dir, dtype=s.hf_dtype)
            else:
                self.loaded[name] = worker.call("load", model_dir=s.model_dir, dtype=s.dtype)
        return config

    def close(self) -> None:
        """Stops every worker."""
        for worker in self.workers.values():
            worker.close()
        self.workers = {}


def ensure_checkpoint(settings: Settings, worker: WorkerProcess | None = None) -> dict[str, Any]:
    """Creates the random-weight checkpoint unless it exists; returns its config.

    Args:
        settings: `model_dir` and `quick` (which config).
        worker: a transformers worker to create it with (default: a short-lived one).

    Returns:
        The checkpoint's `config.json`.
    """
    config_path = Path(settings.model_dir) / "config.json"
    if not config_path.is_file():
        print(f"creating the random-weight checkpoint in {settings.model_dir} ...", flush=True)
        own = worker is None
        worker = worker or WorkerProcess("hf")
        try:
            worker.call(
                "make_checkpoint",
                model_dir=settings.model_dir,
                config=QUICK_CONFIG if settings.quick else {},
            )
        finally:
            if own:
                worker.close()
    return json.loads(config_path.read_text(encoding="utf-8"))


def measure_bandwidth(settings: Settings) -> dict[str, Any]:
    """Memory bandwidth of the device jaxdecode runs on, in its own short-lived worker."""
    worker = WorkerProcess("jd")
    try:
        return worker.call("bandwidth", mb=settings.bw_mb, reps=5)
    finally:
        worker.close()


def _median_ms_per_step(times: Sequence[float], new_tokens: int) -> float:
    return statistics.median(times) / new_tokens * 1e3


def _first_mismatch(a: np.ndarray, b: np.ndarray) -> list[int] | None:
    if a.shape != b.shape:
        return None
    diff = np.argwhere(a != b)
    return [int(v) for v in diff[0]] if len(diff) else None


def bench_workload(
    workload: Workload,
    libs: Libraries,
    settings: Settings,
    model_config: dict[str, Any],
    bandwidth_gbs: float,
) -> dict[str, Any]:
    """Measures one workload with every library.

    Args:
        workload: what to decode.
        libs: the started workers.
        settings: sizes, runs, seed.
        model_config: the checkpoint's `config.json`.
        bandwidth_gbs: the measured memory bandwidth.

    Returns:
        The workload's record (see the module docstring for every field).
    """
    s = settings
    n = s.new_tokens
    prompts = make_prompts(
        workload.batch, s.prompt_len, int(model_config["vocab_size"]), s.seed
    ).tolist()
    names = list(libs.workers)
    setup: dict[str, dict[str, Any]] = {}
    for name in names:
        worker = libs.workers[name]
        worker.call("begin_workload")
        setup[name] = worker.call(
            "setup",
            workload=workload.name,
            prompts=prompts,
            new_tokens=n,
            seed=s.seed,
            method=s.sampling_method,
        )
        if s.prefill:
            setup[name]["one"] = worker.call("setup_one")

    times: dict[str, list[float]] = {name: [] for name in names}
    one_times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(s.runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:  # rotate who goes first
            time.sleep(s.pause_s)
            times[name].append(libs.workers[name].call("run", new_tokens=n)["seconds"])
    if s.prefill:
        for i in range(s.runs):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                time.sleep(s.pause_s)
                one_times[name].append(libs.workers[name].call("run", new_tokens=1)["seconds"])
    memory = {name: libs.workers[name].call("memory") for name in names}

    record: dict[str, Any] = {
        "workload": workload.name,
        "batch": workload.batch,
        "num_beams": workload.num_beams,
        "do_sample": workload.do_sample,
        "prompt_len": s.prompt_len,
        "new_tokens": n,
        "runs": s.runs,
    }
    layers, n_embd = int(model_config["n_layer"]), int(model_config["n_embd"])
    jd_seqs = np.asarray(setup["jd"]["sequences"])
    for name in names:
        prefix = LIB_NAMES[name]
        loaded = libs.loaded[name]
        run_s = times[name]
        ms = _median_ms_per_step(run_s, n)
        kv = kv_bytes_per_step(
            layers, workload.rows, s.prompt_len, n, n_embd, loaded["cache_itemsize"]
        )
        step_bytes = loaded["weight_bytes"] + kv
        mem = memory[name]
        peak = mem["device_peak_mb"] if mem["device_peak_mb"] is not None else mem["peak_rss_mb"]
        med_s = statistics.median(run_s)
        fields: dict[str, Any] = {
            "ms_per_step": ms,
            "min_ms_per_step": min(run_s) / n * 1e3,
            "run_s": run_s,
            "tokens_per_s": workload.batch * n / med_s,
            "compile_s": setup[name]["compile_s"],
            "first_call_s": setup[name]["first_call_s"],
            "first_call_minus_median_s": setup[name]["first_call_s"] - med_s,
            "peak_mb": peak,
            "peak_rss_mb": mem["peak_rss_mb"],
            "rss_before_mb": mem["rss_before_mb"],
            "peak_scope": mem["peak_scope"],
            "device_peak_mb": mem["device_peak_mb"],
            "device_peak_scope": mem["device_peak_scope"],
            "weight_bytes": loaded["weight_bytes"],
            "kv_bytes_per_step": kv,
            "mbu": mbu(step_bytes, ms / 1e3, bandwidth_gbs),
            "dtype": loaded["dtype"],
            "new_tokens_ok": setup[name]["new_tokens_ok"],
        }
        if "compile_phases_s" in setup[name]:
            fields["compile_phases_s"] = setup[name]["compile_phases_s"]
        if name == "hf":
            fields["device"] = loaded["device"]
        if s.prefill:
            one = statistics.median(one_times[name])
            fields["one_token_s"] = one
            fields["one_token_compile_s"] = setup[name]["one"]["compile_s"]
            if n > 1:
                decode_ms = (med_s - one) / (n - 1) * 1e3
                fields["decode_ms_per_step"] = decode_ms
                fields["mbu_decode"] = mbu(step_bytes, decode_ms / 1e3, bandwidth_gbs)
        if name != "jd":
            jd_ms = record["jaxdecode_ms_per_step"]
            fields["ratio"] = ms / jd_ms  # peer / jaxdecode: > 1 means jaxdecode is faster
            if workload.has_parity:
                peer_seqs = np.asarray(setup[name]["sequences"])
                fields["parity"] = bool(np.array_equal(peer_seqs, jd_seqs))
                fields["first_mismatch"] = _first_mismatch(peer_seqs, jd_seqs)
            else:
                fields["parity"] = None
        for key, value in fields.items():
            record[f"{prefix}_{key}" if key != "ratio" or name != "hf" else "ratio"] = value
    if "hf" in names:
        record["parity"] = record.pop("transformers_parity")
    return record


# --------------------------------------------------------------------------- #
# Reporting.
# --------------------------------------------------------------------------- #


def _fmt(value: Any, spec: str, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, bool):
        return f"{str(value):>{width}}"
    return f"{value:>{width}{spec}}"


def format_table(records: Sequence[dict[str, Any]], peer: str = "transformers") -> str:
    """The records as a fixed-width table, jaxdecode against one peer.

    Args:
        records: as returned by `bench_workload`.
        peer: "transformers" or "hf_flax" (the JSON field prefix of the peer).

    Returns:
        The table with a header line.
    """
    short = {"transformers": "hf", "hf_flax": "flax"}[peer]
    cols = [
        ("workload", 10),
        ("jd ms/step", 10),
        (f"{short} ms/step", 12),
        ("ratio", 6),
        ("jd tok/s", 9),
        (f"{short} tok/s", 10),
        (f"{'jd' if peer == 'transformers' else short} compile s", 12),
        ("jd peak MB", 10),
        (f"{short} peak MB", 12),
        ("jd MBU%", 7),
        (f"{short} MBU%", 9),
        ("parity", 6),
    ]
    header = " ".join(f"{name:>{w}}" if i else f"{name:<{w}}" for i, (name, w) in enumerate(cols))
    lines = [header, "-" * len(header)]
    for r in records:
        ratio = r.get("ratio") if peer == "transformers" else r.get("hf_flax_ratio")
        parity = r.get("parity") if peer == "transformers" else r.get("hf_flax_parity")
        jd_mbu, peer_mbu = r.get("jaxdecode_mbu"), r.get(f"{peer}_mbu")
        compile_s = r["jaxdecode_compile_s"]
        if peer == "hf_flax":
            compile_s = r.get("hf_flax_compile_s")
        values = [
            _fmt(r["jaxdecode_ms_per_step"], ".2f", 10),
            _fmt(r.get(f"{peer}_ms_per_step"), ".2f", 12),
            _fmt(ratio, ".2f", 6),
            _fmt(r["jaxdecode_tokens_per_s"], ".1f", 9),
            _fmt(r.get(f"{peer}_tokens_per_s"), ".1f", 10),
            _fmt(compile_s, ".2f", 12),
            _fmt(r["jaxdecode_peak_mb"], ".0f", 10),
            _fmt(r.get(f"{peer}_peak_mb"), ".0f", 12),
            _fmt(None if jd_mbu is None else 100 * jd_mbu, ".1f", 7),
            _fmt(None if peer_mbu is None else 100 * peer_mbu, ".1f", 9),
            _fmt("n/a" if r["do_sample"] else parity, "", 6),
        ]
        lines.append(f"{r['workload']:<10} " + " ".join(values))
    return "\n".join(lines)


def format_decode_table(records: Sequence[dict[str, Any]], prefixes: Sequence[str]) -> str:
    """Prefill-free step times (`decode ms/step`) per library."""
    header = f"{'workload':<10} " + " ".join(f"{p + ' decode ms/step':>28}" for p in prefixes)
    lines = [header, "-" * len(header)]
    for r in records:
        values = [_fmt(r.get(f"{p}_decode_ms_per_step"), ".2f", 28) for p in prefixes]
        lines.append(f"{r['workload']:<10} " + " ".join(values))
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Command line.
# --------------------------------------------------------------------------- #


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line.

    Args:
        argv: arguments (default: `sys.argv[1:]`).

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help=f"checkpoint directory, created once if missing (default {DEFAULT_MODEL_DIR}; "
        f"--quick: {QUICK_MODEL_DIR})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: 2 layers, n_embd 64, vocab 1000, prompt 8, 8 new tokens, 1 run, "
        "64 MiB bandwidth array, shared workers",
    )
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (128)")
    parser.add_argument(
        "--runs", type=int, default=None, help="timed runs per library, median reported (3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and sampling")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=list(WORKLOADS),
        default=list(WORKLOADS),
        help="what to run",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="jaxdecode weights and KV cache",
    )
    parser.add_argument(
        "--hf-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="transformers (and hf-flax) weights",
    )
    parser.add_argument(
        "--hf-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="transformers device (auto: cuda when available)",
    )
    parser.add_argument(
        "--peer",
        nargs="+",
        choices=(*PEERS, "none"),
        default=["hf"],
        help="libraries compared with jaxdecode: hf (transformers 5, PyTorch), hf-flax "
        "(transformers 4.57 Flax generate, own venv), none",
    )
    parser.add_argument(
        "--hf-flax-python",
        type=Path,
        default=DEFAULT_FLAX_PYTHON,
        help=f"python of the hf-flax virtual environment (create it with: {FLAX_VENV_HELP})",
    )
    parser.add_argument(
        "--sampling-method",
        choices=("exact", "fast"),
        default="exact",
        help="jaxdecode top_k_method / top_p_method of the sampling workloads",
    )
    parser.add_argument(
        "--no-prefill",
        dest="prefill",
        action="store_false",
        help="skip the one-token runs (no decode ms/step)",
    )
    parser.add_argument(
        "--workers",
        choices=("per-workload", "shared"),
        default=None,
        help="fresh library processes per workload (default; cleanest memory figures) or one "
        "set for the whole run (default with --quick)",
    )
    parser.add_argument(
        "--bw-mb", type=int, default=None, help="MiB copied to measure the bandwidth (1024)"
    )
    parser.add_argument(
        "--pause-s",
        type=float,
        default=0.2,
        help="idle seconds before each timed call, so that the other library's threads, "
        "which may spin-wait after a call, are asleep",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the records (default "
        "benchmarks/results/compare_hf_<platform>_<dtype>.json)",
    )
    args = parser.parse_args(argv)
    # --quick changes the defaults; options given explicitly win.
    sizes = dict(prompt_len=8, new_tokens=8, runs=1, bw_mb=64, workers="shared")
    if not args.quick:
        sizes = dict(prompt_len=32, new_tokens=128, runs=3, bw_mb=1024, workers="per-workload")
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.model_dir is None:
        args.model_dir = QUICK_MODEL_DIR if args.quick else DEFAULT_MODEL_DIR
    if args.prompt_len < 1 or args.new_tokens < 1 or args.runs < 1 or args.bw_mb < 1:
        parser.error("need --prompt-len, --new-tokens, --runs and --bw-mb >= 1")
    if "none" in args.peer and len(args.peer) > 1:
        parser.error("--peer none excludes the other peers")
    return args


def _resolve_peers(args: argparse.Namespace) -> tuple[str, ...]:
    peers = tuple(dict.fromkeys(p for p in args.peer if p != "none"))
    if "hf-flax" in peers and not args.hf_flax_python.is_file():
        print(
            f"hf-flax peer skipped: no python at {args.hf_flax_python}.\n"
            "The Flax generate of transformers 4.57 needs its own virtual environment "
            "(transformers 5 has no Flax); from the repository root:\n"
            f"    {FLAX_VENV_HELP}\n"
            "then pass --hf-flax-python .venv-hfflax/bin/python (the default path).",
            file=sys.stderr,
        )
        peers = tuple(p for p in peers if p != "hf-flax")
    return peers


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints the tables and writes the JSON.

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status (0).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:
        return worker_main(argv[1])
    args = parse_args(argv)
    settings = Settings(
        model_dir=str(args.model_dir.resolve()),
        workloads=tuple(args.workloads),
        peers=_resolve_peers(args),
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        runs=args.runs,
        seed=args.seed,
        dtype=args.dtype,
        hf_dtype=args.hf_dtype,
        hf_device=args.hf_device,
        sampling_method=args.sampling_method,
        prefill=args.prefill,
        workers=args.workers,
        bw_mb=args.bw_mb,
        pause_s=args.pause_s,
        quick=args.quick,
        hf_flax_python=str(args.hf_flax_python),
    )
    load_before = load_avg()
    # The bandwidth first, while no other worker of ours runs.
    bandwidth = measure_bandwidth(settings)
    print(
        f"bandwidth: {bandwidth['bandwidth_gbs']:.1f} GB/s on {bandwidth['device']} "
        f"({', '.join(f'{k} {v:.1f}' for k, v in bandwidth.items() if k.endswith('_gbs'))})",
        flush=True,
    )

    records: list[dict[str, Any]] = []
    libs = Libraries(settings)
    try:
        for i, name in enumerate(settings.workloads):
            if i == 0 or settings.workers == "per-workload":
                libs.close()
                model_config = libs.start()
                n_positions = int(model_config.get("n_positions", 1024))
                if settings.prompt_len + settings.new_tokens > n_positions:
                    raise SystemExit(
                        f"prompt + new tokens exceed the model's n_positions={n_positions}"
                    )
            records.append(
                bench_workload(
                    WORKLOADS[name], libs, settings, model_config, bandwidth["bandwidth_gbs"]
                )
            )
            print(f"  {name} done", flush=True)
    finally:
        info, loaded = dict(libs.info), dict(libs.loaded)
        libs.close()

    print()
    peer_prefixes = [LIB_NAMES[p] for p in settings.peers]
    if "hf" in settings.peers or not settings.peers:
        print(format_table(records, "transformers"))
    if "hf-flax" in settings.peers:
        print()
        print(format_table(records, "hf_flax"))
    if settings.prefill and settings.new_tokens > 1:
        print()
        print(format_decode_table(records, ["jaxdecode", *peer_prefixes]))

    machine = host_info()
    machine.pop("load_avg")
    machine["load_avg_before"], machine["load_avg_after"] = load_before, load_avg()
    for name, lib_info in info.items():
        prefix = "" if name != "hf-flax" else "hf_flax_"
        machine.update({prefix + k: v for k, v in lib_info.items()})
    if "hf" in loaded:
        machine["transformers_device"] = loaded["hf"]["device"]
    print(f"\nload average (1, 5, 15 min): before {load_before}, after {machine['load_avg_after']}")
    platform_name = machine.get("jax_backend", "cpu")
    path = args.json
    if path is None:
        suffix = "_quick" if settings.quick else ""
        path = RESULTS / f"compare_hf_{platform_name}_{settings.dtype}{suffix}.json"
    result = {
        "benchmark": "compare_hf",
        "machine": machine,
        "settings": dataclasses.asdict(settings),
        "model": {k: model_config.get(k) for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
        | {f"{LIB_NAMES[k]}_parameters": v["parameters"] for k, v in loaded.items()},
        "bandwidth": bandwidth,
        "notes": (
            "ms_per_step = median wall time of one generate call (prefill included) / new_tokens; "
            "decode_ms_per_step = (median full - median one-token generate) / (new_tokens - 1); "
            "ratio = peer ms_per_step / jaxdecode ms_per_step (> 1: jaxdecode faster); "
            "tokens_per_s = batch * new_tokens / median run; compile_s = JAX trace + lowering + "
            "XLA compile durations of the first call (jax.monitoring); peak_mb = device peak on a "
            "GPU, else the worker's peak RSS during the workload (peak_scope); mbu = (weight_bytes "
            "+ kv_bytes_per_step) / (ms_per_step / 1e3) / bandwidth; kv_bytes_per_step = 2 * "
            "layers * batch * beams * (prompt_len + new_tokens / 2) * n_embd * itemsize; parity = "
            "identical generated ids (greedy, beam search), null for sampling; EOS disabled, "
            "every library runs exactly new_tokens steps (new_tokens_ok)."
        ),
        "records": records,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
