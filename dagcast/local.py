"""The embedded stack: moto server, the API and the ingest function, and K sidecars on loopback.

Everything real but Lambda itself: moto server runs in its own process (real HTTP, real
S3 notifications to SQS, real SNS fan-out); the Chalice app is served by Chalice's local
server in this process, and the ingest handler is fed from the ingest queue the way the
Lambda SQS event source would feed it; sidecars are `dagcast sidecar` processes.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("dagcast.local")

REGION = "us-east-1"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"}


@dataclass
class SidecarInfo:
    name: str
    dags_path: str
    root: str
    log: str
    metrics_url: str = ""


@dataclass
class LocalInfo:
    api_url: str
    token: str
    deployment: str
    sidecars: list[SidecarInfo] = field(default_factory=list)
    console_url: str = ""
    aws_endpoint_url: str = ""
    sidecar_token: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:g}s")


class EmbeddedStack:
    """Start with `start()`, stop with `stop()`; or use as a context manager."""

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int = 0,
        sidecars: int = 2,
        deployment: str = "demo",
        stack_name: str = "dagcast-local",
        sidecar_args: list[str] | None = None,
        janitor_interval: float = 30.0,
    ) -> None:
        self.janitor_interval = janitor_interval
        self.state_dir = state_dir.resolve()
        self.port = port or free_port()
        self.sidecar_count = sidecars
        self.deployment = deployment
        self.stack_name = stack_name
        self.sidecar_args = sidecar_args or []
        self.moto: subprocess.Popen[bytes] | None = None
        self.sidecar_procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[TextIO] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self.info: LocalInfo | None = None
        self.env: dict[str, str] = {}

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> LocalInfo:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "local.json").unlink(missing_ok=True)
        moto_url = self._start_moto()
        self.env = {
            **FAKE_CREDENTIALS,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": moto_url,
        }
        os.environ.update(self.env)  # this process plays the Lambda runtime: its environment is the function's
        import boto3

        from dagcast.bootstrap import bootstrap

        outputs = bootstrap(boto3.session.Session(region_name=REGION), self.stack_name)
        os.environ.update(
            {
                "DAGCAST_TABLE_NAME": outputs.table_name,
                "DAGCAST_BUNDLES_BUCKET": outputs.bucket,
                "DAGCAST_TOPIC_ARN": outputs.topic_arn,
                "DAGCAST_SIDECAR_QUEUE_PREFIX": f"{self.stack_name}-sidecar-",
                # the stack's announcement signing key: a P-256 key in the state folder (KMS on AWS)
                "DAGCAST_SIGNING_KEY_FILE": str(self.state_dir / "signing-key.pem"),
                "POWERTOOLS_LOG_LEVEL": os.environ.get("POWERTOOLS_LOG_LEVEL", "WARNING"),
                "POWERTOOLS_METRICS_NAMESPACE": "dagcast",
                # EMF lines are for CloudWatch; on this machine they would only flood the terminal
                "POWERTOOLS_METRICS_DISABLED": os.environ.get("POWERTOOLS_METRICS_DISABLED", "true"),
            }
        )
        api_url = self._start_api()
        self._start_ingest(outputs.ingest_queue_url)
        self._start_janitor()
        token, sidecar_token = self._seed()
        self.info = LocalInfo(
            api_url=api_url,
            token=token,
            deployment=self.deployment,
            console_url=api_url + "/",
            aws_endpoint_url=moto_url,
            sidecar_token=sidecar_token,
        )
        for i in range(self.sidecar_count):
            self.info.sidecars.append(self.start_sidecar(f"sidecar-{i + 1}"))
        self._wait_registered()
        self._write_info()
        return self.info

    def stop(self) -> None:
        self._stop.set()
        for proc in self.sidecar_procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sidecar_procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._server is not None:
            self._server.shutdown()
        for t in self._threads:
            t.join(timeout=10)
        if self.moto is not None and self.moto.poll() is None:
            self.moto.terminate()
            try:
                self.moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.moto.kill()
        for f in self._logs:
            f.close()

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- parts ---------------------------------------------------------------------------

    def _start_moto(self) -> str:
        port = free_port()
        logf = open(self.state_dir / "moto.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(logf)
        self.moto = subprocess.Popen(
            [sys.executable, "-m", "dagcast.moto_server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/moto-api/data.json", 60, self.moto)
        return url

    def _start_api(self) -> str:
        from chalice.config import Config
        from chalice.local import create_local_server

        import app as chalice_app

        server = create_local_server(chalice_app.app, Config(), "127.0.0.1", self.port)
        server.server.RequestHandlerClass = _quiet(server.server.RequestHandlerClass)
        self._server = server
        t = threading.Thread(target=server.server.serve_forever, name="api", daemon=True)
        t.start()
        url = f"http://127.0.0.1:{self.port}"
        _wait_http(url + "/healthz", 30)
        return url

    def _start_ingest(self, queue_url: str, workers: int = 2) -> None:
        for i in range(workers):
            t = threading.Thread(target=self._ingest_loop, args=(queue_url,), name=f"ingest-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _ingest_loop(self, queue_url: str) -> None:
        """Plays Lambda's SQS event source: receive a batch, invoke the handler, delete what succeeded."""
        import boto3

        import app as chalice_app

        sqs = boto3.client("sqs", region_name=REGION)
        arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        while not self._stop.is_set():
            try:
                out = sqs.receive_message(
                    QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=2, AttributeNames=["All"]
                )
            except Exception:  # noqa: BLE001 - moto going away at shutdown
                if self._stop.is_set():
                    return
                log.exception("ingest receive failed")
                time.sleep(0.5)
                continue
            messages = out.get("Messages", [])
            if not messages:
                continue
            event = {"Records": [_lambda_sqs_record(m, arn) for m in messages]}
            try:
                result = chalice_app.ingest(event, None)
                failed = {f["itemIdentifier"] for f in result.get("batchItemFailures", [])}
            except Exception:  # noqa: BLE001 - a whole-batch failure: every message is retried
                log.exception("ingest handler failed")
                failed = {m["MessageId"] for m in messages}
            done = [m for m in messages if m["MessageId"] not in failed]
            if done:
                sqs.delete_message_batch(
                    QueueUrl=queue_url,
                    Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
                )
            for m in messages:
                if m["MessageId"] in failed:  # retry soon rather than after the full visibility timeout
                    sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=2)

    def _start_janitor(self) -> None:
        """Plays the scheduled janitor function."""
        import app as chalice_app

        def loop() -> None:
            while not self._stop.wait(self.janitor_interval):
                try:
                    chalice_app.janitor(_scheduled_event(), None)
                except Exception:  # noqa: BLE001 - keep the schedule going, like EventBridge would
                    log.exception("janitor failed")

        t = threading.Thread(target=loop, name="janitor", daemon=True)
        t.start()
        self._threads.append(t)

    def _seed(self) -> tuple[str, str]:
        import app as chalice_app
        from chalicelib.models import CreateDeployment, Mechanism, Role

        control = chalice_app.get_control()
        control.create_deployment(CreateDeployment(name=self.deployment, mechanism=Mechanism.DAG_ONLY))
        admin = control.issue_token("local-admin", Role.ADMIN, ["*"])
        sidecar = control.issue_token("local-sidecars", Role.SIDECAR, [self.deployment], sidecar_names=["sidecar-*"])
        return admin, sidecar

    def start_sidecar(self, name: str, extra_args: list[str] | None = None) -> SidecarInfo:
        assert self.info is not None
        root = self.state_dir / "sidecars" / name
        root.mkdir(parents=True, exist_ok=True)
        link = root / "current"
        log_path = self.state_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(exist_ok=True)
        logf = open(log_path, "a")  # noqa: SIM115 - closed in stop()
        self._logs.append(logf)
        env = {
            **os.environ,
            **self.env,
            "DAGCAST_API_URL": self.info.api_url,
            "DAGCAST_TOKEN": self.info.sidecar_token,
            "DAGCAST_DEPLOYMENT": self.deployment,
        }
        metrics_port = free_port()
        args = ["--name", name, "--root", str(root), "--link", str(link), "--component", "worker",
                "--metrics-addr", f"127.0.0.1:{metrics_port}"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagcast", "sidecar", *args, *self.sidecar_args, *(extra_args or [])],
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        self.sidecar_procs.append(proc)
        return SidecarInfo(name=name, dags_path=str(link), root=str(root), log=str(log_path),
                           metrics_url=f"http://127.0.0.1:{metrics_port}")

    def _wait_registered(self, timeout: float = 60) -> None:
        import app as chalice_app

        want = {s.name for s in self.info.sidecars} if self.info else set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            have = {s.name for s in chalice_app.get_control().sidecar_views(self.deployment)}
            if want <= have:
                return
            dead = [p for p in self.sidecar_procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a sidecar exited with {dead[0].returncode}; see {self.state_dir / 'logs'}")
            time.sleep(0.1)
        raise RuntimeError(f"sidecars did not register within {timeout:g}s; see {self.state_dir / 'logs'}")

    def _write_info(self) -> None:
        assert self.info is not None
        doc = asdict(self.info)
        doc["sidecars"] = [{"name": s.name, "dags_path": s.dags_path, "metrics_url": s.metrics_url} for s in self.info.sidecars]
        tmp = self.state_dir / ".local.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the admin token
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self.state_dir / "local.json")


def _lambda_sqs_record(message: dict[str, Any], queue_arn: str) -> dict[str, Any]:
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message.get("Attributes", {}),
        "messageAttributes": message.get("MessageAttributes", {}),
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": REGION,
    }


def _scheduled_event() -> dict[str, Any]:
    """The event EventBridge sends a scheduled function."""
    import uuid

    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": REGION,
        "resources": [],
        "detail": {},
    }


def _quiet(handler: Any) -> Any:
    """Chalice's request handler class (a partial) with access logs silenced."""
    import functools

    from chalice.local import ChaliceRequestHandler

    class Quiet(ChaliceRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    return functools.partial(Quiet, *handler.args, **handler.keywords)
