"""The FastAPI app: OpenAI routes (behind API keys when configured), the admin API (behind the
admin key), and open /health, /ready and /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mergeserve import __version__
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import errors
from mergeserve.server.ab.rollout import Rollouts
from mergeserve.server.admin_routes import AdminLimits, AdminRoutes
from mergeserve.server.auth import APIKeyMiddleware, Auth
from mergeserve.server.body_limit import BodyLimitMiddleware
from mergeserve.server.builder import Builder
from mergeserve.server.metrics import HTTPMetricsMiddleware, Metrics
from mergeserve.server.openai_routes import OpenAIRoutes
from mergeserve.server.registry import Registry


def create_app(
    registry: Registry, executor: Executor, auth: Auth = Auth(), builder: Builder | None = None,
    relative_to: Path = Path("."), limits: AdminLimits = AdminLimits(),
) -> FastAPI:
    """`builder` builds what the admin API asks for (default: a fresh, unconfined pool);
    `relative_to`: the folder relative sources in admin specs are resolved against."""
    builder = builder or Builder(registry, ExpertPool(), executor)

    metrics = Metrics(registry.backends, registry.revisions, registry.alias_states, max_models=limits.max_compositions)
    rollouts = Rollouts(registry, metrics.tallies, metrics.rollout_decision, builder.save)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        executor.start()
        rollouts.start()
        try:
            yield
        finally:
            rollouts.stop()
            executor.stop()
            builder.shutdown()

    app = FastAPI(title="mergeserve", version=__version__, lifespan=lifespan)
    app.state.registry, app.state.executor, app.state.metrics, app.state.auth = registry, executor, metrics, auth
    app.state.builder, app.state.rollouts = builder, rollouts
    errors.install(app)
    app.add_middleware(BodyLimitMiddleware)  # inside the key check: a request without a key is 401 whatever its size
    app.add_middleware(APIKeyMiddleware, auth=auth)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)  # added last: outermost, so it counts 401s too
    app.include_router(OpenAIRoutes(registry, metrics).router)
    admin = AdminRoutes(registry, builder, relative_to.resolve(), limits, metrics.tallies)
    app.include_router(admin.router)
    app.include_router(admin.adapter_router)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.state.draining = False  # set on SIGTERM (server/serve.py): take this replica out of rotation

    @app.get("/ready", responses={503: {"description": "No composition is ready, or the server is shutting down"}})
    async def ready() -> JSONResponse:
        """200 while at least one composition serves and the server is not shutting down."""
        names = registry.names()
        ok = bool(names) and not app.state.draining
        body = {"ready": ok, "models": names, "draining": app.state.draining}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
