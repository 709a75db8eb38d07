"""Fisher-weighted merging (Matena & Raffel 2022): theta = sum_i w_i F_i theta_i / sum_i w_i F_i.

F_i is expert i's diagonal (empirical) Fisher information on its own calibration text: the
mean over sequences of the squared gradient of the sequence's log-likelihood, per weight.
Where every expert's Fisher is ~0 the merge falls back to the weighted average (eps).

`mergeserve fisher --spec FILE --data DIR --out DIR` computes each expert's Fisher once and
caches it as `DIR/<expert>.safetensors` (one tensor per merged weight, the expert's source
in the metadata); a spec with `method: fisher` and `merge: {fisher: DIR}` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from mergeserve.calibration import data_files, pack_files, read_texts
from mergeserve.experts import Checkpoint, CheckpointError, ExpertPool
from mergeserve.merge.btx import load_experts
from mergeserve.spec import SpecError, load_composition

EPS = 1e-12  # keeps sum_i F_i away from 0 where no expert's loss depends on a weight


@dataclass(frozen=True)
class FisherConfig:
    samples: int = 16  # sequences of the expert's text, one backward each
    seq_len: int = 128
    seed: int = 0


def merge(base: Tensor, experts: list[Tensor], weights: list[float], fishers: list[Tensor]) -> Tensor:
    """Fisher-weighted average of the experts' tensors (fp32, the base's shape)."""
    del base  # theta_i are whole weights: the base cancels out
    num = sum(w * f * e for w, f, e in zip(weights, fishers, experts))
    den = sum(w * f for w, f in zip(weights, fishers))
    mean = sum(w * e for w, e in zip(weights, experts)) / sum(weights)
    return torch.where(den > EPS, num / den.clamp_min(EPS), mean)


class FisherFiles:
    """The cached Fishers of a spec's experts, read tensor by tensor."""

    def __init__(self, folder: str | Path, names: list[str], sources: list[str]) -> None:
        self.files = []
        for name, source in zip(names, sources):
            path = Path(folder) / f"{name}.safetensors"
            try:
                f = safe_open(str(path), "pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: no readable Fisher for expert {name!r} (run `mergeserve fisher`): {e}") from e
            if (f.metadata() or {}).get("source") != source:
                raise CheckpointError(f"{path}: computed for {(f.metadata() or {}).get('source')}, the spec's {name!r} is {source}")
            self.files.append(f)

    def get(self, key: str) -> list[Tensor] | None:
        """Every expert's Fisher of `key`; None when not computed (a tensor the experts share)."""
        if not all(key in f.keys() for f in self.files):
            return None
        return [f.get_tensor(key) for f in self.files]


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
        tokens = pack_files(texts[name], base.tokenizer, cfg.samples, cfg.seq_len, cfg.seed)  # [samples, T]
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
