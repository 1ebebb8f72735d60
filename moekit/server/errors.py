"""OpenAI-style errors: `APIError`, the `{"error": {message, type, param, code}}` envelope, handlers.

Every failure the server answers goes through here, so a client always gets
the envelope with a 4xx naming the offending field (or a 5xx only for a
failure of the server itself, which the handlers keep from escaping as a bare
500 page). `from_validation` turns a pydantic ValidationError into one
message that names the field path (`messages[0].role`).

Not here: which requests are refused (schemas.py, app.py).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("moekit.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("body",) and not out:
            continue
        elif _is_type_tag(part):  # pydantic's union branch names (str, list[int], ...): not a field
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list") or "[" in part
                                      or part.startswith(("function-", "tagged-union", "literal[")))


def from_validation(e: ValidationError) -> APIError:
    """One 400 naming the first offending field (unsupported values name theirs)."""
    errors = e.errors()
    first = errors[0]
    err = (first.get("ctx") or {}).get("error")
    if getattr(err, "field", None):
        return APIError(400, str(err), param=err.field, code="unsupported_value")
    param = _path(first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}: it is not an accepted parameter of this endpoint",
                        param=param, code="unknown_field")
    if kind == "missing":
        return APIError(400, f"missing required field {param!r}", param=param, code="missing_field")
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return APIError(400, f"{param or 'body'}: {msg}{shown}", param=param or None, code="invalid_value")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, e: ValidationError):
        return from_validation(e).response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, e: RequestValidationError):
        loc = e.errors()[0].get("loc", ()) if e.errors() else ()
        return APIError(400, f"invalid request: {e.errors()[0].get('msg', 'malformed')}", param=_path(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()
        if e.status_code == 405:
            return APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed").response()
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").response()


__all__ = ["APIError", "from_validation", "install_handlers"]
