"""What validating a bundle says: its limits, the issues that reject it, and the manifest of a valid one.

The lowest layer of the package: plain models (pydantic) and the two exceptions the consumers of a
report raise, shared by the scanner, the extractor, the API's records and the CLI. `HARD_LIMITS` caps
what a deployment may configure, so a sidecar can bound what it extracts whatever the API says.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from chalicelib.exceptions import DagcastError

MiB = 1024 * 1024
MAX_ERRORS = 100


# The largest limits a deployment may set: what every sidecar and the Airflow bundle's fetch
# extract (they extract each version with the limits it was validated with, see Version.limits).
HARD_LIMITS = {
    "max_bundle_bytes": 1024 * MiB,
    "max_total_bytes": 4096 * MiB,
    "max_members": 1_000_000,
    "max_member_bytes": 1024 * MiB,
    "max_py_bytes": 16 * MiB,
    "max_path_bytes": 4096,
}
NAME_MAX = 255  # bytes in one path component, on every filesystem a sidecar writes to


class Model(BaseModel):
    """The base of dagcast's models: each builds its validator on first use, not at import, so that
    a cold start pays only for the models it uses (building all of them was ~70 ms of `import app`)."""

    model_config = ConfigDict(defer_build=True)


class Limits(Model):
    """Size and count limits; every one is enforced while streaming, none may exceed HARD_LIMITS."""

    model_config = ConfigDict(extra="forbid")

    max_bundle_bytes: int = Field(default=256 * MiB, gt=0, le=HARD_LIMITS["max_bundle_bytes"])  # compressed input
    max_total_bytes: int = Field(default=1024 * MiB, gt=0, le=HARD_LIMITS["max_total_bytes"])  # uncompressed sum
    max_members: int = Field(default=100_000, gt=0, le=HARD_LIMITS["max_members"])
    max_member_bytes: int = Field(default=100 * MiB, gt=0, le=HARD_LIMITS["max_member_bytes"])
    max_py_bytes: int = Field(default=10 * MiB, gt=0, le=HARD_LIMITS["max_py_bytes"])
    max_path_bytes: int = Field(default=1024, gt=0, le=HARD_LIMITS["max_path_bytes"])


class Issue(Model):
    """One reason a bundle is rejected."""

    code: str
    path: str | None = None
    line: int | None = None
    message: str


class FileEntry(Model):
    """A regular file of a valid bundle: its DAG ids given as literals, and how many DAG definitions
    in it have ids computed at parse time (`DAG(f"etl_{team}")` in a loop), which no scan can name."""

    path: str
    size: int
    sha256: str
    dag_ids: list[str] = []
    dynamic_dags: int = 0


class Report(Model):
    """Outcome of validating (or extracting) one bundle."""

    valid: bool
    files: int
    bytes: int
    errors: list[Issue]
    errors_truncated: int = 0
    manifest: list[FileEntry]
    sha256: str
    compressed_bytes: int

    def summary(self) -> dict[str, Any]:
        """The public JSON contract of ``dagcast validate --json``."""
        return {
            "valid": self.valid,
            "files": self.files,
            "bytes": self.bytes,
            "errors": [e.model_dump() for e in self.errors],
        }

    @property
    def dag_ids(self) -> list[str]:
        """Every DAG id found in the manifest, sorted and de-duplicated."""
        return sorted({d for f in self.manifest for d in f.dag_ids})


class DeltaMismatch(DagcastError):
    """A delta did not turn its base version's files into the version it belongs to."""

    code = "delta_mismatch"


class BundleRejected(DagcastError):
    """extract_bundle refused a bundle; ``report`` says why."""

    code = "bundle_rejected"

    def __init__(self, report: Report) -> None:
        first = report.errors[0].message if report.errors else "bundle rejected"
        more = len(report.errors) + report.errors_truncated - 1
        super().__init__(first + (f" (and {more} more problems)" if more > 0 else ""))
        self.report = report



def files_digest(entries: Iterable[FileEntry]) -> str:
    """sha256 over a version's regular files (path, size, sha256; sorted by path)."""
    return triples_digest((e.path, e.size, e.sha256) for e in entries)


def triples_digest(files: Iterable[tuple[str, int, str]]) -> str:
    """files_digest of (path, size, sha256) triples, for a caller that has no FileEntry to make."""
    h = hashlib.sha256()
    for path, size, sha256 in sorted(files):
        h.update(f"{path}\0{size}\0{sha256}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()

