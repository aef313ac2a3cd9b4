"""The README's exit-code table and `--json` schema say what the code does."""
from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from dagcast import cli, exceptions
from dagcast.deploy import DeployResult
from dagcast.observe import SidecarMetrics
from dagcast.sidecar import Sidecar, SidecarConfig

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def table_after(heading: str) -> list[list[str]]:
    start = README.index(heading)
    rows = []
    for line in README[start:].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:]


def test_the_exit_code_table_is_the_one_main_uses() -> None:
    rows = table_after("Exit codes (also in `dagcast --help`)")
    documented = {int(c) for row in rows for c in re.findall(r"\d+", row[0])}
    used = {getattr(exceptions, name) for name in dir(exceptions) if name.startswith("EXIT_")}
    assert documented == used == {0, 1, 2, 3, 4, 5, 130, 143}
    assert "Exit codes: 0 success" in CliRunner().invoke(cli.cli, ["--help"]).output


def test_every_documented_deploy_json_key_is_in_every_deploy_json_object() -> None:
    rows = table_after("`deploy --json` always has these keys")
    documented = {k for row in rows for k in re.findall(r"`(\w+)`", row[0])}
    keys = set(DeployResult().to_json()) | {"files_list"}  # files_list only with --dry-run
    assert documented == keys


def test_a_sidecar_before_the_first_deploy_says_it_is_waiting_on_healthz(tmp_path: Path) -> None:
    cfg = SidecarConfig(name="s", root=tmp_path / "root", link=tmp_path / "dags", deployment="d")
    daemon = Sidecar(cfg, None, None, SidecarMetrics())  # type: ignore[arg-type]
    daemon.syncer.prepare()
    assert daemon.health() == (False, "no version live yet")
    daemon.waiting = True
    assert daemon.health() == (False, "waiting for the first deploy of this deployment")
