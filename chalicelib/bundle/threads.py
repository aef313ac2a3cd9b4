"""The background threads of stream work: one thread that inflates, one that deflates.

Reading a bundle inflates the next chunk while the caller parses the current one, and writing one
compresses a batch while the caller frames the next files: zlib, hashlib and file I/O release the
GIL, so on 2 cores each pass takes about 60-70 % of the time it takes in one thread. Each pool has a
single thread, so the work one stream hands over runs in the order it was handed over; the output
is byte for byte the same as doing it in the caller's thread.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_pools: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def worker(kind: str) -> ThreadPoolExecutor:
    """The single-thread pool for `kind` ("inflate" or "deflate"), started on first use."""
    pool = _pools.get(kind)
    if pool is None:
        with _lock:
            pool = _pools.get(kind)
            if pool is None:
                pool = _pools[kind] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dagcast-{kind}")
    return pool


def _forget() -> None:
    global _lock
    _pools.clear()  # a forked child has none of its parent's threads: it starts its own when it needs them
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget)
