"""Errors of the HTTP server in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

Kept apart from the app so that the upload parser and the scheduler can raise them without
importing FastAPI: the handlers turn an APIError into its JSON answer in one place.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class APIError(Exception):
    """An error answered with `status` and OpenAI's error object (optional extra `headers`)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body: also what a stream sends as its last event when it fails after starting."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, with all four keys always present (clients look them up)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer, for the OpenAPI schema."""

    error: ErrorObject


# What each error status means on this server (generic: a route lists the ones it can send).
STATUS_DOCS = {
    400: "Invalid request: malformed JSON or Content-Length, a bad, unknown or unsupported field, a server "
         "bound passed (max_tokens, prompts, messages)",
    401: "Missing or wrong API key (only when the server has one; GET is open)",
    403: "Forbidden by the server's configuration",
    404: "No such model or adapter",
    408: "The request body did not arrive whole within the server's --body-timeout (connection closed)",
    409: "The library is busy (another write holds it), or an adapter a waiting request arrived with was "
         "replaced; retry",
    413: "The request body (or an unpacked archive) is over the server's limit",
    422: "The adapter is refused (invalid files, wrong base model)",
    429: "The request queue is full; retry shortly",
    503: "The server's worker is not running (stopped or shutting down)",
    504: "The request did not finish within its timeout (the server's or the body's `timeout`)",
    507: "The library's storage is full or read-only; nothing was changed",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for the error `statuses` a route really sends, with the error body."""
    return {s: {"model": ErrorResponse, "description": STATUS_DOCS[s]} for s in statuses}


__all__ = ["APIError", "error_body", "ErrorResponse", "error_responses", "STATUS_DOCS"]
