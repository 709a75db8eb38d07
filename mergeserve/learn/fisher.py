"""`mergeserve fisher`: each expert's diagonal (empirical) Fisher information on its own text.

F_i is the mean over sequences of the squared gradient of the sequence's log-likelihood, per
weight. `mergeserve fisher --spec FILE --data DIR --out DIR` computes each expert's Fisher once
and caches it as `DIR/<expert>.safetensors` (one tensor per merged weight, the expert's source
in the metadata); a spec with `method: fisher` and `merge: {fisher: DIR}` merges with them
(merge/fisher.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from mergeserve.calibration import data_files, file_rows, read_texts
from mergeserve.experts import Checkpoint, ExpertPool
from mergeserve.merge.btx import load_experts
from mergeserve.spec import SpecError, load_composition


@dataclass(frozen=True)
class FisherConfig:
    samples: int = 16  # sequences of the expert's text, one backward each
    seq_len: int = 128
    seed: int = 0


def compute_fishers(spec_path: str | Path, data: dict[str, list[str | Path]], out: str | Path, cfg: FisherConfig = FisherConfig(),
                    progress: bool = True) -> list[Path]:
    """`mergeserve fisher`: each expert's diagonal Fisher on its own text, one file per expert."""
    spec = load_composition(spec_path)
    names = [e.name for e in spec.experts]
    if missing := [n for n in names if n not in data]:
        raise SpecError(f"no calibration text for the experts {missing} (give --data NAME=PATH, or a folder with a subfolder per expert)")
    texts = {n: [read_texts(f) for f in data_files(data[n])] for n in names}
    base, experts = load_experts(spec, ExpertPool())
    written = []
    for name, e, source in zip(names, experts, (x.source for x in spec.experts)):
        tokens = file_rows(texts[name], base.tokenizer, cfg.samples, cfg.seq_len, cfg.seed)  # [samples, T]
        fisher = diagonal_fisher(e, tokens, desc=f"fisher {name}" if progress else None)
        path = Path(out) / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(fisher, str(path), metadata={"format": "pt", "source": source, "samples": str(cfg.samples), "seq_len": str(cfg.seq_len)})
        written.append(path)
    return written


def diagonal_fisher(expert: Checkpoint, tokens: Tensor, desc: str | None = None) -> dict[str, Tensor]:
    """Mean squared gradient of each sequence's summed log-likelihood, per 2-D weight of the layers."""
    model = AutoModelForCausalLM.from_config(expert.config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in expert.tensors.items()}, strict=False)
    params = {n: p for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() == 2}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for row in tqdm(tokens, desc=desc, unit="seq", disable=desc is None):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=row.unsqueeze(0), labels=row.unsqueeze(0))
        (out.loss * (row.numel() - 1)).backward()  # the sequence's log-likelihood, not its mean
        for n, p in params.items():
            fisher[n] += p.grad.pow(2) / len(tokens)
    return fisher
