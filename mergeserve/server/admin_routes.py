"""Admin API (admin key only): compositions built and swapped while traffic flows, A/B aliases, the pool.

PUT returns 202 at once with a status URL; the build runs on the builder's thread and the
new revision replaces the live one only when ready. A failed build leaves the live one serving.
The admin key chooses only what the serve config offers: a spec names a vLLM profile, an
upstream under the allowlist and a key variable from its list, or is refused (403).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse, PlainTextResponse

from mergeserve.experts import CheckpointError
from mergeserve.server.ab.report import report
from mergeserve.server.ab.tally import Tallies
from mergeserve.server.auth import require_admin
from mergeserve.server.backends.policy import NotAllowed
from mergeserve.server.builder import Builder
from mergeserve.server.errors import APIError, bad_request, responses
from mergeserve.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
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
    def __init__(
        self, registry: Registry, builder: Builder, relative_to: Path, limits: AdminLimits = AdminLimits(),
        tallies: Tallies | None = None,
    ) -> None:
        """tallies: what the A/B aliases' targets did (the metrics' own), for their reports."""
        self.registry, self.builder, self.relative_to = registry, builder, relative_to
        self.limits, self.tallies = limits, tallies or Tallies()
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
        r.add_api_route("/aliases/{name}/report", self.alias_report, methods=["GET"], responses=responses(404))
        r.add_api_route("/pool", self.pool, methods=["GET"])
        # vLLM's adapter routes, as cluster routers (Gateway API Inference Extension, production-stack) call them.
        v = self.adapter_router = APIRouter(
            prefix="/v1", dependencies=[Depends(require_admin)], tags=["admin"], responses=responses(400, 401, 403, 404),
        )
        text = {200: {"description": "Done, in vLLM's words", "content": {"text/plain": {"schema": {"type": "string"}}}}}
        v.add_api_route("/load_lora_adapter", self.load_lora_adapter, methods=["POST"], responses=text)
        v.add_api_route("/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"], responses=text)

    async def list_compositions(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._status(*entry) for entry in self.registry.entries()]}

    async def get_composition(self, name: str) -> dict[str, Any]:
        return self._status(name, *self.registry.revision(name))

    async def put_composition(self, name: str, spec: dict = Body(...)) -> JSONResponse:
        _check_name(name)  # the body's size is bounded by server/body_limit.py, before it is parsed
        if spec.setdefault("name", name) != name:
            raise bad_request(f"the spec's name {spec['name']!r} differs from the URL's {name!r}", param="name")
        revision, _ = await self._submit(name, spec)
        url = f"/admin/compositions/{name}"
        body = {"name": name, "revision": revision.number, "state": revision.state, "status_url": url}
        return JSONResponse(body, status_code=202, headers={"Location": url})

    async def _submit(self, name: str, spec: dict) -> tuple[Revision, Future]:
        """Check `spec` and start its build: the new revision and the build's future."""
        self._check_room(name)
        try:
            parsed = parse_composition(spec, self.relative_to, origin=f"composition {name!r}")
            await asyncio.to_thread(self.builder.check, parsed)  # it walks the sources' folders
            self._check_room(name)  # again: other requests ran while the sources were checked
            return self.builder.submit(parsed, checked=True)
        except NotAllowed as e:  # a vLLM profile, upstream or key variable the serve config does not offer
            raise APIError(403, str(e), param=e.field, code="not_allowed") from None
        except (SpecError, CheckpointError) as e:
            raise bad_request(str(e), code="invalid_spec") from None
        except OSError as e:
            raise not_saved(e, "nothing was built; the live revision keeps serving") from e

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        """vLLM's route: the PEFT folder `lora_path` served as model `lora_name`, a one-adapter
        composition over the base the served compositions share (served as they are: locally, or
        as an adapter of that base's vLLM engine). 200 once it serves; 400 for a name in use
        (unless load_inplace: then it replaces it), a folder that does not load, or no single base."""
        name = body.lora_name
        _check_name(name)
        if name in self.registry.all_names() and not body.load_inplace:
            raise bad_request(f"the lora adapter {name!r} has already been loaded", param="lora_name", code="already_loaded")
        spec = self._adapter_spec(name, body.lora_path)
        revision, build = await self._submit(name, spec)
        await asyncio.wrap_future(build)
        if revision.state != "ready":
            raise bad_request(f"the lora adapter {name!r} could not be served: {revision.error}", param="lora_path",
                              code="invalid_adapter")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        if body.lora_name not in self.registry.all_names():
            raise APIError(404, f"the lora adapter {body.lora_name!r} cannot be found", param="lora_name", code="model_not_found")
        await self.delete_composition(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def _adapter_spec(self, name: str, path: str) -> dict:
        """A one-adapter composition over the base every served composition is built on, served as
        the first of them is (backend, vLLM options, dtype)."""
        built = [live.spec for _, live, _ in self.registry.entries() if live is not None and live.spec is not None
                 and live.spec.base is not None and not live.spec.routes_requests]
        bases = sorted({s.base for s in built})
        if len(bases) != 1:
            raise bad_request(f"the served compositions are built on {len(bases)} bases {bases[:4]}; with other than one, "
                              "PUT /admin/compositions/{name} with the adapter's base named", param="lora_path", code="no_single_base")
        like = dump_spec(built[0])
        serving = {k: like[k] for k in ("backend", "vllm", "dtype") if k in like}
        return {"name": name, "base": bases[0], "experts": [{"name": name, "source": path}], **serving}

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
        return {"object": "list", "data": [self._alias(n) for n in self.registry.aliases()]}

    async def put_alias(self, name: str, alias: AliasSpec) -> dict[str, Any]:
        """Declare an alias; the same declaration again changes nothing (a rollout in progress goes on)."""
        _check_name(name)
        self.registry.set_alias(name, alias)
        self._save()
        return self._alias(name)

    def _alias(self, name: str) -> dict[str, Any]:
        """The alias as declared, with the weights in force (a rollout sets them) and their generation."""
        spec, state = self.registry.alias(name)
        return {"name": name, **spec.model_dump(), "weights": state.weights, "generation": state.generation,
                "rollout_status": state.rollout.status if state.rollout else None}

    async def alias_report(self, name: str) -> dict[str, Any]:
        """Each target since the alias's weights last changed, each variant against the control (the
        first target) with an always-valid verdict, and the rollout's state and decisions."""
        spec, state = self.registry.alias(name)
        return report(name, spec, state, self.tallies.snapshot(name, state.generation, spec.targets))

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
            "compile": _compile_state(live),
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


def _compile_state(live: Revision | None) -> dict[str, Any] | None:
    """The in-process engine's compiled decode step (engine/compiled.py); None when not compiling."""
    engine = live.backend.engine if live and live.backend else None
    return getattr(engine, "compile_state", None)


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
