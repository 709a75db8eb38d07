"""Request body limits counted on the bytes that arrive, not on what Content-Length claims.

A declared length over the limit is refused before anything is read. A chunked body (no
Content-Length) is counted as it streams in, and the client gets a 413 in the OpenAI
envelope the moment it passes the limit: nothing past the limit is buffered.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mergeserve.server.errors import APIError

MAX_ADMIN_BYTES = 1 << 20  # a composition spec or an alias
MAX_V1_BYTES = 16 << 20  # a request of token ids at max_model_len is well under this


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limits: tuple[tuple[str, int], ...] = (("/admin", MAX_ADMIN_BYTES), ("/v1", MAX_V1_BYTES))) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = next((n for prefix, n in self.limits if scope["type"] == "http" and scope["path"].startswith(prefix)), None)
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(limit).response()(scope, receive, send)
            return
        received, refused = 0, False

        async def counted() -> Message:
            # Past the limit the 413 goes out at once and the app sees the client gone: whatever
            # it answers to that is dropped (FastAPI would turn an error raised here into a 400).
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not refused:
                    refused = True
                    await too_large(limit).response()(scope, receive, send)
            return {"type": "http.disconnect"} if refused else message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted, unless_refused)
        except Exception:
            if not refused:
                raise


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body may be at most {limit} bytes", code="too_large")
