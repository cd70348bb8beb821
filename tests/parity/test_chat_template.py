"""Chat templates rendered by jaxdecode (jinja2) against transformers'
`apply_chat_template(..., tokenize=False)` on the same template and tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

import jaxdecode as jd

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
# Llama-2 style: bos/eos tokens, a system prompt folded into the first turn,
# raise_exception on roles that do not alternate, whitespace control.
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = messages[0]['content'] %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' '  + content.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}"""
# tojson (non-ASCII kept), loop controls, namespace, an extra variable.
FANCY = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'skip' %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}
  {{ ns.n }}:{{ m | tojson }}
  {%- if ns.n >= 3 %}{% break %}{% endif %}
{% endfor -%}
{%- if add_generation_prompt %}<{{ greeting | default('none') }}>{% endif -%}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  and 3+3?  "},
    ],
    [
        {"role": "user", "content": "naïve “quotes” 日本"},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
        {"role": "user", "content": "past the break"},
    ],
]


@pytest.fixture(scope="module")
def bundled():
    return jd.from_pretrained("bundled")


def _pair(bundled, template: str, tmp_path):
    """A jaxdecode model and a transformers tokenizer sharing `template`, with
    bos/eos tokens, through tokenizer_config.json (as a checkpoint ships it)."""
    directory = tmp_path / "ckpt"
    bundled.save_pretrained(str(directory))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": template,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return jd.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parity
@pytest.mark.parametrize("template", [CHATML, LLAMA2, FANCY], ids=["chatml", "llama2", "fancy"])
def test_rendering_equals_transformers(bundled, tmp_path, template):
    lm, tok = _pair(bundled, template, tmp_path)
    for messages in CONVERSATIONS:
        for gen in (False, True):
            for extra in ({}, {"greeting": "héllo"}):
                try:
                    want = tok.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=gen, **extra
                    )
                except Exception as e:  # the template refused the conversation
                    with pytest.raises(ValueError, match="roles must alternate"):
                        lm.apply_chat_template(messages, add_generation_prompt=gen, **extra)
                    assert "roles must alternate" in str(e)
                    continue
                got = lm.apply_chat_template(messages, add_generation_prompt=gen, **extra)
                assert got == want, (messages, gen, extra)


def test_template_from_chat_template_jinja_and_round_trip(bundled, tmp_path):
    lm, _ = _pair(bundled, CHATML, tmp_path)
    assert lm.tokenizer.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    out = tmp_path / "saved"
    lm.save_pretrained(str(out))
    again = jd.from_pretrained(out)
    assert again.tokenizer.chat_template == CHATML
    assert again.tokenizer.special_tokens == lm.tokenizer.special_tokens
    # chat_template.jinja takes precedence, as in transformers 5.
    (out / "chat_template.jinja").write_text("{{ messages | length }}")
    assert jd.from_pretrained(out).apply_chat_template(CONVERSATIONS[1]) == "4"


def test_errors(bundled, tmp_path):
    with pytest.raises(ValueError, match="has no chat template"):
        bundled.apply_chat_template(CONVERSATIONS[0])
    lm, _ = _pair(bundled, "{{ raise_exception('nope') }}", tmp_path)
    with pytest.raises(ValueError, match="the chat template failed: nope"):
        lm.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="mappings with role and content"):
        lm.apply_chat_template(["hi"])
    no_tok = bundled.replace(tokenizer=None)
    with pytest.raises(ValueError, match="needs a model with a tokenizer"):
        no_tok.apply_chat_template(CONVERSATIONS[0])


def _same_outputs(a: dict, b: dict) -> None:
    """Same text and tokens; log-probabilities within 1e-5 (the engine's and a
    static batch's programs may differ in the last printed digit)."""
    for x, y in zip(a["outputs"], b["outputs"], strict=True):
        assert (x["text"], x["tokens"]) == (y["text"], y["tokens"])
        np.testing.assert_allclose(x["token_logprobs"], y["token_logprobs"], atol=1e-5)


def test_eval_messages_lines_and_chat_flag(bundled, tmp_path, capsys, monkeypatch):
    """`eval` lines with `"messages"` are rendered with the model's template; each
    record equals `generate --json --chat` on that conversation's user turn (same
    tokens), and `--chat` renders plain `prompt` lines the same way."""
    from jaxdecode.cli import main

    monkeypatch.setenv("JAXDECODE_COMPILATION_CACHE", "off")
    lm, _ = _pair(bundled, CHATML, tmp_path)
    model = str(tmp_path / "ckpt")
    chats = [
        [{"role": "user", "content": "And God said"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Amen"}],
    ]
    src = tmp_path / "p.jsonl"
    lines = [{"id": "a", "messages": chats[0]}, {"id": "b", "messages": chats[1]}]
    src.write_text("".join(json.dumps(x) + "\n" for x in [*lines, {"id": "c", "prompt": "Amen"}]))
    common = ["--model", model, "--quiet", "--no-do_sample", "--max_new_tokens", "8"]
    out = tmp_path / "o.jsonl"
    assert main(["eval", str(src), "-o", str(out), *common]) == 0
    got = {r["id"]: r for r in map(json.loads, out.open())}
    for key, messages in zip("ab", chats, strict=True):
        text = lm.apply_chat_template(messages, add_generation_prompt=True)
        assert got[key]["messages"] == messages
        assert got[key]["prompt"] == text and text.endswith("<|im_start|>assistant\n")
        ids = np.array([lm.tokenizer.encode(text)])
        want = lm.generate(ids, max_new_tokens=8, do_sample=False).sequences[0, ids.shape[1] :]
        assert (
            got[key]["outputs"][0]["tokens"]
            == [int(t) for t in want][: len(got[key]["outputs"][0]["tokens"])]
        )
    # The same conversations through generate --json --chat (--system for the second).
    gen = ["generate", "--json", "--chat", *common[:2], *common[3:]]
    assert main([*gen, "And God said"]) == 0
    _same_outputs(json.loads(capsys.readouterr().out), got["a"])
    assert main([*gen, "--system", "Be brief.", "Amen"]) == 0
    _same_outputs(json.loads(capsys.readouterr().out), got["b"])
    # --chat renders plain prompt lines; without it they are plain text.
    assert got["c"]["prompt"] == "Amen" and "messages" not in got["c"]
    out2 = tmp_path / "o2.jsonl"
    assert (
        main(["eval", str(src), "-o", str(out2), *common, "--chat", "--system", "Be brief."]) == 0
    )
    chat_c = {r["id"]: r for r in map(json.loads, out2.open())}["c"]
    assert chat_c["prompt"] == "Amen"
    _same_outputs(chat_c, got["b"])
    assert chat_c["outputs"] != got["c"]["outputs"]
    # Bad chat lines are reported with the other bad lines, before generating.
    bad = [
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"prompt": "x", "messages": chats[0]},
    ]
    src.write_text("".join(json.dumps(x) + "\n" for x in bad))
    assert main(["eval", str(src), "-o", str(tmp_path / "o3.jsonl"), *common]) == 2
    err = capsys.readouterr().err
    assert "3 bad lines" in err and "line 1: 'messages' must be a non-empty list" in err
    assert (
        "line 3: give one of 'prompt', 'messages' or 'prompt_ids', not prompt and messages" in err
    )
    capsys.readouterr()
    src.write_text(json.dumps({"messages": chats[0]}) + "\n")
    assert main(["eval", str(src), "-o", str(tmp_path / "o4.jsonl"), "--quiet"]) == 2
    assert "line 1 (id 1): " in capsys.readouterr().err
