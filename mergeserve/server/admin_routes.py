"""Admin API (admin key only): compositions built and swapped while traffic flows, A/B aliases, the pool.

PUT returns 202 at once with a status URL; the build runs on the builder's thread and the
new revision replaces the live one only when ready. A failed build leaves the live one serving.
The admin key chooses only what the serve config offers: a spec names a vLLM profile, an
upstream under the allowlist and a key variable from its list, or is refused (403).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse

from mergeserve.experts import CheckpointError
from mergeserve.server.auth import require_admin
from mergeserve.server.backends.policy import NotAllowed
from mergeserve.server.builder import Builder
from mergeserve.server.errors import APIError, bad_request, responses
from mergeserve.server.registry import RETRY_AFTER_S, Registry, Revision
from mergeserve.server.state import dump_spec
from mergeserve.spec import NAME_PATTERN, AliasSpec, ServeConfig, SpecError, parse_composition


def _serve_default(field: str) -> Any:
    return ServeConfig.model_fields[field].default


@dataclass(frozen=True)
class AdminLimits:
    """What the admin API refuses a PUT over, rather than letting memory grow without bound: the
    serve config's fields of these names (ServeConfig says what each means), defaults included."""

    max_compositions: int = _serve_default("max_compositions")
    max_draining: int = _serve_default("max_draining")
    memory_budget_bytes: int | None = _serve_default("memory_budget_bytes")

    @classmethod
    def from_config(cls, config: ServeConfig) -> AdminLimits:
        return cls(config.max_compositions, config.max_draining, config.memory_budget_bytes)


class AdminRoutes:
    def __init__(self, registry: Registry, builder: Builder, relative_to: Path, limits: AdminLimits = AdminLimits()) -> None:
        self.registry, self.builder, self.relative_to = registry, builder, relative_to
        self.limits = limits
        r = self.router = APIRouter(
            prefix="/admin", dependencies=[Depends(require_admin)], tags=["admin"], responses=responses(401, 403),
        )
        r.add_api_route("/compositions", self.list_compositions, methods=["GET"])
        r.add_api_route("/compositions/{name}", self.get_composition, methods=["GET"], responses=responses(404))
        r.add_api_route(
            "/compositions/{name}", self.put_composition, methods=["PUT"], status_code=202,
            responses=responses(409, 413, 507),
        )
        r.add_api_route(
            "/compositions/{name}", self.delete_composition, methods=["DELETE"], responses=responses(404, 409),
        )
        r.add_api_route("/aliases", self.list_aliases, methods=["GET"])
        r.add_api_route("/aliases/{name}", self.put_alias, methods=["PUT"], responses=responses(409))
        r.add_api_route("/aliases/{name}", self.delete_alias, methods=["DELETE"], responses=responses(404))
        r.add_api_route("/pool", self.pool, methods=["GET"])

    async def list_compositions(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._status(*entry) for entry in self.registry.entries()]}

    async def get_composition(self, name: str) -> dict[str, Any]:
        return self._status(name, *self.registry.revision(name))

    async def put_composition(self, name: str, spec: dict = Body(...)) -> JSONResponse:
        _check_name(name)  # the body's size is bounded by server/body_limit.py, before it is parsed
        if spec.setdefault("name", name) != name:
            raise bad_request(f"the spec's name {spec['name']!r} differs from the URL's {name!r}", param="name")
        self._check_room(name)
        try:
            parsed = parse_composition(spec, self.relative_to, origin=f"composition {name!r}")
            await asyncio.to_thread(self.builder.check, parsed)  # it walks the sources' folders
            self._check_room(name)  # again: other requests ran while the sources were checked
            revision, _ = self.builder.submit(parsed, checked=True)
        except NotAllowed as e:  # a vLLM profile, upstream or key variable the serve config does not offer
            raise APIError(403, str(e), param=e.field, code="not_allowed") from None
        except (SpecError, CheckpointError) as e:
            raise bad_request(str(e), code="invalid_spec") from None
        except OSError as e:
            raise not_saved(e, "nothing was built; the live revision keeps serving") from e
        url = f"/admin/compositions/{name}"
        body = {"name": name, "revision": revision.number, "state": revision.state, "status_url": url}
        return JSONResponse(body, status_code=202, headers={"Location": url})

    def _check_room(self, name: str) -> None:
        limits = self.limits
        if name not in self.registry.all_names() and len(self.registry.all_names()) >= limits.max_compositions:
            raise APIError(409, f"this server holds at most {limits.max_compositions} compositions", code="limit")
        draining = [r.number for r in self.registry.revisions() if r.name == name and r.retired and r.backend]
        if len(draining) >= limits.max_draining:
            raise APIError(409, f"{len(draining)} replaced revisions of {name!r} are still draining (revisions {draining}; "
                           f"the limit is {limits.max_draining}); retry once they finish their requests",
                           code="too_many_draining", headers={"Retry-After": RETRY_AFTER_S})
        if limits.memory_budget_bytes is not None and (rss := resident_bytes()) >= limits.memory_budget_bytes:
            raise APIError(507, f"this process holds {rss} bytes, at or past its memory budget of "
                           f"{limits.memory_budget_bytes} bytes; delete a composition or wait for replaced ones to drain",
                           type="server_error", code="memory_budget")

    async def delete_composition(self, name: str) -> dict[str, Any]:
        self.registry.remove(name)
        self._save()
        return {"name": name, "deleted": True}

    async def list_aliases(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"name": n, **a.model_dump()} for n, a in self.registry.aliases().items()]}

    async def put_alias(self, name: str, alias: AliasSpec) -> dict[str, Any]:
        _check_name(name)
        self.registry.set_alias(name, alias)
        self._save()
        return {"name": name, **alias.model_dump()}

    async def delete_alias(self, name: str) -> dict[str, Any]:
        self.registry.remove_alias(name)
        self._save()
        return {"name": name, "deleted": True}

    def _save(self) -> None:
        try:
            self.builder.save()
        except OSError as e:
            raise not_saved(e, "the change is in effect until this process exits") from e

    async def pool(self) -> dict[str, Any]:
        return {"experts": self.builder.pool.sources(), "resident_bytes": resident_bytes()}

    def _status(self, name: str, live: Revision | None, latest: Revision | None) -> dict[str, Any]:
        shown = latest or live
        draining = [r.number for r in self.registry.revisions() if r.name == name and r.retired and r.backend]
        return {
            "name": name,
            "state": shown.state,
            "revision": shown.number,
            "serving_revision": live.number if live else None,
            "draining_revisions": draining,
            "error": shown.error,
            "build_seconds": shown.build_seconds,
            "memory_bytes": (live or shown).current_memory_bytes(),  # now, KV cache included
            "kv_cache_bytes": (live or shown).kv_cache_bytes(),
            "spec": _spec(live or shown),
            "router": _router_stats(live),
            "backend": _backend(live, shown),
        }


def not_saved(error: OSError, consequence: str) -> APIError:
    """500 naming why the state file could not be written (it still holds the previous state)."""
    return APIError(500, f"the state file could not be written ({error}); it keeps the previous state, and {consequence}",
                    type="server_error", code="state_not_saved")


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name) or len(name) > 128:
        raise bad_request(f"{name!r} is not a valid name (letters, digits, _ . : -)", param="name")


def _spec(revision: Revision) -> dict | None:
    return dump_spec(revision.spec) if revision.spec is not None else None


def _backend(live: Revision | None, shown: Revision) -> dict[str, Any]:
    """What serves it (for a child server: its state, restarts and log tail)."""
    if live is not None and live.backend is not None:
        return live.backend.describe()
    return {"kind": shown.spec.backend if shown.spec is not None else "local"}


def _router_stats(live: Revision | None) -> dict[str, Any] | None:
    """Share of routed tokens (and mean weight) per expert over all MoE layers, since the revision went live."""
    engine = live.backend.engine if live and live.backend else None
    if engine is None or engine.expert_load is None:
        return None
    tokens = engine.expert_load.sum(0)  # [E]
    weights = engine.expert_weight.sum(0)  # [E]
    total = max(int(tokens.sum()), 1)
    return {
        "kind": live.spec.router.kind if live.spec else None,
        "experts": [
            {"name": n, "token_share": int(t) / total, "mean_weight": float(w) / max(int(t), 1)}
            for n, t, w in zip(engine.expert_names, tokens.tolist(), weights.tolist())
        ],
    }


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
