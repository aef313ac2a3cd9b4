"""The console's views for looking into deploys: a deploy's page (files and their diff, DAGs, errors, parse
report, timeline, who), the fleet by component, the chart of the last deploys, and the Git column."""
from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from helpers import Api, PlayedSidecar, aws, dag_source, parse_json_stdout, write_dags
from playwright.sync_api import Page, expect
from test_console import NARROW, OpenConsole, deploy_dags, fits_width, history_row, shoot, sign_in

BRANCH = "feature/console-investigation-view"


def git_checkout(folder: Path, files: dict[str, str]) -> Path:
    """A DAG folder that is a git checkout on BRANCH, with an uncommitted file (so the deploy is +dirty)."""
    write_dags(folder, files)
    for args in (["init", "-q", "-b", BRANCH], ["add", "."],
                 ["-c", "user.name=Ada Lovelace", "-c", "user.email=ada@example.com", "commit", "-q", "-m", "console view"]):
        subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)
    (folder / "notes.sql").write_text("select 'uncommitted';\n")
    return folder


def two_deploys(stack: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Two live versions of demo, the second changing etl.py, adding a DAG file and removing a helper."""
    tag = uuid.uuid4().hex[:8]
    first = {"etl.py": dag_source(f"page_etl_{tag}"), "helpers.py": "def helper():\n    return 1\n"}
    proc = deploy_dags(stack, write_dags(tmp_path / "a", first), "--wait", "--json", "--force", "--allow-dag-removal")
    assert proc.returncode == 0, proc.stderr
    before = parse_json_stdout(proc)
    second = {"etl.py": dag_source(f"page_etl_{tag}", "# retries raised\n"), f"added_{tag}.py": dag_source(f"page_new_{tag}")}
    folder = git_checkout(tmp_path / "b", second)
    proc = deploy_dags(stack, folder, "--wait", "--json", "--force", "--allow-dag-removal", "--description", "the page under test")
    assert proc.returncode == 0, proc.stderr
    return before, parse_json_stdout(proc), tag


def test_a_deploy_page_shows_its_file_changes_a_diff_the_dags_the_timeline_and_who_deployed(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], tmp_path: Path, screenshots: Path
) -> None:
    before, after, tag = two_deploys(stack, tmp_path)
    me = Api(stack).json("GET", "/whoami")
    page = open_console(fragment="#d=demo&tab=history")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    sign_in(page, stack["token"])
    history_row(page, after["deploy_id"]).locator(".description").click()  # a click anywhere on the row opens it

    expect(page.locator("#page-title")).to_have_text(f"demo v{after['version']}")
    assert page.evaluate("location.hash") == f"#d=demo&tab=history&v={after['version']}"
    body = page.locator("#page-body")
    expect(body.locator(".created-by")).to_have_text(me["name"])
    expect(body).to_contain_text("Ada Lovelace <ada@example.com>")
    expect(body.locator(".git-full .branch")).to_have_text(BRANCH)
    expect(body.locator(".git-full .dirty")).to_have_text("+dirty")
    expect(body.get_by_role("list", name="DAGs added")).to_contain_text(f"page_new_{tag}")
    expect(body.locator(".files-summary")).to_contain_text(f"1 changed, 2 added, 1 removed, against v{before['version']}")
    expect(body.get_by_role("list", name="Files removed")).to_contain_text("helpers.py")
    expect(body.get_by_role("list", name="Files added")).to_contain_text(f"added_{tag}.py")
    changed = body.locator('.file-changed li[data-path="etl.py"]')
    expect(changed.locator(".file-size")).to_have_text(re.compile(r"^\d+ B → \d+ B$"))

    changed.get_by_role("button", name="Show diff").click()
    diff = changed.locator("pre.diff-text")
    expect(diff).to_contain_text(f"--- v{before['version']}/etl.py")
    expect(diff.locator(".dl-add")).to_have_text(["+# retries raised\n"])
    timeline = body.locator("svg.timeline")
    expect(timeline.locator("title")).to_have_text("Stage timeline of this deploy")
    labels = timeline.locator(".tl-label")
    for name in ("created", "uploaded", "ACTIVE", *(f"{s['name']} live" for s in stack["sidecars"]), "all sidecars live"):
        expect(labels.filter(has_text=re.compile(f"^{re.escape(name)}$"))).to_have_count(1)
    shoot(page, screenshots, "desktop-deploy-page")

    # the diff came through the API, never a bundle (no S3 URL, no version download) in the browser
    assert any("/files/diff?path=etl.py" in u for u in requests), requests
    assert not [u for u in requests if stack["aws_endpoint_url"] in u or "/versions/" in u], requests

    page.go_back()  # the page was a history entry: Back closes it
    expect(page.locator("#deploy-page")).to_be_hidden()
    expect(page.locator("#history-body tr").first).to_be_visible()


def test_the_deploy_page_and_its_diff_fit_a_390px_screen(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], tmp_path: Path, screenshots: Path
) -> None:
    _, after, _ = two_deploys(stack, tmp_path)
    page = open_console(viewport=NARROW, fragment=f"#d=demo&tab=history&v={after['version']}")
    sign_in(page, stack["token"])
    changed = page.locator('.file-changed li[data-path="etl.py"]')
    changed.get_by_role("button", name="Show diff").click()
    expect(changed.locator("pre.diff-text")).to_be_visible()
    expect(page.locator("svg.timeline")).to_be_visible()
    assert fits_width(page), "deploy page"
    shoot(page, screenshots, "narrow-deploy-page")


def test_a_rejected_deploys_page_lists_its_validation_errors_by_file_and_line(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], tmp_path: Path, screenshots: Path
) -> None:
    dags = write_dags(tmp_path / "dags", {"ok.py": dag_source("page_ok"), "broken.py": "x = 1\ndef f(:\n"})
    proc = deploy_dags(stack, dags, "--wait", "--json", "--skip-validation")
    assert proc.returncode == 3, proc.stderr
    rejected = parse_json_stdout(proc)
    page = open_console(fragment="#d=demo&tab=history")
    sign_in(page, stack["token"])
    history_row(page, rejected["deploy_id"]).get_by_role("link", name=f"Open deploy {rejected['deploy_id']}").click()
    expect(page.locator("#page-title")).to_have_text("demo deploy")
    assert page.evaluate("location.hash") == f"#d=demo&tab=history&deploy={rejected['deploy_id']}"
    by_file = page.get_by_role("list", name="Validation errors by file")
    expect(by_file.locator(".error-file .where")).to_have_text(["broken.py"])
    expect(by_file).to_contain_text(re.compile(r"line 2: syntax_error: "))
    expect(page.locator("#page-body")).to_contain_text("This deploy never went live: no files changed.")
    shoot(page, screenshots, "desktop-deploy-page-rejected")


def test_a_deploy_page_shows_airflows_import_errors_by_file_with_each_component(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], tmp_path: Path
) -> None:
    dags = write_dags(tmp_path / "dags", {"ok.py": dag_source("page_parsed"),
                                          "needs_pandas.py": "from airflow import DAG\nimport pandas_not_here\n"})
    proc = deploy_dags(stack, dags, "--wait", "--json", "--allow-import-errors", "--allow-dag-removal")
    assert proc.returncode == 0, proc.stderr
    deployed = parse_json_stdout(proc)
    components = {s["name"]: s["component"] for s in Api(stack).json("GET", "/deployments/demo/sidecars")["items"]}
    page = open_console(fragment=f"#d=demo&tab=history&v={deployed['version']}")
    sign_in(page, stack["token"])
    by_file = page.get_by_role("list", name="Import errors by file")
    expect(by_file.locator(".error-file .where")).to_have_text(["needs_pandas.py"])
    expect(by_file).to_contain_text("line 2: ModuleNotFoundError: No module named 'pandas_not_here'")
    for s in stack["sidecars"]:
        expect(by_file).to_contain_text(re.compile(f"{re.escape(components[s['name']])}: [^;]*{re.escape(s['name'])}"))


def test_the_fleet_groups_sidecars_by_component_and_marks_the_behind_and_the_stale(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], screenshots: Path
) -> None:
    api = Api(stack)
    v = api.json("GET", "/deployments/demo")["current_version"]
    table = aws(stack, "dynamodb")
    key = {"pk": {"S": "DEPLOYMENT#demo"}, "sk": {"S": "SIDECAR#fleet-silent"}}
    silent = int(time.time() * 1000) - 120_000
    table.put_item(TableName="dagcast-local-state", Item={**key, "deployment": {"S": "demo"}, "name": {"S": "fleet-silent"},
                   "component": {"S": "triggerer"}, "version": {"N": str(v)}, "last_heartbeat": {"N": str(silent)},
                   "registered_at": {"N": str(silent)}})
    lagging = PlayedSidecar(api, "demo", "fleet-lagging", "triggerer")
    try:
        lagging.report({"version": v - 1})
        page = open_console(fragment="#d=demo&tab=fleet")
        sign_in(page, stack["token"])
        group = page.locator('.fleet-group[data-component="triggerer"]')
        expect(group.locator(".fleet-head .badge")).to_have_text(f"0 of 2 on v{v}")
        behind = group.locator('li[data-sidecar="fleet-lagging"]')
        expect(behind.locator(".fleet-version")).to_have_text(f"v{v - 1}")
        expect(behind.locator(".fleet-mark")).to_have_text(f"behind v{v}")
        expect(behind.locator(".fleet-beat")).to_contain_text(re.compile(r"heartbeat \d+ s ago"))
        stale = group.locator('li[data-sidecar="fleet-silent"]')
        expect(stale.locator(".fleet-mark")).to_have_text("stale")
        expect(stale.locator(".fleet-beat")).to_contain_text(re.compile(r"heartbeat [12] min ago"))
        for s in stack["sidecars"]:  # the stack's own sidecars are current, each in its component's group
            expect(page.locator(f'li[data-sidecar="{s["name"]}"] .fleet-mark')).to_have_text("current")
        shoot(page, screenshots, "desktop-fleet")

        narrow = open_console(viewport=NARROW, fragment="#d=demo&tab=fleet")
        sign_in(narrow, stack["token"])
        expect(narrow.locator('li[data-sidecar="fleet-lagging"] .fleet-mark')).to_have_text(f"behind v{v}")
        assert fits_width(narrow), "fleet"
        shoot(narrow, screenshots, "narrow-fleet")
    finally:
        lagging.deregister()
        table.delete_item(TableName="dagcast-local-state", Key=key)


def chart_versions(stack: dict[str, Any]) -> list[int]:
    """The versions the chart draws: the last 50 deploys that went live and have stage timings, oldest first."""
    items = Api(stack).json("GET", "/deployments/demo/deploys?limit=50")["items"]
    timed = [d for d in items if d["version"] and (d["stages"]["ingest_to_active_s"] is not None
                                                   or d["stages"]["active_to_all_live_s"] is not None)]
    return [d["version"] for d in reversed(timed)]


def test_the_chart_draws_the_last_deploys_upload_to_active_and_active_to_all_live_with_a_table_fallback(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], screenshots: Path
) -> None:
    page = open_console(fragment="#d=demo&tab=history")
    sign_in(page, stack["token"])
    chart = page.locator("svg.deploy-chart")
    expect(chart).to_be_visible()
    versions = chart_versions(stack)
    bars = chart.locator("g.bar")
    expect(bars).to_have_count(len(versions))
    assert [int(x) for x in bars.evaluate_all("gs => gs.map(g => g.dataset.version)")] == versions
    expect(chart.locator("title").first).to_have_text(f"Timings of the last {len(versions)} deploys")
    last = bars.last
    expect(last.locator("title")).to_have_text(re.compile(rf"^v{versions[-1]}: upload → ACTIVE \d.* s, ACTIVE → all live \d.* s$"))
    heights = last.locator("rect").evaluate_all("rs => rs.map(r => Number(r.getAttribute('height')))")
    assert all(h > 0 for h in heights), heights  # both stages drawn for a deploy that went live everywhere
    page.get_by_text("Show as a table").click()
    expect(page.locator("#chart-body tr")).to_have_count(len(versions))
    expect(page.locator("#chart-body tr").first).to_contain_text(f"v{versions[-1]}")
    page.locator("#deploy-chart").screenshot(path=str(screenshots / "desktop-chart.png"))

    narrow = open_console(viewport=NARROW, fragment="#d=demo&tab=history")
    sign_in(narrow, stack["token"])
    expect(narrow.locator("svg.deploy-chart")).to_be_visible()
    assert fits_width(narrow), "chart"
    narrow.locator("#deploy-chart").screenshot(path=str(screenshots / "narrow-chart.png"))


# One line box per part (the sha, "+dirty", the branch), measured in one go: a poll may replace the row.
LINES_OF = """id => [...document.querySelectorAll(`#history-body tr[data-deploy-id="${id}"] td[data-label='Git'] .git > *`)]
  .map(part => {
    const range = document.createRange();
    range.selectNodeContents(part);
    return [part.textContent, new Set([...range.getClientRects()].map(r => Math.round(r.top))).size];
  })"""


def git_lines(page: Page, deploy_id: str) -> list[list[Any]]:
    return list(page.evaluate(LINES_OF, deploy_id))


def test_the_git_column_never_breaks_a_sha_or_a_branch_mid_word(
    open_console: OpenConsole, stack: dict[str, Any], demo_live: dict[str, Any], tmp_path: Path, screenshots: Path
) -> None:
    _, after, _ = two_deploys(stack, tmp_path)
    sha = Api(stack).json("GET", f"/deployments/demo/deploys/{after['deploy_id']}")["deploy"]["git"]["sha"]
    for viewport, name in (({"width": 900, "height": 800}, "desktop-history-git"), (NARROW, "narrow-history-git")):
        page = open_console(viewport=viewport, fragment="#d=demo&tab=history")
        sign_in(page, stack["token"])
        expect(history_row(page, after["deploy_id"]).locator(".git .branch")).to_have_text(BRANCH)
        parts = git_lines(page, after["deploy_id"])
        assert [p[0] for p in parts] == [sha[:8], "+dirty", BRANCH], parts
        assert all(lines == 1 for _, lines in parts), (viewport, parts)
        assert fits_width(page), viewport
        shoot(page, screenshots, name)
