"""The contracts of ARCHITECTURE.md as an outside tool sees them: exit codes and JSON shapes."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from helpers import run_dagcast, write_dags


def tarball(path: Path, members: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


def validate(path: Path) -> tuple[int, dict[str, Any], str]:
    proc = run_dagcast(["validate", str(path), "--json"])
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else {}, proc.stderr


def test_validate_accepts_a_good_bundle_with_the_json_contract(tmp_path: Path) -> None:
    code, doc, err = validate(tarball(tmp_path / "good.tar.gz", {"a.py": b"x = 1\n", "lib/b.py": b"y = 2\n"}))
    assert code == 0
    assert doc == {"valid": True, "files": 2, "bytes": 12, "errors": [], "ok": True, "exit_code": 0}


def test_validate_rejects_a_path_escape_naming_the_member(tmp_path: Path) -> None:
    code, doc, err = validate(tarball(tmp_path / "bad.tar.gz", {"a.py": b"x = 1\n", "../escape.py": b"y = 2\n"}))
    assert code == 1 and doc["valid"] is False
    assert {"code", "path", "line", "message"} <= set(doc["errors"][0])
    assert any(e["path"] == "../escape.py" for e in doc["errors"])
    assert "Traceback" not in err


def test_validate_reports_syntax_errors_with_line_for_a_folder(tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {"ok.py": "x = 1\n", "etl.py": "x = 1\n\nif True\n"})
    code, doc, _ = validate(dags)
    assert code == 1
    assert [(e["code"], e["path"], e["line"]) for e in doc["errors"]] == [("syntax_error", "etl.py", 3)]
    human = run_dagcast(["validate", str(dags)])
    assert f"{dags}/etl.py:3: syntax_error:" in human.stderr


def test_validate_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    proc = run_dagcast(["validate", str(tmp_path / "missing.tar.gz"), "--json"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert run_dagcast(["validate"]).returncode == 2


def test_validate_rejects_garbage_as_an_archive_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"definitely not gzip")
    code, doc, err = validate(junk)
    assert code == 1 and doc["errors"][0]["code"] in ("corrupt_archive", "unsupported_format")
    assert "Traceback" not in err


def test_local_json_follows_the_contract(stack: dict[str, Any]) -> None:
    assert stack["api_url"].startswith("http://127.0.0.1:")
    assert stack["token"] and stack["deployment"]
    assert len(stack["sidecars"]) == 2
    for s in stack["sidecars"]:
        assert {"name", "dags_path"} <= set(s)
        assert Path(s["dags_path"]).is_absolute()


def test_deploy_without_configuration_is_a_usage_error(tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {"a.py": "x = 1\n"})
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags)], env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "DAGCAST_API_URL" in proc.stderr and "Traceback" not in proc.stderr
