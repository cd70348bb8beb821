"""`jaxdecode detect`: score texts (a JSONL file) for a watermark with
`jaxdecode.watermark_detect`, one JSON object per line on stdout."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from jaxdecode.cli import common


def _detect_texts(path: str) -> list[tuple[Any, str]]:
    """`(id, text)` per line of a JSONL file: a JSON string, or an object with
    "text" (and optionally "id"; default: the line number)."""
    out = []
    for number, line in enumerate(common.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise common.CLIError(f"{path}:{number}: not JSON ({e})") from None
        if isinstance(rec, str):
            rec = {"text": rec}
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise common.CLIError(
                f'{path}:{number}: a line is a JSON string or an object with "text"'
            )
        out.append((rec.get("id", number), rec["text"]))
    return out


def cmd_detect(args: argparse.Namespace) -> int:
    """Scores each text for a watermark: one JSON object per line on stdout."""
    import numpy as np

    import jaxdecode

    if args.watermarking_config is None:
        raise common.CLIError("detect needs --watermarking_config (the one used to generate)")
    try:
        config = jaxdecode.GenerationConfig(watermarking_config=args.watermarking_config)
        config.validate()
    except ValueError as e:
        raise common.CLIError(str(e)) from None
    texts = _detect_texts(args.texts_file)
    lm = common.load_model(args, " (detect encodes the texts)")
    eos = lm.generation_config.eos_ids
    for rid, text in texts:
        ids = [lm.tokenizer.encode(text)]
        try:
            result = jaxdecode.watermark_detect(
                ids,
                config.watermarking_config,
                vocab_size=lm.vocab_size,
                z_threshold=args.z_threshold,
                ignore_repeated_ngrams=args.ignore_repeated_ngrams,
                eos_token_id=eos[0] if eos else None,
            )
        except ValueError as e:
            print(json.dumps({"id": rid, "error": str(e)}))
            continue
        fields = {
            k: np.asarray(v)[0].item()
            for k, v in dataclasses.asdict(result).items()
            if k not in ("g_values", "mask")
        }
        print(json.dumps({"id": rid, **fields}))
    return 0
