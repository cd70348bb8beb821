"""Every code block of README.md, docs/ (and the pages it includes) runs in reading order.

Each page's Python blocks run one after another in one fresh namespace (a block may
use what an earlier block of the same page defined, never what another page did), so
a page that only works after another page fails here. Conventions, in the Markdown:

- a ```python block runs;
- `<!-- output -->` on the line before a ```text block: that block is what the
  preceding Python block prints, checked exactly (trailing spaces aside);
- `<!-- notest: WHY -->` on the line before a block: it does not run, and WHY says
  why (a shell set-up command, a multi-host or multi-device snippet, ...);
  `test_blocks_not_run_say_why` lists them all;
- a shell block (```bash) must be marked `notest` (CLI examples are run by the tests
  named in their reason); a ```json block must parse.

Page-specific checks (greedy is greedy, the RL ratio is 1, the constrained output
validates) run on the page's namespace after its blocks. Loading a model is
memoised for this file (`jd.from_pretrained` returns the same immutable `CausalLM`
for the same path), so the real SmolLM2 model is read once however many pages use it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from support import loading_once

import jaxdecode as jd

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks/README.md"] + sorted(
    (ROOT / "docs").rglob("*.md")
)
FENCE = re.compile(r"^( *)```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(notest|output)\s*:?\s*(.*?)\s*-->\s*$")
SHELL = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mark: str | None  # "notest", "output" or None
    why: str  # a notest block's reason


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        indent, info, body = m.group(1), m.group(2).strip(), m.group(3)
        code = "\n".join(line[len(indent) :] for line in body.splitlines())
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARKER.search(before)
        out.append(
            Block(
                page=str(path.relative_to(ROOT)),
                line=text[: m.start()].count("\n") + 1,
                lang=info.split()[0] if info else "",
                code=code + "\n",
                mark=mark.group(1) if mark else None,
                why=mark.group(2) if mark else "",
            )
        )
    return out


ALL = {str(p.relative_to(ROOT)): blocks(p) for p in PAGES}
RUNNABLE = [
    page for page, bs in ALL.items() if any(_b.lang == "python" and not _b.mark for _b in bs)
]


@pytest.fixture(scope="module", autouse=True)
def memoised_loading():
    """`jd.from_pretrained` loads each path once for the whole file."""
    with loading_once():
        yield


def run_page(page: str) -> dict:
    """Runs a page's Python blocks in order in one namespace; checks shown outputs."""
    namespace: dict = {"__name__": "__docs__"}
    printed = None
    for block in ALL[page]:
        where = f"{block.page}:{block.line}"
        if block.mark == "output":
            assert printed is not None, f"{where}: an output block with no Python block before it"
            got = "\n".join(line.rstrip() for line in printed.strip("\n").splitlines())
            want = "\n".join(line.rstrip() for line in block.code.strip("\n").splitlines())
            assert got == want, f"{where}: the block above prints\n{got}\nnot\n{want}"
            printed = None
        elif block.lang == "python" and not block.mark:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(compile(block.code, where, "exec"), namespace)
            printed = buffer.getvalue()
    return namespace


# --------------------------------------------------------------------------- #
# What every block must be.


def test_every_block_is_run_or_says_why_not():
    problems = []
    for page, bs in ALL.items():
        for i, b in enumerate(bs):
            where = f"{page}:{b.line}"
            if b.mark == "notest" and not b.why:
                problems.append(f"{where}: `notest` without a reason")
            if b.lang in SHELL and b.mark != "notest":
                problems.append(f"{where}: a {b.lang} block must be marked <!-- notest: why -->")
            if b.mark == "output" and (i == 0 or bs[i - 1].lang != "python" or bs[i - 1].mark):
                problems.append(f"{where}: an output block must follow a Python block that runs")
            if b.lang == "json" and b.mark != "notest":
                try:
                    json.loads(b.code)
                except ValueError as e:
                    problems.append(f"{where}: invalid JSON: {e}")
            if b.lang == "python" and b.mark == "notest":
                ast.parse(b.code)  # still valid Python
    assert not problems, "\n".join(problems)


def test_blocks_not_run_say_why():
    """The list of blocks that do not run, with their reasons (printed with -s)."""
    skipped = [
        f"{b.page}:{b.line} [{b.lang}] {b.why}"
        for bs in ALL.values()
        for b in bs
        if b.mark == "notest"
    ]
    print("\n".join(skipped))
    assert all(s.rsplit("] ", 1)[1] for s in skipped)


def test_relative_links_resolve():
    """README and docs pages link to files that exist (mkdocs --strict checks the
    site's own links again, anchors included)."""
    missing = []
    for path in PAGES:
        text = FENCE.sub("", path.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = target.split("#")[0]
            if file and not (path.parent / file).exists():
                missing.append(f"{path.relative_to(ROOT)}: {target}")
    assert not missing, missing


def test_config_fields_table_is_complete():
    """The generated GenerationConfig table documents every field (mkdocs' hook)."""
    spec = importlib.util.spec_from_file_location(
        "config_fields", ROOT / "docs/hooks/config_fields.py"
    )
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    table = hook.render()
    for name in jd.config.HF_FIELDS + jd.config.PER_ROW_FIELDS + ("seed", "json_schema"):
        assert f"| `{name}` |" in table


def test_readme_fits_on_a_screen_or_five():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 260


# --------------------------------------------------------------------------- #
# Every page runs, then what its examples claim.


def check_readme(ns: dict) -> None:
    """The quick start's labelled examples are reproducible and do what the label says
    (the bundled model samples by default: an example labelled greedy that forgot
    `do_sample=False` would sample with a fresh seed)."""
    quick = next(b for b in ALL["README.md"] if b.lang == "python")
    lines = quick.code.splitlines()
    labelled = {}
    for node in ast.parse(quick.code).body:
        label = re.search(
            r"#\s*(greedy|beam search|nucleus sampling)\s*$", lines[node.end_lineno - 1]
        )
        if label and isinstance(node, ast.Assign) and node.targets[0].id == "out":
            labelled[label.group(1)] = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    assert set(labelled) == {"greedy", "beam search", "nucleus sampling"}, labelled

    def run(label):
        scope = dict(ns)
        exec(labelled[label], scope)
        return scope["out"]

    lm, ids = ns["lm"], ns["ids"]
    for label in labelled:
        a, b = run(label), run(label)
        np.testing.assert_array_equal(a.sequences, b.sequences, err_msg=label)
    greedy = run("greedy")
    seq = np.asarray(greedy.sequences)[:, : ids.shape[1] + int(greedy.lengths[0])]
    logits = np.asarray(lm.logits(seq))[0, ids.shape[1] - 1 : -1]
    np.testing.assert_array_equal(logits.argmax(-1), seq[0, ids.shape[1] :])
    beams = run("beam search")
    assert beams.sequences_scores is not None, "not beam search"
    want = jd.generate(lm, ids, max_new_tokens=60, do_sample=False, num_beams=4)
    np.testing.assert_array_equal(beams.sequences, want.sequences)


def check_rl(ns: dict) -> None:
    """Sampler and trainer agree, and the first ratio is exactly 1."""
    assert ns["out"].sequences.shape[0] == 4
    assert float(ns["gap"]) <= 1e-5
    mask = np.asarray(ns["mask"])
    np.testing.assert_array_equal(np.asarray(ns["ratio"])[mask], 1.0)


def check_constrained(ns: dict) -> None:
    """The real-weights JSON validates against its schema."""
    import jsonschema

    jsonschema.validate(json.loads(ns["text"]), ns["schema"])


CHECKS = {
    "README.md": check_readme,
    "docs/guides/rl.md": check_rl,
    "docs/guides/constrained.md": check_constrained,
}


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_runs_in_order(page):
    namespace = run_page(page)
    if page in CHECKS:
        CHECKS[page](namespace)


def test_every_page_with_checks_runs():
    assert set(CHECKS) <= set(RUNNABLE)


# --------------------------------------------------------------------------- #
# The CLI guide's labelled commands (shell blocks are not run by the page runner).


def cli_examples() -> dict[str, list[str]]:
    (block,) = (b for b in ALL["docs/guides/cli.md"] if "test_cli_examples" in b.why)
    examples = {}
    for line in block.code.splitlines():
        command, _, label = line.partition("#")
        if command.startswith("jaxdecode generate") and label.strip():
            examples[label.strip()] = shlex.split(command)[1:]
    return examples


def generated(out, ids) -> np.ndarray:
    return np.asarray(out.sequences)[0, ids.shape[1] :]


def test_cli_examples_are_reproducible_and_do_what_they_say(capsys, monkeypatch):
    """Each labelled command runs twice in this process (`cli.main`: the process,
    its exit code and stderr end to end are tests/integration/test_cli.py's);
    `from_pretrained` is memoised here, so both runs and the library reference
    below share one model and its compiled programs."""
    from jaxdecode.cli import main

    examples = cli_examples()
    assert {"greedy", "sampling", "beam search"} <= set(examples), examples
    monkeypatch.setenv("JAXDECODE_COMPILATION_CACHE", "off")  # not for the whole process
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)

    def run(args: list[str]) -> str:
        capsys.readouterr()
        code = main(args)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out

    lm = jd.from_pretrained("bundled")
    # Each labelled command runs twice; the other labelled lines only show options.
    checked = ("greedy", "sampling", "beam search")
    outs = {label: (run(examples[label]), run(examples[label])) for label in checked}
    for label in checked:
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
