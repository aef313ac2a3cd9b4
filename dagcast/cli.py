"""The `dagcast` command. Exit codes are chosen here only:

0 success; 1 error (API, network, configuration); 2 usage error;
3 the bundle was rejected (locally or by the server); 4 --wait timed out.
`dagcast validate` exits 1 when the bundle is rejected.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

# httpx imports its own command line (rich, pygments: ~90 ms) whenever it can; dagcast never runs
# it, and start-up time is on the path of every `dagcast deploy`. httpx falls back to a stub
# `httpx.main` when that module cannot be imported, which this entry makes happen, in the CLI's
# process only (dagcast's library users, such as Airflow importing dagcast.airflow, are untouched).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

EXIT_ERROR, EXIT_USAGE, EXIT_REJECTED, EXIT_TIMEOUT = 1, 2, 3, 4


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def _fail(exc: Exception, debug: bool, code: int = EXIT_ERROR) -> NoReturn:
    _echo_err(f"error: {exc}")
    hint = getattr(exc, "hint", None)
    if hint:
        _echo_err(f"hint: {hint}")
    if debug:
        import traceback

        traceback.print_exception(exc)
    sys.exit(code)


def print_errors(errors: list[dict[str, Any]], prefix: str) -> None:
    """Compiler-style lines: `dags/etl.py:12: syntax_error: message`."""
    for e in errors:
        where = f"{prefix}/{e['path']}" if e.get("path") else prefix
        line = f":{e['line']}" if e.get("line") else ""
        _echo_err(f"{where}{line}: {e['code']}: {e['message']}")


def _required(value: str | None, flag: str, env: str) -> str:
    if not value:
        raise click.UsageError(f"missing {flag} (or set {env})")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dagcast", message="dagcast %(version)s")
def main() -> None:
    """dagcast: DAG-only deploys for Apache Airflow, event-driven on AWS."""


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: valid, files, bytes, errors.")
def validate(path: Path, as_json: bool) -> None:
    """Validate a .tar.gz bundle or a dags folder with the server's rules."""
    from chalicelib.validation import validate_stream

    if not path.exists():
        _echo_err(f"error: {path} does not exist")
        sys.exit(EXIT_USAGE)
    try:
        if path.is_dir():
            import tempfile

            from dagcast import bundler
            from dagcast.exceptions import ClientError

            with tempfile.TemporaryFile() as tmp:
                try:
                    bundler.build(path, tmp)
                except ClientError as exc:
                    _echo_err(f"error: {exc}")
                    sys.exit(EXIT_USAGE)
                tmp.seek(0)
                report = validate_stream(tmp)
            prefix = str(path).rstrip("/")
        else:
            with path.open("rb") as f:
                report = validate_stream(f)
            prefix = str(path)
    except OSError as exc:
        _echo_err(f"error: cannot read {path}: {exc.strerror or exc}")
        sys.exit(EXIT_USAGE)
    summary = report.summary()
    if as_json:
        click.echo(json.dumps(summary))
    else:
        print_errors(summary["errors"], prefix)
        verdict = "valid" if report.valid else f"rejected ({len(report.errors)} error(s))"
        click.echo(f"{path}: {verdict}: {report.files} files, {report.bytes} bytes")
    sys.exit(0 if report.valid else 1)


@main.command()
@click.option("--dags", "dags", is_flag=True, required=True, help="Deploy only the DAGs folder (DAG-only deploy).")
@click.option("--dags-path", type=click.Path(path_type=Path), default=Path("dags"), show_default=True,
              help="The dags folder to bundle.")
@click.option("--api-url", envvar="DAGCAST_API_URL", help="API URL [env DAGCAST_API_URL].")
@click.option("--token", envvar="DAGCAST_TOKEN", help="API token [env DAGCAST_TOKEN].")
@click.option("--deployment", envvar="DAGCAST_DEPLOYMENT", help="Deployment name [env DAGCAST_DEPLOYMENT].")
@click.option("--wait/--no-wait", default=None, help="Wait until live on every sidecar (default: on a terminal).")
@click.option("--timeout", type=click.FloatRange(min=1), default=300, show_default=True, help="Seconds to --wait.")
@click.option("--description", default="", help="What this deploy changes (default: the git commit subject).")
@click.option("--skip-validation", is_flag=True, help="Skip local validation (the server still validates).")
@click.option("--force", is_flag=True, help="Deploy even when the live version has the same bundle.")
@click.option("--dry-run", is_flag=True, help="List what would ship and the DAG diff against the live version.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for CI.")
@click.option("--debug", is_flag=True, help="Show details of errors.")
def deploy(
    dags: bool,
    dags_path: Path,
    api_url: str | None,
    token: str | None,
    deployment: str | None,
    wait: bool | None,
    timeout: float,
    description: str,
    skip_validation: bool,
    force: bool,
    dry_run: bool,
    as_json: bool,
    debug: bool,
) -> None:
    """Bundle the dags folder, upload it, and (with --wait) wait until every sidecar runs it."""
    from dagcast import config
    from dagcast import deploy as deploying
    from dagcast.client import ApiClient
    from dagcast.exceptions import BundleInvalid, ClientError, ConfigError, WaitTimeout

    try:
        settings = config.resolve(api_url, token, deployment)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if wait is None:
        wait = sys.stdout.isatty() and not as_json
    say: Callable[[str], None] = _echo_err if as_json else click.echo
    api = ApiClient(settings.api_url, settings.token, on_retry=lambda m: _echo_err(f"warning: {m}"))
    opts = deploying.DeployOptions(
        dags_path=dags_path,
        deployment=settings.deployment,
        wait=wait,
        timeout=timeout,
        skip_validation=skip_validation,
        force=force,
        dry_run=dry_run,
        description=description,
    )
    try:
        with _upload_progress(enabled=sys.stderr.isatty() and not as_json) as progress:
            result = deploying.run(api, opts, say, progress)
    except BundleInvalid as exc:
        if as_json:
            doc = exc.result or {"deploy_id": None, "version": None, "state": "INVALID", "sidecars": []}
            click.echo(json.dumps({**doc, "errors": exc.errors}))
        print_errors(exc.errors, str(dags_path).rstrip("/"))
        _fail(exc, debug, EXIT_REJECTED)
    except WaitTimeout as exc:
        _fail(exc, debug, EXIT_TIMEOUT)
    except ClientError as exc:
        _fail(exc, debug)
    finally:
        api.close()
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    if result.files_list is not None:
        for f in result.files_list:
            click.echo(f"{f['size']:>12}  {f['path']}")
        click.echo(f"{result.files} files, {result.bytes} bytes would ship (dry run: nothing uploaded)")
        return
    if result.sidecars:
        click.echo(f"{'SIDECAR':<24} {'VERSION':>7}  STATE")
        for s in result.sidecars:
            click.echo(f"{s['name']:<24} {'v' + str(s['version']):>7}  {'live' if s['live'] else 'stale'}")
    click.echo(f"Deploy {result.deploy_id}: {result.state}" + (f" v{result.version}" if result.version else ""))


class _upload_progress:  # noqa: N801 - used as a context manager like a function
    """A rich progress bar for the upload on a terminal; nothing otherwise (plain lines are printed instead)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        self._bar = Progress("upload", BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True)
        self._bar.start()
        return self._update

    def _update(self, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._bar.add_task("upload", total=total)
        self._bar.update(self._task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


@main.command()
@click.option("--api-url", required=True, envvar="DAGCAST_API_URL", help="API URL [env DAGCAST_API_URL].")
@click.option("--deployment", required=True, envvar="DAGCAST_DEPLOYMENT", help="Deployment name.")
def init(api_url: str, deployment: str) -> None:
    """Write .dagcast/config.toml in this folder (API URL and deployment; safe to commit)."""
    from dagcast import config

    path = config.write_project(Path.cwd(), api_url, deployment)
    click.echo(f"wrote {path}; now run `dagcast login`")


@main.command()
@click.option("--token", prompt=True, hide_input=True, envvar="DAGCAST_TOKEN", help="API token (prompted, never echoed).")
def login(token: str) -> None:
    """Store a token in .dagcast/credentials.toml (mode 0600, git-ignored) after checking it works."""
    from dagcast import config
    from dagcast.client import ApiClient
    from dagcast.exceptions import ClientError

    folder = config.find_project()
    if folder is None:
        raise click.UsageError("no .dagcast/ folder here or above: run `dagcast init` first")
    values = config.project_values()
    api = ApiClient(values.get("api_url", ""), token.strip())
    try:
        api.get_deployment(values.get("deployment", ""))
    except ClientError as exc:
        _fail(exc, False)
    finally:
        api.close()
    path = config.write_credentials(folder, token.strip())
    click.echo(f"token verified and stored in {path}")


@main.command()
@click.option("--name", required=True, envvar="DAGCAST_SIDECAR_NAME", help="This sidecar's name, unique per deployment.")
@click.option("--root", required=True, type=click.Path(path_type=Path), help="Folder that keeps the versions.")
@click.option("--link", required=True, type=click.Path(path_type=Path), help="Symlink to maintain; Airflow's dags folder.")
@click.option("--api-url", envvar="DAGCAST_API_URL", help="API URL [env DAGCAST_API_URL].")
@click.option("--token", envvar="DAGCAST_TOKEN", help="API token [env DAGCAST_TOKEN].")
@click.option("--deployment", envvar="DAGCAST_DEPLOYMENT", help="Deployment name [env DAGCAST_DEPLOYMENT].")
@click.option("--component", default="unknown", show_default=True, help="scheduler, worker, triggerer, ...")
@click.option("--once", is_flag=True, help="Sync the current version and exit (init container).")
@click.option("--resync-interval", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Seconds between reconciles with the API.")
@click.option("--keep", type=click.IntRange(min=1), default=5, show_default=True, help="Versions to keep on disk.")
@click.option("--metrics-addr", default="0.0.0.0:9108", show_default=True, envvar="DAGCAST_METRICS_ADDR",
              help="host:port for /healthz and /metrics; empty to disable.")
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING, ERROR.")
def sidecar(
    name: str,
    root: Path,
    link: Path,
    api_url: str | None,
    token: str | None,
    deployment: str | None,
    component: str,
    once: bool,
    resync_interval: float,
    keep: int,
    metrics_addr: str,
    log_level: str,
) -> None:
    """Keep LINK pointing at the deployment's live DAGs version."""
    from dagcast import logs
    from dagcast.client import ApiClient
    from dagcast.exceptions import ClientError
    from dagcast.sidecar import Sidecar, SidecarConfig, Syncer

    api_url = _required(api_url, "--api-url", "DAGCAST_API_URL")
    token = _required(token, "--token", "DAGCAST_TOKEN")
    deployment = _required(deployment, "--deployment", "DAGCAST_DEPLOYMENT")
    logs.setup(log_level)
    cfg = SidecarConfig(
        name=name, root=root.absolute(), link=link.absolute(), deployment=deployment, component=component,
        resync_interval=resync_interval, keep=keep,
    )
    api = ApiClient(api_url, token)
    if once:
        syncer = Syncer(cfg, api)
        try:
            syncer.prepare()
            version = syncer.sync(None)
        except (ClientError, OSError) as exc:
            _fail(exc, False)
        live = syncer.live_version()
        click.echo(f"{cfg.link} -> v{live}" + ("" if version else " (already current)"))
        return
    import boto3

    daemon = Sidecar(cfg, api, boto3.client("sqs"))
    if metrics_addr:
        from dagcast.observe import serve

        try:
            server = serve(metrics_addr, daemon.metrics, lambda: daemon.syncer.live_version() > 0)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"cannot listen on {metrics_addr!r}: {exc}", param_hint="--metrics-addr") from exc
        host, port = server.server_address[:2]
        logs_extra = {"metrics": f"{host!s}:{port}"}
        logging.getLogger("dagcast.sidecar").info("serving /healthz and /metrics", extra=logs_extra)
    daemon.install_signal_handlers()
    daemon.run()


def api_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--api-url, --token and --deployment, each with its environment fallback, plus --json and --debug."""
    for option in reversed([
        click.option("--api-url", envvar="DAGCAST_API_URL", help="API URL [env DAGCAST_API_URL]."),
        click.option("--token", envvar="DAGCAST_TOKEN", help="API token [env DAGCAST_TOKEN]."),
        click.option("--deployment", envvar="DAGCAST_DEPLOYMENT", help="Deployment name [env DAGCAST_DEPLOYMENT]."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON."),
        click.option("--debug", is_flag=True, help="Show details of errors."),
    ]):
        fn = option(fn)
    return fn


def _call(api_url: str | None, token: str | None, debug: bool, action: Callable[[Any], Any]) -> Any:
    """Run one API action with a client; API and network errors become one clean line."""
    from dagcast import config
    from dagcast.client import ApiClient
    from dagcast.exceptions import ClientError, ConfigError

    try:
        settings = config.resolve(api_url, token, "-")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    api = ApiClient(settings.api_url, settings.token)
    try:
        return action(api)
    except ClientError as exc:
        _fail(exc, debug)
    finally:
        api.close()


def _deployment(flag: str | None) -> str:
    from dagcast import config

    name = flag or config.project_values().get("deployment")
    if not name:
        raise click.UsageError("missing --deployment (or set DAGCAST_DEPLOYMENT, or run `dagcast init`)")
    return name


def _when(ms: int | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _diff_summary(diff: dict[str, Any] | None) -> str:
    from chalicelib.manifest import DeployDiff, summary

    return summary(DeployDiff.model_validate(diff)) if diff else ""


@main.group()
def deployment() -> None:
    """Show and change a deployment's settings."""


@deployment.command("show")
@api_options
def deployment_show(api_url: str | None, token: str | None, deployment: str | None, as_json: bool, debug: bool) -> None:
    """Show the deployment's mechanism, live version and limits."""
    name = _deployment(deployment)
    doc = _call(api_url, token, debug, lambda api: api.get_deployment(name))
    if as_json:
        click.echo(json.dumps(doc))
        return
    dag_deploys = "enabled" if doc["mechanism"] == "DAG_ONLY" else "disabled (image deploys only)"
    click.echo(f"deployment {doc['name']}: DAG-only deploys {dag_deploys}; live version v{doc['current_version']}")
    click.echo(f"  keep {doc['keep_versions']} versions, {doc['retention_days']} days; limits: "
               + ", ".join(f"{k}={v}" for k, v in doc["limits"].items()))


@deployment.command("update")
@api_options
@click.option("--dag-deploy", type=click.Choice(["enabled", "disabled"]), help="Accept DAG-only deploys (admin only).")
@click.option("--keep-versions", type=click.IntRange(1, 1000), help="Bundles to keep beyond the live one.")
@click.option("--retention-days", type=click.IntRange(1, 3650), help="Days to keep older bundles.")
def deployment_update(api_url: str | None, token: str | None, deployment: str | None, as_json: bool, debug: bool,
                      dag_deploy: str | None, keep_versions: int | None, retention_days: int | None) -> None:
    """Change the deployment's settings. Switching DAG deploys never touches the DAGs sidecars serve."""
    name = _deployment(deployment)
    changes: dict[str, Any] = {}
    if dag_deploy:
        changes["mechanism"] = "DAG_ONLY" if dag_deploy == "enabled" else "IMAGE"
    if keep_versions:
        changes["keep_versions"] = keep_versions
    if retention_days:
        changes["retention_days"] = retention_days
    if not changes:
        raise click.UsageError("nothing to change: give --dag-deploy, --keep-versions or --retention-days")
    doc = _call(api_url, token, debug, lambda api: api.update_deployment(name, changes))
    click.echo(json.dumps(doc) if as_json else f"deployment {name} updated: mechanism {doc['mechanism']}")


@main.group()
def deploys() -> None:
    """Deploy history."""


@deploys.command("list")
@api_options
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
def deploys_list(api_url: str | None, token: str | None, deployment: str | None, as_json: bool, debug: bool,
                 limit: int) -> None:
    """Deploys, newest first: version, state, who, when, description, DAG diff."""
    name = _deployment(deployment)
    page = _call(api_url, token, debug, lambda api: api.list_deploys(name, limit))
    if as_json:
        click.echo(json.dumps(page))
        return
    for d in page["items"]:
        version = f"v{d['version']}" if d.get("version") else "-"
        click.echo(f"{d['deploy_id']}  {version:>5}  {d['state']:<10}  {_when(d['created_at'])}  {d['created_by']:<14}  "
                   f"{d['description'][:40]:<40}  {_diff_summary(d.get('diff'))}")


@deploys.command("show")
@click.argument("deploy_id")
@api_options
def deploys_show(deploy_id: str, api_url: str | None, token: str | None, deployment: str | None, as_json: bool,
                 debug: bool) -> None:
    """One deploy: state, errors, manifest summary and sidecars."""
    name = _deployment(deployment)
    view = _call(api_url, token, debug, lambda api: api.get_deploy(name, deploy_id))
    if as_json:
        click.echo(json.dumps(view))
        return
    d = view["deploy"]
    click.echo(f"deploy {d['deploy_id']}: {d['state']}" + (f" v{d['version']}" if d.get("version") else ""))
    click.echo(f"  by {d['created_by']} at {_when(d['created_at'])}: {d['description']}")
    if d.get("rollback_of"):
        click.echo(f"  rollback of {d['rollback_of']}")
    if d.get("files") is not None:
        click.echo(f"  {d['files']} files, {d['bytes']} bytes, {len(d.get('dag_ids', []))} DAGs; {_diff_summary(d.get('diff'))}")
    print_errors(d.get("errors", []), "dags")
    for s in view["sidecars"]:
        state = "live" if s["live"] else "stale"
        click.echo(f"  sidecar {s['name']:<20} v{s['version']:<5} {state}  last heartbeat {_when(s['last_heartbeat'])}")


@main.command()
@click.argument("deploy_id")
@api_options
def rollback(deploy_id: str, api_url: str | None, token: str | None, deployment: str | None, as_json: bool,
             debug: bool) -> None:
    """Make an earlier deploy's bundle live again, as a new version (admin only)."""
    name = _deployment(deployment)
    d = _call(api_url, token, debug, lambda api: api.rollback(name, deploy_id))
    click.echo(json.dumps(d) if as_json else f"rolled back: deploy {d['deploy_id']} is {d['state']} v{d['version']}")


@main.group()
def admin() -> None:
    """Operator commands that talk to AWS directly (your AWS credentials, not an API token)."""


@admin.command("create-token")
@click.option("--table", required=True, envvar="DAGCAST_TABLE_NAME", help="The stack's DynamoDB table [env DAGCAST_TABLE_NAME].")
@click.option("--name", required=True, help="A name for the token (unique).")
@click.option("--role", type=click.Choice(["viewer", "deployer", "sidecar", "admin"]), default="admin", show_default=True)
@click.option("--deployment", "deployments", multiple=True, help="Scope to these deployments (default: all).")
def admin_create_token(table: str, name: str, role: str, deployments: tuple[str, ...]) -> None:
    """Write a token straight into the table: how the first admin token of a new AWS stack is made.

    The secret is printed once on stdout; only its hash is stored.
    """
    import time

    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from chalicelib.auth import hash_token, new_token
    from chalicelib.exceptions import DagcastError
    from chalicelib.models import Role, Token
    from chalicelib.store import Store

    secret = new_token()
    token = Token(token_hash=hash_token(secret), name=name, role=Role(role), deployments=list(deployments) or ["*"],
                  created_at=int(time.time() * 1000))
    try:
        Store(boto3.resource("dynamodb").Table(table)).put_token(token)
    except (DagcastError, BotoCoreError, ClientError) as exc:
        _fail(exc, False)
    _echo_err(f"token {name!r} ({role}) created; it is shown only this once:")
    click.echo(secret)


@main.group()
def local() -> None:
    """The embedded stack on this machine (moto server on 127.0.0.1, no AWS account)."""


@local.command("up")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path), help="Where state and local.json go.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="API port (default: a free one).")
@click.option("--sidecars", type=click.IntRange(0, 200), default=2, show_default=True, help="Sidecars to start.")
@click.option("--deployment", default="demo", show_default=True, help="Deployment to create.")
@click.option("--janitor-interval", type=click.FloatRange(min=0.1), default=30, show_default=True,
              help="Seconds between runs of the scheduled janitor.")
def local_up(state_dir: Path, port: int, sidecars: int, deployment: str, janitor_interval: float) -> None:
    """Run the embedded stack in the foreground until SIGINT/SIGTERM."""
    import signal
    import threading

    from dagcast.local import EmbeddedStack

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stack = EmbeddedStack(state_dir, port=port, sidecars=sidecars, deployment=deployment, janitor_interval=janitor_interval)
    try:
        info = stack.start()
        click.echo(f"dagcast local stack ready: API {info.api_url}, deployment {info.deployment!r}")
        click.echo(f"  console:    {info.console_url}")
        for s in info.sidecars:
            click.echo(f"  sidecar {s.name}: dags folder {s.dags_path}")
        click.echo(f"  state:      {state_dir / 'local.json'} (holds an admin token)")
        click.echo("Press Ctrl-C to stop.", nl=True)
        sys.stdout.flush()
        stop.wait()
    except Exception as exc:  # noqa: BLE001 - the top of the command: report in one line, clean up
        _echo_err(f"error: cannot start the local stack: {exc.__class__.__name__}: {exc}")
        _echo_err(f"hint: logs are in {state_dir}")
        stack.stop()
        sys.exit(EXIT_ERROR)
    click.echo("stopping ...")
    stack.stop()


if __name__ == "__main__":
    main()
