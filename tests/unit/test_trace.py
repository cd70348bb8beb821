"""`jaxdecode.trace` and `jaxdecode explain`: the record is generate's, stage by stage.

On the bundled model (byte-level GPT-2, 257 tokens): the traced per-processor
scores equal `process_logits` over the same history at every step, the traced
choices are `generate`'s for the same key, the beam trace's best finished
hypothesis is `generate`'s beam output, generate's own program records nothing,
and the pictures and the HTML page are written with sane sizes.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from support import assert_same_scores, count_compiles

import jaxdecode as jd
from jaxdecode import generation
from jaxdecode.search import generate_program
from jaxdecode.trace import trace


@pytest.fixture(scope="module")
def lm():
    return jd.from_pretrained("bundled")


def _ids(lm, *texts):
    encoded = [lm.tokenizer.encode(t) for t in texts]
    width = max(map(len, encoded))
    ids = np.full((len(encoded), width), 256, np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = e
        mask[i, width - len(e) :] = 1
    return ids, mask


SAMPLING = jd.GenerationConfig(
    do_sample=True,
    max_new_tokens=6,
    repetition_penalty=1.4,
    no_repeat_ngram_size=2,
    min_new_tokens=3,
    temperature=0.7,
    top_k=12,
    top_p=0.9,
    eos_token_id=256,
    pad_token_id=256,
)
GREEDY = jd.GenerationConfig(
    do_sample=False, max_new_tokens=5, repetition_penalty=1.3, frequency_penalty=0.4
)


@pytest.mark.parametrize("config", [SAMPLING, GREEDY], ids=["sampling", "greedy"])
def test_stages_equal_process_logits_and_choices_equal_generate(lm, config):
    ids, mask = _ids(lm, "In the beginning", "And God said, Let")
    key = jax.random.key(11)
    tr = trace(lm, ids, config, attention_mask=mask, key=key)
    out = jd.generate(lm, ids, mask, config, key=key)
    # The same tokens as generate, for the same key (and the same full output).
    np.testing.assert_array_equal(np.asarray(tr.output.sequences), np.asarray(out.sequences))
    new = np.asarray(out.sequences)[:, ids.shape[1] :]
    np.testing.assert_array_equal(tr.tokens.T, new)

    chain = jd.logits_processor(config)
    names = [type(p).__name__ for p in chain.processors]
    assert tr.stage_names == ["raw", *names]
    assert tr.stages.shape == (6 if config is SAMPLING else 5, len(names) + 1, 2, lm.vocab_size)
    for step in range(tr.steps):
        history = np.asarray(out.sequences)[:, : ids.shape[1] + step]
        raw = tr.stages[step, 0]
        for i in range(1, len(names) + 1):
            ref = jd.process_logits(
                raw,
                history,
                jd.chain(*chain.processors[:i]),
                prompt_length=ids.shape[1],
                attention_mask=mask,
            )
            assert_same_scores(tr.stages[step, i], np.asarray(ref), atol=1e-5)
        # The full chain as generate builds it from the config.
        ref = jd.process_logits(
            raw, history, config, prompt_length=ids.shape[1], attention_mask=mask
        )
        assert_same_scores(tr.stages[step, -1], np.asarray(ref), atol=1e-5)
        # The chosen token is possible after the last stage; greedy takes its argmax.
        for r in range(2):
            assert tr.kept(step, -1, r)[tr.chosen(step, r)]
            if not config.do_sample:
                assert tr.chosen(step, r) == int(np.argmax(tr.stages[step, -1, r]))


def test_process_logits_compiles_once_per_doubling_of_the_history():
    # A history one token longer each step (as a step-by-step caller passes it)
    # reuses the program until the history outgrows its power-of-two buffer, and
    # equals the scores over the unpadded history's penalties.
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((2, 50)).astype(np.float32)
    processor = jd.chain(jd.repetition_penalty(1.5), jd.no_repeat_ngram_size(2))
    ids = rng.integers(0, 50, (2, 40)).astype(np.int32)
    with count_compiles() as c:
        outs = [np.asarray(jd.process_logits(scores, ids[:, :n], processor)) for n in range(17, 33)]
    assert c.of("_apply") == 1, c.names
    for n, out in zip(range(17, 33), outs, strict=True):
        ref = scores.copy()
        for r in range(2):
            seen = np.unique(ids[r, :n])
            ref[r, seen] = np.where(ref[r, seen] > 0, ref[r, seen] / 1.5, ref[r, seen] * 1.5)
            last = ids[r, n - 1]
            banned = [ids[r, j + 1] for j in range(n - 1) if ids[r, j] == last]
            ref[r, banned] = -np.inf
        assert_same_scores(out, ref, atol=1e-6)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_trace_best_hypothesis_is_generates_output(lm, length_penalty):
    ids, mask = _ids(lm, "And God said")
    # EOS on frequent bytes ('e', ' ', ',') so hypotheses finish early and compete.
    config = jd.GenerationConfig(
        do_sample=False,
        num_beams=3,
        max_new_tokens=7,
        eos_token_id=[101, 32, 44],
        pad_token_id=256,
        length_penalty=length_penalty,
    )
    tr = trace(lm, ids, config, attention_mask=mask)
    out = jd.generate(lm, ids, mask, config)
    best = tr.best()
    seq = np.asarray(out.sequences)[0, ids.shape[1] :][: int(out.lengths[0])]
    assert best.tokens == tuple(int(t) for t in seq)
    np.testing.assert_allclose(best.normalized, float(out.sequences_scores[0]), rtol=1e-6)
    hyps = tr.hypotheses()
    assert len(hyps) >= 2  # hypotheses compete (the EOS bytes are frequent)
    # Every candidate's running score is the sum of its processed log-probs: the
    # kept beams' scores are the next step's parents' scores plus one token each.
    b = tr.beam
    for step in range(1, tr.steps):
        for j in range(b["cand_tokens"].shape[-1]):
            parent = b["cand_parent"][step, 0, j]
            parent_score = b["cand_scores"][step - 1, 0, b["kept"][step - 1, 0, parent]]
            if parent_score < -1e8:
                continue
            token_lp = tr.stages[step, -1, parent, b["cand_tokens"][step, 0, j]]
            np.testing.assert_allclose(
                b["cand_scores"][step, 0, j], parent_score + token_lp, rtol=1e-5, atol=1e-5
            )


def test_generate_program_records_nothing(lm):
    """generate's plan has the switch off, and its compiled program has exactly
    GenerateOutput's outputs; trace's has more. Tracing does not make generate
    compile again."""
    ids, mask = _ids(lm, "In the beginning")
    req = generation.prepare(lm, ids, mask, SAMPLING, key=jax.random.key(0))
    assert req.plan.record is False
    args = req.args()
    plain = generate_program.lower(req.plan, *args)

    recorded = generate_program.lower(dataclasses.replace(req.plan, record=True), *args)
    assert len(jax.tree_util.tree_leaves(plain.out_info)) == 3  # sequences, logprobs, lengths
    assert len(jax.tree_util.tree_leaves(recorded.out_info)) == 4  # + the stages
    assert plain.as_text() != recorded.as_text()
    key = jax.random.key(1)
    jd.generate(lm, ids, mask, SAMPLING, key=key)
    trace(lm, ids, SAMPLING, attention_mask=mask, key=key)
    with count_compiles() as n:
        out = jd.generate(lm, ids, mask, SAMPLING, key=key)
    assert n.count == 0 and out.trace is None


def test_trace_validates_steps(lm):
    ids, _ = _ids(lm, "In")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 5\].*got 6"):
        trace(lm, ids, GREEDY, steps=6)
    tr = trace(lm, ids, GREEDY, steps=2)
    assert tr.steps == 2 and tr.tokens.shape == (2, 1)
    with pytest.raises(ValueError, match="stage must be one of"):
        tr.top(0, "TopK")
    with pytest.raises(ValueError, match="beam-search trace"):
        tr.hypotheses()


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("beams", [1, 3])
def test_report_pictures_and_html(lm, tmp_path, beams):
    from jaxdecode import explain

    ids, mask = _ids(lm, "And God said")
    config = (
        SAMPLING
        if beams == 1
        else jd.GenerationConfig(num_beams=3, max_new_tokens=4, eos_token_id=[44], pad_token_id=256)
    )
    tr = trace(lm, ids, config, attention_mask=mask, key=jax.random.key(0))
    decode = lambda t: lm.tokenizer.decode([t])
    written = explain.write_report(tr, str(tmp_path), decode=decode, steps=3, m=8)
    names = sorted(os.path.basename(p) for p in written)
    want = ["index.html", "step_00.png", "step_01.png", "step_02.png", "temperature.png"]
    # The repetition penalty is drawn only when the configuration has one.
    want += ["repetition_penalty.png"] if beams == 1 else ["beam_tree.png"]
    assert names == sorted(want)
    for path in written[:-1]:
        size = os.path.getsize(path)
        assert 5_000 < size < 1_000_000, (path, size)
        w, h = _png_size(path)
        assert 300 <= w <= 3000 and 150 <= h <= 2000, (path, w, h)
    with open(written[-1], encoding="utf-8") as f:
        page = f.read()
    assert page.count("data:image/png;base64,") == len(written) - 1
    assert "<table>" in page
    assert ("TopP" if beams == 1 else "Finished hypotheses") in page
    assert "<p>Prompt: <code>And God said</code></p>" in page, "the prompt as text, not tokens"


def test_repetition_penalty_effect_lowers_seen_tokens(lm):
    from jaxdecode import explain

    ids, _ = _ids(lm, "the the the the")
    tr = trace(lm, ids, GREEDY.replace(repetition_penalty=1.0, frequency_penalty=0.0))
    before, after, used = explain.repetition_penalty_effect(tr, 1, 2.0)
    fig = explain.plot_repetition_penalty(tr, 1, 2.0)  # asked for: an illustration, labelled
    assert fig.axes[0].get_title().startswith("illustration, not in this configuration")
    seen = set(ids[0].tolist()) | {tr.chosen(0)}
    assert used == 2.0
    for t in seen:  # a seen token's probability only goes down... relative to unseen ones
        ratio_seen = after[t] / before[t]
        unseen = [u for u in range(256) if u not in seen and before[u] > 0]
        assert ratio_seen < min(after[u] / before[u] for u in unseen)


def test_pictures_fit_their_titles_and_mark_seen_tokens_visibly(lm):
    """A beam-search step (one panel: no processor) is as wide as its title; a
    token a repetition penalty takes to ~0 stays visibly marked as seen (its
    "before" bar hatched too, its label starred), not just its invisible
    "after" bar."""
    import matplotlib.text

    from jaxdecode import explain

    ids, _ = _ids(lm, "And God said")
    beam = jd.GenerationConfig(num_beams=3, max_new_tokens=2, eos_token_id=[44], pad_token_id=256)
    fig = explain.plot_step(trace(lm, ids, beam), 0)
    fig.canvas.draw()
    width = fig.get_size_inches()[0] * fig.dpi
    assert fig.get_size_inches()[0] * 90 >= 630  # the report's dpi
    (title,) = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text().startswith("step 0")]
    box = title.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= width, (box, width)

    ids, _ = _ids(lm, "the the the the")
    tr = trace(lm, ids, GREEDY.replace(repetition_penalty=50.0, frequency_penalty=0.0))
    fig = explain.plot_repetition_penalty(tr, 2)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]  # "#id" without decode=
    seen = set(tr.history(2).tolist())
    before_bars, after_bars = ax.containers
    crushed = 0
    for label, b, a in zip(labels, before_bars, after_bars, strict=True):
        is_seen = int(label.removeprefix(explain.SEEN_MARK).lstrip("#")) in seen
        assert label.startswith(explain.SEEN_MARK) == is_seen, label
        assert (b.get_hatch() == "//") == is_seen and (a.get_hatch() == "//") == is_seen, label
        crushed += is_seen and a.get_width() < 0.01 * b.get_width()
    assert crushed, "the penalty should take a seen token to ~0 here"


def test_cli_explain(tmp_path):
    out = tmp_path / "ex"
    cmd = [sys.executable, "-m", "jaxdecode.cli", "explain", "In the beginning", "-o", str(out)]
    res = subprocess.run(
        cmd + ["--steps", "2", "--no-do_sample", "--num_beams", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    # 2 steps, temperature, beam tree; no repetition penalty was asked for.
    assert "wrote 4 pictures" in res.stdout and str(out / "index.html") in res.stdout
    assert res.stdout.startswith("In the beginning")
    assert (out / "beam_tree.png").is_file()
    assert not (out / "repetition_penalty.png").exists()
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<p>Prompt: <code>In the beginning</code></p>" in page
    res = subprocess.run(cmd + ["--steps", "0"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--steps" in res.stderr


def test_cli_explain_without_matplotlib_is_a_one_line_error():
    code = (
        "import sys; sys.modules['matplotlib'] = None; from jaxdecode.cli import main; "
        "sys.exit(main(['explain', 'In', '-o', 'unused']))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        'jaxdecode: error: jaxdecode explain draws with matplotlib: pip install "jaxdecode[explain]"'
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m": 0}, "m must be an int >= 1, got 0"),
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
        ({"temperatures": (1.0, 0.0)}, r"temperatures must be > 0, got \(1.0, 0.0\)"),
    ],
)
def test_report_validates_its_options(lm, tmp_path, kwargs, message):
    from jaxdecode import explain

    ids, _ = _ids(lm, "In")
    tr = trace(lm, ids, GREEDY, steps=2)
    with pytest.raises(ValueError, match=message):
        explain.write_report(tr, str(tmp_path / "x"), **kwargs)
    assert not (tmp_path / "x").exists()
