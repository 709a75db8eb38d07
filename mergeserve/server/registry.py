"""Registry: the one owner of the served compositions, their revisions and the A/B aliases.

A request leases the live revision of a composition for as long as it runs. Replacing a
composition installs the new revision for every later lease; the old one is retired and
freed (the `on_free` callback) when its last lease ends, so requests in flight finish
where they started. A name's revision numbers never repeat, across deletes too: a revision's
id (`name@number`) is what it claims pool checkpoints under.

The registry holds backends without knowing how they answer requests: it is generic over the
backend type, of which it (and the metrics that read it) needs only what `Served` names.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

from mergeserve.server.ab.alias_state import AliasState
from mergeserve.server.aliases import pick
from mergeserve.server.errors import APIError

if TYPE_CHECKING:
    from mergeserve.engine.engine import Engine
    from mergeserve.spec import AliasSpec, CompositionSpec

State = Literal["building", "ready", "failed"]
RETRY_AFTER_S = "1"
MAX_REMEMBERED_RESPONSES = 100_000  # response id -> composition, for POST /v1/feedback


class Served(Protocol):
    """What the registry and the metrics read of a backend (server/backends/base.Backend)."""

    name: str  # the composition's
    # The in-process engine where there is one (router statistics); None for remote backends.
    engine: Engine | None

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...


B = TypeVar("B", bound=Served)


class ModelNotFound(APIError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            404, f"the model {name!r} does not exist; served models: {', '.join(known) or 'none'}",
            param="model", code="model_not_found",
        )
        self.name = name


def not_ready(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="not_ready", headers={"Retry-After": RETRY_AFTER_S})


@dataclass(eq=False)
class Revision(Generic[B]):
    """One build of a composition: `building` until its backend exists, then `ready` or `failed`."""

    name: str
    number: int
    spec: CompositionSpec | None
    state: State = "building"
    backend: B | None = None
    error: str | None = None
    build_seconds: float | None = None
    memory_bytes: int | None = None
    created: float = field(default_factory=time.time)
    in_flight: int = 0  # open leases
    in_flight_sequences: int = 0  # engine sequences (prompts x n) of the open leases: what admission counts
    retired: bool = False
    # Restored from the state file (or the config): a failed build keeps its name, to be retried.
    keep: bool = False

    @property
    def id(self) -> str:
        """`name@number`: what it claims pool checkpoints under, and what responses report."""
        return f"{self.name}@{self.number}"

    def kv_cache_bytes(self) -> int | None:
        """The KV cache's resident bytes now (an in-process engine's); None where there is none."""
        return getattr(self.backend, "kv_cache_bytes", None)

    def current_memory_bytes(self) -> int | None:
        """What it holds now beyond the shared pool: its own weights (measured at build) plus the KV cache."""
        if self.memory_bytes is None:
            return None
        return self.memory_bytes + (self.kv_cache_bytes() or 0)


@dataclass(eq=False)
class Lease(Generic[B]):
    """A request's hold on one revision; release exactly once (further calls are no-ops)."""

    revision: Revision[B]
    alias: str | None
    _release: Callable[[Lease[B]], None]
    generation: int = 0  # the alias's, when one chose the revision (A/B tallies count within it)
    _released: bool = False
    member: str | None = None  # method=route: the member model that serves the request, once routed
    sequences: int = 1  # engine sequences the request runs (prompts x n), in revision.in_flight_sequences

    @property
    def backend(self) -> B:
        assert self.revision.backend is not None
        return self.revision.backend

    @property
    def name(self) -> str:
        return self.revision.name

    @property
    def headers(self) -> dict[str, str]:
        member = {"X-Mergeserve-Member": self.member} if self.member else {}
        return {"X-Mergeserve-Composition": self.revision.name, "X-Mergeserve-Revision": str(self.revision.number)} | member

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self)


@dataclass
class Answered:
    """Who answered a recent response, for its one feedback score."""

    name: str  # the composition
    revision: int
    alias: str | None  # the A/B alias the request named, if any
    generation: int  # the alias's generation then
    experts: dict[str, float] | None = None  # what it was routed to, once it finished (largest share first)

    @property
    def top_expert(self) -> str:
        """The expert with the largest share ("none" without routing): feedback split by it."""
        return next(iter(self.experts), "none") if self.experts else "none"


@dataclass
class _Entry(Generic[B]):
    live: Revision[B] | None = None  # what new requests get
    latest: Revision[B] | None = None  # the newest PUT: live, or a build in progress, or a failed one


class Registry(Generic[B]):
    def __init__(
        self, backends: Iterable[B] = (), on_free: Callable[[Revision[B], B | None], None] | None = None,
    ) -> None:
        self._entries: dict[str, _Entry[B]] = {}
        self._failed_new: dict[str, Revision[B]] = {}  # names whose first build failed, for GET
        self._draining: set[Revision[B]] = set()  # retired, still finishing requests
        self._aliases: dict[str, AliasSpec] = {}  # as declared
        self._alias_states: dict[str, AliasState] = {}  # as they serve: weights in force, rollouts
        self._responses: OrderedDict[str, Answered] = OrderedDict()
        self._scored: set[str] = set()  # response ids that got their one feedback score
        self._last_number: dict[str, int] = {}  # per name, deleted names included
        # Called with a revision that is retired and drained (or failed): its owner frees what it held.
        self.on_free = on_free or (lambda revision, backend: None)
        self._lock = threading.Lock()  # request handlers, the build thread and admin routes all come here
        for backend in backends:
            self.add(backend)

    # --- compositions ----------------------------------------------------------------------
    def add(self, backend: B) -> Revision[B]:
        """Serve an already built backend as a new composition (startup, tests)."""
        with self._lock:
            if backend.name in self._entries:
                raise ValueError(f"a composition named {backend.name!r} is already registered")
        revision = self.begin(backend.name, None)
        self.install(revision, backend, 0.0, None)
        return revision

    def begin(self, name: str, spec: CompositionSpec | None, number: int | None = None, keep: bool = False) -> Revision[B]:
        """Register a build of `name` (new or a replacement); it serves once `install`ed. `number`:
        a restored revision's own; `keep`: see Revision.keep."""
        with self._lock:
            if name in self._aliases:
                raise APIError(409, f"{name!r} is an alias; delete the alias first", code="name_taken")
            entry = self._entries.setdefault(name, _Entry())
            if entry.latest is not None and entry.latest.state == "building":
                raise APIError(409, f"{name!r} is already being built; retry when it is done", code="build_in_progress")
            self._failed_new.pop(name, None)
            number = self._last_number.get(name, 0) + 1 if number is None else number
            self._last_number[name] = max(number, self._last_number.get(name, 0))
            entry.latest = Revision(name, number, spec, keep=keep)
            return entry.latest

    def last_numbers(self) -> dict[str, int]:
        """The last revision number given to each name, deleted names included (for the state file)."""
        with self._lock:
            return dict(self._last_number)

    def reserve_numbers(self, last: dict[str, int]) -> None:
        """Numbers given out before a restart: later revisions of these names count on from them."""
        with self._lock:
            for name, number in last.items():
                self._last_number[name] = max(number, self._last_number.get(name, 0))

    def install(self, revision: Revision[B], backend: B, seconds: float, memory_bytes: int | None) -> None:
        """Make a built revision live; the one it replaces drains and is freed."""
        with self._lock:
            revision.backend, revision.state = backend, "ready"
            revision.build_seconds, revision.memory_bytes = seconds, memory_bytes
            entry = self._entries.get(revision.name)
            if entry is None or entry.latest is not revision:  # deleted or superseded while building
                revision.retired = True
                old = revision
            else:
                old, entry.live = entry.live, revision
                if old is not None:
                    old.retired = True
        self._free_if_drained(old)

    def fail(self, revision: Revision[B], error: str) -> None:
        with self._lock:
            revision.state, revision.error = "failed", error
            entry = self._entries.get(revision.name)
            if entry is not None and entry.live is None and entry.latest is revision and not revision.keep:
                del self._entries[revision.name]  # a new name that never served is forgotten
                self._failed_new[revision.name] = revision
        self.on_free(revision, None)

    def remove(self, name: str) -> None:
        with self._lock:
            if self._failed_new.pop(name, None) is not None:
                return
            if name not in self._entries:
                raise ModelNotFound(name, sorted(self._entries))
            users = sorted(a for a, alias in self._aliases.items() if name in alias.targets)
            if users:
                raise APIError(409, f"{name!r} is a target of the aliases {users}; change them first", code="in_use")
            entry = self._entries.pop(name)
            retired = [r for r in {entry.live, entry.latest} if r is not None]
            for revision in retired:
                revision.retired = True
        for revision in retired:
            if revision.state != "building":
                self._free_if_drained(revision)

    def revision(self, name: str) -> tuple[Revision[B] | None, Revision[B] | None]:
        """(live, latest) for `name`, or the last failed build of a name that never served."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                failed = self._failed_new.get(name)
                if failed is None:
                    raise ModelNotFound(name, sorted(self._entries))
                return None, failed
            return entry.live, entry.latest

    def entries(self) -> list[tuple[str, Revision[B] | None, Revision[B] | None]]:
        """(name, live, latest) of every composition (and of new names whose build failed), read at one instant."""
        with self._lock:
            failed = [(name, None, r) for name, r in self._failed_new.items()]
            return [(name, e.live, e.latest) for name, e in self._entries.items()] + failed

    def names(self) -> list[str]:
        """Compositions that serve now."""
        with self._lock:
            return [n for n, e in self._entries.items() if e.live is not None]

    def all_names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def backends(self) -> list[B]:
        with self._lock:
            return [e.live.backend for e in self._entries.values() if e.live is not None and e.live.backend]

    def revisions(self) -> list[Revision[B]]:
        """Every revision that holds memory or is being built: live, latest, and draining ones."""
        with self._lock:
            found = {r for e in self._entries.values() for r in (e.live, e.latest) if r is not None} | self._draining
        return sorted(found, key=lambda r: (r.name, r.number))

    # --- aliases ---------------------------------------------------------------------------
    def set_alias(self, name: str, alias: AliasSpec, state: AliasState | None = None) -> None:
        """Declare `alias`; the same declaration again changes nothing (a rollout goes on). `state`:
        the one it was saved with (a restart), else a fresh one (its weights, a rollout's first step)."""
        with self._lock:
            if name in self._entries:
                raise APIError(409, f"{name!r} is a composition; an alias needs a name of its own", code="name_taken")
            unknown = sorted(set(alias.targets) - set(self._entries))
            if unknown:
                raise APIError(
                    400, f"unknown target compositions {unknown}; known: {sorted(self._entries)}",
                    param="targets", code="model_not_found",
                )
            if state is None and self._aliases.get(name) == alias:
                return
            self._aliases[name] = alias
            self._alias_states[name] = state or AliasState.declared(alias, self._alias_states.get(name))

    def remove_alias(self, name: str) -> None:
        with self._lock:
            if self._aliases.pop(name, None) is None:
                raise APIError(404, f"no alias named {name!r}", code="alias_not_found")
            del self._alias_states[name]

    def alias_states(self) -> dict[str, AliasState]:
        """A copy of each alias's state as it serves."""
        with self._lock:
            return {n: s.model_copy(deep=True) for n, s in self._alias_states.items()}

    def alias(self, name: str) -> tuple[AliasSpec, AliasState]:
        """The alias `name` as declared, and a copy of its state."""
        with self._lock:
            if name not in self._aliases:
                raise APIError(404, f"no alias named {name!r}", code="alias_not_found")
            return self._aliases[name], self._alias_states[name].model_copy(deep=True)

    def update_alias_state(self, name: str, seen: AliasState, new: AliasState) -> bool:
        """Replace the state `seen` (read by the caller) with `new`; False, changing nothing, if the
        alias was redeclared, removed or changed in between."""
        with self._lock:
            if self._alias_states.get(name) != seen:
                return False
            self._alias_states[name] = new
            return True

    def aliases(self) -> dict[str, AliasSpec]:
        with self._lock:
            return dict(self._aliases)

    # --- requests --------------------------------------------------------------------------
    def acquire(self, model: str, sticky_key: str | None = None, sequences: int = 1) -> Lease[B]:
        """Lease the live revision `model` names (a composition, or an alias resolved to one target)
        for a request of `sequences` engine sequences."""
        with self._lock:
            alias = self._aliases.get(model)
            generation = 0
            if alias is not None:
                state = self._alias_states[model]
                ready = {t: w for t, w in state.weights.items() if w > 0 and self._live(t) is not None}
                if not ready:
                    raise not_ready(f"no target of the alias {model!r} is ready; retry shortly")
                target, generation = pick(alias, model, ready, sticky_key), state.generation
            else:
                target = model
            revision = self._live(target)
            if revision is None:
                if not any(e.live for e in self._entries.values()):
                    raise not_ready("no model is loaded yet; retry shortly")
                if target in self._entries:
                    failed = self._entries[target].latest.state == "failed"  # kept: it is retried
                    doing = "not built yet (its last build failed and is retried)" if failed else "still being built"
                    raise not_ready(f"the model {target!r} is {doing}; retry shortly")
                raise ModelNotFound(model, sorted([*self._entries, *self._aliases]))
            revision.in_flight += 1
            revision.in_flight_sequences += sequences
            return Lease(revision, model if alias is not None else None, self._release, generation=generation, sequences=sequences)

    def remember(self, response_id: str, lease: Lease[B]) -> None:
        with self._lock:
            self._responses[response_id] = Answered(lease.revision.name, lease.revision.number, lease.alias, lease.generation)
            while len(self._responses) > MAX_REMEMBERED_RESPONSES:
                self._scored.discard(self._responses.popitem(last=False)[0])

    def note_experts(self, response_id: str, experts: dict[str, float]) -> None:
        """A remembered response finished, routed to `experts`."""
        with self._lock:
            if (answered := self._responses.get(response_id)) is not None:
                answered.experts = experts

    def score(self, response_id: str) -> Answered:
        """Who answered a recent response, for its one feedback score: a second would weigh that
        response twice in an A/B comparison."""
        with self._lock:
            served = self._responses.get(response_id)
            if served is None:
                raise APIError(404, f"no recent response has the id {response_id!r}", param="id", code="response_not_found")
            if response_id in self._scored:
                raise APIError(409, f"the response {response_id!r} already has a score; a response takes one",
                               param="id", code="already_scored")
            self._scored.add(response_id)
            return served

    def _live(self, name: str) -> Revision[B] | None:
        entry = self._entries.get(name)
        return entry.live if entry is not None else None

    def _release(self, lease: Lease[B]) -> None:
        with self._lock:
            lease.revision.in_flight -= 1
            lease.revision.in_flight_sequences -= lease.sequences
        self._free_if_drained(lease.revision)

    def _free_if_drained(self, revision: Revision[B] | None) -> None:
        if revision is None:
            return
        with self._lock:
            if not revision.retired or revision.backend is None:
                return
            free = revision.in_flight == 0
            backend, revision.backend = (revision.backend, None) if free else (None, revision.backend)
            (self._draining.discard if free else self._draining.add)(revision)
        if free:
            self.on_free(revision, backend)
