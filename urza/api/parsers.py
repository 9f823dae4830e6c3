from __future__ import annotations

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from urza.errors import ApplicationError

MAX_DEPTH = 64
"""Nesting the API accepts: the deepest document it defines (a graph's seed stats) is 5."""

MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
"""The integers a JSON body may hold, MIN_INT to MAX_INT: what a database bigint stores."""


def check_json(data: object) -> None:
    """Reject what parses as JSON but cannot be stored or echoed back: nesting deeper than
    `MAX_DEPTH`, integers beyond a bigint, and strings (values or keys) with a NUL
    character (Postgres text and jsonb refuse it) or a lone UTF-16 surrogate (not valid
    Unicode: it cannot be written out as UTF-8). Iterative, so no input can exhaust the
    stack; where a value sits is spelled out only for the error."""
    # Each entry: (value, depth, where), where = (parent's where, key or index) or None.
    stack: list[tuple[object, int, tuple | None]] = [(data, 0, None)]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise ParseError(f"{_path(where, 120)}: JSON nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, (where, key), "a key")
                stack.append((item, depth + 1, (where, key)))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, (where, i)) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where, "a string")
        elif isinstance(value, int) and not MIN_INT <= value <= MAX_INT:
            raise ParseError(
                f"{_path(where)}: integer out of range (a signed 64-bit integer, "
                f"{MIN_INT} to {MAX_INT})"
            )


def _path(where: tuple | None, limit: int | None = None) -> str:
    """``config.layers[0].name`` from a chain of (parent, key or index); keys are printed
    with their bad characters escaped. Past `limit` characters the middle is elided."""
    parts: list[str] = []
    while where is not None:
        where, step = where
        if isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            shown = step.encode("utf-8", "backslashreplace").decode("utf-8")
            shown = shown.replace("\x00", "\\u0000")
            shown = shown if len(shown) <= 64 else shown[:61] + "..."
            parts.append(("." if where is not None else "") + shown)
    path = "".join(reversed(parts)) or "body"
    if limit is not None and len(path) > limit:
        keep = (limit - 3) // 2
        path = f"{path[:keep]}...{path[-keep:]}"
    return path


def _check_text(text: str, where: tuple | None, what: str) -> None:
    if "\x00" in text:
        raise ParseError(
            f"{_path(where)}: {what} contains a NUL character (\\u0000), which is not stored"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ParseError(
            f"{_path(where)}: {what} contains a lone UTF-16 surrogate (\\ud800-\\udfff), "
            "which is not valid Unicode"
        ) from None


class BoundedJSONParser(JSONParser):
    """JSON bodies up to `DATA_UPLOAD_MAX_MEMORY_SIZE` bytes (larger ones get a 413), and
    only what `check_json` accepts."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        request = (parser_context or {}).get("request")
        declared = 0
        if request is not None:
            try:
                declared = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                declared = 0
        if limit is not None and declared > limit:
            raise ApplicationError(
                f"request body is {declared} bytes; the limit is {limit}",
                code="payload_too_large",
                status=413,
            )
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON nested more than {MAX_DEPTH} levels deep") from None
        check_json(data)
        return data
