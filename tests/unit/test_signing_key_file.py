"""The embedded stack's signing key file: made once, even when its functions start at the same time."""
from __future__ import annotations

import threading
from pathlib import Path

from chalicelib.signing import FileSigner


def test_signers_starting_at_once_make_one_key_and_all_use_it(tmp_path: Path) -> None:
    for n in range(10):
        path = tmp_path / str(n) / "signing-key.pem"
        ids: list[str] = []
        errors: list[str] = []

        def start(path: Path = path, ids: list[str] = ids, errors: list[str] = errors) -> None:
            try:
                ids.append(FileSigner(path).key_id)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(exc))

        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(ids) == 8
        assert len(set(ids)) == 1, "every signer uses the one key on disk"
        assert [p.name for p in path.parent.iterdir()] == ["signing-key.pem"], "no temp file left"
        assert path.stat().st_mode & 0o777 == 0o600
