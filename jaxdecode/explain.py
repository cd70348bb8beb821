"""Pictures of a `Trace`: what each decoding parameter did, from the real model.

Needs matplotlib (`pip install "jaxdecode[explain]"`). Every function reads a
`jaxdecode.trace.Trace` and returns a matplotlib `Figure`; `write_report`
writes them all as PNG files plus one self-contained HTML page (pictures
embedded, numbers in tables). Token strings come from `decode(token_id)`.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxdecode.trace import Trace, softmax64

__all__ = [
    "plot_step",
    "plot_temperature_sweep",
    "plot_repetition_penalty",
    "plot_beam_tree",
    "write_report",
    "token_label",
]

Decode = Callable[[int], str]
KEPT, REMOVED, CHOSEN = "#3b6fb6", "#c8c8c8", "#d62728"
MIN_WIDTH = 7.0  # inches: a step's title fits (630 px at the report's 90 dpi)
SEEN_MARK = "* "  # label prefix of a token already in the text (repetition penalty)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            'jaxdecode explain draws with matplotlib: pip install "jaxdecode[explain]"'
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def token_label(decode: Decode | None, token: int) -> str:
    """A printable label: the token's text quoted as a Python literal (`' '`,
    `'\\n'`, `'\\x00'`), so spaces and control bytes stay visible in any font."""
    if decode is None:
        return f"#{token}"
    return repr(decode(token))


def _token_set(tr: Trace, step: int, row: int, m: int) -> list[int]:
    """Top-m of the raw distribution, then any top-m token of a later stage and the
    chosen token that are not among them (so every bar that matters is shown)."""
    tokens = [t for t, _ in tr.top(step, 0, row, m)]
    for stage in range(1, len(tr.stage_names)):
        tokens += [t for t, p in tr.top(step, stage, row, m) if p > 0 and t not in tokens]
    if tr.beam is None and tr.chosen(step, row) not in tokens:
        tokens.append(tr.chosen(step, row))
    return tokens[: m + 5]


def plot_step(tr: Trace, step: int, *, row: int = 0, m: int = 10, decode: Decode | None = None):
    """One panel per stage (raw, then after each processor): the probability of
    the same tokens, blue where still possible, grey where removed, the chosen
    token (greedy/sampling) outlined in red."""
    plt = _pyplot()
    tokens = _token_set(tr, step, row, m)
    labels = [token_label(decode, t) for t in tokens]
    stages = len(tr.stage_names)
    # At least the title's width: beam search without processors is one panel.
    fig, axes = plt.subplots(
        1,
        stages,
        figsize=(max(2.3 * stages + 1.2, MIN_WIDTH), 0.28 * len(tokens) + 1.4),
        sharey=True,
        squeeze=False,
    )
    chosen = tr.chosen(step, row) if tr.beam is None else None
    y = np.arange(len(tokens))
    for s, ax in enumerate(axes[0]):
        p = tr.probs(step, s, row)
        kept = tr.kept(step, s, row)
        vals = [p[t] for t in tokens]
        colors = [KEPT if kept[t] else REMOVED for t in tokens]
        edges = [CHOSEN if t == chosen else "none" for t in tokens]
        ax.barh(y, vals, color=colors, edgecolor=edges, linewidth=1.8)
        ax.set_title(f"{tr.stage_names[s]}\n{int(kept.sum())} kept", fontsize=9)
        ax.set_xlim(0, max(1e-9, max(vals)) * 1.15)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, labels, fontsize=8, family="monospace")
    axes[0][0].invert_yaxis()
    what = f"chose {token_label(decode, chosen)}" if chosen is not None else "beam search"
    fig.suptitle(f"step {step}: next-token probability after each processor ({what})", fontsize=10)
    fig.tight_layout()
    return fig


def _finish_bars(fig, ax, y, tokens, decode: Decode | None, title: str):
    """Token labels on the y axis (most probable on top), legend, title."""
    ax.set_yticks(y)
    ax.set_yticklabels(
        [token_label(decode, int(t)) for t in tokens], family="monospace", fontsize=8
    )
    ax.invert_yaxis()
    ax.set_xlabel("probability")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_temperature_sweep(
    tr: Trace,
    step: int,
    temperatures: Sequence[float] = (0.5, 1.0, 2.0),
    *,
    row: int = 0,
    m: int = 10,
    decode: Decode | None = None,
):
    """The raw distribution of one step divided by several temperatures."""
    plt = _pyplot()
    raw = tr.stages[step, 0, row]
    tokens = [t for t, _ in tr.top(step, 0, row, m)]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(tokens) + 1.4))
    height = 0.8 / len(temperatures)
    y = np.arange(len(tokens))
    for i, t in enumerate(temperatures):
        p = softmax64(raw / t)
        ax.barh(y + i * height, [p[k] for k in tokens], height, label=f"T = {t:g}")
    title = f"step {step}: softmax(logits / T), top {len(tokens)} tokens at T = 1"
    return _finish_bars(fig, ax, y + height * (len(temperatures) - 1) / 2, tokens, decode, title)


def repetition_penalty_effect(
    tr: Trace, step: int, penalty: float | None = None, *, row: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """`(before, after, penalty)` `[V]` probabilities around a repetition penalty.

    From the trace's own `RepetitionPenalty` stage when the configuration has
    one; else `jaxdecode.repetition_penalty(penalty or 1.5)` applied to the
    step's raw logits over the prompt and the tokens generated so far.
    """
    if "RepetitionPenalty" in tr.stage_names and penalty is None:
        s = tr.stage_names.index("RepetitionPenalty")
        return tr.probs(step, s - 1, row), tr.probs(step, s, row), tr.config.repetition_penalty
    import jax.numpy as jnp

    from jaxdecode.context import DecodeContext
    from jaxdecode.processors import repetition_penalty

    penalty = 1.5 if penalty is None else penalty
    ctx = DecodeContext.from_ids(tr.history(step, row)[None], vocab_size=tr.stages.shape[-1])
    raw = tr.stages[step, 0, row][None]
    after = np.asarray(repetition_penalty(penalty)(jnp.asarray(raw), ctx))[0]
    return softmax64(raw[0]), softmax64(after), penalty


def plot_repetition_penalty(
    tr: Trace,
    step: int,
    penalty: float | None = None,
    *,
    row: int = 0,
    m: int = 10,
    decode: Decode | None = None,
):
    """Before/after bars of a repetition penalty; tokens already seen are hatched."""
    plt = _pyplot()
    before, after, used = repetition_penalty_effect(tr, step, penalty, row=row)
    tokens = list(np.argsort(-before, kind="stable")[:m])
    tokens += [t for t in np.argsort(-after, kind="stable")[:m] if t not in tokens][:5]
    seen = set(tr.history(step, row).tolist())
    fig, ax = plt.subplots(figsize=(MIN_WIDTH + 1, 0.3 * len(tokens) + 1.4))
    y = np.arange(len(tokens))
    hatch = ["//" if t in seen else "" for t in tokens]
    # Both bars hatched, and the label marked: a penalty can take the "after" bar
    # to ~0 width, where its hatching would be invisible.
    before_bars = ax.barh(y - 0.2, [before[t] for t in tokens], 0.4, label="before", color=REMOVED)
    after_bars = ax.barh(y + 0.2, [after[t] for t in tokens], 0.4, label="after", color=KEPT)
    for bars in (before_bars, after_bars):
        for bar, h in zip(bars, hatch, strict=True):
            bar.set_hatch(h)
    title = (
        f"step {step}: repetition penalty {used:g} "
        f"({SEEN_MARK.strip()} and hatched: already in the text)"
    )
    if "RepetitionPenalty" not in tr.stage_names:
        title = f"illustration, not in this configuration: {title}"
    fig = _finish_bars(fig, ax, y, tokens, decode, title)
    ax.set_yticklabels(
        [(SEEN_MARK if t in seen else "") + token_label(decode, int(t)) for t in tokens],
        family="monospace",
        fontsize=8,
    )
    fig.tight_layout()
    return fig


def plot_beam_tree(tr: Trace, *, row: int = 0, decode: Decode | None = None, max_steps: int = 12):
    """Beam search as a tree: at each step every candidate (token, running score),
    an edge from the beam it extends; kept beams bold, finished hypotheses as
    stars with their length-normalised score, the best one in red."""
    if tr.beam is None:
        raise ValueError("plot_beam_tree needs a beam-search trace (num_beams > 1)")
    plt = _pyplot()
    b = tr.beam
    steps = min(tr.steps, max_steps)
    k = b["cand_tokens"].shape[-1]
    fig, ax = plt.subplots(figsize=(2.0 * steps + 1.5, 0.55 * k + 1.6))
    prev_y: list[float] = [0.0] * b["kept"].shape[-1]  # y of each running beam
    ax.plot([-0.6], [0], "ko")
    ax.annotate("prompt", (-0.6, 0), xytext=(-0.6, -0.6), fontsize=8, ha="center")
    best = tr.best(row)
    for step in range(steps):
        kept = list(b["kept"][step, row])
        for j in range(k):
            score = float(b["cand_scores"][step, row, j])
            if score < -1e8:  # extends one of the placeholder beams of step 0
                continue
            parent = int(b["cand_parent"][step, row, j])
            x0, y0, x1, y1 = step - 1, prev_y[parent], step, float(j)
            is_kept = j in kept
            ends = bool(b["cand_eos"][step, row, j])
            entered = ends and bool(b["cand_finishing"][step, row, j])
            style = dict(color="k", lw=1.6) if is_kept else dict(color="#bbbbbb", lw=0.8)
            ax.plot([x0 if step else -0.6, x1], [y0, y1], **style)
            tok = token_label(decode, int(b["cand_tokens"][step, row, j]))
            text = f"{tok!s} {score:.2f}"
            if entered:
                norm = float(b["cand_normalized"][step, row, j])
                best_here = best.step == step and np.float32(norm) == np.float32(best.normalized)
                ax.plot([x1], [y1], marker="*", ms=12, color=CHOSEN if best_here else "#ff9f1c")
                text += f" ⇒ {norm:.3f}"
            else:
                ax.plot([x1], [y1], "o", ms=5, color=KEPT if is_kept else "#bbbbbb")
            ax.annotate(
                text,
                (x1, y1),
                xytext=(4, 3),
                textcoords="offset points",
                fontsize=7,
                family="monospace",
                color="k" if is_kept or entered else "#888888",
            )
        prev_y = [float(j) for j in kept]
    ax.set_xlim(-1, steps)
    ax.set_ylim(k - 0.4, -0.9)
    ax.set_xticks(range(steps))
    ax.set_xlabel("step")
    ax.set_ylabel("candidate rank (by running score)")
    ax.set_title(
        f"beam search, {b['kept'].shape[-1]} beams: bold = kept, star = finished "
        f"(score / length^{tr.config.length_penalty:g}), red = best",
        fontsize=10,
    )
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _stage_table(tr: Trace, step: int, row: int, m: int, decode: Decode | None) -> str:
    tokens = _token_set(tr, step, row, m)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in tr.stage_names)
    lines = [f"<table><tr><th>token</th>{head}</tr>"]
    chosen = tr.chosen(step, row) if tr.beam is None else None
    for t in tokens:
        cells = []
        for s in range(len(tr.stage_names)):
            p = tr.probs(step, s, row)[t]
            cls = "" if tr.kept(step, s, row)[t] else ' class="removed"'
            cells.append(f"<td{cls}>{p:.4f}</td>")
        mark = " ◀ chosen" if t == chosen else ""
        label = html.escape(token_label(decode, t))
        lines.append(f"<tr><td><code>{label}</code> ({t}){mark}</td>{''.join(cells)}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _beam_table(tr: Trace, row: int, decode: Decode | None) -> str:
    lines = [
        "<table><tr><th>step</th><th>text</th><th>score</th><th>normalized</th><th>entered</th></tr>"
    ]
    best = tr.best(row)
    for h in tr.hypotheses(row):
        text = html.escape("".join(token_label(decode, t) for t in h.tokens))
        star = " ★ best" if h == best else ""
        lines.append(
            f"<tr><td>{h.step}</td><td><code>{text}</code>{star}</td><td>{h.score:.4f}</td>"
            f"<td>{h.normalized:.4f}</td><td>{'yes' if h.entered else 'no'}</td></tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;
font-size:13px;text-align:right}td:first-child{text-align:left}.removed{color:#aaa}
img{max-width:100%;border:1px solid #eee}"""


def write_report(
    tr: Trace,
    out_dir: str,
    *,
    decode: Decode | None = None,
    steps: int | None = None,
    m: int = 10,
    temperatures: Sequence[float] = (0.5, 1.0, 2.0),
    title: str = "jaxdecode explain",
    row: int = 0,
    prompt_text: str | None = None,
) -> list[str]:
    """Writes the pictures (PNG) and `index.html` (self-contained) into `out_dir`.

    `repetition_penalty.png` is drawn only when the configuration has a repetition
    penalty. `prompt_text` is the prompt as the page shows it (default: the
    prompt's tokens decoded one by one).

    Returns the paths written, `index.html` last.

    A function over ~80 lines: the report's sections in page order.
    """
    for name, value in (("m", m), ("steps", 1 if steps is None else steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not temperatures or any(not t > 0 for t in temperatures):
        raise ValueError(f"temperatures must be > 0, got {tuple(temperatures)!r}")
    os.makedirs(out_dir, exist_ok=True)
    steps = min(tr.steps, steps or tr.steps)
    pictures: list[tuple[str, str, Any]] = []
    for s in range(steps):
        pictures.append(
            (f"step_{s:02d}.png", f"Step {s}", plot_step(tr, s, row=row, m=m, decode=decode))
        )
    pictures.append(
        (
            "temperature.png",
            "Temperature",
            plot_temperature_sweep(tr, 0, temperatures, row=row, m=m, decode=decode),
        )
    )
    if "RepetitionPenalty" in tr.stage_names:
        rep_step = min(steps - 1, max(1, steps // 2))
        pictures.append(
            (
                "repetition_penalty.png",
                "Repetition penalty",
                plot_repetition_penalty(tr, rep_step, row=row, m=m, decode=decode),
            )
        )
    if tr.beam is not None:
        pictures.append(
            ("beam_tree.png", "Beam search", plot_beam_tree(tr, row=row, decode=decode))
        )

    written = []
    sections = []
    for name, heading, fig in pictures:
        data = _png(fig)
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        written.append(path)
        body = f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        if name.startswith("step_"):
            body += _stage_table(tr, int(name[5:7]), row, m, decode)
        if name == "beam_tree.png":
            body += "<h3>Finished hypotheses</h3>" + _beam_table(tr, row, decode)
        sections.append(f"<h2>{html.escape(heading)}</h2>\n{body}")

    if prompt_text is None:
        prompt_row = tr.prompt[row // max(1, tr.tokens.shape[1] // tr.prompt.shape[0])]
        prompt_text = "".join(
            decode(int(t)) if decode else token_label(None, int(t)) for t in prompt_row
        )
    cfg = {k: v for k, v in tr.config.to_hf().items() if v is not None}
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>Prompt: <code>{html.escape(prompt_text)}</code></p>"
        f"<p>Stages: {html.escape(' → '.join(tr.stage_names))}</p>"
        f"<details><summary>generation config</summary><pre>{html.escape(str(cfg))}</pre></details>"
        + "\n".join(sections)
        + "</body></html>"
    )
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(page)
    written.append(index)
    return written
