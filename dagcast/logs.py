"""Structured logs: a short fixed message, values as fields, one JSON object per line."""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info and record.exc_info[1] is not None:
            doc["error"] = f"{record.exc_info[0].__name__ if record.exc_info[0] else 'Error'}: {record.exc_info[1]}"
        return json.dumps(doc, default=str)


_OWN = "dagcast-cli"


def one_handler() -> None:
    """One handler on the "dagcast" logger, so each line is written once, in one format: the CLI's
    own if it set one up, else the functions' powertools handler (CloudWatch's JSON lines). Chalice
    (whose app is also named "dagcast") and powertools each add one when app.py is imported."""
    root = logging.getLogger("dagcast")
    own = [h for h in root.handlers if h.get_name() == _OWN]
    powertools = [h for h in root.handlers if type(h.formatter).__module__.startswith("aws_lambda_powertools")]
    root.handlers[:] = own or powertools[:1] or root.handlers[:1]
    root.propagate = False


def setup(level: str = "INFO", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.set_name(_OWN)
    root = logging.getLogger("dagcast")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
