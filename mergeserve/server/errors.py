"""Every error leaves the server as OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

REF = "#/components/schemas/{model}"
# An error answers a request of up to 16 MB: it says what is wrong, it does not echo the request.
MAX_ERROR_CHARS = 2048  # of one error message (inputs quoted in it are clipped before)
MAX_PROBLEMS = 5  # a validation error lists the first few problems and counts the rest
MAX_PROBLEM_CHARS = 300  # of one listed problem (its location can hold a client's dict key)
DESCRIPTIONS = {
    400: "Invalid request: the body is not JSON, a field has the wrong type or range, or a value is not supported",
    401: "Missing or invalid API key",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request too large",
    422: "The request is well formed but cannot be served (e.g. the chat template refuses the messages)",
    429: "Too many requests waiting; retry after the Retry-After header's seconds",
    500: "Internal server error",
    503: "Not ready yet; retry after the Retry-After header's seconds",
    507: "The server is at its memory budget: nothing new is built until memory is freed",
}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: the body of every 4xx and 5xx this server sends."""

    error: ErrorBody


HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}},
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for the error statuses it can send, each with the envelope as its body."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": DESCRIPTIONS.get(status, "Error")}
        if status in HEADERS:
            out[status]["headers"] = HEADERS[status]
    return out


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
    error = {"message": clip(message, MAX_ERROR_CHARS), "type": type, "param": param and clip(param, 80), "code": code}
    return JSONResponse({"error": error}, status_code=status)


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to at most `limit` characters, saying how many it left out."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text) - limit} more characters)"
    return text[: max(limit - len(note), 0)] + note


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
    problems = [
        clip(f"{_where(tuple(e['loc'])) or 'request body'}: {e['msg']}", MAX_PROBLEM_CHARS) for e in errors[:MAX_PROBLEMS]
    ]
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    first = tuple(errors[0]["loc"]) if errors else ()
    # The top-level field is the param: pydantic's union branches make deeper paths noisy.
    param = str(first[1]) if len(first) > 1 and first[0] == "body" else None
    return error_response(400, "; ".join(problems), param=param)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    response = error_response(exc.status_code, message, type=type)
    response.headers.update(exc.headers or {})  # e.g. a 405's Allow
    return response


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after sending this, so the server logs the traceback once.
    return error_response(500, "internal server error", type="server_error")


def _document_envelope(app: FastAPI) -> None:
    """FastAPI documents a 422 HTTPValidationError for every route that validates input; we send
    those errors as a 400 envelope (`_validation_error`), so the schema says 400 instead."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        envelope = ErrorResponse.model_json_schema(ref_template=REF)
        components.update(envelope.pop("$defs", {}))
        components.setdefault(ErrorResponse.__name__, envelope)
        ref = {"$ref": REF.format(model=ErrorResponse.__name__)}
        for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
            documented = operation.setdefault("responses", {})
            if "HTTPValidationError" in str(documented.get("422")):
                del documented["422"]  # a 422 the route declares itself (its own errors) stays
            if "requestBody" in operation or operation.get("parameters"):
                documented.setdefault(
                    "400", {"description": DESCRIPTIONS[400], "content": {"application/json": {"schema": ref}}},
                )
        if "HTTPValidationError" not in str(schema.get("paths")):
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    _document_envelope(app)
