"""Errors of the HTTP server in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

Kept apart from the app so that the upload parser and the scheduler can raise them without
importing FastAPI: the handlers turn an APIError into its JSON answer in one place.
"""

from __future__ import annotations

from typing import Any


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


__all__ = ["APIError", "error_body"]
