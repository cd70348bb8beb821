"""`jaxdecode detect`: scoring a JSONL file of texts for a watermark, after
`jaxdecode generate --watermarking_config`."""

from __future__ import annotations

import json


def test_cli_generate_then_detect(tmp_path, capsys):
    """`jaxdecode generate --watermarking_config` then `jaxdecode detect` on its
    text and on the prompt's unwatermarked continuation."""
    from jaxdecode import cli

    marking = '{"bias": 4.0, "seeding_scheme": "selfhash", "context_width": 2}'
    common = ["And God said", "--max_new_tokens", "40", "--no-do_sample", "--json"]
    texts = []
    for extra in (["--watermarking_config", marking], []):
        assert cli.main(["generate", *common, *extra]) == 0
        texts.append(json.loads(capsys.readouterr().out)["outputs"][0]["text"])
    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps(texts[0]) + "\n" + json.dumps({"id": "plain", "text": texts[1]}))
    assert cli.main(["detect", str(path), "--watermarking_config", marking]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == [1, "plain"]
    assert [r["prediction"] for r in rows] == [True, False]
    assert cli.main(["detect", str(path)]) == 2  # the config is required
    assert "watermarking_config" in capsys.readouterr().err
