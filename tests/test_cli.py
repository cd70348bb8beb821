"""The `jaxdecode` command line, run as a subprocess (as a user runs it).

A tiny byte-level GPT-2 with random weights is written once per module and passed
with `--model DIR`. Every subprocess pays for a JAX import and its compilations,
so runs are few and each one's output serves several assertions; the subprocesses
share a persistent JAX compilation cache (per module), which changes no result.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxdecode
from jaxdecode.models.gpt2 import GPT2Config, gpt2_decoder, init_params

EOS = 256
VOCAB = 257
CFG = GPT2Config(
    vocab_size=VOCAB,
    n_positions=128,
    n_embd=32,
    n_layer=1,
    n_head=2,
    bos_token_id=EOS,
    eos_token_id=EOS,
)
TOKENIZER = jaxdecode.byte_tokenizer()


# --------------------------------------------------------------------------- #
# Fixtures and helpers.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # Jitted: eager Flax init runs (and compiles) op by op.
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    lm = jaxdecode.CausalLM(
        params=params,
        decoder=gpt2_decoder(CFG),
        config=CFG,
        generation_config=jaxdecode.GenerationConfig(
            max_new_tokens=20, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS
        ),
        tokenizer=jaxdecode.byte_tokenizer(),
    )
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    lm.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("jax-cache")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONIOENCODING": "utf-8",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


class Result:
    """A finished run: exit code, stdout and stderr as text (no newline translation)."""

    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.rc = proc.returncode
        self.out = proc.stdout.decode("utf-8")
        self.err = proc.stderr.decode("utf-8")

    def __repr__(self) -> str:  # shown by pytest on a failed assertion
        return f"Result(rc={self.rc}, stdout={self.out[-2000:]!r}, stderr={self.err[-2000:]!r})"


MODULE_CMD = [sys.executable, "-m", "jaxdecode.cli"]


def run(env: dict[str, str], *args: str, cmd: list[str] | None = None) -> Result:
    proc = subprocess.run([*(cmd or MODULE_CMD), *args], env=env, capture_output=True, timeout=300)
    return Result(proc)


def json_lines(text: str) -> list[dict]:
    # Not str.splitlines: generated text may hold U+2028 or U+0085, which JSON leaves as is.
    return [json.loads(line) for line in text.split("\n") if line]


def check_record(rec: dict, max_new_tokens: int) -> None:
    """tokens, token_logprobs and text agree with each other."""
    tokens = rec["tokens"]
    assert 1 <= len(tokens) <= max_new_tokens, rec
    assert all(isinstance(t, int) and 0 <= t < VOCAB for t in tokens), rec
    # A random model almost never picks EOS; stopping early is only allowed on EOS.
    assert len(tokens) == max_new_tokens or tokens[-1] == EOS, rec
    body = tokens[:-1] if tokens[-1] == EOS else tokens
    assert rec["text"] == TOKENIZER.decode(body), rec
    if "token_logprobs" in rec:
        logps = rec["token_logprobs"]
        assert len(logps) == len(tokens), rec
        assert all(np.isfinite(x) and x <= 0 for x in logps), rec


def assert_one_line_error(res: Result, *words: str | tuple[str, ...]) -> None:
    """Exit code 2, empty stdout, one line on stderr naming each of `words`
    (a tuple: any one of its alternatives)."""
    assert res.rc == 2, res
    lines = res.err.strip("\n").split("\n")
    assert len(lines) == 1, f"expected one line on stderr: {res!r}"
    assert lines[0].startswith("jaxdecode: error:"), res
    for w in words:
        alternatives = (w,) if isinstance(w, str) else w
        assert any(a.lower() in lines[0].lower() for a in alternatives), (
            f"{w!r} not named in {lines[0]!r}"
        )
    assert res.out == "", res


def left_pad(prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [TOKENIZER.encode(p) for p in prompts]
    width = max(map(len, encoded))
    ids = np.full((len(encoded), width), EOS, np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = e
        mask[i, width - len(e) :] = 1
    return ids, mask


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def read_results(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "OUT must end on a complete line"
    return json_lines(text)


# --------------------------------------------------------------------------- #
# jaxdecode generate
# --------------------------------------------------------------------------- #

PROMPTS = ["In the beginning", "And God said"]


def test_generate_text_json_and_inprocess_parity(model_dir, env):
    text = run(env, "generate", *PROMPTS, "--model", model_dir, "--max-new-tokens", "5")
    js = run(env, "generate", *PROMPTS, "--model", model_dir, "--max_new_tokens", "5", "--json")
    assert text.rc == 0, text
    assert js.rc == 0, js

    records = json_lines(js.out)
    assert len(records) == 2, js
    for rec, prompt in zip(records, PROMPTS, strict=True):
        assert rec["prompt"] == prompt
        check_record(rec, 5)
        assert len(rec["tokens"]) == 5  # greedy on random weights: no EOS in 5 steps

    # Plain output: prompt + continuation per prompt, separated by "---". The
    # dashed flag (text run) and the underscored one (JSON run) mean the same.
    expected = "\n---\n".join(r["prompt"] + r["text"] for r in records) + "\n"
    assert text.out == expected

    # The CLI decodes exactly what `jaxdecode.generate` does in-process.
    lm = jaxdecode.from_pretrained(model_dir)
    ids, mask = left_pad(PROMPTS)
    out = jaxdecode.generate(lm, ids, mask, max_new_tokens=5)
    seqs, lengths = np.asarray(out.sequences), np.asarray(out.lengths)
    logps = np.asarray(out.token_logprobs)
    width = ids.shape[1]
    for i, rec in enumerate(records):
        n = int(lengths[i])
        assert rec["tokens"] == seqs[i, width : width + n].tolist()
        np.testing.assert_allclose(rec["token_logprobs"], logps[i, :n], atol=1e-5)


def test_generate_seeded_sampling_and_sampled_stream(model_dir, env):
    args = ["generate", "Hello", "--model", model_dir, "--max_new_tokens", "8", "--do_sample"]
    a = run(env, *args, "--seed", "3", "--json")
    b = run(env, *args, "--seed", "3", "--json")
    c = run(env, *args, "--seed", "4", "--json")
    for res in (a, b, c):
        assert res.rc == 0, res
    assert a.out == b.out, "same seed, different samples"
    assert a.out != c.out, "different seeds, same samples"
    (rec,) = json_lines(a.out)
    check_record(rec, 8)

    # Streaming samples through the same step with the same key: same text.
    streamed = run(env, *args, "--seed", "3", "--stream")
    assert streamed.rc == 0, streamed
    assert streamed.out == rec["prompt"] + rec["text"] + "\n"


def test_stream_equals_generate_through_console_script(model_dir, env):
    script = Path(sys.executable).parent / ("jaxdecode.exe" if os.name == "nt" else "jaxdecode")
    try:
        importlib.metadata.distribution("jaxdecode")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("jaxdecode is not installed (no console script)")
    assert script.is_file(), f"the installed package has no console script at {script}"

    args = ["generate", "Once upon a time", "--model", model_dir, "--max_new_tokens", "6"]
    plain = run(env, *args, cmd=[str(script)])
    streamed = run(env, *args, "--stream")
    assert plain.rc == 0, plain
    assert streamed.rc == 0, streamed
    assert plain.out.startswith("Once upon a time")
    assert len(plain.out) > len("Once upon a time\n")
    assert streamed.out == plain.out


def test_generate_beam_search_json(model_dir, env):
    res = run(
        env, "generate", "Hello", "--model", model_dir, "--max_new_tokens", "5", "--num_beams", "2",
        "--json",
    )  # fmt: skip
    assert res.rc == 0, res
    (rec,) = json_lines(res.out)
    check_record(rec, 5)
    score = rec["sequence_score"]
    assert isinstance(score, float) and np.isfinite(score) and score <= 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["Hi", "--no-such-flag"], ["--no-such-flag"]),
        (["Hi", "--top_p", "1.5"], ["top_p"]),
        (["Hi", "--temperature", "0", "--do_sample"], ["temperature"]),
        (["Hi", "--num_beams", "0"], ["num_beams"]),
        (["Hi", "--max_new_tokens", "1000"], ["n_positions"]),
        ([], ["prompt"]),
        (["Hi", "--early_stopping", "sometimes"], ["early_stopping", "sometimes"]),
        (["Hi", "--bad_words_ids", "notjson"], ["bad_words_ids"]),
        (["Hi", "--stream", "--num_beams", "2"], ["stream", "num_beams"]),
    ],
    ids=[
        "unknown-flag",
        "top_p",
        "temperature0-sample",
        "num_beams0",
        "beyond-n_positions",
        "no-prompt",
        "early_stopping",
        "bad_words_ids",
        "stream-beams",
    ],
)
def test_generate_bad_inputs(model_dir, env, args, words):
    assert_one_line_error(run(env, "generate", "--model", model_dir, *args), *words)


def test_generate_unknown_model(env):
    assert_one_line_error(run(env, "generate", "Hi", "--model", "/no/such/dir"), "/no/such/dir")


# --------------------------------------------------------------------------- #
# jaxdecode eval
# --------------------------------------------------------------------------- #


def test_eval_per_prompt_options_progress_and_rerun(model_dir, env, tmp_path):
    # Command-line options on prompts of 2 to 15 bytes (two length buckets); lines
    # with their own options on short prompts (one bucket): four compilations.
    records = []
    for i in range(36):
        if i % 4 == 1:
            records.append({"id": f"p{i}", "prompt": f"#{i} ab", "max_new_tokens": 3})
        elif i % 4 == 2:
            records.append(
                {"id": f"p{i}", "prompt": f"#{i} cd", "temperature": 0.5, "do_sample": True}
            )
        else:
            records.append({"id": f"p{i}", "prompt": f"#{i}" + "x" * (i % 13)})
    # The same prompts greedy (command line) and sampled (per-prompt options).
    for j in range(4):
        prompt = f"twin {j}"
        records.append({"id": f"greedy{j}", "prompt": prompt})
        records.append(
            {"id": f"sampled{j}", "prompt": prompt, "temperature": 0.5, "do_sample": True}
        )
    lengths = {len(r["prompt"].encode()) for r in records}
    assert min(lengths) <= 8 < max(lengths) <= 16
    prompts_file, out_file = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts_file, records)

    args = [
        "eval", str(prompts_file), "-o", str(out_file), "--model", model_dir,
        "--max_new_tokens", "6", "--batch_size", "8", "--seed", "0",
    ]  # fmt: skip
    res = run(env, *args)
    assert res.rc == 0, res
    assert "prompt" in res.err or "it/s" in res.err, "no progress on stderr"
    assert "tok" in res.err, "no tokens per second in the progress"
    assert res.out == "", "progress belongs on stderr"

    results = read_results(out_file)
    by_id = {r["id"]: r for r in results}
    assert len(results) == len(records) == len(by_id), "one line per id"
    for rec in records:
        got = by_id[rec["id"]]
        assert got["prompt"] == rec["prompt"]
        limit = rec.get("max_new_tokens", 6)
        check_record(got, limit)
        if "max_new_tokens" in rec:  # the line's option overrides --max_new_tokens 6
            assert len(got["tokens"]) <= 3, got
    # do_sample from the line took effect: sampled twins differ from the greedy ones.
    differ = [by_id[f"greedy{j}"]["tokens"] != by_id[f"sampled{j}"]["tokens"] for j in range(4)]
    assert all(differ), differ

    # A second run over a complete OUT does nothing.
    before = out_file.read_bytes()
    again = run(env, *args)
    assert again.rc == 0, again
    assert out_file.read_bytes() == before


def test_eval_without_ids_uses_line_numbers(model_dir, env, tmp_path):
    prompts_file, out_file = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts_file, [{"prompt": "first"}, {"prompt": "second one"}, {"prompt": "x"}])
    res = run(
        env, "eval", str(prompts_file), "-o", str(out_file), "--model", model_dir,
        "--max_new_tokens", "4", "--batch_size", "4", "--quiet",
    )  # fmt: skip
    assert res.rc == 0, res
    assert res.err == "", "--quiet prints nothing"
    results = read_results(out_file)
    assert sorted(r["id"] for r in results) == [1, 2, 3]
    prompts = {1: "first", 2: "second one", 3: "x"}
    for r in results:
        assert r["prompt"] == prompts[r["id"]]
        check_record(r, 4)


def test_eval_resume_after_kill(model_dir, env, tmp_path):
    n = 60
    # Three length buckets (<= 8, <= 16, <= 32): the compilation between buckets
    # leaves the run half-written for a while.
    records = []
    for i in range(n):
        length = [3, 12, 24][i % 3] + i % 5
        records.append({"id": i, "prompt": ("abcdefghij" * 4)[: length - 1] + chr(65 + i % 26)})
    prompts_file = tmp_path / "prompts.jsonl"
    write_jsonl(prompts_file, records)

    def args(out: Path) -> list[str]:
        return [
            "eval", str(prompts_file), "-o", str(out), "--model", model_dir,
            "--max_new_tokens", "4", "--batch_size", "2", "--quiet",
        ]  # fmt: skip

    # The killed run compiles from scratch (no shared cache): long pauses between buckets.
    killed_out = tmp_path / "resumed.jsonl"
    no_cache = {k: v for k, v in env.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    proc = subprocess.Popen(
        [*MODULE_CMD, *args(killed_out)],
        env=no_cache,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if killed_out.exists() and killed_out.read_bytes().count(b"\n") > 0:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "eval finished before it could be killed"
        assert time.monotonic() < deadline, "eval wrote nothing in time"
    finally:
        proc.kill()
        proc.wait()
    written = killed_out.read_bytes()
    cut = written.rfind(b"\n") + 1
    before_kill = json_lines(written[:cut].decode("utf-8"))
    assert 0 < len(before_kill) < n, f"{len(before_kill)} lines at the kill"
    # A torn write: half a result line at the end.
    with open(killed_out, "ab") as f:
        f.write(b'{"id": 59, "prompt": "abcd')

    resumed = run(env, *args(killed_out))
    assert resumed.rc == 0, resumed
    results = read_results(killed_out)
    ids = [r["id"] for r in results]
    assert sorted(ids) == list(range(n)), "every id exactly once, no gaps"
    assert results[: len(before_kill)] == before_kill, "lines written before the kill changed"

    clean_out = tmp_path / "clean.jsonl"
    clean = run(env, *args(clean_out))
    assert clean.rc == 0, clean
    clean_by_id = {r["id"]: r for r in read_results(clean_out)}
    for r in results:
        check_record(r, 4)
        assert r == clean_by_id[r["id"]], "a resumed result differs from the clean run"


def test_eval_per_prompt_seed_overrides_command_line(model_dir, env, tmp_path):
    line = {"id": "x", "prompt": "Hello", "do_sample": True}

    def sample(tag: str, record: dict, seed: str) -> list[int]:
        prompts_file, out_file = tmp_path / f"{tag}.jsonl", tmp_path / f"{tag}-out.jsonl"
        write_jsonl(prompts_file, [record])
        res = run(
            env, "eval", str(prompts_file), "-o", str(out_file), "--model", model_dir,
            "--max_new_tokens", "8", "--batch_size", "1", "--quiet", "--seed", seed,
        )  # fmt: skip
        assert res.rc == 0, res
        (result,) = read_results(out_file)
        return result["tokens"]

    seed1 = sample("cmdline-seed1", line, "1")
    seed2 = sample("cmdline-seed2", line, "2")
    assert seed1 != seed2, "--seed has no effect on eval's sampling"
    # {"seed": 1} on the line overrides --seed 2: the same as --seed 1.
    line_seed1 = sample("line-seed1", {**line, "seed": 1}, "2")
    assert line_seed1 == seed1, "a per-prompt seed is ignored (the command line's is used)"


@pytest.mark.parametrize(
    "lines, out_text, words",
    [
        (None, None, ["missing.jsonl"]),
        (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"'], None, [(":2:", "line 2")]),
        (['{"id": 1, "prompt": "a"}', '{"id": 2}'], None, ["prompt"]),
        (['{"id": 1, "prompt": "a", "temprature": 0.5}'], None, ["temprature"]),
        (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], None, ["id"]),
        (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b", "top_p": 1.5}'], None, ["top_p"]),
        (['{"id": 1, "prompt": "a"}'], "[1]\n", ["out.jsonl"]),
    ],
    ids=[
        "missing-file",
        "invalid-json",
        "no-prompt",
        "unknown-option",
        "duplicate-ids",
        "bad-option-value",
        "out-line-not-a-result",
    ],
)
def test_eval_bad_inputs(model_dir, env, tmp_path, lines, out_text, words):
    prompts_file, out_file = tmp_path / "missing.jsonl", tmp_path / "out.jsonl"
    if lines is not None:
        prompts_file = tmp_path / "prompts.jsonl"
        prompts_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if out_text is not None:
        out_file.write_text(out_text, encoding="utf-8")
    res = run(env, "eval", str(prompts_file), "-o", str(out_file), "--model", model_dir)
    assert_one_line_error(res, *words)
    if out_text is not None:
        assert out_file.read_text(encoding="utf-8") == out_text, "OUT was changed"
    elif "top_p" not in words:  # a bad per-prompt value may stop a run part-way
        assert not out_file.exists(), "nothing is written on a bad prompts file"
