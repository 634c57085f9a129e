"""One structured log line per HTTP request of the server, to stderr through `logging`.

    configure("json")   # {"ts": ..., "request_id": "...", "method": "POST", "path": "/v1/completions",
                        #  "status": 200, "latency_s": 0.21, "route": "capital", "experts": {"capital": 1.0},
                        #  "prompt_tokens": 31, "completion_tokens": 3, "finish_reason": "stop"}
    configure("text")   # the same fields as key=value pairs after a timestamp

Why JSON lines: a log shipper (or `jq`) reads them without a parser of our own; the text form is
for a person at a terminal. The logger is `modulora.requests`; without `configure` nothing is
printed (INFO is below Python's last-resort level), so a library user embedding the app chooses.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

LOGGER = "modulora.requests"
FORMATS = ("json", "text")
_FIELDS = "fields"  # the attribute of a LogRecord holding a request's fields


class JsonLines(logging.Formatter):
    """A record as one JSON object: time, level, message and the request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "event": record.getMessage()}
        out.update(getattr(record, _FIELDS, {}))
        return json.dumps(out, default=str, separators=(",", ":"))


_BARE = re.compile(r"[A-Za-z0-9_.,/:@+-]+")  # what a text-log value may be without quotes


def text_value(value) -> str:
    """One value of the text log as a single token that cannot end the line or fake a key: a
    plain string (or key) stays bare; a number, bool or null is its JSON; anything else is JSON,
    and JSON-quoted again when it holds a space or `=` (JSON escapes every control character
    and, ASCII only, every line separator)."""
    if isinstance(value, str):
        return value if _BARE.fullmatch(value) else json.dumps(value)
    text = json.dumps(value, default=str, separators=(",", ":"))
    if isinstance(value, (bool, int, float)) or value is None or (" " not in text and "=" not in text):
        return text
    return json.dumps(text)


class KeyValues(logging.Formatter):
    """A record as `TIME LEVEL event key=value ...`; values are escaped by `text_value`."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [self.formatTime(record), record.levelname.lower(), text_value(record.getMessage())]
        for k, v in getattr(record, _FIELDS, {}).items():
            parts.append(f"{text_value(str(k))}={text_value(v)}")
        return " ".join(parts)


def configure(fmt: str = "text", stream=None) -> logging.Logger:
    """Send the request log to `stream` (stderr) in `fmt` ("json" or "text"); replaces an earlier setup."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; use json or text")
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else KeyValues())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


QUIET_PATHS = ("/health", "/metrics")  # polled by monitors: their successes are logged at DEBUG


def log_request(fields: dict) -> None:
    """Log one finished request; 5xx answers at ERROR, 4xx at WARNING, the rest at INFO (DEBUG
    for successful polls of QUIET_PATHS, which would otherwise drown the rest)."""
    status = int(fields.get("status", 0) or 0)
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    if level == logging.INFO and fields.get("path") in QUIET_PATHS:
        level = logging.DEBUG
    logging.getLogger(LOGGER).log(level, "request", extra={_FIELDS: fields})


__all__ = ["configure", "log_request", "text_value", "JsonLines", "KeyValues", "LOGGER", "FORMATS"]
