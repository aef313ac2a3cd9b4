"""moto server for the embedded stack, with DynamoDB writes made atomic across requests.

moto serves each request in a thread, and its transact_write_items snapshots the table,
applies the items, and restores the snapshot when a condition fails, without a lock: a
failed transaction can then roll back another request's committed write. Real DynamoDB
never does that, and dagcast's version assignment relies on it, so every DynamoDB write
here takes one lock. Run as `python -m dagcast.moto_server` with moto_server's arguments.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from moto.dynamodb.models import DynamoDBBackend
from moto.server import main

_WRITE_LOCK = threading.RLock()
WRITES = ("put_item", "update_item", "delete_item", "transact_write_items")


def _serialised(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _WRITE_LOCK:
            return method(*args, **kwargs)

    return locked


def patch() -> None:
    for name in WRITES:
        setattr(DynamoDBBackend, name, _serialised(getattr(DynamoDBBackend, name)))


if __name__ == "__main__":
    patch()
    main()
