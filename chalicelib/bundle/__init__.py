"""Bundles: the deterministic archive of a DAG folder, the rules it must pass, and its safe extraction.

One file per idea, each layer importing only the ones below it:

    report        limits, issues, manifest entries, the report (models)
    threads       the inflate and deflate threads that overlap zlib with the caller's work
    format        writing a DAG folder as a deterministic gzip-compressed tar
    scan          the gzip + tar stream, read once, limits enforced before inflating
    rules         what a member may be (paths, types, symlinks, structure)
    dag_ids       DAG ids from the AST; dag_scan: the lexical scan that spares most ASTs
    python        the compile check of each .py file
    compile_workers  bounded worker processes that run the compile check on hostile-sized files
    cache         what validation and extraction may reuse (compiled digests, an earlier version)
    validate      the engine: one pass, every member to its consumers; validate_stream
    extract       writing a checked bundle or a delta to a new folder
    delta         building a delta against the live version while validating
    segments      a bundle's segments (gzip members) learnt as it is read, and the index ingest keeps
    written       validating a bundle as it is written (the CLI's bundle, the rebuilt one)
    rebuild       a version's bundle from an earlier one's and an uploaded delta (ingest)

The CLI, the sidecar, the Airflow bundle and the ingest function use the names re-exported here.
Each is imported on first use (PEP 562), so that a caller that needs only the models (the API
function, through chalicelib.models) does not pay for tarfile, the scanner and the workers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chalicelib.bundle.cache import CompileCache, Reuse
    from chalicelib.bundle.compile_workers import Bounds, CompileDeadline, CompileSession, CompileWorkerError, CompileWorkers
    from chalicelib.bundle.delta import BuiltDelta, DeltaCollector
    from chalicelib.bundle.extract import extract_bundle, extract_delta
    from chalicelib.bundle.format import BundleError, BundleInfo, write_bundle
    from chalicelib.bundle.report import (
        HARD_LIMITS,
        NAME_MAX,
        BundleRejected,
        DeltaMismatch,
        FileEntry,
        Issue,
        Limits,
        MiB,
        Model,
        Report,
        files_digest,
    )
    from chalicelib.bundle.rules import relative_link
    from chalicelib.bundle.validate import validate_file, validate_stream

# name -> the submodule that defines it
_EXPORTS = {
    "CompileCache": "cache", "Reuse": "cache",
    "Bounds": "compile_workers", "CompileDeadline": "compile_workers", "CompileSession": "compile_workers",
    "CompileWorkerError": "compile_workers", "CompileWorkers": "compile_workers",
    "BuiltDelta": "delta", "DeltaCollector": "delta",
    "extract_bundle": "extract", "extract_delta": "extract",
    "BundleError": "format", "BundleInfo": "format", "write_bundle": "format",
    "HARD_LIMITS": "report", "NAME_MAX": "report", "BundleRejected": "report", "DeltaMismatch": "report",
    "FileEntry": "report", "Issue": "report", "Limits": "report", "MiB": "report", "Model": "report", "Report": "report",
    "files_digest": "report",
    "relative_link": "rules",
    "validate_file": "validate", "validate_stream": "validate",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "HARD_LIMITS",
    "NAME_MAX",
    "Bounds",
    "BuiltDelta",
    "BundleError",
    "BundleInfo",
    "BundleRejected",
    "CompileCache",
    "CompileDeadline",
    "CompileSession",
    "CompileWorkerError",
    "CompileWorkers",
    "DeltaCollector",
    "DeltaMismatch",
    "FileEntry",
    "Issue",
    "Limits",
    "MiB",
    "Model",
    "Report",
    "Reuse",
    "extract_bundle",
    "extract_delta",
    "files_digest",
    "relative_link",
    "validate_file",
    "validate_stream",
    "write_bundle",
]
