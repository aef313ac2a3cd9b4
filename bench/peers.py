"""The peers bench/e2e.py measures beside dagcast, in the same run, on the same folders and S3 endpoint.

- `aws s3 sync`: the upload `aws s3 sync <dags> s3://<bucket>/dags/`, then on each of K "sidecars" at
  once `aws s3 sync s3://<bucket>/dags/ <its folder>`: the do-it-yourself DAG deploy.
- Airflow's S3DagBundle (apache-airflow-providers-amazon): the same upload, then on each of K
  long-running processes (bench/s3_bundle_worker.py, Airflow imported once, as in a dag processor)
  what the bundle does on a refresh: list the prefix and download what changed.

Each is timed from the start of the upload to the last sidecar done. Neither validates, parses, or
says when the sidecars have it; the S3DagBundle one waits for no refresh interval (it refreshes at
once, which a real dag processor does only every `refresh_interval`, 300 s by default).

The provider is not a dependency of dagcast: it is installed on demand into build/bench-peers/venv,
a virtualenv layered on the one running the bench (a .pth file puts that one's site-packages, with
its apache-airflow, behind the peer venv's own), so nothing installed there changes.
"""
from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / "build" / "bench-peers" / "venv"
PROVIDER = "apache-airflow-providers-amazon==9.39.0"  # resolves against apache-airflow 3.3.2 without changing it
WORKER = Path(__file__).resolve().parent / "s3_bundle_worker.py"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class PeerUnavailable(Exception):
    """A peer that cannot run here; the message says why (shown in the table)."""


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)


def aws_env() -> dict[str, str]:
    return {**os.environ, **CREDENTIALS}


def aws_upload(aws_cli: str, endpoint: str, dags: Path, bucket: str) -> None:
    subprocess.run([aws_cli, "s3", "sync", str(dags), f"s3://{bucket}/dags/", "--endpoint-url", endpoint,
                    "--only-show-errors"], env=aws_env(), check=True, timeout=3600)


def check_copy(dags: Path, local: Path, files: int) -> None:
    """The sidecar's copy has the folder's files, and the file bench/e2e.py changes as it is now."""
    have = sum(1 for p in local.rglob("*") if p.is_file())
    rel = Path("team_0") / "pipeline_0.py"
    if have < files or (local / rel).read_bytes() != (dags / rel).read_bytes():
        raise RuntimeError(f"{local}: {have} of {files} files, or {rel} is not the one just uploaded")


class SyncPeer:
    """`aws s3 sync` up, then `aws s3 sync` down on each sidecar at once."""

    name = "aws s3 sync"

    def __init__(self, aws_cli: str, endpoint: str, work: Path, bucket: str, sidecars: int) -> None:
        self.aws, self.endpoint, self.bucket = aws_cli, endpoint, bucket
        self.dirs = [work / f"{bucket}-sidecar-{i + 1}" for i in range(sidecars)]
        make_bucket(endpoint, bucket)

    def reset(self) -> None:
        """A first deploy: nothing on the sidecars yet."""
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)

    def run(self, dags: Path, files: int) -> float:
        started = time.monotonic()
        aws_upload(self.aws, self.endpoint, dags, self.bucket)
        procs = [subprocess.Popen([self.aws, "s3", "sync", f"s3://{self.bucket}/dags/", str(d), "--endpoint-url",
                                   self.endpoint, "--only-show-errors"], env=aws_env()) for d in self.dirs]
        codes = [p.wait(timeout=3600) for p in procs]
        seconds = time.monotonic() - started
        if any(codes):
            raise RuntimeError(f"aws s3 sync down exited {codes}")
        for d in self.dirs:
            check_copy(dags, d, files)
        return seconds

    def close(self) -> None:
        pass


def peer_python() -> Path:
    """The peer venv's python, made (and the provider installed) on first use."""
    python = PEER_VENV / "bin" / "python"
    probe = [str(python), "-c", "import airflow.providers.amazon.aws.bundles.s3"]
    if python.exists() and subprocess.run(probe, capture_output=True, timeout=120).returncode == 0:
        return python
    try:
        airflow = importlib.metadata.version("apache-airflow")  # found, not imported
    except importlib.metadata.PackageNotFoundError as exc:
        raise PeerUnavailable(f"apache-airflow is not installed in {sys.prefix}") from exc
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True, timeout=300)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "_bench_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    print(f"peers: installing {PROVIDER} (for apache-airflow {airflow}) into {PEER_VENV}", file=sys.stderr, flush=True)
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", PROVIDER, f"apache-airflow=={airflow}"],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or subprocess.run(probe, capture_output=True, timeout=120).returncode != 0:
        raise PeerUnavailable(f"could not install {PROVIDER} into {PEER_VENV}: {proc.stderr.strip()[-500:]}")
    return python


class BundlePeer:
    """The same upload, then a refresh of Airflow's S3DagBundle on each sidecar at once."""

    name = "S3DagBundle"

    def __init__(self, aws_cli: str, endpoint: str, work: Path, bucket: str, sidecars: int) -> None:
        self.aws, self.endpoint, self.bucket = aws_cli, endpoint, bucket
        python = peer_python()
        make_bucket(endpoint, bucket)
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        s3.put_object(Bucket=bucket, Key="dags/.init", Body=b"")  # initialize() checks that the prefix exists
        conn = {"conn_type": "aws", "login": "testing", "password": "testing",
                "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        home = work / f"{bucket}-airflow"
        env = {**aws_env(), "AIRFLOW_HOME": str(home), "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(conn),
               "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(home / "bundles"),
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING"}
        self.procs = [subprocess.Popen([str(python), str(WORKER), "--name", f"sidecar-{i + 1}", "--bucket", bucket,
                                        "--prefix", "dags"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True) for i in range(sidecars)]
        self.dirs = [Path(self._answer(p, "ready")) for p in self.procs]
        self._refresh_all()  # initialize() on each, as a dag processor does at start
        s3.delete_object(Bucket=bucket, Key="dags/.init")

    @staticmethod
    def _answer(proc: subprocess.Popen[str], want: str) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        word, _, rest = line.partition(" ")
        if word != want:
            raise RuntimeError(f"S3DagBundle worker: {line or f'exited {proc.poll()}'}")
        return rest

    def _refresh_all(self) -> float:
        """Ask every worker at once; the epoch time the last one finished."""
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("refresh\n")
            p.stdin.flush()
        with concurrent.futures.ThreadPoolExecutor(len(self.procs)) as pool:
            answers = list(pool.map(lambda p: self._answer(p, "done"), self.procs))
        return max(float(a.split()[0]) for a in answers)

    def reset(self) -> None:
        for d in self.dirs:  # the bundle's folder is made again by the next refresh's downloads
            for child in d.iterdir() if d.exists() else ():
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def run(self, dags: Path, files: int) -> float:
        started = time.time()
        aws_upload(self.aws, self.endpoint, dags, self.bucket)
        seconds = self._refresh_all() - started
        for d in self.dirs:
            check_copy(dags, d, files)
        return seconds

    def close(self) -> None:
        for p in self.procs:
            if p.stdin:
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
