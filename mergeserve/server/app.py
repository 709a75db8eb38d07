"""The FastAPI app: OpenAI routes (behind API keys when configured) plus open /health, /ready and /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mergeserve import __version__
from mergeserve.server import errors
from mergeserve.server.auth import APIKeyMiddleware, Auth
from mergeserve.server.metrics import HTTPMetricsMiddleware, Metrics
from mergeserve.server.openai_routes import OpenAIRoutes
from mergeserve.server.registry import Registry

if TYPE_CHECKING:
    from mergeserve.engine.executor import Executor


def create_app(registry: Registry, executor: Executor, auth: Auth = Auth()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        executor.start()
        try:
            yield
        finally:
            executor.stop()

    app = FastAPI(title="mergeserve", version=__version__, lifespan=lifespan)
    metrics = Metrics(registry.engines)
    app.state.registry, app.state.executor, app.state.metrics, app.state.auth = registry, executor, metrics, auth
    errors.install(app)
    app.add_middleware(APIKeyMiddleware, auth=auth)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)  # added last: outermost, so it counts 401s too
    app.include_router(OpenAIRoutes(registry, executor, metrics).router)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        names = registry.names()
        return JSONResponse({"ready": bool(names), "models": names}, status_code=200 if names else 503)

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
