"""MkDocs hook: the `GenerationConfig` fields table, generated at build time.

A page holding the line `<!-- config-fields -->` gets, in its place, one table row per
field of `dataclasses.fields(jaxdecode.GenerationConfig)`, in the class's order and
under its own group comments (`# Length.`, `# Strategy.`, ...): name, type, default,
whether transformers has the field (`hf` metadata), whether it takes one value per
row (`per_row` metadata), and what it does. Names, types, defaults and flags are read
from the code, never copied. The description is the field's `doc` metadata when the
code has one, else the entry of `DESCRIPTIONS` below; a field with neither, or a
description for a field that does not exist, is a build error, so adding a field
without documenting it fails `mkdocs build --strict` (and tests/integration/test_docs.py).

`render()` is importable without MkDocs (the doc tests call it).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

MARKER = "<!-- config-fields -->"

# What each field does, in one sentence. Keep in step with the code (the build
# checks both directions).
DESCRIPTIONS: dict[str, str] = {
    "max_length": "Total length (prompt + new tokens); `max_new_tokens` wins when both are set.",
    "max_new_tokens": "Tokens to generate at most (`None` and no `max_length`: 20, as transformers).",
    "min_length": "EOS is banned while the whole sequence (padded prompt included) is shorter.",
    "min_new_tokens": "EOS is banned until this many tokens were generated.",
    "do_sample": "Sample (`True`) or search greedily / by beams (`False`).",
    "num_beams": "Beam search with this many beams (1: no beam search).",
    "early_stopping": 'When a beam-search row stops: `True`, `False` (heuristic) or `"never"`.',
    "length_penalty": "Beam scores are divided by `generated_length ** length_penalty`.",
    "num_return_sequences": "Outputs per prompt (≤ `num_beams`; samples with `do_sample`).",
    "temperature": "Divides the logits (sampling only); > 0.",
    "top_h": "Top-H: keep the most likely tokens while their entropy stays within top_h × the top-100's entropy (sampling only).",
    "top_k": "Keep the k most likely tokens, ties kept (sampling only; 0 disables).",
    "top_p": "Keep the smallest set whose probability reaches p (sampling only).",
    "min_p": "Remove tokens below `min_p` × the top probability (sampling only).",
    "typical_p": "Locally typical sampling with this mass (sampling only).",
    "epsilon_cutoff": "Remove tokens whose probability is below ε (sampling only).",
    "eta_cutoff": "Remove tokens below min(η, √η·exp(−entropy)) (sampling only).",
    "repetition_penalty": "Penalise every token already in the text (prompt included); 1.0: off.",
    "prompt_ignore_length": "The repetition penalty skips tokens in each row's first this-many columns (transformers' processor argument).",
    "no_repeat_ngram_size": "Ban any token that would repeat an n-gram of this size.",
    "bad_words_ids": "Token sequences never to produce.",
    "sequence_bias": "Add a bias to a token, or to a sequence's last token after its prefix.",
    "forced_bos_token_id": "The only token allowed as the first one.",
    "forced_eos_token_id": "The only token(s) allowed at `max_length − 1`.",
    "remove_invalid_values": "Replace NaN and ±inf in the scores by finite values.",
    "exponential_decay_length_penalty": "`(start, factor)`: raise EOS's score exponentially after `start` new tokens.",
    "suppress_tokens": "Tokens banned at every step.",
    "begin_suppress_tokens": "Tokens banned at the first generated step.",
    "renormalize_logits": "`log_softmax` the scores after every processor.",
    "guidance_scale": "Classifier-free guidance: `s·(log p(x|prompt) − log p(x|negative)) + log p(x|negative)`; negative prompt via `generate(negative_prompt_ids=)`.",
    "watermarking_config": "A watermark: Kirchenbauer green lists (`jd.WatermarkingConfig`) or SynthID-Text (`jd.SynthIDTextWatermarkingConfig`), or either's dict; detect with `jd.watermark_detect`.",
    "output_scores": "Return the processed scores of every step (`GenerateOutput.scores`).",
    "output_logits": "Return the raw logits of every step (`GenerateOutput.logits`).",
    "return_dict_in_generate": "Accepted for transformers compatibility; `generate` always returns a `GenerateOutput`.",
    "pad_token_id": "Fills finished rows (default: the first EOS id).",
    "bos_token_id": "Beginning-of-sequence token id.",
    "eos_token_id": "Token id(s) that end a row.",
    "stop_strings": "A row ends when its text contains one of these strings (decided on the device).",
    "prompt_lookup_num_tokens": "Speculative decoding by prompt lookup: tokens drafted per round.",
    "max_matching_ngram_size": "Prompt lookup: longest n-gram matched (default 2).",
    "num_assistant_tokens": "Draft-model speculative decoding: tokens drafted per round (the start, with a heuristic schedule).",
    "num_assistant_tokens_schedule": '`"constant"`, or `"heuristic"` / `"heuristic_transient"`: per row, K + 2 after a fully accepted round, else K − 1 (≥ 1).',
    "assistant_confidence_threshold": "The draft model stops drafting a row after a token it gives a lower probability (0 or `None`: never; 0.4 as transformers).",
    "frequency_penalty": "Subtract f × count of each generated token (OpenAI / vLLM).",
    "presence_penalty": "Subtract p from every token generated at least once (OpenAI / vLLM).",
    "seed": "Sampling seed (0 to 2³²−1) when no `key` is given.",
    "repetition_penalty_form": '`"hf"` (transformers\' sign-dependent form) or `"ctrl"` (divide always).',
    "top_k_method": '`"exact"` (transformers\' mask) or `"fast"` (static cap, no sort).',
    "top_p_method": '`"exact"` (transformers\' mask) or `"fast"` (bisection, no sort).',
    "regex": "Every output matches this regular expression (one for all rows, or one per row).",
    "json_schema": "Every output is JSON of this schema (dict or JSON text; or one per row).",
    "choices": "Every output is one of these strings (or one list per row).",
    "output_raw_logprobs": "Also return the raw model's log-probability of each chosen token.",
    "logprobs": "Return the N best tokens and their log-probabilities at every step.",
    "logprobs_mode": 'Whether `logprobs` ranks the `"processed"` or the `"raw"` distribution.',
    "prompt_logprobs": "Return each prompt token's log-probability (N ≥ 1 adds the top-N alternatives).",
    "cache_implementation": '`"quantized"`: the full-attention layers keep keys and values in `cache_config["nbits"]` bits (`jd.QuantizedKVCache`); `None`, `"dynamic"`, `"static"`, `"hybrid"`, `"sliding_window"`: the float cache.',
    "cache_config": "The quantized cache's settings, transformers' keys: `nbits` (8, 4 (default) or 2; static), `q_group_size` (features per scale, dividing head_dim; default head_dim); `axis_key`/`axis_value` 0, `residual_length` 0 and `backend` `\"quanto\"` are accepted, other values refused.",
}


def _groups(cls: type) -> dict[str, str]:
    """Field name -> the group comment above it in the class source (`# Length.`)."""
    lines, _ = inspect.getsourcelines(cls)
    group, groups, in_comment = "", {}, False
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            if not in_comment:  # the first line of a comment block names the group
                group = re.split(r"[(:]", text.lstrip("# "))[0].strip().rstrip(".")
            in_comment = True
            continue
        in_comment = False
        match = re.match(r"(\w+)\s*:", text)
        if match:
            groups[match.group(1)] = group
    return groups


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return "required"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def render() -> str:
    """The Markdown table of every `GenerationConfig` field, with type aliases spelled
    out below it. Raises ValueError when a field has no description or a
    description names no field."""
    from jaxdecode import config as config_module
    from jaxdecode.config import GenerationConfig

    fields = dataclasses.fields(GenerationConfig)
    names = {f.name for f in fields}
    docs = {f.name: f.metadata.get("doc") or DESCRIPTIONS.get(f.name) for f in fields}
    missing = sorted(n for n, d in docs.items() if not d)
    stale = sorted(set(DESCRIPTIONS) - names)
    if missing or stale:
        raise ValueError(
            "docs/hooks/config_fields.py: GenerationConfig fields without a description: "
            f"{missing}; descriptions of fields that do not exist: {stale}"
        )
    groups = _groups(GenerationConfig)
    rows, aliases, last_group = [], {}, None
    header = "| field | type | default | transformers | per row | what it does |"
    rows += [header, "|---|---|---|---|---|---|"]
    for f in fields:
        group = groups.get(f.name, "")
        if group != last_group:
            rows.append(f"| **{group}** | | | | | |")
            last_group = group
        type_text = str(f.type)
        for word in re.findall(r"[A-Z]\w+", type_text):
            value = getattr(config_module, word, None)
            if value is None or word in aliases or word == "Literal" or isinstance(value, type):
                continue
            text = re.sub(r"\btyping\.|\bcollections\.abc\.", "", str(value))
            aliases[word] = re.sub(r"\bjax(\.\w+)*\.Array\b", "jax.Array", text)
        rows.append(
            f"| `{f.name}` | `{type_text}` | {_cell(_default(f))} | "
            f"{'✓' if f.metadata.get('hf') else '–'} | "
            f"{'✓' if f.metadata.get('per_row') else '–'} | {_cell(docs[f.name])} |"
        )
    legend = [f"- `{name}` = `{text}`" for name, text in sorted(aliases.items())]
    return "\n".join(rows) + "\n\nType names used above:\n\n" + "\n".join(legend) + "\n"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """MkDocs hook: replace the marker with the generated table."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render())
    return markdown
