"""Write a composition as a standard Hugging Face checkpoint that transformers and vLLM load."""

from __future__ import annotations

from pathlib import Path

import torch

from mergeserve.composition import ComposedModel
from mergeserve.export.dense import export_dense
from mergeserve.export.mixtral import export_mixtral

__all__ = ["export_composition", "export_dense", "export_mixtral", "export_spec"]


def export_composition(composed: ComposedModel, out_dir: str | Path, dtype: str | torch.dtype = "float32") -> Path:
    """Mixtral for an MoE composition, the base's own architecture for a one-expert one."""
    if all(not layer.is_moe for layer in composed.layers):
        return export_dense(composed, out_dir, dtype)
    return export_mixtral(composed, out_dir, dtype)


def export_spec(spec_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """`mergeserve export --spec FILE --out DIR [--dtype D]`: build the composition, then export it."""
    from mergeserve.experts import ExpertPool
    from mergeserve.learn.compose import build
    from mergeserve.spec import load_composition

    return export_composition(build(load_composition(spec_path), ExpertPool()), out_dir, dtype)
