"""The web console in a real Chromium against `dagcast local up`: what an operator sees and can do."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from helpers import (
    DAGCAST,
    Api,
    PlayedSidecar,
    dag_source,
    parse_json_stdout,
    run_dagcast,
    stack_env,
    until,
    version_of_link,
    write_dags,
)
from playwright.sync_api import Page, expect

OpenConsole = Callable[..., Page]
NARROW = {"width": 390, "height": 844}


def sign_in(page: Page, token: str) -> None:
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("status")).to_contain_text("Signed in")


def deploy_dags(info: dict[str, Any], folder: Path, *args: str, deployment: str | None = None) -> subprocess.CompletedProcess[str]:
    env = stack_env(info, **({"DAGCAST_DEPLOYMENT": deployment} if deployment else {}))
    return run_dagcast(["deploy", "--dags", "--dags-path", str(folder), *args], env)


def deployment_card(page: Page, name: str) -> Any:
    return page.locator(f'li[data-deployment="{name}"]')


def history_row(page: Page, deploy_id: str) -> Any:
    return page.locator(f'#history-body tr[data-deploy-id="{deploy_id}"]')


def shoot(page: Page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def fits_width(page: Page) -> bool:
    return bool(page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth"))


def test_admin_signs_in_and_sees_demo_on_its_version_with_every_sidecar_converged(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], screenshots: Path
) -> None:
    page = open_console()
    sign_in(page, stack["token"])
    me = Api(stack).json("GET", "/whoami")
    expect(page.locator("#who")).to_have_text(f"Signed in as {me['name']} (admin)")  # the token's name, not only the role
    card = deployment_card(page, "demo")
    expect(card.locator(".version")).to_have_text(f"v{demo_live['current_version']}")
    expect(card.locator(".convergence")).to_have_text("converged")
    expect(card).to_contain_text("DAG-only deploys")
    card.click()  # other tests' deployments may sort before demo and be selected first
    expect(page.locator("#detail-badge")).to_have_text(f"converged on v{demo_live['current_version']}")
    expect(page.get_by_role("tab", name="History")).to_have_attribute("aria-selected", "true")
    shoot(page, screenshots, "desktop-deployments")


def test_a_sidecar_behind_the_current_version_shows_in_the_badge_and_the_sidecar_table(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], screenshots: Path
) -> None:
    api = Api(stack)
    v = api.json("GET", "/deployments/demo")["current_version"]
    live = len(stack["sidecars"])
    page = open_console(fragment="#d=demo&tab=sidecars")
    sign_in(page, stack["token"])
    expect(page.locator("#detail-badge")).to_have_text(f"converged on v{v}")
    lagging = PlayedSidecar(api, "demo", "console-lagging", "scheduler")
    try:
        lagging.report({"version": v - 1, "last_error": "disk full: /opt/airflow/dags"})
        expect(deployment_card(page, "demo").locator(".convergence")).to_have_text(f"{live} of {live + 1} sidecars on v{v}")
        row = page.locator('#sidecar-body tr[data-sidecar="console-lagging"]')
        expect(row).to_contain_text(f"v{v - 1}")
        expect(row).to_contain_text(f"behind v{v}")
        expect(row).to_contain_text("disk full: /opt/airflow/dags")
        expect(row).to_contain_text("scheduler")
        expect(row.locator(".badge")).to_have_text("live")
        shoot(page, screenshots, "desktop-sidecars-converging")
    finally:
        lagging.deregister()
    expect(page.locator("#detail-badge")).to_have_text(f"converged on v{v}")
    expect(row).to_have_count(0)


def test_a_stale_sidecar_behind_the_live_version_is_never_hidden_behind_converged(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], screenshots: Path
) -> None:
    """A sidecar registered but silent for two minutes (its record as the API keeps it), still on an older version."""
    from helpers import aws

    v = Api(stack).json("GET", "/deployments/demo")["current_version"]
    table = aws(stack, "dynamodb")
    key = {"pk": {"S": "DEPLOYMENT#demo"}, "sk": {"S": "SIDECAR#console-silent"}}
    silent = int(time.time() * 1000) - 120_000
    table.put_item(TableName="dagcast-local-state", Item={**key, "deployment": {"S": "demo"}, "name": {"S": "console-silent"},
                   "component": {"S": "worker"}, "version": {"N": str(v - 1)}, "last_heartbeat": {"N": str(silent)},
                   "registered_at": {"N": str(silent)}})
    try:
        page = open_console(fragment="#d=demo&tab=sidecars")
        sign_in(page, stack["token"])
        live = len(stack["sidecars"])
        expect(page.locator("#detail-badge")).to_have_text(f"{live} of {live} live sidecars on v{v}; 1 stale and behind")
        expect(page.locator('#sidecar-body tr[data-sidecar="console-silent"] .badge')).to_have_text("stale")
        shoot(page, screenshots, "desktop-sidecars-stale")
    finally:
        table.delete_item(TableName="dagcast-local-state", Key=key)
    expect(page.locator("#detail-badge")).to_have_text(f"converged on v{v}")


def test_settings_mechanism_decides_whether_dag_only_deploys_are_accepted(
    open_console: OpenConsole, stack: dict[str, Any], tmp_path: Path, screenshots: Path
) -> None:
    api = Api(stack)
    created = api.call("POST", "/deployments", {"name": "console-mech", "mechanism": "DAG_ONLY"})
    assert created.status_code in (201, 409), created.text
    api.json("PATCH", "/deployments/console-mech", {"mechanism": "DAG_ONLY"})
    dags = write_dags(tmp_path / "dags", {"etl.py": dag_source("console_mech")})

    page = open_console(fragment="#d=console-mech&tab=settings")
    sign_in(page, stack["token"])
    expect(page.get_by_role("tabpanel", name="Settings")).to_be_visible()
    expect(page.get_by_label("DAG-only deploys")).to_be_checked()
    page.get_by_label("Image only").check()
    page.get_by_label("Versions to keep").fill("7")
    page.get_by_label("Max path length (bytes)").fill("512")
    page.get_by_role("button", name="Save settings").click()
    expect(page.get_by_role("status")).to_contain_text("Saved settings of console-mech")
    saved = api.json("GET", "/deployments/console-mech")
    assert (saved["mechanism"], saved["keep_versions"], saved["limits"]["max_path_bytes"]) == ("IMAGE", 7, 512)
    expect(deployment_card(page, "console-mech")).to_contain_text("Image only")

    refused = deploy_dags(stack, dags, "--no-wait", deployment="console-mech")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "409" in refused.stderr and "--dag-deploy enabled" in refused.stderr

    page.get_by_label("DAG-only deploys").check()
    page.get_by_role("button", name="Save settings").click()
    expect(page.get_by_role("status")).to_contain_text("Saved settings of console-mech: DAG-only deploys")
    assert api.json("GET", "/deployments/console-mech")["mechanism"] == "DAG_ONLY"
    accepted = deploy_dags(stack, dags, "--no-wait", deployment="console-mech")
    assert accepted.returncode == 0, accepted.stderr
    expect(page.get_by_label("Versions to keep")).to_have_value("7")
    shoot(page, screenshots, "desktop-settings")


def test_a_deploy_is_watched_live_until_active_with_every_sidecar_converged(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], tmp_path: Path
) -> None:
    api = Api(stack)
    known = {d["deploy_id"] for d in api.json("GET", "/deployments/demo/deploys?limit=100")["items"]}
    page = open_console(fragment="#d=demo&tab=history")
    sign_in(page, stack["token"])
    expect(page.locator("#history-body tr").first).to_be_visible()

    dags = write_dags(tmp_path / "dags", {"etl.py": dag_source(f"watched_{uuid.uuid4().hex[:8]}")})
    proc = subprocess.Popen(
        [*DAGCAST, "deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", "--description", "watched from the console"],
        env=stack_env(stack), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen: list[str] = []
    deploy_id = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        first = page.locator("#history-body tr").first
        row_id = first.get_attribute("data-deploy-id")
        if row_id and row_id not in known:
            deploy_id = row_id
            row_state = first.locator(".state").inner_text()
            if not seen or seen[-1] != row_state:
                seen.append(row_state)
            if row_state == "ACTIVE":
                break
        page.wait_for_timeout(100)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert deploy_id == result["deploy_id"], (deploy_id, seen)
    assert seen[-1] == "ACTIVE" and set(seen) <= {"PENDING", "VALIDATING", "ACTIVE"}, seen
    assert seen == sorted(seen, key=["PENDING", "VALIDATING", "ACTIVE"].index), seen

    row = history_row(page, result["deploy_id"])
    expect(row).to_contain_text(f"v{result['version']}")
    expect(row).to_contain_text("watched from the console")
    expect(row).to_contain_text("+1 DAG")
    expect(row.locator(".stages")).to_contain_text("upload → ACTIVE")
    expect(row.locator(".stages")).to_contain_text("ACTIVE → all sidecars")
    card = deployment_card(page, "demo")
    expect(card.locator(".version")).to_have_text(f"v{result['version']}")
    expect(card.locator(".convergence")).to_have_text("converged")
    expect(page.locator("#detail-badge")).to_have_text(f"converged on v{result['version']}")


def test_a_rejected_deploy_shows_its_errors_with_file_and_line(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], tmp_path: Path, screenshots: Path
) -> None:
    dags = write_dags(tmp_path / "dags", {"ok.py": dag_source("console_ok"), "broken.py": "x = 1\ndef f(:\n"})
    proc = deploy_dags(stack, dags, "--wait", "--json", "--skip-validation", "--description", "a typo")
    assert proc.returncode == 3, proc.stderr
    rejected = parse_json_stdout(proc)

    page = open_console(fragment="#d=demo&tab=history")
    sign_in(page, stack["token"])
    row = history_row(page, rejected["deploy_id"])
    expect(row.locator(".state")).to_have_text("REJECTED")
    errors = row.get_by_role("list", name="Errors")
    expect(errors).to_contain_text(re.compile(r"broken\.py:2: syntax_error: "))
    expect(row.get_by_role("button")).to_have_count(0)
    shoot(page, screenshots, "desktop-history-rejected")


def test_a_deploy_airflow_could_not_fully_load_shows_the_import_errors_by_file_with_their_sidecars(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], tmp_path: Path, screenshots: Path
) -> None:
    dags = write_dags(tmp_path / "dags", {"ok.py": dag_source("console_parsed"),
                                          "needs_pandas.py": "from airflow import DAG\nimport pandas_not_here\n"})
    proc = deploy_dags(stack, dags, "--wait", "--json", "--allow-import-errors", "--allow-dag-removal")
    assert proc.returncode == 0, proc.stderr
    deployed = parse_json_stdout(proc)
    assert deployed["parse"]["status"] == "parsed"

    page = open_console(fragment="#d=demo&tab=history")
    sign_in(page, stack["token"])
    row = history_row(page, deployed["deploy_id"])
    errors = row.get_by_role("list", name="Import errors")
    expect(errors).to_contain_text(re.compile(r"needs_pandas\.py:2: ModuleNotFoundError: No module named 'pandas_not_here'"))
    for s in stack["sidecars"]:
        expect(errors).to_contain_text(s["name"])
    expect(row.locator(".parse").first).to_contain_text(re.compile(r"Airflow loaded 1 of 2 files"))
    shoot(page, screenshots, "desktop-history-import-errors")


def test_rollback_from_the_console_asks_first_then_moves_every_sidecar_to_a_new_version(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], screenshots: Path
) -> None:
    api = Api(stack)
    history = api.json("GET", "/deployments/demo/deploys?limit=100")["items"]
    target = next(d for d in history if d["state"] == "SUPERSEDED")
    before = api.json("GET", "/deployments/demo")
    page = open_console(fragment="#d=demo&tab=history")
    sign_in(page, stack["token"])
    button = history_row(page, target["deploy_id"]).get_by_role("button", name=f"Roll back to v{target['version']}")

    button.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Roll back demo to v{target['version']}?")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_role("status")).to_have_text("Rollback cancelled.")
    assert api.json("GET", "/deployments/demo")["current_version"] == before["current_version"]

    button.click()
    dialog.get_by_role("button", name=f"Roll back to v{target['version']}").click()
    new = before["last_version"] + 1
    expect(page.get_by_role("status")).to_contain_text(f"Rollback started: v{new} serves the DAGs of v{target['version']}")
    expect(page.locator("#history-body tr").first).to_contain_text(f"rollback to v{target['version']}")

    page.get_by_role("tab", name="Sidecars").click()
    live_versions = page.locator("#sidecar-body tr.sidecar:not(.stale) .sidecar-version")
    expect(live_versions).to_have_count(len(stack["sidecars"]))
    expect(live_versions).to_have_text([f"v{new}"] * len(stack["sidecars"]))
    expect(page.locator("#detail-badge")).to_have_text(f"converged on v{new}")
    # "converged" is each sidecar's own report of the exact version, sent after its swap: the links are there
    assert [version_of_link(s["dags_path"]) for s in stack["sidecars"]] == [new] * len(stack["sidecars"])
    shoot(page, screenshots, "desktop-sidecars")


def test_a_viewer_sees_settings_read_only_and_no_rollback_buttons(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], screenshots: Path
) -> None:
    viewer = Api(stack).json("POST", "/tokens", {"name": f"console-viewer-{uuid.uuid4().hex[:6]}", "role": "viewer",
                                                  "deployments": ["demo"]})
    page = open_console(fragment="#d=demo&tab=history")
    page.get_by_label("API token").fill(viewer["token"])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("status")).to_have_text("Signed in with read-only access.")
    expect(page.locator("#who")).to_have_text(f"Signed in as {viewer['info']['name']} (viewer)")
    expect(page.locator("#history-body tr.state-superseded").first).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("Roll back"))).to_have_count(0)
    expect(page.locator("#deployment-list li")).to_have_count(1)

    page.get_by_role("tab", name="Settings").click()
    expect(page.get_by_text("Read-only: only an admin can change these settings.")).to_be_visible()
    inputs = page.locator("#settings-form input")
    expect(inputs.first).to_be_disabled()
    expect(page.locator("#settings-form input:enabled")).to_have_count(0)
    assert inputs.count() == 10  # two mechanism radios, two retention fields, six limits
    expect(page.get_by_role("button", name="Save settings")).to_have_count(0)
    expect(page.get_by_label("DAG-only deploys")).to_be_checked()
    shoot(page, screenshots, "desktop-settings-viewer")


def test_the_page_talks_only_to_its_own_origin_under_a_strict_csp(
    open_console: OpenConsole, browser: Any, stack: dict[str, Any], demo_live: dict[str, Any]
) -> None:
    origin = stack["api_url"].rstrip("/")
    served = httpx.get(origin + "/", timeout=30)
    assert served.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in served.headers["content-security-policy"]
    assert "script-src 'self'" in served.headers["content-security-policy"]
    assert "<script>" not in served.text and " style=" not in served.text
    assert httpx.get(origin + "/console/console.js", timeout=30).headers["content-type"].startswith("text/javascript")
    assert httpx.get(origin + "/console/app.py", timeout=30).status_code == 404

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    requests: list[str] = []
    problems: list[str] = []
    context.on("request", lambda r: requests.append(r.url))
    context.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    context.on("weberror", lambda e: problems.append(str(e.error)))
    try:
        page = context.new_page()
        page.goto(origin + "/")
        sign_in(page, stack["token"])
        deployment_card(page, "demo").get_by_role("button").click()
        expect(page.locator("#detail-title")).to_have_text("demo")
        for tab in ("Sidecars", "Settings", "History"):
            page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(2500)  # at least one poll
        page.reload()  # the token and the selection survive a reload: sessionStorage and the URL fragment
        expect(page.locator("#detail-title")).to_have_text("demo")
        expect(page.get_by_role("tab", name="History")).to_have_attribute("aria-selected", "true")
        assert page.evaluate("[sessionStorage.length, localStorage.length, document.cookie]") == [1, 0, ""]
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_label("API token")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0
    finally:
        context.close()
    assert requests, "the page made no requests"
    elsewhere = [u for u in requests if not u.startswith(origin + "/")]
    assert not elsewhere, elsewhere
    assert any("/deployments/demo/deploys" in u for u in requests) and any(u.endswith("/whoami") for u in requests)
    assert not problems, problems


def test_narrow_viewport_shows_every_view_without_horizontal_overflow(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], screenshots: Path
) -> None:
    page = open_console(viewport=NARROW, fragment="#d=demo&tab=history")
    assert fits_width(page), "sign-in page"
    sign_in(page, stack["token"])
    expect(page.locator("#history-body tr").first).to_be_visible()
    expect(deployment_card(page, "demo").locator(".convergence")).not_to_have_text("checking sidecars…")
    assert fits_width(page), "deployments and history"
    shoot(page, screenshots, "narrow-history")
    page.screenshot(path=str(screenshots / "narrow-deployments.png"))
    for tab in ("Fleet", "Sidecars", "Webhooks", "Settings"):
        page.get_by_role("tab", name=tab).click()
        expect(page.get_by_role("tabpanel", name=tab)).to_be_visible()
        assert fits_width(page), tab
        shoot(page, screenshots, f"narrow-{tab.lower()}")
    page.get_by_role("tab", name="History").click()
    rollback = page.get_by_role("button", name=re.compile("Roll back to v"))
    rollback.first.click()
    expect(page.get_by_role("dialog")).to_be_visible()
    assert fits_width(page), "rollback dialog"
    page.screenshot(path=str(screenshots / "narrow-rollback-dialog.png"))
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()


def test_a_bundle_version_link_from_airflow_opens_that_deploys_page_then_history_highlights_it(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any]
) -> None:
    version = demo_live["current_version"]
    page = open_console(fragment=f"#d=demo&tab=history&v={version}")  # what DagcastDagBundle.view_url gives Airflow
    sign_in(page, stack["token"])
    expect(page.locator("#page-title")).to_have_text(f"demo v{version}")
    expect(page.locator("#tabs")).to_be_hidden()
    assert page.evaluate("location.hash").endswith(f"&v={version}")
    page.get_by_role("button", name="Back to history").click()
    focused = page.locator("#history-body tr.focused")
    expect(focused).to_have_count(1)
    expect(focused.locator(".version")).to_contain_text(f"v{version}")
    expect(page.locator("#deploy-page")).to_be_hidden()
    assert page.evaluate("location.hash").endswith(f"&v={version}")


def test_a_promoted_deploy_says_where_it_came_from_and_webhook_deliveries_show_their_statuses(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], screenshots: Path
) -> None:
    api = Api(stack)
    target = "promo-target"
    if api.call("GET", f"/deployments/{target}").status_code == 404:
        api.json("POST", "/deployments", {"name": target, "mechanism": "DAG_ONLY"})
    proc = run_dagcast(["promote", "--from", "demo", "--to", target, "--wait", "--json", "--force"], stack_env(stack))
    assert proc.returncode == 0, proc.stderr
    promoted = parse_json_stdout(proc)
    # a webhook whose receiver is down: every attempt is recorded as failed, with why
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    hook = api.json("POST", f"/deployments/{target}/webhooks", {"url": f"http://127.0.0.1:{port}/hook", "events": ["*"]})
    try:
        proc = run_dagcast(["promote", "--from", "demo", "--to", target, "--json", "--force"], stack_env(stack))
        assert proc.returncode == 0, proc.stderr
        until(lambda: api.json("GET", f"/deployments/{target}/deliveries")["items"], 30, "a delivery attempt recorded")

        page = open_console(fragment=f"#d={target}&tab=history")
        sign_in(page, stack["token"])
        row = history_row(page, promoted["deploy_id"])
        expect(row.locator(".promoted")).to_contain_text(f"from demo v{promoted['promoted_from']['version']}")
        shoot(page, screenshots, "desktop-promoted")
        page.get_by_role("tab", name="Webhooks").click()
        first = page.locator("#delivery-body tr").first
        expect(first).to_contain_text("deploy.")
        expect(first.locator(".error-text")).to_contain_text("ConnectError")
        shoot(page, screenshots, "desktop-webhook-deliveries")
    finally:
        api.call("DELETE", f"/deployments/{target}/webhooks/{hook['webhook']['webhook_id']}")
