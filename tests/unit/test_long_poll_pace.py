"""How often the deploy long poll answers while sidecars run an ACTIVE deploy one by one: the first
report and the one that completes the set at once, the ones in between gathered for
`wait_answer_seconds` (each answer is a full view of the deploy and all its sidecars)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import Sidecars
from test_deploy_stages import Ticks, publish, waiting_control

from chalicelib.service import ControlPlane
from chalicelib.settings import get_settings
from dagcast.bootstrap import StackOutputs

SIDECARS = ("w1", "w2", "w3", "w4")


_SIDECARS: list[Sidecars] = []


@pytest.fixture
def live_on_four(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes], sidecars: Sidecars
) -> str:
    """An ACTIVE v1 with four registered sidecars that have not run it yet."""
    for name in SIDECARS:
        sidecars.register(name)
    _SIDECARS[:] = [sidecars]
    return publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))


def report(control: ControlPlane, deployment: str, name: str) -> Callable[[], object]:
    return lambda: _SIDECARS[0].report(name, 1, last_sync_at=5)


def test_reports_after_the_first_are_gathered_into_one_answer(
    control: ControlPlane, deployment: str, live_on_four: str
) -> None:
    report(control, deployment, "w1")()
    ticks = Ticks({1: report(control, deployment, "w2"), 2: report(control, deployment, "w3")})
    view = waiting_control(ticks).get_deploy(deployment, live_on_four, wait_seconds=10)
    assert view.sidecars_on_version == 3 and not view.converged
    assert sum(ticks.sleeps) == pytest.approx(get_settings().wait_answer_seconds, abs=0.06)


def test_the_first_report_is_answered_at_once(control: ControlPlane, deployment: str, live_on_four: str) -> None:
    ticks = Ticks({2: report(control, deployment, "w1")})
    view = waiting_control(ticks).get_deploy(deployment, live_on_four, wait_seconds=10)
    assert len(ticks.sleeps) == 2 and view.sidecars_on_version == 1


def test_the_report_that_completes_the_set_is_answered_at_once(
    control: ControlPlane, deployment: str, live_on_four: str
) -> None:
    report(control, deployment, "w1")()
    ticks = Ticks({1: report(control, deployment, "w2"), 2: report(control, deployment, "w3"), 3: report(control, deployment, "w4")})
    view = waiting_control(ticks).get_deploy(deployment, live_on_four, wait_seconds=10)
    assert len(ticks.sleeps) == 3, "the last live sidecar's report ends the wait without gathering"
    assert view.converged and view.sidecars_on_version == 4


def test_a_gathered_report_is_answered_even_if_nothing_follows_it(
    control: ControlPlane, deployment: str, live_on_four: str
) -> None:
    report(control, deployment, "w1")()
    ticks = Ticks({1: report(control, deployment, "w2")})
    view = waiting_control(ticks).get_deploy(deployment, live_on_four, wait_seconds=10)
    assert view.sidecars_on_version == 2
    assert sum(ticks.sleeps) < 1, "answered after the gathering period, not at the end of the wait"
