"""The sidecar's parse check: what Airflow, in this component's own environment, makes of each version.

A sidecar that runs in the Airflow image (Airflow importable) keeps a warm parser (`dagcast.parse`:
Airflow imported once, a fresh fork per parse) and loads every new version with Airflow's own
loader, parsing only what can have changed since the version it ran before: the files that differ,
and the files importing a module that differs. It reports the outcome to the API with its own
secret (bounded: the first MAX_REPORTED errors, the rest counted), so `dagcast deploy --wait` and the
console can say what Airflow made of the deploy, per component.

Two modes (the deployment's `parse_mode`, carried in each version's signed statement, or this
sidecar's --parse flag): `report` installs the version, then parses and reports; `gate` parses the
version in its folder before installing it, and holds it back (the link stays on the live version)
when it adds import errors the live version did not have here. A version is held only against a
live version: a sidecar with nothing installed installs what it gets. A parser that fails (not the
DAG files: the parser itself) holds nothing back, and says so in its report.

Every use of the Parser happens on one long-lived thread of this module (the parser's child dies
with the thread that started it, as PR_SET_PDEATHSIG works per thread).
"""
from __future__ import annotations

import concurrent.futures
import importlib.metadata
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from chalicelib.bundle import Limits
from chalicelib.models import MAX_REPORTED, ParseMode, Version
from dagcast.exceptions import ClientError, UsageProblem
from dagcast.observe import SidecarMetrics
from dagcast.parse import ParseError, Parser, ParseResult, airflow_importable

log = logging.getLogger("dagcast.parse_check")

MODES = ("auto", "report", "gate", "off")
_LIMITS = {"path": 1024, "type": 200, "message": 2000, "frame": 400}


def airflow_label() -> str | None:
    """"airflow 3.3.2" when Airflow is importable here (found, not imported), else None."""
    if not airflow_importable():
        return None
    try:
        return f"airflow {importlib.metadata.version('apache-airflow')}"[:64]
    except importlib.metadata.PackageNotFoundError:
        return "airflow"


def changed_paths(before: dict[str, str] | None, after: dict[str, str]) -> set[str] | None:
    """Files (path -> sha256) that are new or differ; None when there is no earlier file list."""
    if before is None:
        return None
    return {path for path, sha in after.items() if before.get(path) != sha}


def build_report(record: Version, result: ParseResult, base: ParseResult | None, *, mode: ParseMode, held: bool,
                 parser: str | None, parse_ms: int) -> dict[str, Any]:
    """The API's ParseReport body for `result`, against `base` (the version this sidecar ran before)."""
    errors = result.import_errors
    base_errors = {e.path for e in base.import_errors} if base is not None else set()
    new = [e.path for e in errors if e.path not in base_errors]
    ids, base_ids = set(result.dag_ids), set(base.dag_ids) if base is not None else set()
    duplicates = sorted(result.duplicates.items())
    return {
        "version": record.version,
        "sha256": record.sha256,
        "status": "parsed",
        "mode": mode.value,
        "held": held,
        "parser": parser,
        "files": len(result.files),
        "dags": len(ids),
        "import_errors": [
            {"path": e.path[:_LIMITS["path"]], "line": e.line if e.line and e.line > 0 else None,
             "type": e.type[:_LIMITS["type"]], "message": e.message[:_LIMITS["message"]],
             "frames": [f[:_LIMITS["frame"]] for f in e.frames[-5:]]}
            for e in errors[:MAX_REPORTED]
        ],
        "import_errors_total": len(errors),
        "new_import_errors": [p[:_LIMITS["path"]] for p in new[:MAX_REPORTED]],
        "new_import_errors_total": len(new),
        "duplicates": [{"dag_id": d[:250], "paths": [p[:_LIMITS["path"]] for p in paths[:MAX_REPORTED]]}
                       for d, paths in duplicates[:MAX_REPORTED]],
        "dags_added": sorted(ids - base_ids)[:MAX_REPORTED] if base is not None else [],
        "dags_removed": sorted(base_ids - ids)[:MAX_REPORTED] if base is not None else [],
        "parsed_files": result.parsed,
        "parse_ms": parse_ms,
    }


PARSE_NICE = 10  # a parse of many files runs below the sidecar's CPU priority by this (nice(2) increment)


class ParseCheck:
    """Parses versions on a thread of its own; `gate` blocks for the answer, `after_publish` does not."""

    def __init__(self, *, root: Path, mode: str, send: Callable[[dict[str, Any]], None],
                 files_of: Callable[[str], dict[str, str] | None], metrics: SidecarMetrics | None = None,
                 workers: int | None = None, parser_factory: Callable[..., Parser] = Parser) -> None:
        if mode not in MODES:
            raise ValueError(f"--parse must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.label = airflow_label() if mode != "off" else None
        self.available = self.label is not None
        self._send = send
        self._files_of = files_of
        self._metrics = metrics or SidecarMetrics()
        self._workers = workers
        self._factory = parser_factory
        self._dir = root / "parse"
        self._results: dict[str, ParseResult] = {}
        self._decided: dict[str, bool] = {}  # gate: version folder -> installable
        self._unsent: dict[str, dict[str, Any]] = {}  # folder -> report the API did not take yet
        self._jobs: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._parser: Parser | None = None

    # --- lifetime ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the parse thread, which warms the parser (imports Airflow) at once."""
        if not self.available or self._thread is not None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._serve, name="parse-check", daemon=True)
        self._thread.start()
        self._submit(self._warm)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def mode_for(self, record: Version) -> ParseMode | None:
        """The mode this version is parsed in here, or None when it is not parsed."""
        if not self.available:
            return None
        if self.mode in ("report", "gate"):
            return ParseMode(self.mode)
        return record.parse_mode

    # --- the two entry points (called from the sidecar's sync) ---------------------------------

    def gate(self, live_folder: str | None, record: Version, folder: Path) -> bool:
        """Whether `record`, extracted in `folder`, may be installed; in gate mode parse it first."""
        if self.mode_for(record) is not ParseMode.GATE:
            return True
        if folder.name in self._decided:
            return self._decided[folder.name]
        started = time.monotonic()
        ok = bool(self._submit(lambda: self._check(live_folder, record, folder, ParseMode.GATE)).result())
        log.info("gate decided", extra={"version": record.version, "install": ok, "seconds": round(time.monotonic() - started, 3)})
        self._decided[folder.name] = ok
        return ok

    def after_publish(self, previous_folder: str | None, record: Version, folder: Path) -> None:
        """Report mode: parse the version now live here, in the background, and report it."""
        if self.mode_for(record) is not ParseMode.REPORT:
            return
        self._submit(lambda: self._check(previous_folder, record, folder, ParseMode.REPORT))

    def retry_unsent(self) -> None:
        """Send again the reports the API did not take (it was down): called with each heartbeat."""
        if self._unsent and self._thread is not None:
            self._submit(self._flush_unsent)

    # --- on the parse thread -----------------------------------------------------------------

    def _submit(self, job: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._thread is None:
            future.set_result(True)  # not started (--once without a daemon): nothing is parsed
            return future
        self._jobs.put((job, future))
        return future

    def _serve(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                break
            job, future = item
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the job
                log.warning("parse check failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                future.set_result(True)  # a failed check holds nothing back
        if self._parser is not None:
            self._parser.close()

    def _warm(self) -> None:
        # Version folders never change in place; and a parse of many files, only a report (or a gate the sync
        # waits on anyway), yields the CPU to the Airflow component beside it and to the sidecar's own syncs
        # (a change of a few files is parsed at once, at the sidecar's priority: see dagcast.parse.NICE_FROM_FILES).
        self._parser = self._factory(workers=self._workers, bundle_name="dagcast", immutable=True, nice=PARSE_NICE)
        try:
            self._parser.start()
        except ParseError as exc:
            log.warning("the parser did not start; versions are installed without a parse", extra={"error": str(exc)})

    def _check(self, base_folder: str | None, record: Version, folder: Path, mode: ParseMode) -> bool:
        """Parse the version, report it; True when it may be installed (always, outside gate mode)."""
        assert self._parser is not None
        base = self._result_of(base_folder) if base_folder else None
        after = self._files_of(folder.name) or {}
        changed = changed_paths(self._files_of(base_folder) if base_folder else None, after)
        started = time.monotonic()
        try:
            result = self._parser.parse(folder, previous=base, changed=changed if base is not None else None)
        except ParseError as exc:
            self._metrics.parses.labels(result="failed").inc()
            self._deliver(folder.name, {"version": record.version, "sha256": record.sha256, "status": "failed",
                                        "message": str(exc)[:2000], "mode": mode.value, "parser": self.label})
            return True
        parse_ms = int((time.monotonic() - started) * 1000)
        self._keep(folder.name, result)
        base_errors = {e.path for e in base.import_errors} if base is not None else set()
        new = [e for e in result.import_errors if e.path not in base_errors]
        held = mode is ParseMode.GATE and base is not None and bool(new)
        self._metrics.parse_seconds.observe(parse_ms / 1000)
        self._metrics.parses.labels(result="held" if held else "parsed").inc()
        if not held:
            self._metrics.import_errors.set(len(result.import_errors))
        report = build_report(record, result, base, mode=mode, held=held, parser=self.label, parse_ms=parse_ms)
        log.info("parsed", extra={"version": record.version, "files": len(result.files), "parsed": result.parsed,
                                  "import_errors": len(result.import_errors), "new": len(new), "held": held,
                                  "seconds": parse_ms / 1000})
        self._deliver(folder.name, report)
        return not held

    def _deliver(self, folder: str, report: dict[str, Any]) -> None:
        try:
            self._send(report)
            self._unsent.pop(folder, None)
        except ClientError as exc:
            log.warning("parse report not delivered; sent again with the next heartbeat", extra={"error": str(exc)})
            self._unsent[folder] = report

    def _flush_unsent(self) -> None:
        for folder, report in list(self._unsent.items()):
            self._deliver(folder, report)

    def _result_of(self, folder: str) -> ParseResult | None:
        """The parse of an earlier version here (kept on disk, so a restart parses incrementally)."""
        if folder in self._results:
            return self._results[folder]
        try:
            result = ParseResult.model_validate_json((self._dir / f"{folder}.json").read_bytes())
        except (OSError, ValueError):
            return None
        self._results[folder] = result
        return result

    def _keep(self, folder: str, result: ParseResult) -> None:
        self._results = {folder: result, **{k: v for k, v in list(self._results.items())[:3]}}
        tmp = self._dir / f".tmp-{folder}.json"
        try:
            tmp.write_text(result.model_dump_json())
            os.replace(tmp, self._dir / f"{folder}.json")
        except OSError as exc:
            log.warning("cannot keep the parse result", extra={"error": str(exc)})
        for old in sorted(self._dir.glob("*.json"), key=lambda p: p.stat().st_mtime)[:-8]:
            old.unlink(missing_ok=True)


# --- the same parser on the CLI's machine (`validate --parse`, `deploy --parse`) --------------------

NOT_IMPORTABLE = ("--parse needs Airflow importable in this environment: install dagcast with the `airflow` extra "
                  "(pip install 'dagcast[airflow]') or run dagcast in the Airflow image the DAGs run in")


def parse_bundle(bundle: BinaryIO, limits: Limits | None = None) -> ParseResult:
    """Extract a (valid) bundle to a temporary folder and load it with Airflow's own loader, whole.
    UsageProblem when Airflow is not importable here; ParseError when the parser itself fails."""
    import tempfile

    from chalicelib.bundle import extract_bundle
    from dagcast.parse import parse_folder_once

    if not airflow_importable():
        raise UsageProblem(NOT_IMPORTABLE)
    with tempfile.TemporaryDirectory(prefix="dagcast-parse-") as tmp:
        folder = Path(tmp) / "dags"
        extract_bundle(bundle, folder, limits)
        return parse_folder_once(folder)


def parse_issues(result: ParseResult) -> list[dict[str, Any]]:
    """The import errors and duplicate DAG ids of a local parse, as validation issues (path, line, message)."""
    issues: list[dict[str, Any]] = [
        {"code": "import_error", "path": e.path, "line": e.line,
         "message": f"{e.path}{f', line {e.line}' if e.line else ''}: {e.type}: {e.message.splitlines()[0] if e.message else ''}"}
        for e in result.import_errors
    ]
    for dag_id, paths in sorted(result.duplicates.items()):
        issues.append({"code": "duplicate_dag_id", "path": paths[-1], "line": None,
                       "message": f"{paths[-1]}: DAG id {dag_id!r} is also defined in {', '.join(paths[:-1])}"})
    return issues


def parse_summary(result: ParseResult) -> dict[str, Any]:
    return {"files": len(result.files), "dags": len(result.dag_ids), "import_errors": len(result.import_errors),
            "duplicates": [{"dag_id": d, "paths": p} for d, p in sorted(result.duplicates.items())],
            "seconds": round(result.seconds, 3)}
