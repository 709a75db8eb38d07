"""The admin API's state on disk: which compositions and aliases to serve, restored on restart.

One JSON file, replaced atomically (written beside it, fsynced, renamed over it, directory
fsynced): a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergeserve.server.ab.alias_state import AliasState
from mergeserve.spec import AliasSpec, CompositionSpec, SpecError

STATE_FILE = "state.json"


class SavedComposition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revision: int = Field(ge=0)
    spec: dict  # CompositionSpec as JSON, sources absolute
    # Why its last build failed; it is kept and retried, so a source missing at start-up loses nothing.
    error: str | None = None


class SavedState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    compositions: dict[str, SavedComposition] = {}  # serving
    # Accepted by PUT but not built when the state was written: rebuilt as replacements on restart.
    pending: dict[str, SavedComposition] = {}
    aliases: dict[str, AliasSpec] = {}  # as declared
    alias_states: dict[str, AliasState] = {}  # as they served: weights in force, rollouts
    # The last revision number each name was given, deleted names included: numbers never repeat,
    # so a new `c@1` cannot meet a draining `c@1` (they would share pool claims).
    last_revisions: dict[str, int] = {}


def dump_spec(spec: CompositionSpec) -> dict:
    return spec.model_dump(mode="json", by_alias=True, exclude_unset=True)


class StateStore:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STATE_FILE

    def load(self) -> SavedState | None:
        """The saved state, or None when nothing was saved yet."""
        if not self.path.is_file():
            return None
        try:
            return SavedState.model_validate(json.loads(self.path.read_text()))
        except (ValueError, ValidationError) as e:  # only a hand edit gets here: writes are atomic
            raise SpecError(f"{self.path}: cannot restore the saved compositions: {e}") from None

    def save(self, state: SavedState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{STATE_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(state.model_dump_json(indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
