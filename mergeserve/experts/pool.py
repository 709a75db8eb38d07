"""ExpertPool: each source is loaded once and shared by every composition that names it."""

from __future__ import annotations

import threading
from pathlib import Path

from mergeserve.experts.checkpoint import Checkpoint, CheckpointError, check_same_arch
from mergeserve.experts.gguf import load_gguf
from mergeserve.experts.hf_folder import load_hf_folder
from mergeserve.experts.peft_adapter import is_peft_folder, load_peft_adapter


class ExpertPool:
    def __init__(self, roots: list[str | Path] | None = None) -> None:
        """`roots`: when given, every source (and every file inside a folder source, symlinks
        followed) must lie under one of these folders; None loads from anywhere."""
        self.roots = [Path(r).resolve() for r in roots] if roots is not None else None
        self._loaded: dict[tuple[str, str | None], Checkpoint] = {}
        # Builds may run off the request path; one lock keeps a source from loading twice.
        self._lock = threading.RLock()

    def get(self, source: str, base: str | None = None) -> Checkpoint:
        """The checkpoint at `source`; `base` is the base a PEFT adapter applies to."""
        self._confine(Path(source))
        path = Path(source).resolve()
        key = (str(path), str(Path(base).resolve()) if base and is_peft_folder(path) else None)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = self._load(path, key[1])
            return self._loaded[key]

    def get_expert(self, source: str, base: str) -> Checkpoint:
        """An expert for a composition over `base`: loaded, and checked to share its architecture."""
        expert, base_ckpt = self.get(source, base), self.get(base)
        check_same_arch(expert.source, expert.config, base_ckpt.source, base_ckpt.config)
        return expert

    def _confine(self, source: Path) -> None:
        if self.roots is None:
            return
        files = sorted(f for f in source.rglob("*") if f.is_file()) if source.is_dir() else []
        for path in [source, *files]:
            real = path.resolve()  # follows symlinks and `..`
            if not any(real.is_relative_to(root) for root in self.roots):
                where = "" if path == source else f" (inside {source})"
                raise CheckpointError(
                    f"{path}{where}: resolves to {real}, outside the allowed source roots {[str(r) for r in self.roots]}"
                )

    def _load(self, path: Path, base: str | None) -> Checkpoint:
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix == ".gguf":
                return load_gguf(path)
            raise CheckpointError(f"{path}: a single file source must be .gguf (folders hold safetensors checkpoints)")
        if is_peft_folder(path):
            if base is None:
                raise CheckpointError(f"{path}: a PEFT adapter needs a base")
            return load_peft_adapter(path, self.get(base))
        return load_hf_folder(path)

    def sources(self) -> list[dict[str, object]]:
        with self._lock:
            return [
                {"source": c.source, "kind": c.kind, "bytes": c.nbytes(), "model_type": c.config.model_type}
                for c in self._loaded.values()
            ]
