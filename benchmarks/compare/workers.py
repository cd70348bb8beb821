"""The worker processes: one per library, each driving its `generate`.

Run as `python -m compare.workers KIND` (with `benchmarks/` on `PYTHONPATH`;
`protocol.WorkerProcess` does that) and driven over a pipe (see `protocol.py`).
Each worker imports its library lazily, so that this module imports in any
environment: the hf-flax worker runs in a virtual environment with transformers
4.57 and without jaxdecode, and on a GPU machine the transformers worker may run
in its own environment (`--hf-python`), apart from JAX's CUDA libraries.

Commands every library answers: `info` (versions, devices), `load` (the
checkpoint, a directory or a GGUF file in it; weight bytes and parameters),
`setup` (a workload's generate: the first, untimed call, its compile time and
output ids), `setup_one` (the same with one new token), `run` (one timed call),
`begin_workload` / `memory` (peak memory), plus `bandwidth` and `tokenize`
(jaxdecode's worker: the model's tokenizer makes the text prompts of a real
model) and `make_checkpoint` (transformers' worker).

The module is a little over 500 lines: the three workers answer the same
commands and are kept side by side, so that their timed calls can be read
against each other.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .models import MODELS
from .protocol import Worker
from .workloads import PAD_ID, TOP_K, TOP_P, WORKLOADS

__all__ = [
    "COMPILE_EVENTS",
    "WORKER_KINDS",
    "FlaxWorker",
    "JaxMixin",
    "JaxdecodeWorker",
    "TransformersWorker",
    "worker_main",
]

# The jax.monitoring durations that together make a program's compile time.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class JaxMixin:
    """Compile-time accounting and device memory for the JAX-based workers."""

    def init_jax(self) -> None:
        """Imports JAX and starts counting its compile durations."""
        import jax
        from jax import monitoring

        self.jax = jax
        self.compile_secs = dict.fromkeys(COMPILE_EVENTS, 0.0)

        def on_event(name: str, secs: float, **_: Any) -> None:
            if name in self.compile_secs:
                self.compile_secs[name] += secs

        monitoring.register_event_duration_secs_listener(on_event)

    def first_call(self, fn: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
        """Runs `fn` once; returns (output, wall seconds, JAX compile seconds by phase)."""
        before = dict(self.compile_secs)
        start = time.perf_counter()
        out = self.jax.block_until_ready(fn())
        wall = time.perf_counter() - start
        phases = {k.rsplit("/", 1)[1]: self.compile_secs[k] - before[k] for k in COMPILE_EVENTS}
        return out, wall, phases

    def device_peak_mb(self) -> tuple[float | None, str | None]:
        if self.jax.default_backend() == "cpu":
            return None, None
        stats = self.jax.devices()[0].memory_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            return None, None
        return stats["peak_bytes_in_use"] / 2**20, "process"


class JaxdecodeWorker(JaxMixin, Worker):
    """Runs jaxdecode.generate."""

    def __init__(self) -> None:
        super().__init__()
        self.init_jax()
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
            # float32 matmuls on a GPU: XLA's default may use TF32 (JAX_DEFAULT_MATMUL_PRECISION).
            "jax_default_matmul_precision": getattr(
                jax.config, "jax_default_matmul_precision", None
            ),
        }

    def cmd_bandwidth(self, mb: int, reps: int) -> dict[str, Any]:
        """Memory bandwidth in GB/s, best of `reps`: copies (2N bytes per copy of
        N bytes) and a read-only vector x matrix stream (N bytes per call)."""
        jax = self.jax
        import jax.numpy as jnp

        n = mb * 2**20 // 4
        nbytes = 2 * n * 4
        if jax.default_backend() != "cpu":
            reps = max(reps, 20)  # a copy takes well under a millisecond on a card

        def best_seconds(fn, *args) -> float:
            jax.block_until_ready(fn(*args))  # compile, touch every page
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times.append(time.perf_counter() - start)
            return min(times)

        out: dict[str, Any] = {"array_mb": mb, "reps": reps}
        if jax.default_backend() == "cpu":
            src = np.ones(n, np.float32)
            dst = np.empty_like(src)
            out["numpy_copy_gbs"] = nbytes / best_seconds(np.copyto, dst, src) / 1e9
            del src, dst
        x = jnp.ones((n,), jnp.float32)
        inc = jax.jit(lambda a: a + 1.0)
        out["jax_add_gbs"] = nbytes / best_seconds(inc, x) / 1e9
        del x
        # A read-only stream, what a batch-1 decoding step is. On this CPU it
        # reaches ~1.4x the copy figures (36 vs 25.5 GB/s), so without it MBU
        # could pass 100%.
        w = jnp.ones((256, n // 256), jnp.float32)
        vec = jnp.ones((256,), jnp.float32)
        gemv = jax.jit(lambda a, b: a @ b)
        out["jax_gemv_read_gbs"] = n * 4 / best_seconds(gemv, vec, w) / 1e9
        del w
        out["device"] = str(jax.devices()[0])
        out["bandwidth_gbs"] = max(val for k, val in out.items() if k.endswith("_gbs"))
        return out

    def cmd_load(self, model_dir: str, dtype: str, gguf_file: str | None = None) -> dict[str, Any]:
        """Loads the checkpoint (`model_dir`, or the GGUF file `gguf_file` in it).

        The reply's "config" is the model's config in transformers' names (the
        harness reads the sizes of a GGUF model, which has no config.json, from it).
        """
        jax = self.jax
        path = os.path.join(model_dir, gguf_file) if gguf_file else model_dir
        self.lm = self.jd.from_pretrained(path, dtype=dtype)
        leaves = jax.tree_util.tree_leaves(self.lm.params)
        config = self.lm.config
        return {
            "weight_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
            "parameters": int(sum(x.size for x in leaves)),
            "dtype": dtype,
            "cache_itemsize": int(np.dtype(leaves[0].dtype).itemsize),
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {},
        }

    def cmd_tokenize(self, texts: list[str]) -> dict[str, Any]:
        """The loaded model's tokenizer on `texts` (no special tokens added)."""
        if self.lm is None or self.lm.tokenizer is None:
            raise ValueError("tokenize needs a loaded model with a tokenizer")
        return {"ids": [self.lm.tokenizer.encode(t) for t in texts]}

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
        out, first, phases = self.first_call(lambda: call(new_tokens))
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


class TransformersWorker(Worker):
    """Runs transformers' (PyTorch) `generate` (`AutoModelForCausalLM`)."""

    def __init__(self) -> None:
        super().__init__()
        import torch
        import transformers

        self.torch = torch
        self.transformers = transformers
        torch.set_num_threads(os.cpu_count() or 1)
        # Loading a GGUF file draws two progress bars per load (transformers' own and a
        # plain tqdm one, which TQDM_DISABLE turns off); the run's log has no use for them.
        transformers.utils.logging.disable_progress_bar()
        os.environ.setdefault("TQDM_DISABLE", "1")
        self.model = None
        self.device = "cpu"

    def cmd_make_checkpoint(self, model_dir: str, model: str) -> dict[str, Any]:
        """Creates model `model`'s random-weight checkpoint unless `model_dir` has one.

        Written to a temporary sibling directory and renamed into place, so that
        an interrupted run leaves no half-written checkpoint behind.
        """
        torch, transformers = self.torch, self.transformers
        spec = MODELS[model]
        if spec.is_gguf:
            raise ValueError(f"model={model!r} is a GGUF file, not a random checkpoint")
        target = Path(model_dir)
        if (target / "config.json").is_file():
            return {"created": False}
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            config = transformers.AutoConfig.for_model(spec.model_type, **spec.config)
            torch.manual_seed(spec.seed)
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
            # A 1B-class model is GBs: free it before this process loads the checkpoint.
            gc.collect()
            if target.exists() and not any(target.iterdir()):
                target.rmdir()  # an empty leftover
            try:
                os.replace(tmp, target)
            except OSError:
                # Another process (a parallel test, a second run) made it meanwhile:
                # the same spec and seed give the same weights, keep theirs.
                if not (target / "config.json").is_file():
                    raise
                return {"created": False}
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
            # float32 matmuls on a GPU: TF32 (faster, less exact) or full float32.
            "torch_cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch_cuda_matmul_fp32_precision": getattr(
                torch.backends.cuda.matmul, "fp32_precision", None
            ),
        }
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
        return info

    def cmd_load(
        self, model_dir: str, dtype: str, device: str, gguf_file: str | None = None
    ) -> dict[str, Any]:
        """Loads the checkpoint (`model_dir`, or its GGUF file `gguf_file`,
        dequantized by transformers to `dtype`) onto `device`."""
        torch = self.torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        self.model = (
            self.transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, dtype), **extra
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

    def reset_device_peak(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.reset_peak_memory_stats()

    def device_peak_mb(self) -> tuple[float | None, str | None]:
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


class FlaxWorker(JaxMixin, Worker):
    """Runs transformers 4.57's Flax `generate` (`FlaxAutoModelForCausalLM`), under `jax.jit`.

    Meant for its own virtual environment (transformers 5 has no Flax models);
    imports nothing of jaxdecode. Flax generate cannot switch EOS off, so the
    EOS id is `vocab_size`, which no step can produce.
    """

    def __init__(self) -> None:
        super().__init__()
        self.init_jax()
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

    def cmd_load(self, model_dir: str, dtype: str, gguf_file: str | None = None) -> dict[str, Any]:
        import jax.numpy as jnp

        if gguf_file:
            raise ValueError(
                "the hf-flax peer cannot load GGUF files (Flax from_pretrained has no gguf_file)"
            )

        jdtype = jnp.dtype(dtype)
        self.model = self.transformers.FlaxAutoModelForCausalLM.from_pretrained(
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
        out, first, phases = self.first_call(lambda: call(new_tokens))
        seqs = np.asarray(out)
        return {
            "first_call_s": first,
            "compile_s": sum(phases.values()),
            "compile_phases_s": phases,
            "sequences": seqs.tolist(),
            "new_tokens_ok": bool(seqs.shape == (w.batch, ids.shape[1] + new_tokens)),
        }


WORKER_KINDS: dict[str, type[Worker]] = {
    "jd": JaxdecodeWorker,
    "hf": TransformersWorker,
    "hf-flax": FlaxWorker,
}


def worker_main(kind: str) -> int:
    """Entry point of a worker process (`python -m compare.workers KIND`).

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


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
