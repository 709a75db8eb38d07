from __future__ import annotations

from pathlib import Path

import pytest

from tiny import make_checkpoint, perturbed_copy


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three 'fine-tunes' of it (noise on every tensor)."""
    root = tmp_path_factory.mktemp("zoo")
    base = make_checkpoint(root / "base", "llama", seed=0)
    out = {"base": base}
    for i, name in enumerate(["code", "german", "math"]):
        out[name] = perturbed_copy(base, root / name, seed=i + 1)
    return out
