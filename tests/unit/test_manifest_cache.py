"""The CLI keeps the file lists of the bundles it deployed, and the next deploy's look-ahead uses the
kept one for the live version instead of downloading it, when the live version is that very bundle."""
from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from chalicelib.bundle import FileEntry
from chalicelib.manifest import encode_manifest
from dagcast import deploy, manifest_cache


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries(tag: str, n: int = 3) -> list[FileEntry]:
    return [FileEntry(path=f"dags/{tag}_{i}.py", size=i, sha256=hashlib.sha256(f"{tag}{i}".encode()).hexdigest(),
                      dag_ids=[f"{tag}_{i}"]) for i in range(n)]


def live(sha256: str, manifest_url: str | None = "https://manifests.example/v1") -> dict[str, object]:
    return {"version": {"version": 1, "sha256": sha256}, "manifest_url": manifest_url}


def test_a_live_version_deployed_from_here_is_not_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    sha = "a" * 64
    manifest_cache.save(sha, entries("kept"))
    gets: list[str] = []
    monkeypatch.setattr(httpx, "get", lambda url, **kw: gets.append(url))  # type: ignore[arg-type,func-returns-value]
    assert deploy._live_manifest(live(sha)) == entries("kept")
    assert gets == []


def test_another_live_version_is_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    manifest_cache.save("a" * 64, entries("kept"))
    gets: list[str] = []

    def get(url: str, **kw: object) -> httpx.Response:
        gets.append(url)
        return httpx.Response(200, content=encode_manifest(entries("served")), request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", get)
    assert deploy._live_manifest(live("b" * 64)) == entries("served")
    assert gets == ["https://manifests.example/v1"]


def test_a_damaged_kept_list_is_downloaded_instead(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = "c" * 64
    manifest_cache.save(sha, entries("kept"))
    (cache_home / "dagcast" / "manifests" / f"{sha}.json").write_bytes(b'[{"path": "dags/a.py"')  # torn
    monkeypatch.setattr(httpx, "get", lambda url, **kw: httpx.Response(
        200, content=encode_manifest(entries("served")), request=httpx.Request("GET", url)))
    assert deploy._live_manifest(live(sha)) == entries("served")


def test_only_the_last_few_are_kept_and_names_are_digests_only(cache_home: Path) -> None:
    for i in range(manifest_cache.KEEP + 3):
        manifest_cache.save(f"{i:064x}", entries(str(i)))
    folder = cache_home / "dagcast" / "manifests"
    assert len(list(folder.glob("*.json"))) == manifest_cache.KEEP
    assert manifest_cache.load(f"{manifest_cache.KEEP + 2:064x}") == entries(str(manifest_cache.KEEP + 2))
    manifest_cache.save("../../escape", entries("x"))
    assert manifest_cache.load("../../escape") is None
    assert not (cache_home / "escape.json").exists() and not (cache_home.parent / "escape.json").exists()
