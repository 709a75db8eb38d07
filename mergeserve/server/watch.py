"""`mergeserve serve --watch`: edits of the serve config file applied to the running server.

Replicas behind one Service agree by all following the same file (a mounted ConfigMap,
which the kubelet swaps in place): a composition whose spec changed is rebuilt and
hot-swapped, one no longer listed is drained and removed, aliases are set or removed to
match. Compositions added through the admin API are left alone. A file is applied once it
has stopped changing (the same on two polls in a row), so one caught half-written is not;
one that does not parse, or any other error, is logged and the last good config stays in
force. A change that cannot be applied yet (its composition is still building) is retried
at the next poll.

Not covered: a composition removed from the file while a replica with a state dir was down
comes back with that replica's saved state (nothing records which saved compositions the
file had declared); remove it through the admin API, or run replicas without state_dir.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from mergeserve.experts import CheckpointError
from mergeserve.server.builder import Builder
from mergeserve.server.errors import APIError
from mergeserve.server.state import dump_spec
from mergeserve.spec import ServeConfig, SpecError, load_serve_config

log = logging.getLogger(__name__)
POLL_S = 2.0
RESTART_FIELDS = ("host", "port", "engine", "api_keys", "admin_key", "source_roots", "state_dir", "dtype", "lora")


class ConfigWatcher:
    def __init__(self, path: Path, builder: Builder, poll_s: float = POLL_S) -> None:
        """The first poll that finds the file as the one before applies it: a server that restored
        its state dir comes back to what the file says now (an edit made while it was down)."""
        self.path, self.builder, self.poll_s = path, builder, poll_s
        self.current = load_serve_config(path)  # as the file says, without command-line overrides
        self._seen: tuple | None = None  # the file as the previous poll saw it
        self._applied: tuple | None = None  # the file as last applied (or refused)
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mergeserve-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # the watcher outlives any one bad poll; what serves keeps serving
                log.exception("watching %s: this poll failed; the last good config stays in force", self.path)

    def poll(self) -> None:
        """Apply the file if it has changed and then stayed the same since the previous poll."""
        seen = _signature(self.path)
        stable, self._seen = seen == self._seen, seen
        if not stable or seen == self._applied:
            return
        try:
            done = self.reload()
        except Exception:
            log.exception("%s changed but is not applied; the last good config stays in force", self.path)
            done = True  # tried again once the file changes
        if done:
            self._applied = seen

    def reload(self) -> bool:
        """Apply the file as it is now; False when something must be retried."""
        try:
            new = load_serve_config(self.path)
        except SpecError as e:
            log.error("%s changed but is not applied: %s", self.path, e)
            return True  # nothing to retry until the file changes again
        done = apply(self.builder, self.current, new)
        if done:
            self.current = new
        return done


def apply(builder: Builder, old: ServeConfig, new: ServeConfig) -> bool:
    """Make the server serve `new` where it served `old`; False if a build in progress must finish first."""
    registry, done = builder.registry, True
    for field in RESTART_FIELDS:
        if getattr(old, field) != getattr(new, field):
            log.warning("serve config: %s changed; it takes effect on restart", field)
    for spec in new.compositions:
        known = spec.name in registry.all_names()
        latest = registry.revision(spec.name)[1] if known else None
        if latest is not None and latest.spec is not None and dump_spec(latest.spec) == dump_spec(spec):
            continue
        if latest is not None and latest.state == "building":
            done = False  # retried once that build is done
            continue
        try:
            builder.submit(spec)
            log.info("serve config: %s %s", "rebuilding" if known else "adding", spec.name)
        except (APIError, CheckpointError) as e:
            log.error("serve config: composition %r not applied: %s", spec.name, getattr(e, "message", e))
    for name, alias in new.aliases.items():
        if registry.aliases().get(name) != alias:
            _try(f"alias {name!r}", registry.set_alias, name, alias)
    for name in old.aliases.keys() - new.aliases.keys():
        _try(f"alias {name!r}", registry.remove_alias, name)
    for name in {s.name for s in old.compositions} - {s.name for s in new.compositions}:
        _try(f"composition {name!r}", registry.remove, name)
        log.info("serve config: removed %s (it drains)", name)
    builder.save()
    return done


def _try(what: str, change, *args) -> None:
    try:
        change(*args)
    except APIError as e:
        log.error("serve config: %s not applied: %s", what, e.message)


def _signature(path: Path) -> tuple | None:
    """(mtime, size, content hash) of the file; None where it cannot be read."""
    try:
        stat = os.stat(path)
        return stat.st_mtime_ns, stat.st_size, hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None
