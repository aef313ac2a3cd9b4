"""Leases: a version a reader holds is never pruned by the sidecar; a dead reader holds nothing."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from helpers import until
from test_sidecar import env, on_disk, signer, versions_of  # noqa: F401 - the fixtures and helpers of the sync tests

from dagcast.lease import Lease, claim_for_removal, lease_path
from dagcast.sidecar import folder_name


def test_a_held_lease_stops_a_claim_and_a_released_one_does_not(tmp_path: Path) -> None:
    with Lease(tmp_path, "3-a"):
        with claim_for_removal(tmp_path, "3-a") as claimed:
            assert claimed is False
        assert lease_path(tmp_path, "3-a").exists()
    with claim_for_removal(tmp_path, "3-a") as claimed:
        assert claimed is True
    assert not lease_path(tmp_path, "3-a").exists()  # removed with the version, while still locked


def test_leases_on_other_versions_do_not_interfere(tmp_path: Path) -> None:
    with Lease(tmp_path, "1-a"), Lease(tmp_path, "2-a"), claim_for_removal(tmp_path, "3-a") as claimed:
        assert claimed is True


def test_the_sidecar_keeps_a_version_a_reader_holds_beyond_keep_and_prunes_it_once_released(env: Any, tmp_path: Path) -> None:  # noqa: F811
    syncer, api, _ = env  # keep=2
    api.add(1, versions_of(1, tmp_path))
    syncer.sync(api.announced(1))
    v1 = folder_name(1, api.records[1].sha256)
    reader = Lease(syncer.cfg.root, v1)
    reader.acquire()
    for i in (2, 3, 4):
        api.add(i, versions_of(i, tmp_path))
        syncer.sync(api.announced(i))
    assert on_disk(syncer) == [1, 3, 4]
    assert (syncer.versions / v1 / "dag.py").read_text() == "VERSION = 1\n"
    reader.release()
    api.add(5, versions_of(5, tmp_path))
    syncer.sync(api.announced(5))
    assert on_disk(syncer) == [4, 5]


def test_a_lease_held_by_another_process_counts_and_dies_with_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from dagcast.lease import Lease;"
         f"Lease(Path({str(tmp_path)!r}), '7-a').acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with claim_for_removal(tmp_path, "7-a") as claimed:
            assert claimed is False
    finally:
        holder.kill()
        holder.wait()
    with claim_for_removal(tmp_path, "7-a") as claimed:
        assert claimed is True  # the kernel dropped the dead reader's lock


def test_a_reader_waiting_on_a_removal_ends_up_holding_the_file_at_the_path(tmp_path: Path) -> None:
    """The pruner unlinks the lease file while locked; a reader that queued on that inode must retry."""
    got: list[Lease] = []
    with claim_for_removal(tmp_path, "9-a") as claimed:
        assert claimed
        removed = lease_path(tmp_path, "9-a").stat()  # the inode the pruner holds and unlinks on exit
        reader = threading.Thread(target=lambda: got.append(Lease(tmp_path, "9-a").__enter__()))
        reader.start()
        until(lambda: _waiting_for_a_lock_on(removed), 10, "the reader blocked on the pruner's lock")
        assert not got
    reader.join(timeout=10)
    assert got and got[0].held
    with claim_for_removal(tmp_path, "9-a") as claimed:
        assert claimed is False  # the reader's lock is on the file the next pruner sees
    got[0].release()


def _waiting_for_a_lock_on(st: os.stat_result) -> bool:
    """The kernel lists a lock request blocked on this inode ("->" in /proc/locks: <major>:<minor>:<inode>)."""
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any("->" in fields and inode in fields
               for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines()))
