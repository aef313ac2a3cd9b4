"""The GitHub Action's deploy step (action.yml): `dagcast deploy --dags --json`, told to GitHub.

    python -m dagcast.github_action --dags-path dags --wait true --timeout 600 \
        --output-file "$GITHUB_OUTPUT" --summary-file "$GITHUB_STEP_SUMMARY"

It runs the deploy as a user would (the API URL, token and deployment come from DAGCAST_API_URL,
DAGCAST_TOKEN and DAGCAST_DEPLOYMENT, which action.yml sets from its inputs), passes its stderr
through to the log, and from the one JSON object on stdout makes:

- the step's outputs `deploy-id`, `version`, `state` and `exit-code`;
- workflow commands: an `::error file=...,line=...::` annotation on each rejected file (exit 3)
  and on each file Airflow could not import (exit 5), one `::error::` line for any other
  failure, a `::notice::` on success;
- a line in the job summary.

It exits with the deploy's exit code (README: 0 ok, 1 error, 2 usage, 3 rejected, 4 --wait
timed out, 5 new import errors), so that the step fails exactly when the deploy did.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import posixpath
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OUTPUTS = ("deploy-id", "version", "state", "exit-code")


def escape_data(text: str) -> str:
    """A workflow command's message: %, CR and LF escaped (GitHub's own rules)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value (file=...): also ':' and ','."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(message: str, file: str | None = None, line: int | None = None, level: str = "error") -> str:
    props = []
    if file:
        props.append(f"file={escape_property(file)}")
        props.append(f"line={line or 1}")
    head = f"::{level} {','.join(props)}::" if props else f"::{level}::"
    return head + escape_data(message)


def repo_path(dags_path: str, rel: str | None) -> str | None:
    """Where a bundle member is in the repository checkout (annotations need that path)."""
    if not rel:
        return None
    base = Path(dags_path)
    if base.is_absolute():
        with contextlib.suppress(ValueError):  # outside the checkout: keep it absolute
            base = base.relative_to(Path.cwd())
    return posixpath.normpath(posixpath.join(base.as_posix(), rel))


def commands_for(doc: dict[str, Any], code: int, dags_path: str) -> list[str]:
    """The workflow commands that tell the outcome of one deploy (its JSON and exit code)."""
    if code == 0:
        if doc.get("state") == "UNCHANGED":
            return [annotation("no changes: the live version already has this bundle", level="notice")]
        version = f" v{doc['version']}" if doc.get("version") else ""
        return [annotation(f"deployed{version} ({doc.get('state')}), deploy {doc.get('deploy_id')}", level="notice")]
    lines: list[str] = []
    if code == 3:
        for e in doc.get("errors") or []:
            lines.append(annotation(f"{e.get('code')}: {e.get('message')}", repo_path(dags_path, e.get("path")), e.get("line")))
    if code == 5:
        for e in (doc.get("parse") or {}).get("import_errors") or []:
            lines.append(annotation(f"{e.get('type')}: {e.get('message')}", repo_path(dags_path, e.get("path")), e.get("line")))
    error = doc.get("error") or {}
    summary = f"deploy failed (exit {code}): {error.get('code', 'error')}: {error.get('message', 'no JSON from dagcast deploy')}"
    if code == 4:
        names = [f"{s.get('name')} v{s.get('version')}" for s in (doc.get("sidecars") or []) + (doc.get("stale_sidecars") or [])]
        summary += f" (sidecars: {', '.join(names) or 'none'})"
    return [*lines, annotation(summary)]


def write_outputs(path: str | None, doc: dict[str, Any], code: int) -> None:
    if not path:
        return
    values = {"deploy-id": doc.get("deploy_id"), "version": doc.get("version"), "state": doc.get("state"), "exit-code": code}
    with open(path, "a", encoding="utf-8") as f:
        for name in OUTPUTS:
            value = values[name]
            f.write(f"{name}={'' if value is None else value}\n")


def write_summary(path: str | None, doc: dict[str, Any], code: int) -> None:
    if not path:
        return
    verdict = "deployed" if code == 0 else f"failed (exit {code})"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"### dagcast deploy: {verdict}\n\n| deploy | version | state | files | sidecars on it |\n|---|---|---|---|---|\n")
        on_it = sum(1 for s in doc.get("sidecars") or [] if s.get("on_it"))
        f.write(f"| {doc.get('deploy_id') or '-'} | {doc.get('version') or '-'} | {doc.get('state') or '-'} | "
                f"{doc.get('files') or '-'} | {on_it}/{len(doc.get('sidecars') or [])} |\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m dagcast.github_action", description=__doc__.splitlines()[0])
    ap.add_argument("--dags-path", default="dags", help="The dags folder, relative to the checkout.")
    ap.add_argument("--wait", default="true", choices=["true", "false"], help="Wait until every live sidecar runs it.")
    ap.add_argument("--timeout", default="600", help="Seconds to wait.")
    ap.add_argument("--description", default="", help="What the deploy changes (default: the commit subject).")
    ap.add_argument("--output-file", default=None, help="Where the step's outputs go ($GITHUB_OUTPUT).")
    ap.add_argument("--summary-file", default=None, help="The job summary ($GITHUB_STEP_SUMMARY).")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cmd = [sys.executable, "-m", "dagcast", "deploy", "--dags", "--dags-path", args.dags_path, "--json",
           "--wait" if args.wait == "true" else "--no-wait", "--timeout", args.timeout]
    if args.description:
        cmd += ["--description", args.description]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)  # stderr: straight to the log
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    code = proc.returncode
    for line in commands_for(doc, code, args.dags_path):
        print(line)
    write_outputs(args.output_file, doc, code)
    write_summary(args.summary_file, doc, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
