"""Every error leaves the server as OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        response = error_response(self.status, self.message, type=self.type, param=self.param, code=self.code)
        response.headers.update(self.headers)
        return response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_response(
    status: int, message: str, *, type: str = "invalid_request_error",
    param: str | None = None, code: str | None = None,
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


def _where(loc: tuple) -> str:
    # ("body", "messages", 0, "content") -> "messages[0].content"
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    messages = [f"{_where(tuple(e['loc'])) or 'request body'}: {e['msg']}" for e in errors]
    first = tuple(errors[0]["loc"]) if errors else ()
    # The top-level field is the param: pydantic's union branches make deeper paths noisy.
    param = str(first[1]) if len(first) > 1 and first[0] == "body" else None
    return error_response(400, "; ".join(messages), param=param)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, message, type=type)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after sending this, so the server logs the traceback once.
    return error_response(500, "internal server error", type="server_error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
