"""Learned merge coefficients: a weight per expert per layer, kept in a safetensors file.

`mergeserve tune-merge` writes them (learn/tune.py). A spec's `merge.coefficients` names the
file; its task-vector merge then weights expert i's task vector in layer n by
`coefficients[n, i]` (or `coefficients[n, m, i]`, m = 0 for attention and 1 for the FFN)
instead of `lambda * weight`. Tensors outside the layers
(embeddings, final norm, head) keep the spec's weights, and lambda.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mergeserve.experts import CheckpointError

KEY = "coefficients"  # [L, E], or [L, 2, E]: attention (q/k/v/o) and FFN (gate/up/down) apart
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def save(path: str | Path, coefficients: torch.Tensor, expert_names: list[str], metadata: dict[str, object]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: json.dumps(v) for k, v in metadata.items()} | {"format": "pt", "expert_names": json.dumps(expert_names)}
    save_file({KEY: coefficients.detach().float().contiguous()}, str(path), metadata=meta)
    return path


def load(path: str | Path, expert_names: list[str], num_layers: int) -> torch.Tensor:
    """The file's coefficients [L, E], columns in the order of `expert_names` (safetensors only)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if KEY not in f.keys():
                raise CheckpointError(f"{path}: no {KEY!r} tensor (not written by `mergeserve tune-merge`)")
            table = f.get_tensor(KEY)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors coefficients file: {e}") from e
    theirs = json.loads(meta.get("expert_names", "null"))
    if not isinstance(theirs, list) or sorted(theirs) != sorted(expert_names):
        raise CheckpointError(f"{path}: coefficients for the experts {theirs}, the spec has {expert_names}")
    if tuple(table.shape) not in ((num_layers, len(expert_names)), (num_layers, 2, len(expert_names))):
        raise CheckpointError(f"{path}: coefficients of shape {list(table.shape)}, the base needs [layers, experts] = "
                              f"{[num_layers, len(expert_names)]} or [layers, 2, experts]")
    return table[..., [theirs.index(n) for n in expert_names]].float()


def layer_of(key: str) -> int | None:
    """The decoder layer a tensor name belongs to, or None (embeddings, final norm, head)."""
    m = _LAYER.match(key)
    return None if m is None else int(m.group(1))


def weights_for(key: str, table: torch.Tensor | None, default: list[float]) -> list[float]:
    """The experts' weights for the tensor `key`: its layer's row of `table`, else `default`."""
    layer = layer_of(key)
    if table is None or layer is None:
        return default
    row = table[layer]
    return (row[0 if ".self_attn." in key else 1] if row.dim() == 2 else row).tolist()
