"""Structured logs to stderr: logfmt (default) or JSON lines.

Every record is an event name plus fields; connection records carry
``conn``.  Callers pass fields with ``extra={"fields": {...}}`` (see
:func:`fields`).  Nothing here ever sees an AUTH argument or a SASL
payload: the proxy never hands them to a log call.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any


def fields(**values: object) -> dict[str, Mapping[str, object]]:
    """``extra=`` for a log call: ``log.info("violation", extra=fields(conn=1))``."""
    return {"fields": values}


def _timestamp(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info event=violation conn=3 ...``"""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={_timestamp(record)}",
            f"level={record.levelname.lower()}",
            f"event={_logfmt_value(record.getMessage())}",
        ]
        extra: Mapping[str, Any] = getattr(record, "fields", {})
        parts += [f"{k}={_logfmt_value(v)}" for k, v in extra.items()]
        if record.exc_info:
            parts.append(f"exception={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        obj.update(getattr(record, "fields", {}))
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class _Worker(logging.Filter):
    """Adds the worker index to every record (``workers: N``)."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        extra = dict(getattr(record, "fields", {}))
        extra.setdefault("worker", self.worker)
        record.fields = extra
        return True


def setup(level: str = "info", fmt: str = "logfmt", worker: str | None = None) -> None:
    """Send the ``smtpguard`` logger's records to stderr in ``fmt`` at ``level``,
    and those of trio's accept loop (``trio.serve_listeners``: it reports
    EMFILE and friends, and retries)."""
    handler = logging.StreamHandler(sys.stderr)
    if worker is not None:
        handler.addFilter(_Worker(worker))
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    logger = logging.getLogger("smtpguard")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    accept = logging.getLogger("trio.serve_listeners")
    accept.handlers[:] = [handler]
    accept.propagate = False
