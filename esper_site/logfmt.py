"""A log formatter that appends the structured `extra={...}` fields as key=value pairs."""

from __future__ import annotations

import logging

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {
            k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")
        }
        if not fields:
            return line
        return line + " " + " ".join(f"{k}={v}" for k, v in fields.items())
