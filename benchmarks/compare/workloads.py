"""The decoding jobs of the comparison and the prompts they decode.

Standard library and NumPy only: every worker process imports this module,
including a peer's worker in a virtual environment without jaxdecode.

A workload is one `generate` call shape: how many prompts, how many beams,
greedy or sampling. `DEFAULT_WORKLOADS` is what a plain run measures; the
others (batch 64) are there for accelerators, where a large batch is the
interesting case, and are selected by name (`--workloads greedy_b64 ...`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "DEFAULT_WORKLOADS",
    "PAD_ID",
    "TOP_K",
    "TOP_P",
    "WORKLOADS",
    "Workload",
    "make_prompts",
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
    """

    name: str
    batch: int
    num_beams: int = 1
    do_sample: bool = False

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
        Workload("greedy_b1", 1),
        Workload("greedy_b8", 8),
        Workload("beam4_b1", 1, num_beams=4),
        Workload("sample_b1", 1, do_sample=True),
        Workload("sample_b8", 8, do_sample=True),
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
