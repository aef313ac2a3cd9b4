"""Runs Airflow's side of the tests in a process of its own, configured by AIRFLOW__* variables.

Airflow reads its configuration once, at import, and sets up logging; a fresh process per
step keeps that out of pytest. Answers are JSON lines on stdout after a MARK (Airflow logs there too).

  versioned <n>     DagBundlesManager().get_bundle(name, n).initialize(); the files it serves
  processor         an unversioned bundle: initialize(), then one `refresh` per stdin line
  dagbag <folder>   parse a folder with Airflow's DagBag; DAG ids and import errors
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

BUNDLE = "dagcast"
MARK = "@@dagcast-test "


def answer(doc: dict[str, Any]) -> None:
    print(MARK + json.dumps(doc), flush=True)


def files_of(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def state(bundle: Any) -> dict[str, Any]:
    from airflow.dag_processing.bundles.base import unpack_bundle_version

    version, _ = unpack_bundle_version(bundle.get_current_version(), bundle)
    return {"version": version, "path": str(bundle.path), "files": files_of(bundle.path),
            "view_url": bundle.view_url(version)}


def main() -> int:
    from airflow.dag_processing.bundles.manager import DagBundlesManager

    command = sys.argv[1]
    if command == "versioned":
        bundle = DagBundlesManager().get_bundle(BUNDLE, version=sys.argv[2])
        try:
            bundle.initialize()
        except Exception as exc:  # noqa: BLE001 - reported to the test as data
            answer({"error": f"{type(exc).__name__}: {exc}"})
            return 1
        answer(state(bundle))
    elif command == "processor":
        bundle = DagBundlesManager().get_bundle(BUNDLE)
        bundle.initialize()
        answer(state(bundle))
        for _ in sys.stdin:
            bundle.refresh()
            answer(state(bundle))
    elif command == "dagbag":
        from airflow.dag_processing.dagbag import DagBag

        folder = Path(sys.argv[2])
        bag = DagBag(dag_folder=folder, safe_mode=False, bundle_path=folder)
        errors = {str(k): v.strip().splitlines()[-1] if v.strip() else "" for k, v in bag.import_errors.items()}
        answer({"dag_ids": sorted(bag.dag_ids), "import_errors": errors})
    else:
        print(f"unknown command {command}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
