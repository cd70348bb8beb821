"""The decoding jobs of the comparison and the prompts they decode.

Standard library and NumPy only: every worker process imports this module,
including a peer's worker in a virtual environment without jaxdecode.

A workload is one `generate` call shape: how many prompts, how many beams,
greedy or sampling. `DEFAULT_WORKLOADS` is what a plain run measures; the
others (batch 64) are there for accelerators, where a large batch is the
interesting case, and are selected by name (`--workloads greedy_b64 ...`).

Each workload may carry issue 14's targets: at batch 1 (one row: greedy and
sampling) jaxdecode's decode step within 85% of the memory-bandwidth floor
(decode-step MBU >= 0.85) and >= 1.5x transformers' tokens/s; beam search and
batch 8 >= 1.3x. `harness.check_targets` says for each whether it is met.

Prompts: random ids for random-weight models (`make_prompts`); real English text
(`PASSAGES`, written for this benchmark) tokenized by the model's tokenizer for a
real model (`text_prompts`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "DEFAULT_WORKLOADS",
    "PAD_ID",
    "PASSAGES",
    "TOP_K",
    "TOP_P",
    "WORKLOADS",
    "Workload",
    "make_prompts",
    "text_prompts",
]

# Sampling settings of the sampling workloads, the same for every library.
TOP_K = 50
TOP_P = 0.9
# The pad id every library is given (nothing is padded: all prompts have one length).
PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class Workload:
    """One decoding job.

    Attributes:
        name: e.g. "greedy_b8".
        batch: prompts decoded together.
        num_beams: beams per prompt (1: no beam search).
        do_sample: sample (with top_k=50, top_p=0.9) instead of argmax.
        target_ratio: the least jaxdecode tokens/s over transformers' (issue 14),
            or None.
        target_mbu: the least decode-step model bandwidth utilisation of
            jaxdecode, i.e. the fraction of the memory-bandwidth floor (issue 14),
            or None.
    """

    name: str
    batch: int
    num_beams: int = 1
    do_sample: bool = False
    target_ratio: float | None = None
    target_mbu: float | None = None

    @property
    def rows(self) -> int:
        """Sequences the model runs on: batch * beams."""
        return self.batch * self.num_beams

    @property
    def has_parity(self) -> bool:
        """Whether the libraries must produce identical tokens (not sampling)."""
        return not self.do_sample


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("greedy_b1", 1, target_ratio=1.5, target_mbu=0.85),
        Workload("greedy_b8", 8, target_ratio=1.3),
        Workload("beam4_b1", 1, num_beams=4, target_ratio=1.3),
        Workload("sample_b1", 1, do_sample=True, target_ratio=1.5, target_mbu=0.85),
        Workload("sample_b8", 8, do_sample=True, target_ratio=1.3),
        Workload("greedy_b64", 64),
        Workload("sample_b64", 64, do_sample=True),
    )
}

# What a run without `--workloads` measures (a CPU-sized set).
DEFAULT_WORKLOADS: tuple[str, ...] = (
    "greedy_b1",
    "greedy_b8",
    "beam4_b1",
    "sample_b1",
    "sample_b8",
)


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """Random prompt token ids, the same for every library.

    Args:
        batch: rows.
        length: tokens per row.
        vocab: ids are drawn from `[0, vocab)`.
        seed: generator seed.

    Returns:
        `[batch, length]` int32 ids.
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (batch, length), dtype=np.int64).astype(np.int32)


# Real text for the prompts of a real model: eight short passages written for this
# benchmark (plain English prose, a little code and numbers, as prompts tend to be).
PASSAGES: tuple[str, ...] = (
    "The river rose slowly through the night, and by morning the lower fields were "
    "under water. Farmers gathered at the bridge to watch the current carry branches, "
    "fence posts and a wooden door downstream, while the children counted the boats.",
    "To bake a simple loaf of bread, mix five hundred grams of flour with ten grams of "
    "salt, seven grams of yeast and three hundred and fifty millilitres of warm water. "
    "Knead the dough for ten minutes, then let it rise for an hour in a warm place.",
    "def moving_average(values, window):\n    total = sum(values[:window])\n    out = "
    "[total / window]\n    for i in range(window, len(values)):\n        total += "
    "values[i] - values[i - window]\n        out.append(total / window)\n    return out\n",
    "The committee met on Tuesday to review the budget for the coming year. After a "
    "long discussion about the cost of repairs to the library roof, the members agreed "
    "to postpone the new playground until the spring and to ask the council for help.",
    "Light from the nearest star other than the Sun takes a little over four years to "
    "reach the Earth. Astronomers measure such distances by watching how the position "
    "of a star appears to shift as our planet moves from one side of its orbit to the other.",
    "In 1869 the first transcontinental railroad in the United States was completed, "
    "joining the east and west coasts. A journey that had taken months by wagon could "
    "now be made in about a week, and towns grew quickly along the new line.",
    "She opened the old notebook and found a list of names, dates and small drawings of "
    "birds. On the last page, written in pencil, was a note asking whoever found the "
    "book to return it to the lighthouse keeper on the northern island.",
    "A good night's sleep helps the body repair itself and the mind sort the day's "
    "memories. Most adults need between seven and nine hours, and keeping a regular "
    "schedule, even at weekends, makes it easier to fall asleep and wake up rested.",
)


def text_prompts(batch: int, length: int, passage_ids: list[list[int]]) -> np.ndarray:
    """Prompts of real text: every row `length` tokens of the passages, the rows different.

    Row i reads the passages in turn from passage `i % P` on (P passages),
    skipping its first `5 * (i // P)` tokens, so that a batch of up to 8 * P rows
    has no two rows alike when every passage is over 35 tokens long (`PASSAGES`
    are 45-65 tokens each in SmolLM2's tokenizer); the stream wraps around as
    often as `length` needs.

    Args:
        batch: rows.
        length: tokens per row (no padding: every row is exactly this long).
        passage_ids: `PASSAGES` tokenized by the model's tokenizer.

    Returns:
        `[batch, length]` int32 ids.

    Raises:
        ValueError: if a passage tokenizes to nothing.
    """
    if not passage_ids or any(len(ids) == 0 for ids in passage_ids):
        raise ValueError("text_prompts needs non-empty tokenized passages")
    n = len(passage_ids)
    rows = []
    for i in range(batch):
        stream: list[int] = []
        skip = 5 * (i // n)
        j = i
        while len(stream) < skip + length:
            stream.extend(passage_ids[j % n])
            j += 1
        rows.append(stream[skip : skip + length])
    return np.asarray(rows, np.int32)
