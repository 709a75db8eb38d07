"""FastAPI app: OpenAI routes, health and readiness, Prometheus metrics."""

from mergeserve.server.app import create_app
from mergeserve.server.registry import ModelNotFound, Registry

__all__ = ["ModelNotFound", "Registry", "create_app"]
