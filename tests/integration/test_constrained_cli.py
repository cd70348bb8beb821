"""The CLI's output constraints: `--regex` / `--choices` / `--json_schema` flags, and
eval lines that carry different constraints (moved here from the unit tier: it
runs the CLI end to end on the bundled model)."""

from __future__ import annotations

import json
import re

import jsonschema
from support.constraints import NESTED, PERSON, REGEXES


def test_cli_flags_and_eval_lines_with_different_schemas(tmp_path, capsys, monkeypatch):
    """`--regex` / `--choices` / `--json_schema` flags, and an eval file whose lines
    carry different schemas (on the engine they share the slots, their automata
    one union table)."""
    from jaxdecode.cli import main

    monkeypatch.setenv("JAXDECODE_COMPILATION_CACHE", "off")
    argv = ["generate", "Amen", "--json", "--no-do_sample", "--max_new_tokens", "30"]
    assert main([*argv, "--choices", "yes", "no way"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"][0]["text"] in ("yes", "no way")
    lines = [
        {"prompt": "And God said", "json_schema": PERSON},
        {"prompt": "Unto the", "json_schema": json.dumps(NESTED)},
        {"prompt": "In the", "regex": REGEXES[0]},
        {"prompt": "And Moses", "choices": ["Zion", "Moab"]},
    ]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "o.jsonl"
    args = ["eval", str(src), "-o", str(out), "--quiet", "--max_new_tokens", "100"]
    assert main([*args, "--batch_size", "4", "--seed", "3", "--do_sample"]) == 0
    results = {r["id"]: r["outputs"][0]["text"] for r in map(json.loads, out.open())}
    jsonschema.validate(json.loads(results[1]), PERSON)
    jsonschema.validate(json.loads(results[2]), NESTED)
    assert re.fullmatch(REGEXES[0], results[3]) and results[4] in ("Zion", "Moab")
    src.write_text(json.dumps({"prompt": "A", "regex": "("}) + "\n")
    assert main([*args[:3], str(tmp_path / "o2.jsonl"), "--quiet"]) == 2
    assert "line 1 (id 1): regex '(' is invalid" in capsys.readouterr().err
