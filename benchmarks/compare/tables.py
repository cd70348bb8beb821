"""What a run prints and writes: fixed-width tables, Markdown tables, the JSON document.

Everything here reads the records of `harness.bench_workload` (flat dicts with
one `<library>_<field>` key per library and field); nothing here measures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import host_info, load_avg

from .harness import LIB_NAMES, RunResult, Settings
from .models import MODELS, geometry

__all__ = [
    "NOTES",
    "default_json_path",
    "format_decode_table",
    "format_table",
    "format_targets_table",
    "markdown_table",
    "markdown_targets_table",
    "result_document",
]

NOTES = (
    "ms_per_step = median wall time of one generate call (prefill included) / new_tokens; "
    "decode_ms_per_step = (median full - median one-token generate) / (new_tokens - 1); "
    "ratio = peer ms_per_step / jaxdecode ms_per_step (> 1: jaxdecode faster); "
    "tokens_per_s = batch * new_tokens / median run; compile_s = JAX trace + lowering + "
    "XLA compile durations of the first call (jax.monitoring); peak_mb = device peak on a "
    "GPU, else the worker's peak RSS during the workload (peak_scope); mbu = (weight_bytes "
    "+ kv_bytes_per_step) / (ms_per_step / 1e3) / bandwidth; kv_bytes_per_step = 2 * "
    "layers * batch * beams * (prompt_len + new_tokens / 2) * kv_width * itemsize (kv_width "
    "= KV heads * head_dim, n_embd for GPT-2); parity = "
    "identical generated ids (greedy, beam search), null for sampling; EOS disabled, "
    "every library runs exactly new_tokens steps (new_tokens_ok). targets = issue 14's: "
    "batch 1 (greedy, sampling) jaxdecode decode-step MBU >= 0.85 (mbu_decode; mbu "
    "without one-token runs) and ratio >= 1.5; beam search and batch 8 ratio >= 1.3; "
    "prompts = random ids (random weights) or text (PASSAGES tokenized by the model's "
    "tokenizer)."
)

# The peer's JSON prefix -> its short name in table headers.
_SHORT = {"transformers": "hf", "hf_flax": "flax"}


def _fmt(value: Any, spec: str, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, bool):
        return f"{str(value):>{width}}"
    return f"{value:>{width}{spec}}"


def _peer_ratio_parity(r: dict[str, Any], peer: str) -> tuple[Any, Any]:
    """The record's ratio and parity against `peer` (transformers' have no prefix)."""
    if peer == "transformers":
        return r.get("ratio"), r.get("parity")
    return r.get(f"{peer}_ratio"), r.get(f"{peer}_parity")


def format_table(records: Sequence[dict[str, Any]], peer: str = "transformers") -> str:
    """The records as a fixed-width table, jaxdecode against one peer.

    Args:
        records: as returned by `bench_workload`.
        peer: "transformers" or "hf_flax" (the JSON field prefix of the peer).

    Returns:
        The table with a header line.
    """
    short = _SHORT[peer]
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
        ratio, parity = _peer_ratio_parity(r, peer)
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


def _target_cells(target: dict[str, Any]) -> tuple[str, str]:
    """A target's measured value and its verdict as text."""
    value = target["measured"]
    if value is None:
        return "-", "not measured"
    shown = f"{value:.1%}" if "MBU" in target["target"] else f"{value:.2f}x"
    return shown, "met" if target["met"] else "not met"


def format_targets_table(records: Sequence[dict[str, Any]]) -> str:
    """Issue 14's targets of each workload (`harness.check_targets`): met or not met."""
    rows = [
        (r["workload"], t["target"], *_target_cells(t))
        for r in records
        for t in r.get("targets", ())
    ]
    width = max([len("target")] + [len(row[1]) for row in rows])
    header = f"{'workload':<10} {'target (issue 14)':<{width}} {'measured':>9} status"
    lines = [header, "-" * (len(header) + 4)]
    for workload, target, value, verdict in rows:
        lines.append(f"{workload:<10} {target:<{width}} {value:>9} {verdict}")
    return "\n".join(lines)


def markdown_targets_table(records: Sequence[dict[str, Any]]) -> str:
    """Issue 14's targets of each workload as a Markdown table (met / not met)."""
    lines = ["| workload | target (issue 14) | measured | status |", "|---|---|---|---|"]
    for r in records:
        for t in r.get("targets", ()):
            value, verdict = _target_cells(t)
            verdict = f"**{verdict}**" if verdict == "met" else verdict
            lines.append(f"| {r['workload']} | {t['target']} | {value} | {verdict} |")
    return "\n".join(lines)


def _md(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return f"{value * scale:{spec}}"


def markdown_table(records: Sequence[dict[str, Any]], peer: str = "transformers") -> str:
    """The records as a Markdown table (README style), jaxdecode against one peer.

    Args:
        records: as returned by `bench_workload`.
        peer: "transformers" or "hf_flax".

    Returns:
        The table, header and separator lines included.
    """
    name = {"transformers": "transformers", "hf_flax": "HF Flax"}[peer]
    short = _SHORT[peer]
    head = [
        "workload",
        "jaxdecode ms/step",
        f"{name} ms/step",
        f"ratio ({short} / jd)",
        "jaxdecode tok/s",
        f"{name} tok/s",
        "jaxdecode MBU",
        f"{name} MBU",
        "jaxdecode compile s",
        "jaxdecode peak MB",
        f"{name} peak MB",
        "parity",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        ratio, parity = _peer_ratio_parity(r, peer)
        if r["do_sample"]:
            parity_text = "–"
        else:
            parity_text = {True: "tokens identical", False: "differ", None: "–"}[parity]
        cells = [
            r["workload"],
            _md(r["jaxdecode_ms_per_step"], ".2f"),
            _md(r.get(f"{peer}_ms_per_step"), ".2f"),
            _md(ratio, ".2f"),
            _md(r["jaxdecode_tokens_per_s"], ".0f"),
            _md(r.get(f"{peer}_tokens_per_s"), ".0f"),
            _md(r.get("jaxdecode_mbu"), ".0%"),
            _md(r.get(f"{peer}_mbu"), ".0%"),
            _md(r["jaxdecode_compile_s"], ".1f"),
            _md(r["jaxdecode_peak_mb"], ".0f"),
            _md(r.get(f"{peer}_peak_mb"), ".0f"),
            parity_text,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_json_path(
    results_dir: Path, platform: str, settings: Settings, default_model: str
) -> Path:
    """`compare_hf_<platform>_<dtype>[_<model>][_quick].json` under `results_dir`.

    The model's name is left out for the default model, so that the file names of
    earlier runs stay what they were.
    """
    model = "" if settings.model == default_model else f"_{settings.model}"
    suffix = "_quick" if settings.quick else ""
    return results_dir / f"compare_hf_{platform}_{settings.dtype}{model}{suffix}.json"


def result_document(
    result: RunResult, settings: Settings, load_before: list[float] | None
) -> dict[str, Any]:
    """The JSON document of one run.

    Args:
        result: what `run_benchmark` measured.
        settings: what was asked.
        load_before: the load average before the run.

    Returns:
        {"benchmark", "machine", "settings", "model", "bandwidth", "notes", "records"}.
    """
    machine = host_info()
    machine.pop("load_avg")
    machine["load_avg_before"], machine["load_avg_after"] = load_before, load_avg()
    for name, lib_info in result.info.items():
        prefix = "" if name != "hf-flax" else "hf_flax_"
        machine.update({prefix + k: v for k, v in lib_info.items()})
    if "hf" in result.loaded:
        machine["transformers_device"] = result.loaded["hf"]["device"]
    shape = geometry(result.config)
    spec = MODELS[settings.model]
    model = {
        "name": settings.model,
        "summary": spec.summary,
        "source": f"GGUF {spec.gguf_file}" if spec.is_gguf else "random weights",
        "model_type": result.config.get("model_type", spec.model_type),
        "n_layer": shape.layers,
        "n_embd": shape.hidden,
        "n_head": shape.heads,
        "vocab_size": shape.vocab_size,
        "kv_width": shape.kv_width,
        "tie_word_embeddings": result.config.get("tie_word_embeddings"),
        "config": result.config,
    } | {f"{LIB_NAMES[k]}_parameters": v["parameters"] for k, v in result.loaded.items()}
    return {
        "benchmark": "compare_hf",
        "machine": machine,
        "settings": dataclasses.asdict(settings),
        "model": model,
        "bandwidth": result.bandwidth,
        "notes": NOTES,
        "records": result.records,
    }
