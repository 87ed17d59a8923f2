"""OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status it goes with."""
from __future__ import annotations

from typing import Optional


class ApiError(Exception):
    """A request the API refuses: one sentence for the client, the status, and which field was wrong."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
                             429: "rate_limit_error", 503: "server_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def unsupported(message: str, param: str, code: str = "unsupported_value") -> ApiError:
    return ApiError(400, message, param, code)
