from __future__ import annotations

from pathlib import Path

import pytest
from tiny import ALL_PROJECTIONS, make_adapter, make_checkpoint, perturbed_copy


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three 'fine-tunes' of it (noise on every tensor)."""
    root = tmp_path_factory.mktemp("zoo")
    base = make_checkpoint(root / "base", "llama", seed=0)
    out = {"base": base}
    for i, name in enumerate(["code", "german", "math"]):
        out[name] = perturbed_copy(base, root / name, seed=i + 1)
    return out


@pytest.fixture(scope="session")
def adapters(zoo, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA adapters over the zoo's base, of different ranks, scalings and targets
    (rank and alpha patterns, rsLoRA, an adapter without o/k/down)."""
    root, base = tmp_path_factory.mktemp("adapters"), zoo["base"]
    return {
        "math": make_adapter(base, root / "math", 1, ALL_PROJECTIONS, r=4),
        "code": make_adapter(base, root / "code", 2, ALL_PROJECTIONS, r=8, use_rslora=True,
                             rank_pattern={"down_proj": 2}, alpha_pattern={"gate_proj": 5}),
        "german": make_adapter(base, root / "german", 3, ["q_proj", "v_proj", "gate_proj", "up_proj"], r=6),
    }
