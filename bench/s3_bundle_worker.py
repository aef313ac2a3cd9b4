"""One "sidecar" of bench/e2e.py's S3DagBundle peer: Airflow's own S3 bundle, refreshed on request.

  <peer venv>/bin/python bench/s3_bundle_worker.py --name sidecar-1 --bucket B --prefix dags

Runs in the bench's peer virtualenv (build/bench-peers/venv: apache-airflow-providers-amazon on top
of the Airflow the project's venv has), never in the bench process. The AWS connection comes from
the environment (AIRFLOW_CONN_AWS_DEFAULT, endpoint_url in its extra) and the bundle's local folder
from AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH. Airflow is imported once at start, as a dag
processor that is already running; then each line `refresh` on stdin does what the dag processor
does on a bundle refresh (`initialize()` the first time, `refresh()` after): list the prefix and
download what changed. Answers one line each on stdout: `ready <path>`, then `done <epoch s> <files>`
or `error <message>`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="dags")
    args = parser.parse_args()
    from airflow.providers.amazon.aws.bundles.s3 import S3DagBundle

    bundle = S3DagBundle(name=args.name, bucket_name=args.bucket, prefix=args.prefix, refresh_interval=0)
    print(f"ready {bundle.path}", flush=True)
    for line in sys.stdin:
        if line.strip() != "refresh":
            continue
        try:
            if bundle.is_initialized:
                bundle.refresh()
            else:
                bundle.initialize()
            files = sum(1 for p in Path(bundle.path).rglob("*") if p.is_file())
            print(f"done {time.time():.6f} {files}", flush=True)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer: the bench reports it, stops this peer
            print(f"error {type(exc).__name__}: {str(exc)[:500]}".replace("\n", " "), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
