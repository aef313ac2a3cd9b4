"""Children of `dagcast local up` die with it.

The stack starts moto server and its sidecars with DAGCAST_PARENT_PID set; each of them calls
`die_with_parent()` first thing, which asks Linux to send it SIGTERM when its parent goes away
(prctl PR_SET_PDEATHSIG), so that even a `kill -9` of `local up` leaves no orphan behind, and the
SIGTERM lets moto write its state and a sidecar deregister. If the parent died before that call,
the child exits at once. Elsewhere (not Linux, no variable) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PARENT_ENV = "DAGCAST_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child that should die with this process."""
    return {**env, PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    wanted = os.environ.pop(PARENT_ENV, "")
    if not wanted.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        return
    if os.getppid() != int(wanted):  # the parent was gone before the request: nobody would send it
        os._exit(0)
