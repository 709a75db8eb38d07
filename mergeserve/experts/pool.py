"""ExpertPool: each source is loaded once and shared by every composition that names it.

Builds that run under `claim(owner)` record which checkpoints they use; `release(owner)`
drops a finished composition's claims and unloads what no other owner still uses.
"""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch

from mergeserve.experts.checkpoint import Checkpoint, CheckpointError, check_same_arch, in_dtype
from mergeserve.experts.gguf import load_gguf
from mergeserve.experts.hf_folder import load_hf_folder
from mergeserve.experts.peft_adapter import is_peft_folder, load_peft_adapter
from mergeserve.kernels.packed import WeightPacker


class ExpertPool:
    def __init__(
        self, roots: list[str | Path] | None = None, max_file_bytes: int | None = None,
        lora: Literal["factored", "merged"] = "factored", dtype: torch.dtype = torch.float32, int8: bool = False,
    ) -> None:
        """`roots`: when given, every source (and every file inside a folder source, symlinks
        followed) must lie under one of these folders; None loads from anywhere.
        `max_file_bytes`: refuse sources holding a larger file (a GGUF file also when its tensors
        dequantise to more: it is held as float32 once loaded).
        `lora`: keep LoRA adapters as their factors (the default) or merge them into dense weights.
        `dtype`: what checkpoints are held in unless `get` asks for another (LoRA factors keep their file's).
        `int8`: compositions that set no dtype run their weights as int8 (`dtype` is then bfloat16)."""
        self.roots = [Path(r).resolve() for r in roots] if roots is not None else None
        self.max_file_bytes = max_file_bytes
        self.lora = lora
        self.dtype = dtype
        self.int8 = int8
        self.packer = WeightPacker()  # packed copies of the weights engines run, shared between them
        # (source, base of an adapter, dtype) -> the checkpoint
        self._loaded: dict[tuple[str, str | None, torch.dtype], Checkpoint] = {}
        self._stamps: dict[tuple[str, str | None, torch.dtype], Stamp] = {}  # the files as they were loaded
        self._owners: dict[tuple[str, str | None, torch.dtype], set[str]] = {}  # claimed checkpoints -> who uses them
        self._claim = threading.local()  # the owner a build on this thread loads for
        # The tables above, held only briefly: GET /admin/pool reads them while a build loads.
        self._lock = threading.RLock()
        # One per key: a source loads once, and a slow (or hung) load makes no other source wait.
        self._loading: dict[tuple[str, str | None, torch.dtype], threading.Lock] = {}

    @contextmanager
    def claim(self, owner: str) -> Iterator[None]:
        """Record every checkpoint this thread gets inside the block as used by `owner`."""
        previous, self._claim.owner = getattr(self._claim, "owner", None), owner
        try:
            yield
        finally:
            self._claim.owner = previous

    def release(self, owner: str) -> list[str]:
        """Drop `owner`'s claims; unloads (and returns the sources of) checkpoints nobody claims now."""
        with self._lock:
            freed = []
            for key, owners in list(self._owners.items()):
                owners.discard(owner)
                if not owners:
                    del self._owners[key]
                    self._stamps.pop(key, None)
                    freed.append(self._loaded.pop(key).source)
            return freed

    def get(self, source: str, base: str | None = None, dtype: torch.dtype | None = None) -> Checkpoint:
        """The checkpoint at `source` in `dtype` (default: the pool's); `base` is the base a PEFT adapter applies to.

        The source is resolved once, and what is loaded is what was checked: every file's identity
        (device, inode, size, mtime) is taken at the check and again after loading, so a file
        swapped (a symlink turned elsewhere) or rewritten in between is refused, as is a loaded
        checkpoint whose files changed on disk since."""
        path = Path(source).resolve()
        stamp = stamp_of(self.check_allowed(Path(source)))  # checked as given, so errors name what was given
        dtype = dtype or self.dtype
        key = (str(path), str(Path(base).resolve()) if base and is_peft_folder(path) else None, dtype)
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                loaded = self._loaded.get(key)
                if loaded is not None and self._stamps[key] != stamp:
                    raise CheckpointError(f"{path}: changed on disk since it was loaded ({changed(self._stamps[key], stamp)}); "
                                          f"it is not used again until the compositions holding it are removed")
            if loaded is None:
                loaded = self._load(path, key[1], dtype)
                after = stamp_of(self.check_allowed(Path(source))) if Path(source).resolve() == path else {}
                if after != stamp:
                    raise CheckpointError(f"{path}: changed on disk while it was loading ({changed(stamp, after)}); nothing of it is used")
            with self._lock:
                self._loaded[key], self._stamps[key] = loaded, stamp
                if (owner := getattr(self._claim, "owner", None)) is not None:
                    self._owners.setdefault(key, set()).add(owner)
                return loaded

    def get_expert(self, source: str, base: str, dtype: torch.dtype | None = None) -> Checkpoint:
        """An expert for a composition over `base`: loaded, and checked to share its architecture."""
        expert, base_ckpt = self.get(source, base, dtype), self.get(base, dtype=dtype)
        check_same_arch(expert.source, expert.config, base_ckpt.source, base_ckpt.config)
        return expert

    def check_allowed(self, source: Path) -> list[Path]:
        """Refuse `source` if it, or anything inside it, lies outside the roots, or if a file is
        too large; returns its files. The source is checked against the roots before anything
        under it is listed, so a path outside them costs no walk. Blocking: call it off the event loop."""
        self._check_root(source, source)
        if not source.is_dir():
            refuse_special(source)
            self._check_size(source)
            return [source]
        files = []
        for entry in sorted(source.rglob("*")):
            self._check_root(entry, source)  # a symlink inside, to a file or a folder
            if not entry.is_dir():
                refuse_special(entry)
            if entry.is_file():
                self._check_size(entry)
                files.append(entry)
        return files

    def _check_root(self, path: Path, source: Path) -> None:
        if self.roots is None:
            return
        try:
            real = path.resolve()  # follows symlinks and `..`
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            raise CheckpointError(f"{path}: cannot be resolved: {e}") from None
        if not any(real.is_relative_to(root) for root in self.roots):
            where = "" if path == source else f" (inside {source})"
            raise CheckpointError(
                f"{path}{where}: resolves to {real}, outside the allowed source roots {[str(r) for r in self.roots]}"
            )

    def _check_size(self, f: Path) -> None:
        limit = self.max_file_bytes
        if limit is not None and f.is_file() and (size := f.stat().st_size) > limit:
            raise CheckpointError(f"{f}: {size} bytes, over the limit of {limit} bytes per file")

    def _load(self, path: Path, base: str | None, dtype: torch.dtype) -> Checkpoint:
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix == ".gguf":
                return in_dtype(load_gguf(path, self.max_file_bytes), dtype)
            raise CheckpointError(f"{path}: a single file source must be .gguf (folders hold safetensors checkpoints)")
        if is_peft_folder(path):
            if base is None:
                raise CheckpointError(f"{path}: a PEFT adapter needs a base")
            return load_peft_adapter(path, self.get(base, dtype=dtype), merge=self.lora == "merged")
        return in_dtype(load_hf_folder(path), dtype)

    def storage_ptrs(self) -> set[int]:
        """Where the loaded checkpoints' tensors live, to tell shared memory from a composition's own."""
        with self._lock:
            return {t.untyped_storage().data_ptr() for c in self._loaded.values() for t in c.held()}

    def sources(self) -> list[dict[str, object]]:
        with self._lock:
            seen: set[int] = set()  # bytes shared with an earlier entry (an adapter's base) count once
            return [
                {"source": c.source, "base": key[1], "dtype": str(key[2]).removeprefix("torch."), "kind": c.kind, "bytes": c.nbytes(seen),
                 "model_type": c.config.model_type, "used_by": sorted(self._owners.get(key, ()))}
                for key, c in self._loaded.items()
            ]


def refuse_special(path: Path) -> None:
    """Refuse what is not a regular file (a FIFO, socket or device): opening a FIFO to read
    blocks until a writer comes, and a device may never end."""
    try:
        mode = path.stat().st_mode  # follows symlinks: what would be opened
    except FileNotFoundError:
        return  # missing: reported where it matters
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, socket or device); checkpoints are read from files")


Stamp = dict[str, tuple[int, int, int, int]]  # file -> (device, inode, size, mtime_ns) of what it resolves to


def stamp_of(files: list[Path]) -> Stamp:
    out = {}
    for f in files:
        try:
            st = f.stat()  # follows symlinks: the identity of what would be opened
        except FileNotFoundError:
            continue  # gone: the next check finds the difference
        # Keyed by the file it resolves to: one checkpoint reached by two paths (a symlinked venv) is one.
        out[str(f.resolve())] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def changed(before: Stamp, after: Stamp) -> str:
    """The files that differ, named, for an error message."""
    names = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    return ", ".join(Path(n).name for n in names[:3]) + (" and more" if len(names) > 3 else "")
