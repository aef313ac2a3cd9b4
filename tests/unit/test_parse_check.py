"""The sidecar's parse check without Airflow: what it reports, what it holds back, what it parses again."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chalicelib.models import MAX_REPORTED, ParseMode, ParseReport, Version
from dagcast.exceptions import ApiUnavailable
from dagcast.parse import FileResult, ImportFailure, ParseResult
from dagcast.parse_check import PARSE_NICE, ParseCheck, build_report, changed_paths

SHA = "a" * 64


def record(version: int = 2, mode: ParseMode = ParseMode.REPORT) -> Version:
    return Version(deployment="d", version=version, deploy_id="x", sha256=SHA, size=1, key="k", created_at=0, parse_mode=mode)


def result(errors: dict[str, str] | None = None, dags: dict[str, list[str]] | None = None) -> ParseResult:
    files = {p: FileResult(path=p, dag_ids=ids) for p, ids in (dags or {}).items()}
    for path, kind in (errors or {}).items():
        files[path] = FileResult(path=path, dag_ids=[], error=ImportFailure(path=path, line=1, type=kind, message="x" * 5000))
    return ParseResult(files=files)


def test_changed_paths_are_the_new_and_the_different_files() -> None:
    assert changed_paths({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == {"b", "c"}
    assert changed_paths(None, {"a": "1"}) is None


def test_a_report_counts_everything_lists_a_bounded_part_and_names_what_is_new() -> None:
    base = result({"old.py": "ValueError"}, {"keep.py": ["keep"], "gone.py": ["gone"]})
    now = result({"old.py": "ValueError", **{f"n{i}.py": "ModuleNotFoundError" for i in range(MAX_REPORTED + 5)}},
                 {"keep.py": ["keep"], "new.py": ["fresh"]})
    doc = build_report(record(), now, base, mode=ParseMode.REPORT, held=False, parser="airflow 3", parse_ms=5)
    report = ParseReport.model_validate(doc)  # what the API accepts
    assert report.import_errors_total == MAX_REPORTED + 6 and len(report.import_errors) == MAX_REPORTED
    assert report.new_import_errors_total == MAX_REPORTED + 5 and "old.py" not in report.new_import_errors
    assert all(len(e.message) == 2000 for e in report.import_errors)
    assert report.dags_added == ["fresh"] and report.dags_removed == ["gone"] and report.dags == 2


class FakeParser:
    """Parser's interface, answering with prepared results; counts the parses."""

    def __init__(self, answers: dict[str, ParseResult], **_: Any) -> None:
        self.answers = answers
        self.calls: list[tuple[str, set[str] | None]] = []

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def parse(self, folder: Path, *, previous: ParseResult | None = None, changed: set[str] | None = None) -> ParseResult:
        self.calls.append((folder.name, changed))
        return self.answers[folder.name]


@pytest.fixture
def check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr("dagcast.parse_check.airflow_label", lambda: "airflow test")
    sent: list[dict[str, Any]] = []
    parser = FakeParser({"1-a": result(dags={"a.py": ["a"]}), "2-b": result({"b.py": "ImportError"}, {"a.py": ["a"]})})
    files = {"1-a": {"a.py": "1"}, "2-b": {"a.py": "1", "b.py": "2"}}
    pc = ParseCheck(root=tmp_path, mode="auto", send=sent.append, files_of=files.get, parser_factory=lambda **kw: parser)
    pc.start()
    pc.after_publish(None, record(1), tmp_path / "1-a")
    pc._submit(lambda: None).result()  # the parse thread did what it was given
    yield pc, parser, sent
    pc.close()


def test_gate_holds_a_version_that_adds_import_errors_once_and_remembers_it(check: Any, tmp_path: Path) -> None:
    pc, parser, sent = check
    assert pc.gate("1-a", record(2, ParseMode.GATE), tmp_path / "2-b") is False
    assert pc.gate("1-a", record(2, ParseMode.GATE), tmp_path / "2-b") is False
    assert [c[0] for c in parser.calls] == ["1-a", "2-b"], "parsed once; the next reconcile reuses the decision"
    assert parser.calls[1][1] == {"b.py"}, "only what changed against the live version"
    assert sent[-1]["held"] and sent[-1]["new_import_errors"] == ["b.py"] and len(sent) == 2


def test_report_mode_never_holds_and_a_report_the_api_missed_is_sent_again(check: Any, tmp_path: Path) -> None:
    pc, parser, sent = check
    assert pc.gate("1-a", record(2, ParseMode.REPORT), tmp_path / "2-b") is True and len(parser.calls) == 1
    failing = [True]

    def send(doc: dict[str, Any]) -> None:
        if failing[0]:
            raise ApiUnavailable("down")
        sent.append(doc)

    pc._send = send
    pc.after_publish("1-a", record(2), tmp_path / "2-b")
    pc._submit(lambda: None).result()
    assert len(sent) == 1 and pc._unsent
    failing[0] = False
    pc.retry_unsent()
    pc._submit(lambda: None).result()
    assert len(sent) == 2 and sent[-1]["version"] == 2 and not sent[-1]["held"] and not pc._unsent


def test_without_airflow_nothing_is_parsed_and_nothing_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dagcast.parse_check.airflow_label", lambda: None)
    pc = ParseCheck(root=tmp_path, mode="gate", send=lambda doc: None, files_of=lambda name: None)
    pc.start()
    assert not pc.available and pc.mode_for(record()) is None
    assert pc.gate(None, record(2, ParseMode.GATE), tmp_path / "2-b") is True


def test_the_sidecars_parser_lists_its_immutable_version_folders_at_a_lower_cpu_priority(tmp_path: Path,
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dagcast.parse_check.airflow_label", lambda: "airflow test")
    made: list[dict[str, Any]] = []
    parser = FakeParser({"1-a": result(dags={"a.py": ["a"]})})
    def factory(**kw: Any) -> Any:
        made.append(kw)
        return parser

    pc = ParseCheck(root=tmp_path, mode="auto", send=lambda _: None, files_of={"1-a": {"a.py": "1"}}.get,
                    parser_factory=factory)
    pc.start()
    pc.after_publish(None, record(1), tmp_path / "1-a")
    pc._submit(lambda: None).result()
    pc.close()
    assert [(kw["immutable"], kw["nice"]) for kw in made] == [(True, PARSE_NICE)] and PARSE_NICE > 0
