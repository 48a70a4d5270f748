"""Log output: one line per event, plain text for people or JSON for collectors.

Events about one message carry its ids as record attributes (`extra=`):
`request_id` (the X-Request-Id of the proxy request that brought it, kept with
the queued item so its delivery, minutes later, logs the same id), `item` and
`workspace`. The JSON format writes them as fields; the plain format's messages
name them in the text already.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

FORMATS = ("plain", "json")
CONTEXT_FIELDS = ("request_id", "item", "workspace")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def context(
    request_id: str | None = None, item: str | None = None, workspace: str | None = None
) -> dict[str, Any]:
    """`extra=` for a log call about one request or item."""
    return {"request_id": request_id, "item": item, "workspace": workspace}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339 UTC), level, logger, message, ids."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z"
        line: dict[str, Any] = {
            "time": stamp,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # aiohttp's access log would be a second line per request; a2ad logs events.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
