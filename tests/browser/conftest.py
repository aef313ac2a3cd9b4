"""Browser fixtures: Debian's Chromium driven by Playwright against the session's `dagcast local up` stack."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Api, dag_source, run_dagcast, stack_env, write_dags
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

CHROMIUM = os.environ.get("DAGCAST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 800}

expect.set_options(timeout=15_000)


@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="session")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make install` (installs Debian's chromium) or set DAGCAST_CHROMIUM")
    b = playwright_driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield b
    b.close()


SCREENSHOTS = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def screenshots(request: pytest.FixtureRequest) -> Path:
    """Where the tests write screenshots of each view; the path is printed in the terminal summary."""
    folder = Path(os.environ.get("DAGCAST_SCREENSHOTS") or tempfile.mkdtemp(prefix="dagcast-console-"))
    folder.mkdir(parents=True, exist_ok=True)
    request.config.stash[SCREENSHOTS] = folder
    return folder


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    folder = config.stash.get(SCREENSHOTS, None)
    shots = sorted(p.name for p in folder.glob("*.png")) if folder else []
    if folder and shots:
        terminalreporter.write_line(f"screenshots: {folder} ({len(shots)}: {', '.join(shots)})")


@pytest.fixture
def open_console(browser: Browser, stack: dict[str, Any]) -> Iterator[Callable[..., Page]]:
    """Opens the console in a fresh browser context (own sessionStorage); closes them all afterwards."""
    contexts = []

    def open_(viewport: dict[str, int] | None = None, fragment: str = "") -> Page:
        context = browser.new_context(viewport=viewport or DESKTOP)
        contexts.append(context)
        page = context.new_page()
        page.goto(stack["api_url"].rstrip("/") + "/" + fragment)
        return page

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture(scope="session")
def demo_live(stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Make sure "demo" has at least two versions that went live (so there is one to roll back to)."""
    api = Api(stack)
    dep = api.json("GET", f"/deployments/{stack['deployment']}")
    for n in range(max(0, 2 - dep["current_version"])):
        folder = write_dags(tmp_path_factory.mktemp("baseline"), {"etl.py": dag_source(f"console_base_{n}")})
        args = ["deploy", "--dags", "--dags-path", str(folder), "--wait", "--json", "--force", "--description", f"console baseline {n + 1}"]
        proc = run_dagcast(args, stack_env(stack))
        assert proc.returncode == 0, proc.stderr
    dep = api.json("GET", f"/deployments/{stack['deployment']}")
    assert dep["current_version"] >= 2
    return dict(dep)
