"""The one error type services raise; the API maps it to the JSON error shape."""

from __future__ import annotations

from typing import Any


class ApplicationError(Exception):
    """An error with an HTTP status, a stable code and a message that says what to do."""

    def __init__(
        self, message: str, *, code: str = "invalid", status: int = 400, detail: Any = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.detail = detail if detail is not None else {}
