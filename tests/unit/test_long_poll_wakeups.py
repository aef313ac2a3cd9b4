"""The deploy long poll with in-process wake-ups (the embedded stack): the report that converges the
deploy ends the pause between two reads at once; without a wake-up, the reads alone still notice it;
and the last report is never gathered because of a sidecar that will not send one."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from conftest import Sidecars
from test_deploy_stages import Ticks, publish, waiting_control

import app as app_module
from chalicelib.models import DeployView, ParseReport
from chalicelib.notify import SidecarQueues
from chalicelib.service import ControlPlane
from chalicelib.settings import get_settings
from chalicelib.wakeups import DeployWakeups, Waiter
from dagcast.bootstrap import StackOutputs

SIDECARS = ("w1", "w2", "w3")


class RecordingWakeups(DeployWakeups):
    """DeployWakeups that notes how each pause of a long poll ended: True when a wake-up ended it."""

    def __init__(self) -> None:
        super().__init__()
        self.pauses: list[bool] = []
        self.pausing = threading.Event()  # set when a long poll, its first view built, starts its first pause

    @contextlib.contextmanager
    def watch(self, deployment: str, deploy_id: str) -> Iterator[Waiter]:
        with super().watch(deployment, deploy_id) as inner:
            outer = self

            class Recording(Waiter):
                def wait(self, timeout: float) -> bool:
                    outer.pausing.set()
                    woke = inner.wait(timeout)
                    outer.pauses.append(woke)
                    return woke

            yield Recording()


def never_sleep(seconds: float) -> None:
    raise AssertionError(f"the long poll slept {seconds} s instead of waiting on its wake-ups")


def waking_control(wakeups: DeployWakeups, ticks: Ticks, **settings: object) -> ControlPlane:
    """A control plane whose long polls wait on `wakeups`, with a pause between reads (5 s, the most
    allowed) far longer than any of these tests may take: a poll that ends did not sleep it out."""
    s = get_settings().model_copy(update={"wait_wakeups": True, "wait_check_seconds": 5.0,
                                          "wait_check_active_seconds": 5.0, **settings})
    queues = SidecarQueues(boto3.client("sqs"), boto3.client("sns"), s.topic_arn, s.sidecar_queue_prefix)
    return ControlPlane(s, app_module.get_store(), app_module.get_bundles(), queues, app_module.get_publisher(),
                        clock=ticks.clock, sleep=never_sleep, wakeups=wakeups)


def in_background(poll: Callable[[], DeployView]) -> tuple[threading.Thread, list[DeployView]]:
    answers: list[DeployView] = []
    t = threading.Thread(target=lambda: answers.append(poll()), daemon=True)
    t.start()
    return t, answers


@pytest.fixture
def live_on_three(control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes],
                  sidecars: Sidecars) -> str:
    """An ACTIVE v1 with three registered sidecars, two of which run it."""
    for name in SIDECARS:
        sidecars.register(name)
    deploy_id = publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))
    sidecars.report("w1", 1, last_sync_at=5)
    sidecars.report("w2", 1, last_sync_at=6)
    return deploy_id


def test_the_converging_report_wakes_the_long_poll(
    monkeypatch: pytest.MonkeyPatch, deployment: str, live_on_three: str, sidecars: Sidecars
) -> None:
    wakeups = RecordingWakeups()
    monkeypatch.setattr(app_module.get_store(), "_on_deploy_change", wakeups.changed)  # the store signals these
    control = waking_control(wakeups, Ticks())
    t, answers = in_background(lambda: control.get_deploy(deployment, live_on_three, wait_seconds=20))
    assert wakeups.pausing.wait(10)
    sidecars.report("w3", 1, last_sync_at=7)  # the last live sidecar: the deploy converges
    t.join(10)  # the pause between reads is 5 s: an answer before then came from the wake-up
    assert answers, "the long poll did not answer after the converging report"
    assert answers[0].converged and answers[0].sidecars_on_version == 3
    assert wakeups.pauses and wakeups.pauses[-1] is True, "the pause was ended by the report's write"
    assert wakeups.watching() == 0, "the long poll stopped watching when it answered"


def test_without_a_wake_up_the_long_poll_still_notices_by_reading(
    deployment: str, live_on_three: str, sidecars: Sidecars
) -> None:
    wakeups = RecordingWakeups()  # the store never signals this one: every wake-up is missed
    control = waking_control(wakeups, Ticks(), wait_check_active_seconds=0.05)
    t, answers = in_background(lambda: control.get_deploy(deployment, live_on_three, wait_seconds=20))
    assert wakeups.pausing.wait(10)
    sidecars.report("w3", 1, last_sync_at=7)
    t.join(30)
    assert answers and answers[0].converged and answers[0].sidecars_on_version == 3
    assert wakeups.pauses and not any(wakeups.pauses), "no wake-up was delivered: the re-reads noticed the report"


def test_a_change_between_the_first_read_and_the_first_pause_is_not_missed(
    monkeypatch: pytest.MonkeyPatch, deployment: str, live_on_three: str, sidecars: Sidecars
) -> None:
    """The poll watches from before its first read: a report written while it builds its first view
    ends the first pause at once."""
    wakeups = RecordingWakeups()
    monkeypatch.setattr(app_module.get_store(), "_on_deploy_change", wakeups.changed)
    control = waking_control(wakeups, Ticks())
    first_view = control._deploy_view
    calls: list[int] = []

    def view_then_report(*args: object, **kwargs: object) -> DeployView:
        out = first_view(*args, **kwargs)  # type: ignore[arg-type]
        if not calls:
            sidecars.report("w3", 1, last_sync_at=7)
        calls.append(1)
        return out

    monkeypatch.setattr(control, "_deploy_view", view_then_report)
    view = control.get_deploy(deployment, live_on_three, wait_seconds=20)  # never_sleep: no 5 s pause either
    assert view.converged and wakeups.pauses == [True]


def test_the_last_report_is_not_gathered_because_of_a_sidecar_held_by_the_parse_gate(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes], sidecars: Sidecars
) -> None:
    """w3 stays on the version before (its parse gate held v1 back): w2's report, the last one that
    will come, is answered at once, not after the gathering period."""
    from test_parse_reports import report as parse_report

    for name in SIDECARS:
        sidecars.register(name)
    deploy_id = publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))
    sidecars.report("w1", 1, last_sync_at=5)
    sha256 = app_module.get_store().get_version(deployment, 1).sha256
    control.report_parse(deployment, "w3", ParseReport(**parse_report(1, sha256, held=True, mode="gate")),
                         sidecars.secrets["w3"])
    ticks = Ticks({1: lambda: sidecars.report("w2", 1, last_sync_at=8)})
    s = get_settings()
    queues = SidecarQueues(boto3.client("sqs"), boto3.client("sns"), s.topic_arn, s.sidecar_queue_prefix)
    waiting = ControlPlane(s, app_module.get_store(), app_module.get_bundles(), queues, app_module.get_publisher(),
                           clock=ticks.clock, sleep=ticks.sleep)
    view = waiting.get_deploy(deployment, deploy_id, wait_seconds=10)
    assert len(ticks.sleeps) == 1, f"answered at the first read after w2's report, not gathered: {ticks.sleeps}"
    assert view.sidecars_on_version == 2 and view.parse.held == ["w3"]


def test_parse_reports_before_the_last_are_gathered_and_the_last_is_answered_at_once(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes], sidecars: Sidecars
) -> None:
    """Every sidecar runs v1 and parses it: `--wait` ends on the last parse report, so the two before it
    are not answered one by one (each answer is a full view, and the CLI's next poll another), and the
    last one is answered at the first read that sees it."""
    from test_parse_reports import report as parse_report

    for name in SIDECARS:
        sidecars.register(name)
    deploy_id = publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))
    for n, name in enumerate(SIDECARS):
        sidecars.report(name, 1, last_sync_at=5 + n, parser="airflow 3.3.2")
    sha256 = app_module.get_store().get_version(deployment, 1).sha256

    def parsed(name: str) -> Callable[[], object]:
        return lambda: control.report_parse(deployment, name, ParseReport(**parse_report(1, sha256)), sidecars.secrets[name])

    ticks = Ticks({1: parsed("w1"), 2: parsed("w2"), 4: parsed("w3")})
    view = waiting_control(ticks).get_deploy(deployment, deploy_id, wait_seconds=10)
    assert len(ticks.sleeps) == 4, f"answered before the last report, or after gathering it: {ticks.sleeps}"
    assert view.parse.status == "parsed" and view.parse.reported == list(SIDECARS)


def test_a_view_does_not_wait_behind_the_reads_of_a_burst_of_heartbeats(
    control: ControlPlane, deployment: str, live_on_three: str
) -> None:
    """Heartbeats and parse reports make their reads on threads of their own: with every one of those
    busy (50 sidecars reporting a version at once), the view a `--wait` is answered with is still built."""
    release = threading.Event()
    busy = [control._reads.submit(release.wait, 30) for _ in range(control._reads._max_workers)]
    try:
        views: list[DeployView] = []
        t = threading.Thread(target=lambda: views.append(control.get_deploy(deployment, live_on_three)), daemon=True)
        t.start()
        t.join(10)
        assert views, "the view waited for the heartbeats' reads"
        assert views[0].sidecars_on_version == 2
    finally:
        release.set()
        for f in busy:
            f.result(10)


def test_a_wait_until_settled_is_answered_once_every_sidecar_ran_and_parsed_the_version(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes], sidecars: Sidecars,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`dagcast deploy --wait` asks `until=settled`: the first activation, the convergence noted and the
    parse reports before the last are not answered one by one (each answer is a full view, and the
    CLI's next poll reads another); the read that sees the last report builds the one view answered."""
    from test_parse_reports import report as parse_report

    for name in SIDECARS:
        sidecars.register(name)
        sidecars.report(name, 0, parser="airflow 3.3.2")  # live, with a parser, on no version yet
    deploy_id = publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))
    sha256 = app_module.get_store().get_version(deployment, 1).sha256

    def live(*names: str) -> Callable[[], object]:
        return lambda: [sidecars.report(n, 1, last_sync_at=5, parser="airflow 3.3.2") for n in names]

    def parsed(name: str) -> Callable[[], object]:
        return lambda: control.report_parse(deployment, name, ParseReport(**parse_report(1, sha256)), sidecars.secrets[name])

    ticks = Ticks({1: live("w1"), 2: live("w2", "w3"), 3: parsed("w1"), 4: parsed("w2"), 6: parsed("w3")})
    waiting = waiting_control(ticks)
    views: list[DeployView] = []
    real = waiting._deploy_view

    def counted(*args: Any, **kwargs: Any) -> DeployView:
        views.append(real(*args, **kwargs))
        return views[-1]

    monkeypatch.setattr(waiting, "_deploy_view", counted)
    view = waiting.get_deploy(deployment, deploy_id, wait_seconds=10, until_settled=True)
    assert len(ticks.sleeps) == 6, f"answered before the last report, or not at the first read after it: {ticks.sleeps}"
    assert view.converged and view.deploy.converged_at is not None
    assert view.parse.status == "parsed" and view.parse.reported == list(SIDECARS)
    assert len(views) == 2, "the first view, and the one answered"


def test_a_wait_until_settled_is_answered_at_a_change_of_state_and_when_the_time_is_up(
    control: ControlPlane, aws: StackOutputs, deployment: str, live_on_three: str, sidecars: Sidecars,
) -> None:
    """A state change is answered at once (the CLI says it); a sidecar that never runs the version
    leaves the deploy unsettled, and the poll answers what it has when the time is up."""
    ticks = Ticks()
    view = waiting_control(ticks).get_deploy(deployment, live_on_three, wait_seconds=1, until_settled=True)
    assert view.sidecars_on_version == 2 and not view.converged
    assert sum(ticks.sleeps) >= 1, "answered when the time was up"
    table = boto3.resource("dynamodb").Table(get_settings().table_name)
    key = {"pk": f"DEPLOYMENT#{deployment}", "sk": f"DEPLOY#{live_on_three}"}
    ticks = Ticks({2: lambda: table.update_item(Key=key, UpdateExpression="SET #s = :s", ExpressionAttributeNames={
        "#s": "state"}, ExpressionAttributeValues={":s": "SUPERSEDED"})})  # a newer deploy went live meanwhile
    view = waiting_control(ticks).get_deploy(deployment, live_on_three, wait_seconds=10, until_settled=True)
    assert len(ticks.sleeps) == 2 and view.deploy.state.value == "SUPERSEDED"
