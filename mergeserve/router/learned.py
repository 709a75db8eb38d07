"""`learned` gate rows: a safetensors file of `layers.{n}.router` [E, D], as `mergeserve train-router` writes it.

The file's metadata names its experts in row order, so a spec may list the same experts
in another order; their number, names and the hidden size must match the composition.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mergeserve.composition import ComposedModel
from mergeserve.experts import Checkpoint, CheckpointError
from mergeserve.router import Calibration, Rows, routed_sites
from mergeserve.spec import CompositionSpec

log = logging.getLogger(__name__)


def row_key(layer: int, site: str = "ffn") -> str:
    return f"layers.{layer}.router" if site == "ffn" else f"layers.{layer}.attn_router"


def save_rows(
    path: str | Path, rows: list[torch.Tensor], expert_names: list[str], metadata: dict[str, object],
    attention_rows: list[torch.Tensor] | None = None,
) -> Path:
    """Write L router tensors [E, D] (and L attention-router tensors for routed attention);
    metadata values are stored as JSON strings (safetensors holds only strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sites = {"ffn": rows, "attention": attention_rows or []}
    tensors = {row_key(n, site): r.detach().to(torch.float32).contiguous() for site, rs in sites.items() for n, r in enumerate(rs)}
    meta = {k: json.dumps(v) for k, v in metadata.items()} | {"format": "pt", "expert_names": json.dumps(expert_names)}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and raw metadata of a router file (safetensors only: nothing is unpickled)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors router file: {e}") from e


def load_rows(composed: ComposedModel, path: str | Path | None, site: str = "ffn") -> list[torch.Tensor]:
    """The file's rows of one router site (ffn, attention) for every layer of `composed`,
    reordered to its experts: L x [E, D]."""
    if path is None:
        raise CheckpointError("router.kind=learned needs router.weights (a file written by `mergeserve train-router`)")
    tensors, meta = read_file(path)
    order = _expert_order(path, meta, composed.expert_names)
    _warn_other_base(path, meta, composed)
    layers = len(composed.layers)
    expected = {row_key(n, site) for n in range(layers)}
    known = expected | {row_key(n, other) for n in range(layers) for other in ("ffn", "attention")}
    if not expected <= set(tensors) or not set(tensors) <= known:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - known)
        what = "" if site == "ffn" else " (routed attention needs attention-router rows: train them with router.attention: routed)"
        raise CheckpointError(f"{path}: the composition has {layers} layers; missing {missing[:3]}, unexpected {extra[:3]}{what}")
    shape = (len(order), composed.config.hidden_size)
    for key, t in tensors.items():
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {list(t.shape)}, the composition needs [experts, hidden size] = {list(shape)}"
            )
    return [tensors[row_key(n, site)][order].to(torch.float32) for n in range(layers)]


def _meta(path: str | Path, meta: dict[str, str], key: str) -> object:
    try:
        return json.loads(meta[key]) if key in meta else None
    except ValueError:
        raise CheckpointError(f"{path}: metadata {key!r} is not JSON: {meta[key][:80]!r}") from None


def _warn_other_base(path: str | Path, meta: dict[str, str], composed: ComposedModel) -> None:
    trained_on = _meta(path, meta, "base")
    # Paths differ between machines, so another base is worth a warning, not a refusal.
    if trained_on and composed.sources and trained_on != composed.sources[0]:
        log.warning("%s: rows trained over the base %s, this composition's base is %s", path, trained_on, composed.sources[0])


def _expert_order(path: str | Path, meta: dict[str, str], names: list[str]) -> list[int]:
    """Index into the file's rows of each of the composition's experts."""
    theirs = _meta(path, meta, "expert_names")
    if not isinstance(theirs, list):
        raise CheckpointError(f"{path}: no expert_names list in its metadata (not written by `mergeserve train-router`)")
    if sorted(theirs) != sorted(names):
        raise CheckpointError(
            f"{path}: trained for {len(theirs)} experts {theirs}, the composition has {len(names)} experts {names}"
        )
    return [theirs.index(n) for n in names]


def learned_rows(composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, calibration: Calibration | None) -> Rows:
    return {site: load_rows(composed, spec.router.weights, site) for site in routed_sites(composed)}
