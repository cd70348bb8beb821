"""The `jaxdecode` command line, run as a subprocess (as a user runs it).

A tiny byte-level GPT-2 with random weights is written once per module and passed
with `--model DIR`. Every subprocess pays for a JAX import and its compilations,
so runs are few and each one's output serves several assertions; the subprocesses
share a persistent JAX compilation cache (per module), which changes no result.
Runs whose subject is not the process (refusals, records, seeds, eval's
lines) run in this process (`Result.here`, `cli.main`), where each model
directory is loaded once for the module (`support.loading_once`), so they share
its compiled programs as one CLI process does. Subprocesses stay where the
process is the subject: the exit code and the one stderr line end to end
(`test_generate_unknown_model`, `test_eval_reports_every_bad_line_before_generating`),
plain text output, the console script, a killed and resumed eval, the
persistent compilation cache across processes, a closed pipe.
"""

from __future__ import annotations

import dataclasses
import functools
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
from support import loading_once

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
EVAL = "jaxdecode.eval/1"


# --------------------------------------------------------------------------- #
# Fixtures and helpers.
# --------------------------------------------------------------------------- #


def save_model(
    directory: Path, cfg: GPT2Config = CFG, nan: bool = False, tokenizer: bool = True
) -> str:
    # Jitted: eager Flax init runs (and compiles) op by op.
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    if nan:  # a broken checkpoint: every weight NaN
        params = jax.tree.map(lambda x: np.full(x.shape, np.nan, x.dtype), params)
    lm = jaxdecode.CausalLM(
        params=params,
        decoder=gpt2_decoder(cfg),
        config=cfg,
        generation_config=jaxdecode.GenerationConfig(
            max_new_tokens=20, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS
        ),
        tokenizer=jaxdecode.byte_tokenizer() if tokenizer else None,
    )
    lm.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module", autouse=True)
def load_once():
    """In-process runs load each model directory once (`support.loading_once`)."""
    with loading_once():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_model(tmp_path_factory.mktemp("tiny-gpt2"))


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
        "JAXDECODE_COMPILATION_CACHE": "off",  # the JAX_* settings above are the cache
    }


class Result:
    """A finished run: exit code, stdout and stderr as text (no newline translation)."""

    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.rc = proc.returncode
        self.out = proc.stdout.decode("utf-8")
        self.err = proc.stderr.decode("utf-8")

    @classmethod
    def here(cls, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str):
        """`jaxdecode ARGS` run in this process (`cli.main`): the refusals that come
        before any compilation, and runs whose start-up and exit code other tests
        check in a subprocess, need no Python and JAX start of their own."""
        from jaxdecode.cli import main

        # In-process runs must not turn on the persistent cache for the whole worker.
        monkeypatch.setenv("JAXDECODE_COMPILATION_CACHE", "off")
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        capsys.readouterr()
        rc = main(list(args))
        captured = capsys.readouterr()
        out = subprocess.CompletedProcess(args, rc, captured.out.encode(), captured.err.encode())
        return cls(out)

    def __repr__(self) -> str:  # shown by pytest on a failed assertion
        return f"Result(rc={self.rc}, stdout={self.out[-2000:]!r}, stderr={self.err[-2000:]!r})"


MODULE_CMD = [sys.executable, "-m", "jaxdecode.cli"]


def run(env: dict[str, str], *args: str, cmd: list[str] | None = None) -> Result:
    proc = subprocess.run([*(cmd or MODULE_CMD), *args], env=env, capture_output=True, timeout=300)
    return Result(proc)


def json_lines(text: str) -> list[dict]:
    # Not str.splitlines: generated text may hold U+2028 or U+0085, which JSON leaves as is.
    return [json.loads(line) for line in text.split("\n") if line]


def check_record(
    rec: dict, max_new_tokens: int, schema: str = "jaxdecode.generate/1", n: int = 1
) -> None:
    """A result record: its schema and fields, then each output (`check_output`)."""
    keys = ["schema", "prompt", "seed", "outputs"]
    if schema.endswith("eval/1"):
        keys += ["id", "model", "options"]  # and what made it
    assert sorted(rec) == sorted(keys), rec
    assert rec["schema"] == schema, rec
    assert len(rec["outputs"]) == n, rec
    for out in rec["outputs"]:
        check_output(out, max_new_tokens)


def check_output(rec: dict, max_new_tokens: int) -> None:
    """tokens, token_logprobs and text agree with each other."""
    assert sorted(rec) == ["sequence_score", "text", "token_logprobs", "tokens"], rec
    tokens = rec["tokens"]
    assert 1 <= len(tokens) <= max_new_tokens, rec
    assert all(isinstance(t, int) and 0 <= t < VOCAB for t in tokens), rec
    # A random model almost never picks EOS; stopping early is only allowed on EOS.
    assert len(tokens) == max_new_tokens or tokens[-1] == EOS, rec
    body = tokens[:-1] if tokens[-1] == EOS else tokens
    assert rec["text"] == TOKENIZER.decode(body), rec
    logps = rec["token_logprobs"]
    assert len(logps) == len(tokens), rec
    assert all(np.isfinite(x) and x <= 0 for x in logps), rec


def assert_same_result(got: dict, want: dict) -> None:
    """Records equal but for schema, id and eval's model and options; log-probabilities
    within float32 rounding (a batch of several rows may round the last digit differently)."""
    eval_only = ("schema", "id", "outputs", "model", "options")
    strip = lambda r: {k: v for k, v in r.items() if k not in eval_only}
    assert strip(got) == strip(want)
    assert len(got["outputs"]) == len(want["outputs"])
    for a, b in zip(got["outputs"], want["outputs"], strict=True):
        assert (a["tokens"], a["text"]) == (b["tokens"], b["text"]), (got, want)
        np.testing.assert_allclose(a["token_logprobs"], b["token_logprobs"], atol=1e-5)
        if b["sequence_score"] is None:
            assert a["sequence_score"] is None
        else:
            np.testing.assert_allclose(a["sequence_score"], b["sequence_score"], atol=1e-5)


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


def test_generate_text_json_and_inprocess_parity(model_dir, env, capsys, monkeypatch):
    text = run(env, "generate", *PROMPTS, "--model", model_dir, "--max-new-tokens", "5")
    js = Result.here(
        capsys, monkeypatch, "generate", *PROMPTS, "--model", model_dir, "--max_new_tokens", "5",
        "--json",
    )  # fmt: skip
    assert text.rc == 0, text
    assert js.rc == 0, js

    records = json_lines(js.out)
    assert len(records) == 2, js
    for rec, prompt in zip(records, PROMPTS, strict=True):
        assert rec["prompt"] == prompt
        check_record(rec, 5)
        assert rec["seed"] is None, "greedy: no seed"
        assert len(rec["outputs"][0]["tokens"]) == 5  # random weights: no EOS in 5 steps
        assert rec["outputs"][0]["sequence_score"] is None

    # Plain output: prompt + continuation per prompt, separated by "---". The
    # dashed flag (text run) and the underscored one (JSON run) mean the same.
    expected = "\n---\n".join(r["prompt"] + r["outputs"][0]["text"] for r in records) + "\n"
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
        assert rec["outputs"][0]["tokens"] == seqs[i, width : width + n].tolist()
        np.testing.assert_allclose(rec["outputs"][0]["token_logprobs"], logps[i, :n], atol=1e-5)


def test_generate_seeded_sampling_and_sampled_stream(model_dir, capsys, monkeypatch):
    # In-process (`cli.main`): the subprocess runs above check the exit code and the
    # output end to end; a process start and model load each would add nothing here.
    args = ["generate", "Hello", "--model", model_dir, "--max_new_tokens", "8", "--do_sample"]
    a = Result.here(capsys, monkeypatch, *args, "--seed", "3", "--json")
    b = Result.here(capsys, monkeypatch, *args, "--seed", "3", "--json")
    c = Result.here(capsys, monkeypatch, *args, "--seed", "4", "--json")
    for res in (a, b, c):
        assert res.rc == 0, res
    assert a.out == b.out, "same seed, different samples"
    assert a.out != c.out, "different seeds, same samples"
    (rec,) = json_lines(a.out)
    check_record(rec, 8)
    assert rec["seed"] == 3
    assert a.err == "", "a seed given is not announced"

    # Streaming samples through the same step with the same key: same text.
    streamed = Result.here(capsys, monkeypatch, *args, "--seed", "3", "--stream")
    assert streamed.rc == 0, streamed
    assert streamed.out == rec["prompt"] + rec["outputs"][0]["text"] + "\n"


def test_generate_draws_a_seed_it_shows_and_that_repeats_the_run(model_dir, capsys, monkeypatch):
    args = ["generate", "Hello", "--model", model_dir, "--max_new_tokens", "8", "--do_sample"]
    drawn = Result.here(capsys, monkeypatch, *args, "--json")
    assert drawn.rc == 0, drawn
    (rec,) = json_lines(drawn.out)
    seed = rec["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**31, rec
    assert drawn.err == f"jaxdecode: sampled with seed {seed} (repeat with --seed {seed})\n"
    again = Result.here(capsys, monkeypatch, *args, "--json", "--seed", str(seed))
    assert again.rc == 0, again
    assert again.out == drawn.out


def test_stream_equals_generate_through_console_script(model_dir, env, capsys, monkeypatch):
    script = Path(sys.executable).parent / ("jaxdecode.exe" if os.name == "nt" else "jaxdecode")
    try:
        importlib.metadata.distribution("jaxdecode")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("jaxdecode is not installed (no console script)")
    assert script.is_file(), f"the installed package has no console script at {script}"

    args = ["generate", "Once upon a time", "--model", model_dir, "--max_new_tokens", "6"]
    plain = run(env, *args, cmd=[str(script)])
    streamed = Result.here(capsys, monkeypatch, *args, "--stream")
    assert plain.rc == 0, plain
    assert streamed.rc == 0, streamed
    assert plain.out.startswith("Once upon a time")
    assert len(plain.out) > len("Once upon a time\n")
    assert streamed.out == plain.out


def test_generate_beam_search_json(model_dir, capsys, monkeypatch):
    res = Result.here(
        capsys, monkeypatch, "generate", "Hello", "--model", model_dir, "--max_new_tokens", "5",
        "--num_beams", "2", "--json",
    )  # fmt: skip
    assert res.rc == 0, res
    (rec,) = json_lines(res.out)
    check_record(rec, 5)
    score = rec["outputs"][0]["sequence_score"]
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
        (["Hi", "--do_sample", "--seed", "99999999999999999999"], ["seed", "99999999999999999999"]),
        (["Hi", "--seed", "-1"], ["seed"]),
        (["Hi", "--stream", "--json"], ["--stream", "--json"]),
        (["Hi", "--output_scores", "--json"], ["output_scores"]),
        (["Hi", "--output_logits"], ["output_logits"]),
        (["Hello world", "--max_length", "5"], ["max_length=5", "11-token prompt"]),
        (["Hi", "--max_length", "9", "--max_new_tokens", "1000"], ["n_positions"]),
        (
            [
                "Hi",
                "--json_schema",
                '{"type": "array", "items": {"type": "string"}, "uniqueItems": true}',
            ],
            ["json_schema", "'uniqueItems' at /"],
        ),
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
        "huge-seed",
        "negative-seed",
        "stream-json",
        "output_scores",
        "output_logits",
        "max_length-too-short",
        "max_new_tokens-wins",
        "json_schema-keyword",
    ],
)
def test_generate_bad_inputs(model_dir, capsys, monkeypatch, args, words):
    res = Result.here(capsys, monkeypatch, "generate", "--model", model_dir, *args)
    assert_one_line_error(res, *words)


def test_generate_unknown_model(env):
    assert_one_line_error(run(env, "generate", "Hi", "--model", "/no/such/dir"), "/no/such/dir")


def test_generate_max_length_is_honoured(model_dir, capsys, monkeypatch):
    # The model's generation_config sets max_new_tokens=20; --max_length replaces it.
    res = Result.here(
        capsys, monkeypatch, "generate", "Hi", "--model", model_dir, "--max_length", "5", "--json"
    )
    assert res.rc == 0, res
    (rec,) = json_lines(res.out)
    check_record(rec, 3)
    assert len(rec["outputs"][0]["tokens"]) == 3, "max_length=5 after a 2-token prompt: 3 new"


def test_tokens_the_tokenizer_does_not_know_are_shown(tmp_path, capsys, monkeypatch):
    # A model with 300 tokens and a tokenizer with 257: ids 257..299 have no text.
    cfg = dataclasses.replace(CFG, vocab_size=300)
    model = save_model(tmp_path / "big-vocab", cfg)
    res = Result.here(
        capsys, monkeypatch, "generate", "Hi", "--model", model, "--max_new_tokens", "3", "--json",
        "--sequence_bias", "[[[290], 100.0]]",
    )  # fmt: skip
    assert res.rc == 0, res
    (rec,) = json_lines(res.out)
    assert rec["outputs"][0]["tokens"] == [290, 290, 290]
    assert rec["outputs"][0]["text"] == "<unk:290><unk:290><unk:290>"
    assert TOKENIZER.decode([72, 290, 105]) == "H<unk:290>i"


def test_a_model_with_nan_weights_is_a_clear_error(tmp_path, capsys, monkeypatch):
    model = save_model(tmp_path / "nan-model", nan=True)
    here = functools.partial(Result.here, capsys, monkeypatch)
    res = here("generate", "Hi", "--model", model, "--max_new_tokens", "3", "--json")
    assert_one_line_error(res, model, "non-finite")
    prompts_file, out_file = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts_file, [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}])
    res = here("eval", str(prompts_file), "-o", str(out_file), "--model", model, "--quiet")
    assert_one_line_error(res, model, "non-finite")
    assert out_file.read_text(encoding="utf-8") == "", "nothing is written, never a NaN"


# --------------------------------------------------------------------------- #
# jaxdecode eval
# --------------------------------------------------------------------------- #


def test_eval_per_prompt_options_progress_and_rerun(model_dir, capsys, monkeypatch, tmp_path):
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
    res = Result.here(capsys, monkeypatch, *args)
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
        check_record(got, limit, EVAL)
        if "max_new_tokens" in rec:  # the line's option overrides --max_new_tokens 6
            assert len(got["outputs"][0]["tokens"]) <= 3, got
        assert (got["seed"] is None) == (not rec.get("do_sample")), got
    # do_sample from the line took effect: sampled twins differ from the greedy ones.
    toks = lambda i: by_id[i]["outputs"][0]["tokens"]
    differ = [toks(f"greedy{j}") != toks(f"sampled{j}") for j in range(4)]
    assert all(differ), differ

    # A second run over a complete OUT does nothing.
    before = out_file.read_bytes()
    again = Result.here(capsys, monkeypatch, *args)
    assert again.rc == 0, again
    assert out_file.read_bytes() == before


def test_eval_without_ids_uses_line_numbers(model_dir, capsys, monkeypatch, tmp_path):
    prompts_file, out_file = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts_file, [{"prompt": "first"}, {"prompt": "second one"}, {"prompt": "x"}])
    res = Result.here(
        capsys, monkeypatch, "eval", str(prompts_file), "-o", str(out_file), "--model", model_dir,
        "--max_new_tokens", "4", "--batch_size", "4", "--quiet",
    )  # fmt: skip
    assert res.rc == 0, res
    assert res.err == "", "--quiet prints nothing"
    results = read_results(out_file)
    assert sorted(r["id"] for r in results) == [1, 2, 3]
    prompts = {1: "first", 2: "second one", 3: "x"}
    for r in results:
        assert r["prompt"] == prompts[r["id"]]
        check_record(r, 4, EVAL)


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
    assert no_cache["JAXDECODE_COMPILATION_CACHE"] == "off"
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
        f.write(b'{"schema": "jaxdecode.eval/1", "id": 59, "prompt": "abcd')

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
        check_record(r, 4, EVAL)
        assert r == clean_by_id[r["id"]], "a resumed result differs from the clean run"


def test_eval_seeds_per_prompt_and_from_the_command_line(model_dir, capsys, monkeypatch, tmp_path):
    """A line's own seed is used as is; other prompts get a seed derived from
    --seed and their id. Each record names its seed, and `generate --seed` with
    it gives the same output."""
    lines = [
        {"id": "own", "prompt": "Hello", "do_sample": True, "seed": 1},
        {"id": "derived", "prompt": "Hello", "do_sample": True},
    ]
    prompts_file = tmp_path / "prompts.jsonl"
    write_jsonl(prompts_file, lines)

    def results(seed: str) -> dict:
        out_file = tmp_path / f"out-{seed}.jsonl"
        res = Result.here(
            capsys, monkeypatch, "eval", str(prompts_file), "-o", str(out_file), "--model",
            model_dir, "--max_new_tokens", "8", "--batch_size", "2", "--quiet", "--seed", seed,
        )  # fmt: skip
        assert res.rc == 0, res
        return {r["id"]: r for r in read_results(out_file)}

    two, three = results("2"), results("3")
    assert two["own"] == three["own"] and two["own"]["seed"] == 1, "the line's seed wins"
    assert two["derived"]["seed"] != three["derived"]["seed"], "--seed has no effect"
    assert two["derived"]["outputs"] != three["derived"]["outputs"]
    for rec in (two["own"], two["derived"]):
        gen = Result.here(
            capsys, monkeypatch, "generate", "Hello", "--model", model_dir, "--max_new_tokens",
            "8", "--do_sample", "--seed", str(rec["seed"]), "--json",
        )  # fmt: skip
        assert gen.rc == 0, gen
        (want,) = json_lines(gen.out)
        assert_same_result(rec, want)


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
        # Input lines (an id, no result schema) in OUT are not results: refused.
        (['{"id": 1, "prompt": "a"}'], '{"id": 1, "prompt": "a"}\n', ["out.jsonl", "schema"]),
        (['{"id": 1, "prompt": "' + "x" * 120 + '"}'], None, ["line 1", "n_positions"]),
    ],
    ids=[
        "missing-file",
        "invalid-json",
        "no-prompt",
        "unknown-option",
        "duplicate-ids",
        "bad-option-value",
        "out-line-not-a-result",
        "out-holds-input-lines",
        "prompt-too-long",
    ],
)
def test_eval_bad_inputs(model_dir, capsys, monkeypatch, tmp_path, lines, out_text, words):
    prompts_file, out_file = tmp_path / "missing.jsonl", tmp_path / "out.jsonl"
    if lines is not None:
        prompts_file = tmp_path / "prompts.jsonl"
        prompts_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if out_text is not None:
        out_file.write_text(out_text, encoding="utf-8")
    res = Result.here(
        capsys, monkeypatch, "eval", str(prompts_file), "-o", str(out_file), "--model", model_dir
    )
    assert_one_line_error(res, *words)
    if out_text is not None:
        assert out_file.read_text(encoding="utf-8") == out_text, "OUT was changed"
    else:
        assert not out_file.exists(), "nothing is written on a bad prompts file"


def test_eval_reports_every_bad_line_before_generating(model_dir, env, tmp_path):
    lines = [
        {"id": "ok1", "prompt": "fine"},
        {"id": "hot", "prompt": "b", "top_p": 1.5},
        {"id": "long", "prompt": "y" * 120},
        {"id": "ok2", "prompt": "also fine"},
        {"id": "typo", "prompt": "c", "temprature": 0.5},
        {"id": "empty", "prompt": ""},
    ]
    prompts_file, out_file = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts_file, lines)
    res = run(env, "eval", str(prompts_file), "-o", str(out_file), "--model", model_dir)
    assert_one_line_error(
        res, "4 bad lines", "line 2 (id 'hot'): top_p", "line 3 (id 'long')", "n_positions",
        "line 5 (id 'typo'): unknown field 'temprature'", "line 6 (id 'empty'): prompt is empty",
    )  # fmt: skip
    assert not out_file.exists(), "nothing is generated before every line is checked"


@pytest.mark.parametrize("how", ["same-path", "symlink", "hardlink"])
def test_eval_refuses_to_write_into_its_input(model_dir, capsys, monkeypatch, tmp_path, how):
    prompts_file = tmp_path / "prompts.jsonl"
    # No trailing newline: the case that cut the last prompt.
    text = '{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}'
    prompts_file.write_text(text, encoding="utf-8")
    out = prompts_file
    if how == "symlink":
        out = tmp_path / "link.jsonl"
        out.symlink_to(prompts_file)
    elif how == "hardlink":
        out = tmp_path / "hard.jsonl"
        os.link(prompts_file, out)
    res = Result.here(
        capsys, monkeypatch, "eval", str(prompts_file), "-o", str(out), "--model", model_dir
    )
    assert_one_line_error(res, "prompts file")
    assert prompts_file.read_text(encoding="utf-8") == text, "the input was changed"


def test_eval_output_in_a_missing_directory(model_dir, capsys, monkeypatch, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    write_jsonl(prompts_file, [{"prompt": "a"}])
    out = tmp_path / "no" / "such" / "out.jsonl"
    res = Result.here(
        capsys, monkeypatch, "eval", str(prompts_file), "-o", str(out), "--model", model_dir
    )
    assert_one_line_error(res, "does not exist")


# --------------------------------------------------------------------------- #
# eval batches by static options only, and each line is `generate --json`'s
# --------------------------------------------------------------------------- #


def line_flags(options: dict) -> list[str]:
    """A prompt line's options as command-line flags."""
    flags = []
    for name, value in options.items():
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list):
            flags += [f"--{name}", *map(str, value)]
        else:
            flags += [f"--{name}", str(value)]
    return flags


def in_process(capsys, *argv: str) -> str:
    """`jaxdecode ARGV` in this process (no JAX import per run); its stdout."""
    from jaxdecode.cli import main

    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.fixture
def no_persistent_cache(monkeypatch):
    # In-process runs must not turn on the persistent cache for the whole worker.
    monkeypatch.setenv("JAXDECODE_COMPILATION_CACHE", "off")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)


def test_eval_lines_equal_generate_json(
    model_dir, tmp_path, capsys, monkeypatch, no_persistent_cache
):
    """eval's lines, on the engine (the default) and in static batches, are what
    `generate --json` prints for each prompt with its options and seed. The
    engine serves a constraint (sharing slots with free prompts) and the extra
    log-probability outputs; prompts it does not serve (beam search, several
    sequences) run static batches in the same run."""
    from jaxdecode import serving as engine_mod

    lm = jaxdecode.from_pretrained(model_dir)  # one decoder: programs are shared
    monkeypatch.setattr(jaxdecode, "from_pretrained", lambda name, **_: lm)
    on_engine = []
    submit = engine_mod.Engine.submit

    def spy(self, prompts, configs=None):
        on_engine.extend(lm.tokenizer.decode(list(p)) for p in prompts)
        return submit(self, prompts, configs)

    monkeypatch.setattr(engine_mod.Engine, "submit", spy)
    base = ["--model", model_dir, "--max_new_tokens", "5"]
    # A stop string the greedy output reaches (its third byte, when printable).
    (greedy,) = json_lines(in_process(capsys, "generate", "In the", *base, "--json"))
    stop = chr(next(t for t in greedy["outputs"][0]["tokens"][2:] if 33 <= t < 127))
    lines = [
        {"id": "greedy", "prompt": "In the"},
        {"id": "stop", "prompt": "In the", "stop_strings": [stop]},
        {"id": "t06", "prompt": "And God", "do_sample": True, "temperature": 0.6, "top_p": 0.8},
        {"id": "own-seed", "prompt": "Let", "do_sample": True, "seed": 5, "top_k": 7},
        {"id": "beams", "prompt": "light", "num_beams": 2},
        {"id": "two", "prompt": "and", "do_sample": True, "num_return_sequences": 2,
         "repetition_penalty": 1.3},
        {"id": "logprobs", "prompt": "God", "logprobs": 2, "output_raw_logprobs": True,
         "prompt_logprobs": 1},
        {"id": "choices", "prompt": "Yes or no?", "choices": ["yes", "no"]},
        {"id": "long", "prompt": "a much longer prompt than the others", "max_length": 40},
    ]  # fmt: skip
    prompts_file = tmp_path / "prompts.jsonl"
    write_jsonl(prompts_file, lines)
    runs = {}
    for mode in ("engine", "static"):
        on_engine.clear()
        out_file = tmp_path / f"{mode}.jsonl"
        in_process(
            capsys, "eval", str(prompts_file), "-o", str(out_file), *base, "--seed", "3",
            "--batch_size", "4", "--steps_per_call", "2", "--quiet",
            *(["--static-batching"] if mode == "static" else []),
        )  # fmt: skip
        runs[mode] = {r["id"]: r for r in read_results(out_file)}
        assert runs[mode].keys() == {line["id"] for line in lines}
        static_only = ("light", "and")  # beams, two sequences
        served = [line["prompt"] for line in lines if line["prompt"] not in static_only]
        assert sorted(on_engine) == (sorted(served) if mode == "engine" else [])
    results = runs["engine"]
    for line in lines:
        rec = results[line["id"]]
        options = {k: v for k, v in line.items() if k not in ("id", "prompt", "seed")}
        flags = base[:2] if "max_length" in options else base  # as eval: max_length wins
        if rec["seed"] is not None:
            flags = [*flags, "--seed", str(rec["seed"])]
        out = in_process(capsys, "generate", line["prompt"], *flags, *line_flags(options), "--json")
        (want,) = json_lines(out)
        limit = 40 - len(line["prompt"]) if "max_length" in line else 5
        if line["id"] not in ("stop", "choices", "logprobs"):  # other fields, early stops
            check_record(rec, limit, EVAL, n=line.get("num_return_sequences", 1))
        assert_same_result(rec, want)
        assert_same_result(runs["static"][line["id"]], want)
        assert rec.keys() == want.keys() | {"id", "model", "options"}
        assert rec["outputs"][0].keys() == want["outputs"][0].keys(), line["id"]
    assert results["own-seed"]["seed"] == 5
    assert len(results["long"]["outputs"][0]["tokens"]) == 40 - len(
        b"a much longer prompt than the others"
    )
    stopped = results["stop"]["outputs"][0]
    assert stopped["text"].endswith(stop) and len(stopped["tokens"]) < 5, stopped
    assert results["choices"]["outputs"][0]["text"] in ("yes", "no")


def test_eval_records_what_made_them_and_generate_stops_early(
    model_dir, tmp_path, capsys, monkeypatch, no_persistent_cache
):
    """`generate` runs the early-stopping loop. Each eval record keeps the model
    and options that made it: a rerun on the same OUT with other options is
    refused in one line naming them, one with the same options resumes."""
    from jaxdecode import generation
    from jaxdecode.cli import main

    lm = jaxdecode.from_pretrained(model_dir)
    monkeypatch.setattr(jaxdecode, "from_pretrained", lambda name, **_: lm)
    loops = []
    program = generation.generate_program
    monkeypatch.setattr(
        generation,
        "generate_program",
        lambda plan, *a: loops.append(plan.loop) or program(plan, *a),
    )
    in_process(capsys, "generate", "Hi", "--model", model_dir, "--max_new_tokens", "3")
    assert loops == ["while"], "the CLI runs the fixed-length loop"

    def fails(*argv: str) -> str:
        capsys.readouterr()
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxdecode: error: ") and err.count("\n") == 1, err
        return err

    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts, [{"id": i, "prompt": f"line {i}"} for i in range(3)])
    base = ["eval", str(prompts), "-o", str(out), "--model", model_dir, "--batch_size", "2"]
    base.append("--quiet")
    in_process(capsys, *base, "--max_new_tokens", "4")
    full = out.read_bytes()
    made = {r["id"]: r for r in read_results(out)}
    for r in made.values():
        assert r["model"] == os.path.abspath(model_dir)
        assert r["options"]["max_new_tokens"] == 4 and "do_sample" not in r["options"]
        assert r["options"]["eos_token_id"] == EOS  # the model's defaults count too
    err = fails(*base, "--max_new_tokens", "6", "--do_sample", "--temperature", "1.5")
    assert "id 0 (line 1) made with other options" in err
    assert "max_new_tokens=4 (now 6)" in err and "do_sample=false (now true)" in err, err
    assert "temperature=1.0 (now 1.5)" in err
    assert out.read_bytes() == full, "a refused run wrote nothing"
    out.write_bytes(full[: full.rstrip(b"\n").rfind(b"\n") + 1])  # one result missing
    in_process(capsys, *base, "--max_new_tokens", "4")  # the same options: resumes
    assert {r["id"]: r for r in read_results(out)} == made


def test_eval_prompt_ids_lines_serve_a_model_without_tokenizer(
    model_dir, tmp_path, capsys, no_persistent_cache
):
    """`prompt_ids` lines (vLLM's prompt_token_ids) give what their text twins
    give, on the engine and in static batches (beam search); the record keeps
    `prompt_ids` (its `prompt` is null) and its `tokens`; a model without a
    tokenizer serves them (`text` null) and names the first text line it cannot."""
    texts = ["ab", "hello there", "xyz"]
    records = []
    for i, text in enumerate(texts):
        options = {"num_beams": 2} if i == 2 else {"do_sample": True, "seed": 3} if i else {}
        ids = TOKENIZER.encode(text)
        records.append({"id": f"text{i}", "prompt": text, **options})
        records.append({"id": f"ids{i}", "prompt_ids": ids, **options})
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts, records)
    flags = ["--max_new_tokens", "5", "--batch_size", "2", "--quiet"]
    code, stdout, err = main_result(
        capsys, "eval", str(prompts), "-o", str(out), "--model", model_dir, *flags
    )
    assert code == 0, err
    by_id = {r["id"]: r for r in read_results(out)}
    for i, text in enumerate(texts):
        got, twin = by_id[f"ids{i}"], by_id[f"text{i}"]
        assert got["prompt"] is None and got["prompt_ids"] == TOKENIZER.encode(text)
        assert "prompt_ids" not in twin
        assert got["outputs"] == twin["outputs"], i

    # A model without a tokenizer: the prompt_ids lines alone.
    bare = save_model(tmp_path / "bare", tokenizer=False)
    ids_only, bare_out = tmp_path / "ids.jsonl", tmp_path / "bare.jsonl"
    write_jsonl(ids_only, [r for r in records if "prompt_ids" in r])
    code, stdout, err = main_result(
        capsys, "eval", str(ids_only), "-o", str(bare_out), "--model", bare, *flags
    )
    assert code == 0, err
    for r in read_results(bare_out):
        want = by_id[r["id"]]["outputs"]
        assert [o["tokens"] for o in r["outputs"]] == [o["tokens"] for o in want]
        assert all(o["text"] is None for o in r["outputs"])

    # Refused, naming the line: text without a tokenizer, ids outside the
    # vocabulary, ids that are no list of ids, two prompts on one line.
    cases = [
        (bare, {"prompt": "hi"}, ["has no tokenizer", "line 2"]),
        (bare, {"prompt_ids": [1, VOCAB]}, ["line 2", f"holds {VOCAB}", "vocabulary"]),
        (bare, {"prompt_ids": [1, "2"]}, ["line 2", "'prompt_ids' must be"]),
        (bare, {"prompt_ids": []}, ["line 2", "'prompt_ids' must be"]),
        (model_dir, {"prompt": "a", "prompt_ids": [1]}, ["line 2", "prompt and prompt_ids"]),
        (bare, {"prompt_ids": [1], "stop_strings": ["x"]}, ["line 2", "stop_strings"]),
    ]
    for model, line, words in cases:
        bad = tmp_path / "bad.jsonl"
        write_jsonl(bad, [{"prompt_ids": [1, 2]}, line])
        result = main_result(
            capsys, "eval", str(bad), "-o", str(tmp_path / "never.jsonl"), "--model", model
        )
        assert_one_line(*result, *words)
    assert not (tmp_path / "never.jsonl").exists()


def test_eval_negative_prompt_per_line(model_dir, tmp_path, capsys, no_persistent_cache):
    """Classifier-free guidance with a negative prompt per line (text or ids, of
    different lengths, or none: the prompt's last token), `--guidance_scale` or a
    line's own scale: rows sharing one static batch each give `generate` on that
    line alone; the record keeps the negative prompt as given."""
    lm = jaxdecode.from_pretrained(model_dir)
    lines = [
        {"id": "text", "prompt": "In the", "negative_prompt": "And God said"},
        {"id": "ids", "prompt": "Let there", "negative_prompt_ids": TOKENIZER.encode("dark")},
        {"id": "none", "prompt": "And"},
        {"id": "own", "prompt": "light was", "negative_prompt": "x", "guidance_scale": 4.0},
        {"id": "sampled", "prompt": "be", "negative_prompt": "evening and", "do_sample": True,
         "seed": 7},
    ]  # fmt: skip
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts, lines)
    flags = ["--max_new_tokens", "6", "--guidance_scale", "2.5", "--batch_size", "4", "--quiet"]
    code, _, err = main_result(capsys, "eval", str(prompts), "-o", str(out), "--model", model_dir,
                               *flags)  # fmt: skip
    assert code == 0, err
    by_id = {r["id"]: r for r in read_results(out)}
    for line in lines:
        ids = TOKENIZER.encode(line["prompt"])
        negative = line.get("negative_prompt_ids") or TOKENIZER.encode(
            line.get("negative_prompt", line["prompt"][-1])
        )
        sampled = line.get("do_sample", False)
        alone = jaxdecode.generate(
            lm,
            np.asarray([ids]),
            max_new_tokens=6,
            guidance_scale=line.get("guidance_scale", 2.5),
            negative_prompt_ids=np.asarray([negative]),
            do_sample=sampled,
            key=jax.random.key(7) if sampled else None,
        )
        n = int(alone.lengths[0])
        want = np.asarray(alone.sequences)[0, len(ids) : len(ids) + n].tolist()
        assert by_id[line["id"]]["outputs"][0]["tokens"] == want, line["id"]
        for field in ("negative_prompt", "negative_prompt_ids"):
            assert by_id[line["id"]].get(field) == line.get(field)
    # Unguided: the same prompt without a negative prompt differs.
    plain = jaxdecode.generate(lm, np.asarray([TOKENIZER.encode("In the")]), max_new_tokens=6)
    assert np.asarray(plain.sequences)[0, 6:].tolist() != by_id["text"]["outputs"][0]["tokens"]

    cases = [
        ({"prompt": "a", "negative_prompt": "b"}, ["line 2", "negative_prompt", "guidance_scale"]),
        ({"prompt": "a", "negative_prompt": "b", "negative_prompt_ids": [1]}, ["line 2", "not both"]),
        ({"prompt": "a", "negative_prompt_ids": [VOCAB]}, ["line 2", f"holds {VOCAB}"]),
        ({"prompt": "a", "negative_prompt": ""}, ["line 2", "non-empty string"]),
    ]  # fmt: skip
    for line, words in cases:
        bad = tmp_path / "bad.jsonl"
        write_jsonl(bad, [{"prompt": "ok"}, line])
        result = main_result(
            capsys, "eval", str(bad), "-o", str(tmp_path / "never.jsonl"), "--model", model_dir
        )
        assert_one_line(*result, *words)
    assert not (tmp_path / "never.jsonl").exists()


def test_eval_names_the_line_that_cannot_fit_before_compiling(
    model_dir, tmp_path, capsys, monkeypatch, no_persistent_cache
):
    """A line whose max_new_tokens cannot fit in memory is named (not its
    group's first line), before anything compiles."""
    from support import count_compiles

    from jaxdecode.cli import main
    from jaxdecode.serving import scheduler

    lm = jaxdecode.from_pretrained(model_dir)
    monkeypatch.setattr(jaxdecode, "from_pretrained", lambda name, **_: lm)
    # Room for 2 slots of 8 + 4 tokens, not of 8 + 100 (prompt bucket 8).
    small = sum(scheduler.slot_memory(lm.decoder, lm.generation_config, 2, 8 + 4))
    big = sum(scheduler.slot_memory(lm.decoder, lm.generation_config, 2, 8 + 100))
    monkeypatch.setattr(scheduler, "available_bytes", lambda: (small + big) // 2)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(
        prompts,
        [{"id": "ok", "prompt": "a"}, {"id": "big", "prompt": "b", "max_new_tokens": 100},
         {"id": "ok2", "prompt": "c"}],
    )  # fmt: skip
    with count_compiles() as compiles:
        capsys.readouterr()
        code = main(
            ["eval", str(prompts), "-o", str(tmp_path / "out.jsonl"), "--model", model_dir,
             "--batch_size", "2", "--max_new_tokens", "4"]
        )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "line 2 (id 'big'): Engine(slots=2, max_len=108) needs about" in err, err
    assert "'ok'" not in err
    assert compiles.count == 0, "compiled before refusing"


def test_eval_engine_compiles_nothing_after_warm_up(
    model_dir, tmp_path, capsys, monkeypatch, no_persistent_cache
):
    """The engine: one engine for prompts that differ only in per-row values,
    seeds, lengths and max_new_tokens, and once its programs exist (one prefill
    per prompt bucket, one decode) a new run with other such values compiles
    nothing."""
    from support import count_compiles

    from jaxdecode import serving as engine_mod

    lm = jaxdecode.from_pretrained(model_dir)  # one decoder: see the test below
    monkeypatch.setattr(jaxdecode, "from_pretrained", lambda name, **_: lm)
    engines = []
    real_engine = engine_mod.Engine
    monkeypatch.setattr(
        engine_mod, "Engine", lambda *a, **k: engines.append(k["slots"]) or real_engine(*a, **k)
    )
    options = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2)

    def run_eval(tag: str, lines: list[dict]) -> None:
        prompts_file = tmp_path / f"{tag}.jsonl"
        write_jsonl(prompts_file, lines)
        engines.clear()
        in_process(
            capsys, "eval", str(prompts_file), "-o", str(tmp_path / f"{tag}-out.jsonl"),
            "--model", model_dir, "--max_new_tokens", "4", "--batch_size", "3",
            "--steps_per_call", "2", "--quiet", *line_flags(options),
        )  # fmt: skip
        assert engines == [3], "one engine of 3 slots"

    # Prompts of two buckets (<= 8 and <= 16 bytes).
    with count_compiles() as first:
        run_eval("warm", [{"prompt": "ab" * (1 + 3 * (i % 2)) + str(i)} for i in range(5)])
    assert first.count > 0
    varied = [
        {"prompt": "xy" * (1 + 3 * (i % 2)) + str(i), "seed": 100 + i,
         "temperature": 0.5 + 0.1 * i, "top_k": 5 + i, "top_p": 0.5 + 0.05 * i,
         "repetition_penalty": 1.05 + 0.1 * i, "max_new_tokens": 1 + i % 4}
        for i in range(7)
    ]  # fmt: skip
    with count_compiles() as second:
        run_eval("varied", varied)
    assert second.count == 0, "the engine compiled while running"
    lengths = [len(r["outputs"][0]["tokens"]) for r in read_results(tmp_path / "varied-out.jsonl")]
    assert sum(lengths) > 0 and max(lengths) <= 4


@functools.cache
def tiny_llama() -> jaxdecode.CausalLM:
    """A byte-level Llama with a paged cache (grouped-query attention over its pages)."""
    from jaxdecode.models.llama import LlamaConfig, llama_decoder
    from jaxdecode.models.llama import init_params as llama_params

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    params = jax.tree.map(lambda x: x * 4.0, llama_params(config, jax.random.key(1)))
    return jaxdecode.CausalLM(
        params=params,
        decoder=llama_decoder(config),
        generation_config=jaxdecode.GenerationConfig(
            max_new_tokens=20, eos_token_id=EOS, pad_token_id=0
        ),
        tokenizer=TOKENIZER,
    )


def test_eval_pages_flags_reach_the_engine_and_give_the_dense_lines(
    tmp_path, capsys, monkeypatch, no_persistent_cache
):
    """`--page_size/--kv_pages/--prefill_chunk/--no-prefix_cache` go to the
    engine (prefix hits, chunks, preemptions in a small pool) and every line is
    the dense engine's; bad values and combinations are one-line errors before
    anything compiles."""
    from support import count_compiles

    from jaxdecode import serving as engine_mod
    from jaxdecode.cli import main

    lm = tiny_llama()
    monkeypatch.setattr(jaxdecode, "from_pretrained", lambda name, **_: lm)
    made = []
    real_engine = engine_mod.Engine

    def spy(*a, **k):
        made.append(real_engine(*a, **k))
        return made[-1]

    monkeypatch.setattr(engine_mod, "Engine", spy)
    system = "You answer in one short line, always. "  # 39 bytes: 9 pages of 4
    lines = [{"id": i, "prompt": system + q} for i, q in enumerate(["Sky?", "Grass", "Snow?!"])]
    lines += [
        {"id": "sampled", "prompt": system + "Rain?", "do_sample": True, "temperature": 0.8},
        {"id": "alone", "prompt": "Short."},
    ]
    prompts_file = tmp_path / "prompts.jsonl"
    write_jsonl(prompts_file, lines)
    base = ["--model", "tiny-llama", "--max_new_tokens", "6", "--seed", "3", "--quiet"]
    base += ["--batch_size", "3", "--steps_per_call", "2"]

    def run_eval(tag: str, *flags: str) -> dict:
        made.clear()
        out = tmp_path / f"{tag}.jsonl"
        in_process(capsys, "eval", str(prompts_file), "-o", str(out), *base, *flags)
        return {r["id"]: r for r in read_results(out)}

    dense = run_eval("dense", "--page_size", "0")  # 0: the dense slot cache
    assert all(e.page_size is None for e in made)
    paged = run_eval("paged", "--page_size", "4", "--kv_pages", "40", "--prefill_chunk", "8")
    assert [(e.page_size, e.kv_pages, e.prefill_chunk) for e in made] == [(4, 40, 8)] * 2
    # The system prompt's 9 full pages, taken by the 2nd and 3rd greedy lines (the sampled
    # line has an engine, and a pool, of its own).
    assert sum(e.stats.prefix_tokens for e in made) == 2 * 36
    cold = run_eval("cold", "--no-prefix_cache")  # pages of 16 by default
    assert [e.page_size for e in made] == [16] * 2
    assert sum(e.stats.prefix_tokens for e in made) == 0
    assert dense.keys() == paged.keys() == cold.keys() == {line["id"] for line in lines}
    for key, want in dense.items():
        assert_same_result(paged[key], want)
        assert_same_result(cold[key], want)
        assert paged[key]["options"] == want["options"]  # the page flags change no result

    def refused(*flags: str, words: tuple[str, ...]) -> None:
        capsys.readouterr()
        with count_compiles() as compiles:
            code = main(["eval", str(prompts_file), "-o", str(tmp_path / "x.jsonl"), *base, *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        for w in words:
            assert w in err, err
        assert compiles.count == 0

    refused("--page_size", "-1", words=("--page_size must be >= 0", "got -1"))
    refused("--page_size", "4", "--prefill_chunk", "-2", words=("--prefill_chunk must be >= 1",))
    refused("--page_size", "0", "--kv_pages", "8", words=("--kv_pages needs", "--page_size 0"))
    refused("--page_size", "0", "--no-prefix_cache", words=("--no-prefix_cache needs",))
    refused("--page_size", "4", "--static-batching", words=("--static-batching",))
    # A pool too small for one line names that line (and the pages it needs).
    refused(
        "--page_size", "4", "--kv_pages", "5",
        words=("line 1 (id 0)", "--kv_pages 5 is too small", "need 12 pages"),
    )  # fmt: skip
    no_pages = dataclasses.replace(lm, decoder=dataclasses.replace(lm.decoder, init_paged=None))
    monkeypatch.setattr(jaxdecode, "from_pretrained", lambda name, **_: no_pages)
    refused("--page_size", "4", words=("has no paged cache", "drop --page_size"))
    assert not (tmp_path / "x.jsonl").exists()


def test_eval_per_row_values_share_one_batch_and_one_program(
    model_dir, tmp_path, capsys, monkeypatch, no_persistent_cache
):
    from support import count_compiles

    # One model object for every in-process run: a fresh load has a new decoder,
    # hence new programs (each CLI process loads once, so this is the CLI's case).
    lm = jaxdecode.from_pretrained(model_dir)
    monkeypatch.setattr(jaxdecode, "from_pretrained", lambda name, **_: lm)
    calls = []
    real_generate = jaxdecode.generate
    monkeypatch.setattr(
        jaxdecode, "generate", lambda *a, **k: calls.append(a[1].shape) or real_generate(*a, **k)
    )
    # Every per-row processor present from the command line.
    options = dict(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.9,
        epsilon_cutoff=0.001, eta_cutoff=0.001, repetition_penalty=1.2,
        frequency_penalty=0.1, presence_penalty=0.1,
    )  # fmt: skip

    def run_eval(tag: str, lines: list[dict]) -> None:
        prompts_file = tmp_path / f"{tag}.jsonl"
        write_jsonl(prompts_file, lines)
        calls.clear()
        in_process(
            capsys, "eval", str(prompts_file), "-o", str(tmp_path / f"{tag}-out.jsonl"),
            "--model", model_dir, "--max_new_tokens", "4", "--batch_size", "8", "--quiet",
            "--static-batching", *line_flags(options),
        )  # fmt: skip

    with count_compiles() as first:
        run_eval("uniform", [{"prompt": f"row {i}"} for i in range(8)])
    assert first.count > 0 and len(calls) == 1
    # Eight rows, every per-row value and the seed different: one batch, no compilation.
    varied = [
        {
            "prompt": f"row {i}", "seed": 100 + i, "temperature": 0.5 + 0.1 * i,
            "top_k": 5 + i, "top_p": 0.5 + 0.05 * i, "min_p": 0.01 * (i + 1),
            "typical_p": 0.6 + 0.04 * i, "epsilon_cutoff": 0.0005 * (i + 1),
            "eta_cutoff": 0.0007 * (i + 1), "repetition_penalty": 1.0 + 0.1 * (i + 1),
            "frequency_penalty": 0.1 * i - 0.3, "presence_penalty": 0.3 - 0.1 * i,
        }
        for i in range(8)
    ]  # fmt: skip
    with count_compiles() as second:
        run_eval("varied", varied)
    assert second.count == 0, "rows differing in per-row values compiled a new program"
    assert [c[0] for c in calls] == [8], "rows differing in per-row values were split"
    # A static difference (greedy rows among sampled ones) splits the group.
    run_eval("static", [{"prompt": "x", "do_sample": False}, {"prompt": "y"}])
    assert len(calls) == 2


# --------------------------------------------------------------------------- #
# The persistent compilation cache: a second CLI run compiles nothing
# --------------------------------------------------------------------------- #

COUNTING_DRIVER = """
import json, sys
from jax import monitoring
counts = {"compiles": 0, "cache_hits": 0}
def duration(name, _secs, **_):
    if name == "/jax/core/compile/backend_compile_duration":
        counts["compiles"] += 1
def event(name, **_):
    if name == "/jax/compilation_cache/cache_hits":
        counts["cache_hits"] += 1
monitoring.register_event_duration_secs_listener(duration)
monitoring.register_event_listener(event)
from jaxdecode.cli import main
code = main(sys.argv[1:])
print(json.dumps(counts), file=sys.stderr)
sys.exit(code)
"""


def test_second_cli_run_reads_the_compilation_cache(model_dir, env, tmp_path):
    cache = tmp_path / "cache"
    clean = {k: v for k, v in env.items() if not k.startswith(("JAX_COMPILATION", "JAX_PERSIST"))}
    clean["JAXDECODE_COMPILATION_CACHE"] = str(cache)
    args = ["generate", "In the beginning", "--model", model_dir, "--max_new_tokens", "4"]
    driver = [sys.executable, "-c", COUNTING_DRIVER]
    first, second = run(clean, *args, cmd=driver), run(clean, *args, cmd=driver)
    assert first.rc == 0 and second.rc == 0, (first, second)
    assert first.out == second.out
    c1, c2 = (json.loads(r.err.strip().split("\n")[-1]) for r in (first, second))
    # "compiles" counts requests to compile; a cache hit answers one without XLA.
    assert c1["compiles"] > 0 and c1["cache_hits"] == 0, c1
    assert len(list(cache.iterdir())) > 0, "nothing written to the cache"
    assert c2 == {"compiles": c1["compiles"], "cache_hits": c1["compiles"]}, (c1, c2)
    # Turned off: nothing read, everything compiled again.
    off = run({**clean, "JAXDECODE_COMPILATION_CACHE": "off"}, *args, cmd=driver)
    flag = run(clean, *args, "--no-compilation-cache", cmd=driver)
    for res in (off, flag):
        assert res.rc == 0, res
        assert json.loads(res.err.strip().split("\n")[-1]) == {**c1, "cache_hits": 0}


def test_generate_json_prints_logprob_outputs(model_dir, capsys, no_persistent_cache):
    """--output_raw_logprobs / --logprobs N / --prompt_logprobs N: the --json
    record carries the values `jaxdecode.generate` returns; without --json they
    are refused (the text output has no place for them)."""
    from jaxdecode import cli

    flags = ["--max_new_tokens", "4", "--do_sample", "--seed", "3", "--top_k", "5"]
    extra = ["--output_raw_logprobs", "--logprobs", "2", "--prompt_logprobs", "1"]
    out = in_process(
        capsys, "generate", "Hi", "Hello", "--model", model_dir, "--json", *flags, *extra
    )
    records = json_lines(out)
    lm = jaxdecode.from_pretrained(model_dir)
    encoded = [lm.tokenizer.encode(p) for p in ("Hi", "Hello")]
    width = max(map(len, encoded))
    ids = np.full((2, width), EOS, np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :], mask[i, width - len(e) :] = e, 1
    ref = jaxdecode.generate(
        lm, ids, mask, max_new_tokens=4, do_sample=True, seed=3, top_k=5,
        output_raw_logprobs=True, logprobs=2, prompt_logprobs=1,
    )  # fmt: skip
    for i, rec in enumerate(records):
        o = rec["outputs"][0]
        n = len(o["tokens"])
        np.testing.assert_allclose(
            o["raw_token_logprobs"], ref.raw_token_logprobs[i, :n], atol=1e-5
        )
        assert [[t for t, _ in step] for step in o["top_logprobs"]] == (
            np.asarray(ref.top_token_ids[i, :n]).tolist()
        )
        real = np.flatnonzero(mask[i])
        assert len(o["prompt_logprobs"]) == len(real) and o["prompt_logprobs"][0] is None
        np.testing.assert_allclose(
            o["prompt_logprobs"][1:], ref.prompt_logprobs[i, real[1:]], atol=1e-5
        )
        assert len(o["prompt_top_logprobs"][1]) == 1
    assert cli.main(["generate", "Hi", "--model", model_dir, "--logprobs", "2"]) == 2
    assert "--json" in capsys.readouterr().err


def test_generate_speculative_flags_give_the_greedy_tokens(model_dir, capsys, no_persistent_cache):
    """--prompt_lookup_num_tokens and --assistant_model (here the model itself)
    print the plain greedy records; a bad --assistant_model is a one-line error."""
    from jaxdecode import cli

    base = ["generate", "In the", "And God said", "--model", model_dir, "--json"]
    base += ["--max_new_tokens", "6", "--no-do_sample"]
    plain = json_lines(in_process(capsys, *base))
    for extra in (["--prompt_lookup_num_tokens", "3"], ["--assistant_model", model_dir]):
        got = json_lines(in_process(capsys, *base, *extra))
        assert len(got) == len(plain), extra
        # Same tokens; log-probabilities to float32 rounding (verifying several
        # drafted tokens in one pass rounds the last printed digit differently).
        for a, b in zip(got, plain, strict=True):
            assert_same_result(a, b)
    assert cli.main([*base, "--assistant_model", model_dir + "-missing"]) == 2
    assert "--assistant_model" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# One line instead of a traceback; chat and stream print the same answer.
# --------------------------------------------------------------------------- #

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def save_chat_model(directory: Path, template: str) -> str:
    """The tiny model with a chat template (the byte tokenizer has none)."""
    save_model(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return str(directory)


def main_result(capsys, *argv: str) -> tuple[int, str, str]:
    """`jaxdecode ARGV` in this process: (exit code, stdout, stderr)."""
    from jaxdecode.cli import main

    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(code: int, out: str, err: str, *words: str) -> None:
    """Exit 2, nothing on stdout, one `jaxdecode: error:` line naming `words`."""
    assert code == 2 and out == "", (code, out, err)
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("jaxdecode: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_chat_stream_and_explain_print_the_answer_generate_prints(
    tmp_path, capsys, no_persistent_cache
):
    """--stream --chat prints the answer alone, as --chat without --stream does
    (it used to print the user's message glued to it); explain --chat renders
    the same chat and prints the same answer; --verbose adds one timing line on
    stderr and changes nothing on stdout."""
    model = save_chat_model(tmp_path / "chat", CHAT_TEMPLATE)
    base = ["generate", "Hi there", "--model", model, "--chat", "--system", "Be brief."]
    base += ["--no-do_sample", "--max_new_tokens", "5"]
    plain = main_result(capsys, *base)
    streamed = main_result(capsys, *base, "--stream")
    assert plain[0] == 0 and streamed[0] == 0, (plain, streamed)
    assert streamed[1] == plain[1] and "Hi there" not in plain[1], (plain, streamed)

    code, out, err = main_result(capsys, *base, "--verbose")
    assert (code, out) == (0, plain[1]), err
    (line,) = err.strip().split("\n")
    for word in ("compile", "prefill", "decode 5 tokens", "tokens/s"):
        assert word in line, line
    code, out, err = main_result(capsys, *base, "--stream", "--verbose")
    assert (code, out) == (0, plain[1]), err
    assert "first token after" in err and "tokens/s" in err, err

    explain = ["explain", "Hi there", "--model", model, "--chat", "--system", "Be brief."]
    code, out, err = main_result(
        capsys, *explain, "-o", str(tmp_path / "ex"), "--no-do_sample", "--steps", "5"
    )
    assert code == 0, err
    assert out.split("\n")[0] == plain[1].rstrip("\n"), (out, plain)
    assert_one_line(
        *main_result(
            capsys, "explain", "Hi", "--model", model, "-o", str(tmp_path / "e2"), "--system", "x"
        ),  # fmt: skip
        "--system needs --chat",
    )


def test_generate_errors_are_one_line_before_any_output(tmp_path, capsys, no_persistent_cache):
    """A chat template that fails while rendering, and --stream with an option
    stream cannot honour: one line, exit 2, nothing on stdout (the prompt used to
    be printed before the error)."""
    for template, words in (
        ("{{ 1/0 }}", ("chat template failed", "ZeroDivisionError")),
        ("{{ messages + 1 }}", ("chat template failed", "TypeError")),
        ("{% for i in range(10**9) %}x{% endfor %}", ("chat template failed", "OverflowError")),
    ):
        model = save_chat_model(tmp_path / f"bad{len(words[1])}", template)
        assert_one_line(*main_result(capsys, "generate", "Hi", "--model", model, "--chat"), *words)
    model = save_model(tmp_path / "plain")
    assert_one_line(
        *main_result(
            capsys,
            "generate",
            "Hi",
            "--model",
            model,
            "--stream",
            "--prompt_lookup_num_tokens",
            "4",
        ),  # fmt: skip
        "prompt_lookup_num_tokens",
    )


def test_warnings_are_one_line(model_dir, capsys, monkeypatch):
    """A Python warning raised under the CLI is one `jaxdecode: warning:` line,
    without the source path and line that `warnings` prints by default."""
    import warnings

    from jaxdecode import cli

    def load(name, *_):
        warnings.warn(
            "json_schema uses minimum, which\noutlines-core does not enforce", stacklevel=2
        )
        raise cli.CLIError("stop here")

    monkeypatch.setattr(cli.common, "load_model", load)
    code, out, err = main_result(capsys, "generate", "Hi", "--model", model_dir)
    assert code == 2
    assert err == (
        "jaxdecode: warning: json_schema uses minimum, which outlines-core does not enforce\n"
        "jaxdecode: error: stop here\n"
    ), err


def test_eval_prompt_file_errors(model_dir, tmp_path, capsys):
    """Prompt files: empty (refused before the model loads), UTF-16 with a BOM
    (PowerShell's `>`: read as such), not UTF-8 (the byte, line and column),
    invalid JSON (line and column), a bad choices entry (named)."""
    out = str(tmp_path / "out.jsonl")

    def run_eval(path: Path, model: str = model_dir):
        return main_result(capsys, "eval", str(path), "-o", out, "--model", model)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert_one_line(*run_eval(empty, model="/no/such/model"), "empty.jsonl is empty")

    lines = '{"prompt": "Hi"}\r\n{"prompt": "Ho", "temprature": 1}\r\n'
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(lines.encode("utf-16"))  # with its BOM, as PowerShell writes it
    assert_one_line(*run_eval(utf16), "line 2 (id 2)", "unknown field 'temprature'")

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "Hi"}\n{"prompt": "café"}\n'.encode("latin-1"))
    assert_one_line(
        *run_eval(latin), "latin.jsonl is not UTF-8 text", "b'\\xe9'", "line 2, column 16"
    )

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi"}\n{"prompt": "Ho",, }\n{"prompt": "a", "choices": ["a", 5]}\n')
    code, stdout, err = run_eval(bad)
    assert_one_line(code, stdout, err, "line 2, column 17: not valid JSON")
    assert "choices[1] is 5 (int)" in err and "got 'a'" not in err, err


def test_stream_into_a_closed_pipe_exits_quietly(model_dir, env):
    """`jaxdecode generate --stream ... | head -c 1`: no BrokenPipeError
    traceback, exit code 141 as for a command killed by SIGPIPE."""
    proc = subprocess.Popen(
        [*MODULE_CMD, "generate", "Hello", "--model", model_dir, "--stream"]
        + ["--no-do_sample", "--max_new_tokens", "20"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.read(1) == b"H"  # the prompt comes first; then the reader leaves
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert err == "", err


def test_eval_chat_renders_the_negative_prompt_like_the_prompt(
    tmp_path, capsys, no_persistent_cache
):
    """With --chat a line's negative_prompt is the user's turn of its own chat,
    rendered with --system like the prompt: the line gives `generate` on both
    rendered texts."""
    model = save_chat_model(tmp_path / "chat", CHAT_TEMPLATE)
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts, [{"id": 1, "prompt": "Hi there", "negative_prompt": "Go away"}])
    flags = ["--max_new_tokens", "5", "--guidance_scale", "3", "--quiet"]
    code, _, err = main_result(capsys, "eval", str(prompts), "-o", str(out), "--model", model,
                               "--chat", "--system", "Be brief.", *flags)  # fmt: skip
    assert code == 0, err
    (rec,) = read_results(out)
    lm = jaxdecode.from_pretrained(model)

    def chat(text: str) -> list[int]:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        return lm.tokenizer.encode(lm.apply_chat_template(messages, add_generation_prompt=True))

    ids = chat("Hi there")
    want = jaxdecode.generate(
        lm, np.asarray([ids]), max_new_tokens=5, guidance_scale=3.0,
        negative_prompt_ids=np.asarray([chat("Go away")]),
    )  # fmt: skip
    n = int(want.lengths[0])
    assert rec["outputs"][0]["tokens"] == np.asarray(want.sequences)[0, len(ids) :][:n].tolist()
    raw = jaxdecode.generate(
        lm, np.asarray([ids]), max_new_tokens=5, guidance_scale=3.0,
        negative_prompt_ids=np.asarray([lm.tokenizer.encode("Go away")]),
    )  # fmt: skip
    assert np.asarray(raw.sequences)[0, len(ids) :][:n].tolist() != rec["outputs"][0]["tokens"]
