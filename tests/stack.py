"""`dagcast local up` as a user runs it, for the tests that need the embedded stack."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers import DAGCAST


@contextlib.contextmanager
def local_stack(
    state: Path, sidecars: int = 2, extra: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """`dagcast local up` as a user runs it, in its own process group; yields local.json."""
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / "local-up.log", "a")
    proc = subprocess.Popen(
        [*DAGCAST, "local", "up", "--state-dir", str(state), "--sidecars", str(sidecars), *(extra or [])],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + 120
        while (info := _info_of(state, proc.pid)) is None:  # a run before this one left its own local.json
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("local up did not start:\n" + (state / "local-up.log").read_text())
            time.sleep(0.1)
        info["state_dir"] = str(state)
        yield info
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _info_of(state: Path, pid: int) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads((state / "local.json").read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("pid") == pid else None
