"""Bearer-key authentication: API keys guard /v1, an admin key guards the admin routes.

Keys are compared in constant time against every configured key, so neither a match nor
its position leaks through timing; they are never logged or echoed back.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from mergeserve.server.errors import APIError
from mergeserve.spec import ServeConfig

API_KEYS_ENV = "MERGESERVE_API_KEYS"
# vLLM's adapter routes, which cluster routers call: under /v1, but they change what is served.
ADMIN_V1_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
ADMIN_KEY_ENV = "MERGESERVE_ADMIN_KEY"


@dataclass(frozen=True)
class Auth:
    api_keys: tuple[str, ...] = ()  # empty: /v1 is open
    admin_key: str | None = None  # None: the admin routes are closed

    @classmethod
    def from_config(cls, config: ServeConfig, environ: Mapping[str, str] = os.environ) -> Auth:
        from_env = [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        keys = [k.get_secret_value() for k in config.api_keys] + from_env
        admin = environ.get(ADMIN_KEY_ENV, "").strip() or (config.admin_key and config.admin_key.get_secret_value())
        return cls(tuple(dict.fromkeys(keys)), admin or None)

    def check_api_key(self, request: Request) -> None:
        if self.api_keys and not _matches(_bearer(request), self.api_keys):
            raise _unauthorized(request)

    def check_admin_key(self, request: Request) -> None:
        if self.admin_key is None:
            raise APIError(403, f"the admin API is disabled; set {ADMIN_KEY_ENV} to enable it", code="admin_disabled")
        if not _matches(_bearer(request), (self.admin_key,)):
            raise _unauthorized(request)


class APIKeyMiddleware:
    """Checks /v1 keys and the admin key before a route reads the body, so a request without a
    valid key gets 401 even when its body is malformed or huge (a route dependency would run
    after body parsing)."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        admin = path.startswith("/admin") or path in ADMIN_V1_PATHS
        check = self.auth.check_admin_key if admin else self.auth.check_api_key if path.startswith("/v1") else None
        if check is not None:
            try:
                check(Request(scope))
            except APIError as e:
                await e.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def require_admin(request: Request) -> None:
    """FastAPI dependency for the admin routes."""
    _auth(request).check_admin_key(request)


def _auth(request: Request) -> Auth:
    return getattr(request.app.state, "auth", None) or Auth()


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _matches(given: str | None, keys: tuple[str, ...]) -> bool:
    if given is None:
        return False
    found = False
    for key in keys:  # no early exit: every key costs the same whether or not it matches
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def _unauthorized(request: Request) -> APIError:
    given = "authorization" in request.headers
    message = "invalid API key" if given else "missing API key: send the header `Authorization: Bearer <key>`"
    return APIError(
        401, message, type="invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
    )
