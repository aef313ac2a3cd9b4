"""The embedded stack: moto server, the API and the ingest function, and K sidecars on loopback.

Everything real but Lambda itself: moto server runs in its own process (real HTTP, real S3
notifications to SQS, real SNS fan-out); the Chalice app is served by Chalice's local server
in this process, and the ingest handler is fed from the ingest queue the way the Lambda SQS
event source would feed it; sidecars are `dagcast sidecar` processes.

It is durable and supervised. Everything it holds lives under the state folder: moto's state
in `aws/` (see dagcast.moto_state), the signing key, `local.json` (the API's port and the
tokens, mode 0600) and the sidecars' folders, so a stack started again on the same folder
carries on where it stopped, on the same ports with the same tokens. A crashed moto server or
sidecar is started again with backoff (one log line each time); children die with this process.
One stack runs per state folder (`local.lock`).
"""
from __future__ import annotations

import contextlib
import fcntl
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

from dagcast import logs
from dagcast.lifetime import child_env

log = logging.getLogger("dagcast.local")

REGION = "us-east-1"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"}
ADMIN_TOKEN, SIDECAR_TOKEN = "local-admin", "local-sidecars"
RESTARTS_BEFORE_GIVING_UP = 5  # a child that keeps crashing this many times in a row stops the stack (moto) or stays down


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
    event_bus_name: str = ""
    pid: int = 0


class StackError(RuntimeError):
    """The stack cannot start or keep running (the message says which part)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def read_info(state_dir: Path) -> dict[str, Any] | None:
    """local.json of a state folder, or None."""
    try:
        doc: dict[str, Any] = json.loads((state_dir / "local.json").read_text())
    except (OSError, ValueError):
        return None
    return doc


def running_pid(state_dir: Path) -> int | None:
    """The pid of the `local up` that holds the state folder's lock, or None when none does."""
    lock = state_dir / "local.lock"
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = lock.read_text().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except (OSError, IndexError):  # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"the process serving {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"{url} did not answer within {timeout:g}s")


@dataclass
class _Child:
    """A supervised child process: how to start it again, and its crash count."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    crashes: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    gave_up: bool = False
    _log: TextIO | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(self.argv, env=child_env(self.env), stdout=self._log, stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def last_words(self) -> str:
        """The last line the child wrote (an `error: ...` line when it refused to start)."""
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1].strip()[:500] if lines else ""


class EmbeddedStack:
    """Start with `start()`, keep it running with `supervise()`, stop with `stop()`; or use as a context manager."""

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
        bind: str = "127.0.0.1",
        persist: bool = True,
    ) -> None:
        self.janitor_interval = janitor_interval
        self.persist = persist  # False: moto's state in memory only (bench/durable.py's baseline)
        self.state_dir = state_dir.resolve()
        self.bind = bind
        self.requested_port = port
        self.port = port
        self.sidecar_count = sidecars
        self.deployment = deployment
        self.stack_name = stack_name
        self.sidecar_args = sidecar_args or []
        self.moto: _Child | None = None
        self.children: list[_Child] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self._lock_fd: int | None = None
        self.info: LocalInfo | None = None
        self.env: dict[str, str] = {}
        self.restored: dict[str, Any] = {}

    @property
    def sidecar_procs(self) -> list[subprocess.Popen[bytes]]:
        return [c.proc for c in self.children if c.proc is not None]

    @property
    def host(self) -> str:
        """The address URLs name: the bound one, or this machine's when bound to every interface."""
        if self.bind in ("0.0.0.0", "::", ""):
            try:
                return socket.gethostbyname(socket.gethostname())
            except OSError:
                return "127.0.0.1"
        return self.bind

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> LocalInfo:
        self._started_ms = int(time.time() * 1000)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # tokens, the signing key and the state: this user's only
        self._take_lock()
        previous = read_info(self.state_dir) or {}
        (self.state_dir / "local.json").unlink(missing_ok=True)
        moto_url = self._start_moto(previous)
        self.env = {**FAKE_CREDENTIALS, "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": moto_url}
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
                "DAGCAST_EVENT_BUS_NAME": outputs.event_bus_name,
                "DAGCAST_WEBHOOK_QUEUE_URL": outputs.webhook_queue_url,
                # receivers on this machine (loopback, plain http); retries a second apart, then doubling
                "DAGCAST_WEBHOOK_ALLOW_PRIVATE_HOSTS": "true",
                # one process serves the API, ingest and the sidecars' reports: a long poll wakes on their writes
                "DAGCAST_WAIT_WAKEUPS": os.environ.get("DAGCAST_WAIT_WAKEUPS", "true"),
                "DAGCAST_WEBHOOK_RETRY_BASE_SECONDS": os.environ.get("DAGCAST_WEBHOOK_RETRY_BASE_SECONDS", "1"),
                "POWERTOOLS_LOG_LEVEL": os.environ.get("POWERTOOLS_LOG_LEVEL", "WARNING"),
                "POWERTOOLS_METRICS_NAMESPACE": "dagcast",
                # EMF lines are for CloudWatch; on this machine they would only flood the terminal
                "POWERTOOLS_METRICS_DISABLED": os.environ.get("POWERTOOLS_METRICS_DISABLED", "true"),
            }
        )
        api_url = self._start_api(previous)
        logs.one_handler()  # the functions' logs, once (app's powertools Logger added a second handler)
        self._start_ingest(outputs.ingest_queue_url)
        self._start_consumer("webhooks", outputs.webhook_queue_url, "webhooks", workers=1, retry_visibility=None)
        self._start_janitor()
        token, sidecar_token = self._seed(previous)
        self.info = LocalInfo(
            api_url=api_url,
            token=token,
            deployment=self.deployment,
            console_url=api_url + "/",
            aws_endpoint_url=moto_url,
            sidecar_token=sidecar_token,
            event_bus_name=outputs.event_bus_name,
            pid=os.getpid(),
        )
        self._reconcile_ingest(outputs.bucket, outputs.ingest_queue_url)
        for i in range(self.sidecar_count):
            self.info.sidecars.append(self.start_sidecar(f"sidecar-{i + 1}"))
        self._wait_registered()
        self._write_info()
        return self.info

    def supervise(self, stop: threading.Event, tick: float = 0.5) -> None:
        """Until `stop` is set: start again, with backoff, whatever child crashed. StackError when moto
        server cannot be kept running."""
        while not stop.wait(tick):
            for child in [c for c in (self.moto, *self.children) if c is not None]:
                self._look_after(child)

    def _look_after(self, child: _Child) -> None:
        if child.gave_up or child.proc is None or child.proc.poll() is None:
            return
        now = time.monotonic()
        if child.next_start == 0.0:
            code = child.proc.returncode
            child.crashes = child.crashes + 1 if now - child.started_at < 60 else 1
            delay = min(30.0, 0.5 * 2 ** (child.crashes - 1))
            if child.crashes > RESTARTS_BEFORE_GIVING_UP:
                child.gave_up = True
                log.error("gave up restarting %s after %d crashes (see %s)", child.name, child.crashes - 1, child.log_path)
                if child is self.moto:
                    raise StackError(f"moto server keeps crashing (exit {code}); see {child.log_path}")
                return
            print(f"{child.name} exited with {code}; starting it again in {delay:.1f}s (see {child.log_path})",
                  file=sys.stderr, flush=True)
            child.next_start = now + delay
        if now >= child.next_start:
            child.next_start = 0.0
            child.start()
            if child is self.moto:
                assert self.info is not None
                try:
                    _wait_http(self.info.aws_endpoint_url + "/moto-api/data.json", 60, child.proc)
                except StackError:
                    return  # it crashed again: counted at the next tick
                print(f"{child.name} is running again", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Stop everything, children first; moto last, which writes its state as it exits."""
        started = time.monotonic()
        self._stop.set()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.terminate()
        if self._server is not None:
            threading.Thread(target=self._server.shutdown, daemon=True).start()
        for child in self.children:
            self._reap(child, deadline=started + 3)
        for t in self._threads:
            t.join(timeout=max(0.1, started + 3 - time.monotonic()))
        if self.moto is not None:
            if self.moto.proc is not None and self.moto.proc.poll() is None:
                self.moto.proc.terminate()
            self._reap(self.moto, deadline=time.monotonic() + 10)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def _reap(child: _Child, deadline: float) -> None:
        if child.proc is not None:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        child.close()

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- parts ---------------------------------------------------------------------------

    def _take_lock(self) -> None:
        fd = os.open(self.state_dir / "local.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StackError(f"another `dagcast local up` runs on {self.state_dir} (see `dagcast local status`)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _start_moto(self, previous: dict[str, Any]) -> str:
        remembered = previous.get("aws_endpoint_url", "")
        port = int(remembered.rsplit(":", 1)[1]) if remembered.rpartition(":")[2].isdigit() else 0
        if not port or not port_free(self.bind, port):
            port = free_port(self.bind)
        argv = [sys.executable, "-m", "dagcast.moto_server", "-H", self.bind, "-p", str(port),
                *(["--state-dir", str(self.state_dir / "aws")] if self.persist else [])]
        self.moto = _Child("moto server", argv, dict(os.environ), self.state_dir / "logs" / "moto.log")
        self.moto.start()
        url = f"http://{self.host}:{port}"
        try:
            _wait_http(url + "/moto-api/data.json", 60, self.moto.proc)
        except StackError as exc:
            raise StackError(f"{exc}: {self.moto.last_words() or 'no output'} (log: {self.moto.log_path})") from None
        return url

    def _start_api(self, previous: dict[str, Any]) -> str:
        from chalice.config import Config
        from chalice.local import create_local_server

        import app as chalice_app

        if not self.port:
            remembered = str(previous.get("api_url", "")).rpartition(":")[2]
            self.port = int(remembered) if remembered.isdigit() and port_free(self.bind, int(remembered)) else 0
        if not self.port:
            self.port = free_port(self.bind)
        server = create_local_server(chalice_app.app, Config(), self.bind, self.port)
        server.server.RequestHandlerClass = _quiet(server.server.RequestHandlerClass)
        server.server.handle_error = _quiet_error(server.server.handle_error)
        self._server = server
        t = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.2}, name="api", daemon=True)
        t.start()
        url = f"http://{self.host}:{self.port}"
        _wait_http(url + "/healthz", 30)
        return url

    def _start_ingest(self, queue_url: str, workers: int = 2) -> None:
        self._start_consumer("ingest", queue_url, "ingest", workers)

    def _start_consumer(self, name: str, queue_url: str, handler: str, workers: int = 1,
                        retry_visibility: int | None = 2) -> None:
        for i in range(workers):
            t = threading.Thread(target=self._consume, args=(name, queue_url, handler, retry_visibility),
                                 name=f"{name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _consume(self, name: str, queue_url: str, handler: str, retry_visibility: int | None) -> None:
        """Plays Lambda's SQS event source for one function of the app: receive a batch, invoke the
        handler, delete what succeeded; a failed message comes back after `retry_visibility` seconds
        (None: the handler set its own backoff). While moto server is away (restarting), one line when
        it goes and one when it is back."""
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        import app as chalice_app

        sqs = boto3.client("sqs", region_name=REGION)
        arn: str | None = None
        away = False
        while not self._stop.is_set():
            try:
                arn = arn or sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
                out = sqs.receive_message(
                    QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, AttributeNames=["All"]
                )
            except (BotoCoreError, ClientError) as exc:
                if self._stop.is_set():
                    return
                if not away:
                    log.warning("%s: the embedded AWS does not answer (%s); retrying", name, exc.__class__.__name__)
                    away = True
                self._stop.wait(1.0)
                continue
            if away:
                log.warning("%s: the embedded AWS answers again", name)
                away = False
            messages = out.get("Messages", [])
            if not messages:
                continue
            event = {"Records": [_lambda_sqs_record(m, arn) for m in messages]}
            try:
                result = getattr(chalice_app, handler)(event, None)
                failed = {f["itemIdentifier"] for f in result.get("batchItemFailures", [])}
            except Exception:  # noqa: BLE001 - a whole-batch failure: every message is retried
                log.exception("%s handler failed", name)
                failed = {m["MessageId"] for m in messages}
            done = [m for m in messages if m["MessageId"] not in failed]
            with contextlib.suppress(BotoCoreError, ClientError):
                if done:
                    sqs.delete_message_batch(
                        QueueUrl=queue_url,
                        Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
                    )
                for m in messages:
                    if m["MessageId"] in failed and retry_visibility is not None:  # soon, not after the full visibility timeout
                        sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"],
                                                      VisibilityTimeout=retry_visibility)

    def _reconcile_ingest(self, bucket: str, queue_url: str) -> None:
        """Uploads whose notification was lost while the stack was down (or in flight when it stopped):
        deploys still PENDING or VALIDATING whose object is there are announced to ingest again."""
        import boto3

        import app as chalice_app
        from chalicelib.models import DeployState

        store, s3, sqs = chalice_app.get_store(), boto3.client("s3", region_name=REGION), boto3.client("sqs", region_name=REGION)
        for dep in store.list_deployments():
            for d in store.recent_deploys_in(dep.name, {DeployState.PENDING, DeployState.VALIDATING}, 0):
                for key in filter(None, (d.key, d.delta_key)):  # the bundle, or a delta not yet rebuilt into it
                    try:
                        head = s3.head_object(Bucket=bucket, Key=key)
                        break
                    except Exception:  # noqa: BLE001 - not uploaded (yet): the janitor expires it in time
                        continue
                else:
                    continue
                record = {"eventName": "ObjectCreated:Post", "eventTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": int(head["ContentLength"]),
                                                                       "versionId": head.get("VersionId")}}}
                sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"Records": [record]}))
                log.warning("ingest: announced again the upload of deploy %s (%s)", d.deploy_id, d.state.value)

    def _start_janitor(self) -> None:
        """Plays the scheduled janitor function."""
        import app as chalice_app

        def loop() -> None:
            while not self._stop.wait(self.janitor_interval):
                try:
                    chalice_app.janitor(_scheduled_event(), None)
                except Exception as exc:  # noqa: BLE001 - keep the schedule going, like EventBridge would
                    log.warning("janitor failed: %s: %s", exc.__class__.__name__, exc)

        t = threading.Thread(target=loop, name="janitor", daemon=True)
        t.start()
        self._threads.append(t)

    def _seed(self, previous: dict[str, Any]) -> tuple[str, str]:
        """The deployment and the two tokens: made the first time, the same ones on every later start."""
        import app as chalice_app
        from chalicelib.auth import hash_token
        from chalicelib.exceptions import Conflict
        from chalicelib.models import CreateDeployment, Mechanism, Role

        control, store = chalice_app.get_control(), chalice_app.get_store()
        with contextlib.suppress(Conflict):
            control.create_deployment(CreateDeployment(name=self.deployment, mechanism=Mechanism.DAG_ONLY))
        tokens = []
        for name, key, role, scope, names in ((ADMIN_TOKEN, "token", Role.ADMIN, ["*"], None),
                                              (SIDECAR_TOKEN, "sidecar_token", Role.SIDECAR, [self.deployment], ["sidecar-*"])):
            secret = str(previous.get(key, ""))
            kept = store.token_by_name(name)
            if kept is not None and secret and hash_token(secret) == kept.token_hash and not kept.revoked:
                tokens.append(secret)
                continue
            if kept is not None:  # its secret is lost (local.json removed): a new token under a new name
                name = f"{name}-{int(time.time())}"
            tokens.append(control.issue_token(name, role, scope, sidecar_names=names))
        return tokens[0], tokens[1]

    def start_sidecar(self, name: str, extra_args: list[str] | None = None) -> SidecarInfo:
        assert self.info is not None
        root = self.state_dir / "sidecars" / name
        root.mkdir(parents=True, exist_ok=True)
        link = root / "current"
        log_path = self.state_dir / "logs" / f"{name}.log"
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
        child = _Child(f"sidecar {name}", [sys.executable, "-m", "dagcast", "sidecar", *args, *self.sidecar_args,
                                           *(extra_args or [])], env, log_path)
        child.start()
        self.children.append(child)
        return SidecarInfo(name=name, dags_path=str(link), root=str(root), log=str(log_path),
                           metrics_url=f"http://127.0.0.1:{metrics_port}")

    def _wait_registered(self, timeout: float = 60) -> None:
        import app as chalice_app

        want = {s.name for s in self.info.sidecars} if self.info else set()
        since = self._started_ms
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # registered by the processes started now, not the records a run before this one left
            have = {s.name for s in chalice_app.get_store().list_sidecars(self.deployment) if s.registered_at >= since}
            if want <= have and all(c.proc is not None and c.proc.poll() is None for c in self.children):
                return
            dead = [c for c in self.children if c.proc is not None and c.proc.poll() is not None]
            if dead:
                raise StackError(f"{dead[0].name} exited with {dead[0].proc.returncode if dead[0].proc else '?'}; "
                                 f"see {dead[0].log_path}")
            time.sleep(0.1)
        raise StackError(f"sidecars did not register within {timeout:g}s; see {self.state_dir / 'logs'}")

    def _write_info(self) -> None:
        assert self.info is not None
        doc = asdict(self.info)
        doc["sidecars"] = [{"name": s.name, "dags_path": s.dags_path, "metrics_url": s.metrics_url} for s in self.info.sidecars]
        tmp = self.state_dir / ".local.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the admin token
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self.state_dir / "local.json")


def _lambda_sqs_record(message: dict[str, Any], queue_arn: str | None) -> dict[str, Any]:
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message.get("Attributes", {}),
        "messageAttributes": message.get("MessageAttributes", {}),
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn or "",
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
    """Chalice's request handler class (a partial) with access logs silenced, and TCP_NODELAY."""
    import functools

    from chalice.local import ChaliceRequestHandler

    class Quiet(ChaliceRequestHandler):
        # Headers and body go out in two writes: with Nagle's algorithm on, the body waits for the
        # client's delayed ACK of the headers (~40 ms) on every answer of a kept-alive connection.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    return functools.partial(Quiet, *handler.args, **handler.keywords)


def _quiet_error(original: Any) -> Any:
    """The server's handle_error, silent for clients that went away (a long poll given up, Ctrl-C)."""

    def handle_error(request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)):
            return
        original(request, client_address)

    return handle_error
