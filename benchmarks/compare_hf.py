"""End-to-end decoding speed of jaxdecode against Hugging Face transformers.

A shim: the benchmark is the package `benchmarks/compare/` (its docstring says
what is measured and how; `compare/cli.py` has the options). Usage:

    python benchmarks/compare_hf.py                         # full run -> benchmarks/results/
    python benchmarks/compare_hf.py --models smollm2-135m llama-1b-shape   # real SmolLM2, 1B shape
    python benchmarks/compare_hf.py --workloads greedy_b1 beam4_b1 --runs 5
    python benchmarks/compare_hf.py --dtype bfloat16
    python benchmarks/compare_hf.py --peer hf hf-flax --hf-flax-python .venv-hfflax/bin/python
    python benchmarks/compare_hf.py --quick --json /tmp/c.json   # tiny smoke run
    python benchmarks/compare_hf.py --help
"""

from __future__ import annotations

import sys

from compare.cli import main

if __name__ == "__main__":
    sys.exit(main())
