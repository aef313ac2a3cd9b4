"""The `dagcast` command. Exit codes are chosen here only, in `main`:

  0 success (also "no changes")      3 rejected, locally or by the server, for any reason
  1 error (API, network, config)     4 --wait timed out
  2 usage (a wrong flag, a missing   5 live, but Airflow reported new import errors
    or empty folder, a DAG removal   130 / 143 interrupted (SIGINT / SIGTERM)
    nobody confirmed)
  `dagcast validate` exits 1 when the bundle is rejected (its contract), 2 for a usage error.

With --json every command prints exactly one JSON object on stdout on every exit path: what it
knows at that point, with `ok`, `exit_code`, and `error: {code, message}` when it failed.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

# httpx imports its own command line (rich, pygments: ~90 ms) whenever it can (where they are
# installed: dagcast does not need them); dagcast never runs it, and start-up time is on the path
# of every `dagcast deploy`. httpx falls back to a stub
# `httpx.main` when that module cannot be imported, which this entry makes happen, in the CLI's
# process only (dagcast's library users, such as Airflow importing dagcast.airflow, are untouched).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from dagcast.exceptions import (  # noqa: E402 - after the httpx entry above
    EXIT_ERROR,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    BundleInvalid,
    ClientError,
    Terminated,
    UsageProblem,
)

EXIT_CODES_HELP = (
    "Exit codes: 0 success (also no changes); 1 error (API, network, configuration); 2 usage (also a "
    "missing or empty folder, or a DAG removal nobody confirmed); 3 rejected, locally or by the server; "
    "4 --wait timed out; 5 live but Airflow reported new import errors; 130/143 interrupted. "
    "`dagcast validate` exits 1 when the bundle is rejected."
)


class Outcome:
    """What the running command will say on exit: with --json, one object on stdout, always."""

    def __init__(self) -> None:
        self.json = False
        self.doc: Callable[[], dict[str, Any]] = dict  # what the command knows so far
        self.printed = False

    def emit(self, code: int, error: dict[str, str] | None = None) -> None:
        if not self.json or self.printed:
            return
        self.printed = True
        try:
            doc = dict(self.doc())
        except Exception:  # noqa: BLE001 - the exit report must go out even if a partial result is odd
            doc = {}
        doc.update({"ok": code == EXIT_OK, "exit_code": code})
        if error is not None:
            doc["error"] = error
        click.echo(json.dumps(doc))
        sys.stdout.flush()


OUTCOME = Outcome()


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


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


def _json_option(help_text: str = "Print one JSON object on stdout, whatever happens.") -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help=help_text)


# --- the entry point ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line; one exit code and (with --json) one JSON object, on every path. Without
    `argv` it is the whole program (the console script, `python -m dagcast`): it ends the process
    itself (see _end_process); with `argv` (a caller in-process) it raises SystemExit."""
    args = list(sys.argv[1:] if argv is None else argv)
    # known before parsing, so that a usage error is reported in JSON too
    OUTCOME.json = "--json" in args or "--output=json" in args or any(
        a == "--output" and b == "json" for a, b in zip(args, args[1:], strict=False))
    OUTCOME.doc = _EMPTY_DOCS.get(args[0] if args else "", dict)
    debug = "--debug" in args
    _install_interrupts()
    code, error, message, hint = EXIT_OK, None, None, None
    try:
        rv = cli.main(args=args, prog_name="dagcast", standalone_mode=False)
        code = rv if isinstance(rv, int) else EXIT_OK
    except click.exceptions.Exit as exc:  # --help, --version
        code = exc.exit_code
    except click.exceptions.Abort:  # Ctrl-C at a prompt
        code, error = EXIT_SIGINT, {"code": "interrupted", "message": "interrupted"}
    except click.ClickException as exc:
        code = exc.exit_code if exc.exit_code != 1 else EXIT_ERROR
        error = {"code": "usage" if isinstance(exc, click.UsageError) else "error", "message": exc.format_message()}
        if not OUTCOME.json:
            exc.show()
    except KeyboardInterrupt:
        code, error = EXIT_SIGINT, {"code": "interrupted", "message": "interrupted"}
        message = "interrupted"
    except Terminated:
        code, error = EXIT_SIGTERM, {"code": "interrupted", "message": "terminated (SIGTERM)"}
        message = "terminated (SIGTERM)"
    except ClientError as exc:
        code = exc.exit_code
        error = {"code": str(exc.code), "message": str(exc)}
        message, hint = str(exc), exc.hint
        if isinstance(exc, BundleInvalid):
            print_errors(exc.errors, _prefix(args))
        if debug:
            import traceback

            traceback.print_exception(exc)
    except Exception as exc:  # noqa: BLE001 - the top of the program: one clean line, never a traceback
        code = EXIT_ERROR
        error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
        message = f"unexpected {type(exc).__name__}: {exc}" + ("" if debug else " (run with --debug for details)")
        if debug:
            import traceback

            traceback.print_exception(exc)
    if message:
        _echo_err(f"error: {message}")
    if hint:
        _echo_err(f"hint: {hint}")
    OUTCOME.emit(code, error)
    if argv is None:  # the program's own command line: the console script, `python -m dagcast`
        _end_process(code)
    sys.exit(code)


def _end_process(code: int) -> None:
    """Exit as the interpreter would, without its teardown: with the deploy path's ~400 modules
    (pydantic's schemas, httpx) the garbage collections run while every module is cleared took
    80-110 ms, longer than most of the deploy's stages. What an exit must still do is done here
    first. While a non-daemon thread runs, which the interpreter would wait for (a
    ProcessPoolExecutor's, compile_cache.Prewarm: its shutdown at exit joins its worker
    processes), it returns and the caller exits the usual way, with the objects that exist now
    frozen out of those collections (gc.freeze: most of the teardown's cost)."""
    import atexit
    import gc
    import threading

    gc.freeze()
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)  # CPython's own, since 3.0; tested
    if run_exitfuncs is None or any(
            t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    # logging.shutdown (flushes every handler), weakref.finalize callbacks (temporary folders, the
    # parser's child), multiprocessing's children: what atexit holds runs as at any exit
    run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        code = 120  # what the interpreter exits with when stdout cannot be flushed at exit
    os._exit(code)


def _empty_deploy() -> dict[str, Any]:
    from dagcast.deploy import DeployResult

    return DeployResult().to_json()


# What a command's JSON holds when it failed before it started (a usage error): the same keys as always.
_EMPTY_DOCS: dict[str, Callable[[], dict[str, Any]]] = {
    "deploy": _empty_deploy,
    "promote": _empty_deploy,
    "validate": lambda: {"valid": False, "files": 0, "bytes": 0, "errors": []},
}


def _prefix(args: list[str]) -> str:
    """Where errors' paths are relative to: the --dags-path or validate's PATH, as given."""
    if "--dags-path" in args and args.index("--dags-path") + 1 < len(args):
        return args[args.index("--dags-path") + 1].rstrip("/")
    if args and args[0] == "validate":
        rest = [a for a in args[1:] if not a.startswith("-")]
        return rest[0].rstrip("/") if rest else "."
    return "dags"


def _install_interrupts() -> None:
    """The first SIGINT/SIGTERM interrupts the command (which may clean up: cancel its deploy); a
    second one exits at once, after the JSON object."""

    def second(signum: int, frame: FrameType | None) -> None:
        code = EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT
        OUTCOME.emit(code, {"code": "interrupted", "message": "interrupted twice: exited at once"})
        os._exit(code)

    def first(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, second)
        signal.signal(signal.SIGTERM, second)
        if signum == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt()

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="dagcast", message="dagcast %(version)s")
def cli() -> None:
    """dagcast: DAG-only deploys for Apache Airflow, event-driven on AWS."""


# --- validate -------------------------------------------------------------------------------


@cli.command(epilog="Exit codes: 0 valid, 1 rejected, 2 usage error (a missing or empty folder).")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--parse", "parse_too", is_flag=True,
              help="Also load it with Airflow's own loader here (needs Airflow importable): import errors and "
                   "duplicate DAG ids become errors.")
@_json_option("Print one JSON object: valid, files, bytes, errors (and ok, exit_code, error; parse with --parse).")
def validate(path: Path, parse_too: bool, as_json: bool) -> int:
    """Validate a .tar.gz bundle or a dags folder with the server's rules."""
    from chalicelib.bundle import validate_stream

    OUTCOME.json = as_json
    OUTCOME.doc = lambda: {"valid": False, "files": 0, "bytes": 0, "errors": []}
    if not path.exists():
        raise UsageProblem(f"{path} does not exist")
    prefix = str(path).rstrip("/")
    try:
        if path.is_dir():
            import tempfile

            from dagcast import bundler

            with tempfile.TemporaryFile() as tmp:
                try:
                    bundler.build(path, tmp)
                except BundleInvalid as exc:
                    errors = exc.errors
                    OUTCOME.doc = lambda: {"valid": False, "files": 0, "bytes": 0, "errors": errors}
                    if not as_json:
                        print_errors(errors, prefix)
                        click.echo(f"{path}: rejected ({len(errors)} error(s))")
                    return EXIT_ERROR
                tmp.seek(0)
                report = validate_stream(tmp)
        else:
            with path.open("rb") as f:
                report = validate_stream(f)
    except OSError as exc:
        raise UsageProblem(f"cannot read {path}: {exc.strerror or exc}") from exc
    summary = report.summary()
    OUTCOME.doc = lambda: summary
    if parse_too and report.valid:
        _parse_for_validate(path, summary)
        report_valid = summary["valid"]
    else:
        report_valid = report.valid
    if not as_json:
        print_errors(summary["errors"], prefix)
        verdict = "valid" if report_valid else f"rejected ({len(summary['errors'])} error(s))"
        click.echo(f"{path}: {verdict}: {report.files} files, {report.bytes} bytes")
    return EXIT_OK if report_valid else EXIT_ERROR


def _parse_for_validate(path: Path, summary: dict[str, Any]) -> None:
    """validate --parse: the bundle (or the folder's bundle) through Airflow's own loader."""
    import tempfile

    from dagcast import bundler
    from dagcast.parse import ParseError
    from dagcast.parse_check import parse_bundle, parse_issues, parse_summary

    with tempfile.TemporaryFile() as tmp:
        if path.is_dir():
            bundler.build(path, tmp)
            tmp.seek(0)
            source: Any = tmp
        else:
            source = path.open("rb")
        try:
            result = parse_bundle(source)
        except ParseError as exc:
            raise ClientError(f"--parse: the parser failed: {exc}") from exc
        finally:
            if source is not tmp:
                source.close()
    issues = parse_issues(result)
    summary["errors"] = summary["errors"] + issues
    summary["valid"] = summary["valid"] and not issues
    summary["parse"] = parse_summary(result)


# --- deploy ---------------------------------------------------------------------------------


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--dags", "dags", is_flag=True, required=True, help="Deploy only the DAGs folder (DAG-only deploy).")
@click.option("--dags-path", type=click.Path(path_type=Path), default=Path("dags"), show_default=True,
              help="The dags folder to bundle.")
@click.option("--api-url", envvar="DAGCAST_API_URL", help="API URL [env DAGCAST_API_URL].")
@click.option("--token", envvar="DAGCAST_TOKEN", help="API token [env DAGCAST_TOKEN].")
@click.option("--deployment", envvar="DAGCAST_DEPLOYMENT", help="Deployment name [env DAGCAST_DEPLOYMENT].")
@click.option("--wait/--no-wait", default=None, help="Wait until live on every sidecar (default: on a terminal).")
@click.option("--timeout", type=click.FloatRange(min=1), default=300, show_default=True, help="Seconds to --wait.")
@click.option("--require-all", is_flag=True,
              help="With --wait, also wait for registered sidecars that stopped reporting (stale): exit 4 at the timeout.")
@click.option("--description", default="", help="What this deploy changes (default: the git commit subject).")
@click.option("--skip-validation", is_flag=True, help="Skip local validation (the server still validates).")
@click.option("--force", is_flag=True, help="Deploy even when the live version has the same bundle.")
@click.option("--full", is_flag=True, help="Upload the whole bundle, not a delta against the live version.")
@click.option("--dry-run", is_flag=True, help="List what would ship (links too) and the DAG diff; upload nothing.")
@click.option("--allow-dag-removal", is_flag=True, help="Deploy even though it removes DAGs (otherwise asked on a "
              "terminal; elsewhere warned, or refused with exit 2 where the deployment says dag_removal: confirm).")
@click.option("--yes", "-y", is_flag=True, help="Answer yes to every question (implies --allow-dag-removal).")
@click.option("--parse", "parse_locally", is_flag=True,
              help="Before uploading, load the folder with Airflow's own loader here (needs Airflow importable).")
@click.option("--allow-import-errors", is_flag=True,
              help="Exit 0, not 5, when Airflow reports new import errors (and with --parse, upload anyway).")
@_json_option("Print one JSON object for CI on stdout, on every exit path.")
@click.option("--debug", is_flag=True, help="Show details of errors.")
def deploy(
    dags: bool,
    dags_path: Path,
    api_url: str | None,
    token: str | None,
    deployment: str | None,
    wait: bool | None,
    timeout: float,
    require_all: bool,
    description: str,
    skip_validation: bool,
    force: bool,
    full: bool,
    dry_run: bool,
    allow_dag_removal: bool,
    yes: bool,
    parse_locally: bool,
    allow_import_errors: bool,
    as_json: bool,
    debug: bool,
) -> int:
    """Bundle the dags folder, upload it, and (with --wait) wait until every sidecar runs it and
    Airflow there has loaded it."""
    from dagcast import config
    from dagcast import deploy as deploying
    from dagcast.client import ApiClient
    from dagcast.exceptions import ConfigError

    OUTCOME.json = as_json
    result = deploying.DeployResult()
    OUTCOME.doc = result.to_json
    try:
        settings = config.resolve(api_url, token, deployment)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    interactive = sys.stdin.isatty() and sys.stderr.isatty() and not as_json
    waiting_why = "" if wait is not None else ("not a terminal" if not sys.stdout.isatty() else "--json")
    if wait is None:
        wait = sys.stdout.isatty() and not as_json
    say: Callable[[str], None] = _echo_err if as_json else click.echo
    api = ApiClient(settings.api_url, settings.token, on_retry=lambda m: _echo_err(f"warning: {m}"))
    opts = deploying.DeployOptions(
        dags_path=dags_path,
        deployment=settings.deployment,
        wait=wait,
        timeout=timeout,
        require_all=require_all,
        skip_validation=skip_validation,
        force=force,
        full=full,
        dry_run=dry_run,
        description=description,
        allow_dag_removal=allow_dag_removal or yes,
        confirm=(lambda q: click.confirm(q, default=False, err=True)) if interactive else None,
        allow_import_errors=allow_import_errors,
        parse_locally=parse_locally,
    )
    try:
        with _upload_progress(enabled=sys.stderr.isatty() and not as_json) as progress:
            deploying.run(api, opts, say, progress, result)
    finally:
        api.close()
    if as_json:
        return EXIT_OK
    if result.files_list is not None:
        for f in result.files_list:
            target = f" -> {f['link']}" if f.get("link") else ""
            click.echo(f"{f['size']:>12}  {f['path']}{target}")
        click.echo(f"{len(result.files_list)} members, {result.bytes} bytes would ship (dry run: nothing uploaded)")
        return EXIT_OK
    if result.sidecars or result.stale_sidecars:
        click.echo(f"{'SIDECAR':<24} {'VERSION':>7}  STATE")
        for s in result.sidecars + result.stale_sidecars:
            state = ("live, on it" if s["on_it"] else "live") if s["live"] else f"stale ({s['last_seen_s'] or 0:.0f} s)"
            click.echo(f"{s['name']:<24} {'v' + str(s['version']):>7}  {state}")
    click.echo(f"Deploy {result.deploy_id}: {result.state}" + (f" v{result.version}" if result.version else ""))
    if result.state == "PENDING" or (result.uploaded and not wait):
        click.echo(f"Not waiting for the sidecars ({waiting_why or '--no-wait'}): `dagcast deploys show {result.deploy_id}`")
    return EXIT_OK


class _upload_progress:  # noqa: N801 - used as a context manager like a function
    """A one-line progress bar for the upload on a terminal (stderr, redrawn in place, wiped at the
    end); nothing otherwise (plain lines are printed instead)."""

    WIDTH = 30

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._started = 0.0
        self._drawn = False

    def __enter__(self) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None
        self._started = time.monotonic()
        return self._update

    def _update(self, done: int, total: int) -> None:
        from dagcast.bundler import human_size

        filled = self.WIDTH * done // total if total else self.WIDTH
        elapsed = time.monotonic() - self._started
        speed = f"{human_size(int(done / elapsed))}/s" if elapsed > 0 else ""
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        sys.stderr.write(f"\rupload [{bar}] {human_size(done)}/{human_size(total)} {speed}\x1b[K")
        sys.stderr.flush()
        self._drawn = True

    def __exit__(self, *exc: object) -> None:
        if self._drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# --- project files --------------------------------------------------------------------------


@cli.command()
@click.option("--api-url", envvar="DAGCAST_API_URL", help="API URL [env DAGCAST_API_URL; needed if not set].")
@click.option("--deployment", envvar="DAGCAST_DEPLOYMENT", help="Deployment name [env DAGCAST_DEPLOYMENT; needed if not set].")
def init(api_url: str | None, deployment: str | None) -> None:
    """Write .dagcast/config.toml in this folder (API URL and deployment; safe to commit)."""
    from dagcast import config

    if not api_url or not deployment:
        missing = " and ".join(f for f, v in (("--api-url", api_url), ("--deployment", deployment)) if not v)
        raise click.UsageError(f"missing {missing} (or set DAGCAST_API_URL / DAGCAST_DEPLOYMENT)")
    path = config.write_project(Path.cwd(), api_url, deployment)
    click.echo(f"wrote {path}; now run `dagcast login`")


@cli.command()
@click.option("--token", envvar="DAGCAST_TOKEN",
              help="API token (default: asked on a terminal, never echoed; else read from stdin, e.g. a pipe).")
def login(token: str | None) -> None:
    """Store a token in .dagcast/credentials.toml (mode 0600, git-ignored) after checking it works."""
    from dagcast import config
    from dagcast.client import ApiClient

    if not token:
        token = click.prompt("Token", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()
    if not token or not token.strip():
        raise click.UsageError("no token given: pass --token, set DAGCAST_TOKEN, or pipe it on stdin")

    folder = config.find_project()
    if folder is None:
        raise click.UsageError("no .dagcast/ folder here or above: run `dagcast init` first")
    values = config.project_values()
    api = ApiClient(values.get("api_url", ""), token.strip())
    try:
        api.get_deployment(values.get("deployment", ""))
    finally:
        api.close()
    path = config.write_credentials(folder, token.strip())
    click.echo(f"token verified and stored in {path}")


# --- the sidecar ----------------------------------------------------------------------------


@cli.command()
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
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.5), default=15, show_default=True,
              envvar="DAGCAST_HEARTBEAT_INTERVAL",
              help="Seconds between heartbeats; keep it well under the API's DAGCAST_SIDECAR_STALE_SECONDS (90).")
@click.option("--metrics-addr", default="0.0.0.0:9108", show_default=True, envvar="DAGCAST_METRICS_ADDR",
              help="host:port for /healthz and /metrics; empty to disable.")
@click.option("--parse", "parse_mode", type=click.Choice(["auto", "report", "gate", "off"]), default="auto",
              show_default=True, envvar="DAGCAST_PARSE",
              help="Load each new version with Airflow's own loader (when Airflow is importable here) and report it: "
                   "auto follows the deployment's parse_mode; report installs, then parses; gate parses first and holds "
                   "back a version that adds import errors; off never parses.")
@click.option("--parse-workers", type=click.IntRange(min=1), default=None, envvar="DAGCAST_PARSE_WORKERS",
              help="Parallel parses of a whole version (default: the CPUs).")
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
    heartbeat_interval: float,
    metrics_addr: str,
    parse_mode: str,
    parse_workers: int | None,
    log_level: str,
) -> None:
    """Keep LINK pointing at the deployment's live DAGs version."""
    from dagcast import logs
    from dagcast.client import ApiClient
    from dagcast.lifetime import die_with_parent
    from dagcast.sidecar import Sidecar, SidecarConfig, Syncer

    die_with_parent()  # started by `dagcast local up`: goes when it goes
    api_url = _required(api_url, "--api-url", "DAGCAST_API_URL")
    token = _required(token, "--token", "DAGCAST_TOKEN")
    deployment = _required(deployment, "--deployment", "DAGCAST_DEPLOYMENT")
    logs.setup(log_level)
    cfg = SidecarConfig(
        name=name, root=root.absolute(), link=link.absolute(), deployment=deployment, component=component,
        resync_interval=resync_interval, keep=keep, heartbeat_interval=heartbeat_interval, parse=parse_mode,
        parse_workers=parse_workers,
    )
    api = ApiClient(api_url, token)
    if once:
        syncer = Syncer(cfg, api)
        syncer.prepare()
        version = syncer.sync()
        click.echo(f"{cfg.link} -> v{syncer.live_version()}" + ("" if version else " (already current)"))
        return
    from dagcast import extras

    extras.require("sidecar", "`dagcast sidecar` (the daemon; --once needs no extra)")
    import boto3

    daemon = Sidecar(cfg, api, boto3.client("sqs"))
    if metrics_addr:
        from dagcast.observe import serve

        try:
            server = serve(metrics_addr, daemon.metrics, daemon.health)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"cannot listen on {metrics_addr!r}: {exc}", param_hint="--metrics-addr") from exc
        host, port = server.server_address[:2]
        logs_extra = {"metrics": f"{host!s}:{port}"}
        logging.getLogger("dagcast.sidecar").info("serving /healthz and /metrics", extra=logs_extra)
    daemon.install_signal_handlers()
    daemon.run()


# --- reading and changing things through the API ---------------------------------------------


def api_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--api-url, --token and --deployment, each with its environment fallback, plus --json (or
    --output json), and --debug."""
    import functools

    @functools.wraps(fn)
    def command(*args: Any, output: str | None = None, **kwargs: Any) -> Any:
        if output == "json":
            kwargs["as_json"] = True
        return fn(*args, **kwargs)

    for option in reversed([
        click.option("--api-url", envvar="DAGCAST_API_URL", help="API URL [env DAGCAST_API_URL]."),
        click.option("--token", envvar="DAGCAST_TOKEN", help="API token [env DAGCAST_TOKEN]."),
        click.option("--deployment", envvar="DAGCAST_DEPLOYMENT", help="Deployment name [env DAGCAST_DEPLOYMENT]."),
        _json_option(),
        click.option("--output", type=click.Choice(["table", "json"]), help="table (the default) or json (as --json)."),
        click.option("--debug", is_flag=True, help="Show details of errors."),
    ]):
        command = option(command)
    return command


def _color() -> bool:
    """Colours only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


STATE_COLORS = {"ACTIVE": "green", "REJECTED": "red", "EXPIRED": "yellow", "CANCELLED": "yellow", "PENDING": "cyan",
                "VALIDATING": "cyan", "live": "green", "stale": "red", "behind": "yellow"}


def _paint(text: str, key: str | None = None) -> str:
    color = STATE_COLORS.get(key or text.strip())
    return click.style(text, fg=color) if color and _color() else text


def _table(headers: list[str], rows: list[list[str]]) -> None:
    """Aligned columns with a header row (the last column is not padded)."""
    widths = [max([len(h), *(len(click.unstyle(r[i])) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c + " " * (widths[i] - len(click.unstyle(c))) if i < len(cells) - 1 else c
                         for i, c in enumerate(cells)).rstrip()

    click.echo(line([h.upper() for h in headers]), color=_color())
    for r in rows:
        click.echo(line(r), color=_color())


def _call(api_url: str | None, token: str | None, as_json: bool, action: Callable[[Any], Any]) -> Any:
    """Run one API action with a client; its answer is the command's JSON output."""
    from dagcast import config
    from dagcast.client import ApiClient
    from dagcast.exceptions import ConfigError

    OUTCOME.json = as_json
    try:
        settings = config.resolve(api_url, token, "-")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    api = ApiClient(settings.api_url, settings.token)
    try:
        doc = action(api)
    finally:
        api.close()
    OUTCOME.doc = lambda: doc if isinstance(doc, dict) else {"items": doc}
    return doc


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


@cli.group()
def deployment() -> None:
    """Show and change a deployment's settings."""


@deployment.command("show")
@api_options
def deployment_show(api_url: str | None, token: str | None, deployment: str | None, as_json: bool, debug: bool) -> None:
    """Show the deployment's mechanism, live version and limits."""
    name = _deployment(deployment)
    doc = _call(api_url, token, as_json, lambda api: api.get_deployment(name))
    if as_json:
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
@click.option("--dag-removal", type=click.Choice(["allow", "confirm"]),
              help="confirm: a deploy that removes DAGs needs --allow-dag-removal (or a yes on a terminal).")
@click.option("--parse-mode", type=click.Choice(["report", "gate"]),
              help="report: sidecars install, then parse with Airflow and report; gate: they parse first and hold back "
                   "a version that adds import errors.")
@click.option("--accept", type=click.Choice(["uploads", "promotions", "both"]),
              help="What new versions may come from: uploads (deploy), promotions from another deployment, or both.")
@click.option("--promotion-min-live-minutes", type=click.IntRange(0, 7 * 24 * 60),
              help="A promotion's source version must have run on every sidecar there this long, without new import errors.")
def deployment_update(api_url: str | None, token: str | None, deployment: str | None, as_json: bool, debug: bool,
                      dag_deploy: str | None, keep_versions: int | None, retention_days: int | None,
                      dag_removal: str | None, parse_mode: str | None, accept: str | None,
                      promotion_min_live_minutes: int | None) -> None:
    """Change the deployment's settings. Switching DAG deploys never touches the DAGs sidecars serve."""
    name = _deployment(deployment)
    changes: dict[str, Any] = {}
    if dag_deploy:
        changes["mechanism"] = "DAG_ONLY" if dag_deploy == "enabled" else "IMAGE"
    if keep_versions:
        changes["keep_versions"] = keep_versions
    if retention_days:
        changes["retention_days"] = retention_days
    if dag_removal:
        changes["dag_removal"] = dag_removal
    if parse_mode:
        changes["parse_mode"] = parse_mode
    if accept:
        changes["accept"] = accept
    if promotion_min_live_minutes is not None:
        changes["promotion_min_live_minutes"] = promotion_min_live_minutes
    if not changes:
        raise click.UsageError("nothing to change: give --dag-deploy, --keep-versions, --retention-days, --dag-removal, "
                               "--parse-mode, --accept or --promotion-min-live-minutes")
    doc = _call(api_url, token, as_json, lambda api: api.update_deployment(name, changes))
    if not as_json:
        click.echo(f"deployment {name} updated: mechanism {doc['mechanism']}")


@cli.group()
def deploys() -> None:
    """Deploy history."""


@deploys.command("list")
@api_options
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
def deploys_list(api_url: str | None, token: str | None, deployment: str | None, as_json: bool, debug: bool,
                 limit: int) -> None:
    """Deploys, newest first: version, state, who, when, description, DAG diff; why rejected ones were."""
    name = _deployment(deployment)
    page = _call(api_url, token, as_json, lambda api: api.list_deploys(name, limit))
    if as_json:
        return
    rows = []
    for d in page["items"]:
        version = f"v{d['version']}" if d.get("version") else "-"
        what = _reason(d) if d["state"] == "REJECTED" else _diff_summary(d.get("diff"))
        rows.append([d["deploy_id"], version, _paint(d["state"]), _when(d["created_at"]), d["created_by"] or "-",
                     (d["description"] or "-")[:40], what])
    if not rows:
        click.echo(f"no deploys in {name} yet: `dagcast deploy --dags`")
        return
    _table(["deploy", "version", "state", "created", "by", "description", "changes / why rejected"], rows)


def _reason(d: dict[str, Any]) -> str:
    errors = d.get("errors") or []
    if not errors:
        return "rejected"
    e = errors[0]
    where = f"{e['path']}{':' + str(e['line']) if e.get('line') else ''}: " if e.get("path") else ""
    more = len(errors) - 1 + int(d.get("errors_truncated") or 0)
    return f"{where}{e['message'][:80]}" + (f" (+{more} more)" if more else "")


@deploys.command("show")
@click.argument("deploy_id", required=False)
@api_options
def deploys_show(deploy_id: str | None, api_url: str | None, token: str | None, deployment: str | None, as_json: bool,
                 debug: bool) -> None:
    """One deploy (the live one when no id is given): state, errors, manifest summary and sidecars."""
    name = _deployment(deployment)

    def show(api: Any) -> dict[str, Any]:
        wanted = deploy_id
        if wanted is None:
            wanted = api.get_deployment(name).get("current_deploy_id")
            if not wanted:
                raise click.UsageError(f"{name} has no live deploy yet; give a deploy id")
        return dict(api.get_deploy(name, wanted))

    view = _call(api_url, token, as_json, show)
    if as_json:
        return
    d = view["deploy"]
    click.echo(f"deploy {d['deploy_id']}: {_paint(d['state'])}" + (f" v{d['version']}" if d.get("version") else ""),
               color=_color())
    click.echo(f"  by {d['created_by']} at {_when(d['created_at'])}: {d['description']}")
    git = d.get("git") or {}
    if git.get("sha"):
        click.echo(f"  git {git['sha'][:12]}{' (dirty)' if git.get('dirty') else ''} on {git.get('branch') or '-'} "
                   f"by {git.get('author') or '-'}")
    if d.get("rollback_of"):
        click.echo(f"  rollback of {d['rollback_of']}")
    if d.get("promoted_from"):
        p = d["promoted_from"]
        click.echo(f"  promoted from {p['deployment']} v{p['version']} ({p['deploy_id']})")
    if d.get("files") is not None:
        click.echo(f"  {d['files']} files, {d['bytes']} bytes, {len(d.get('dag_ids', []))} DAGs; {_diff_summary(d.get('diff'))}")
    print_errors(d.get("errors", []), "dags")
    if view["sidecars"]:
        _table(["sidecar", "component", "version", "state", "last heartbeat"],
               [[s["name"], s["component"], f"v{s['version']}", _paint("live" if s["live"] else "stale"),
                 _when(s["last_heartbeat"])] for s in view["sidecars"]])


@deploys.command("cancel")
@click.argument("deploy_id")
@api_options
def deploys_cancel(deploy_id: str, api_url: str | None, token: str | None, deployment: str | None, as_json: bool,
                   debug: bool) -> None:
    """Cancel a deploy that is PENDING or VALIDATING: it will never go live, and its upload is deleted."""
    name = _deployment(deployment)
    d = _call(api_url, token, as_json, lambda api: api.cancel_deploy(name, deploy_id))
    if not as_json:
        click.echo(f"deploy {d['deploy_id']} cancelled: it will never go live")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("target")
@click.option("--yes", "-y", is_flag=True, help="Do not ask (asked only on a terminal).")
@click.option("--wait/--no-wait", default=None, help="Wait until live on every sidecar (default: on a terminal).")
@click.option("--timeout", type=click.FloatRange(min=1), default=300, show_default=True, help="Seconds to --wait.")
@api_options
def rollback(target: str, yes: bool, wait: bool | None, timeout: float, api_url: str | None, token: str | None,
             deployment: str | None, as_json: bool, debug: bool) -> int:
    """Make an earlier version live again, as a new version (admin only). TARGET is a version (v12 or 12)
    or a deploy id. A version already live is left as it is."""
    from dagcast import config
    from dagcast import deploy as deploying
    from dagcast.client import ApiClient
    from dagcast.exceptions import ConfigError

    OUTCOME.json = as_json
    result = deploying.DeployResult()
    OUTCOME.doc = result.to_json
    try:
        settings = config.resolve(api_url, token, deployment)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    name = settings.deployment
    if wait is None:
        wait = sys.stdout.isatty() and not as_json
    say: Callable[[str], None] = _echo_err if as_json else click.echo
    api = ApiClient(settings.api_url, settings.token, on_retry=lambda m: _echo_err(f"warning: {m}"))
    try:
        if re.fullmatch(r"[0-9a-f]{11}-[0-9a-f]{6}", target):
            chosen = api.get_deploy(name, target)["deploy"]
            if not chosen.get("version"):
                raise ClientError(f"deploy {target} is {chosen['state']}; only a deploy that went live can be rolled back to")
            version = int(chosen["version"])
        else:
            version = _version_number(target, "TARGET") or 0
        record = api.get_version(name, version)["version"]
        live = api.get_deployment(name)
        live_sha = api.get_version(name, live["current_version"])["version"]["sha256"] if live["current_version"] else None
        result.sha256 = record["sha256"]
        if version == live["current_version"] or record["sha256"] == live_sha:
            result.state, result.converged = "UNCHANGED", True
            result.deploy_id, result.version = live["current_deploy_id"], live["current_version"]
            say(f"v{version} of {name} is already live" + ("" if version == live["current_version"]
                                                             else f" (as v{live['current_version']}, same bundle)"))
            return EXIT_OK
        interactive = sys.stdin.isatty() and sys.stderr.isatty() and not as_json
        if interactive and not yes and not click.confirm(
                f"Roll {name} back from v{live['current_version']} to the bundle of v{version}?", default=False, err=True):
            raise click.exceptions.Abort()
        created = api.rollback(name, record["deploy_id"])
        result.deploy_id, result.state, result.version = created["deploy_id"], created["state"], created.get("version")
        result.rollback_of, result.diff, result.uploaded = created.get("rollback_of"), created.get("diff"), True
        say(f"rolled back: deploy {created['deploy_id']} is {created['state']} v{created.get('version')} "
            f"(the bundle of v{version})")
        if wait:
            opts = deploying.DeployOptions(dags_path=Path("."), deployment=name, wait=True, timeout=timeout)
            deploying.wait(api, opts, result.deploy_id, result, say)
    finally:
        api.close()
    return EXIT_OK


def _version_number(value: str | None, hint: str = "--version") -> int | None:
    if value is None:
        return None
    digits = value[1:] if value[:1] in ("v", "V") else value
    if not digits.isdigit() or int(digits) < 1:
        raise click.BadParameter(f"{value!r} is not a version (v12 or 12) or a deploy id", param_hint=hint)
    return int(digits)


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--from", "source", required=True, help="The deployment whose version is promoted (staging).")
@click.option("--to", "target", required=True, help="The deployment that will run it (production).")
@click.option("--version", "version", help="Which version of --from (v12 or 12; default: its live one).")
@click.option("--deploy", "deploy_id", help="Or which deploy of --from, by id.")
@click.option("--wait/--no-wait", default=None, help="Wait until live on every sidecar of --to (default: on a terminal).")
@click.option("--timeout", type=click.FloatRange(min=1), default=300, show_default=True, help="Seconds to --wait.")
@click.option("--require-all", is_flag=True, help="With --wait, also wait for registered sidecars that are stale.")
@click.option("--description", default="", help="Why (default: promoted from <from> vN: its description).")
@click.option("--force", is_flag=True, help="Promote even when --to already runs the same bundle.")
@click.option("--allow-import-errors", is_flag=True, help="Exit 0, not 5, when Airflow reports new import errors.")
@click.option("--api-url", envvar="DAGCAST_API_URL", help="API URL [env DAGCAST_API_URL].")
@click.option("--token", envvar="DAGCAST_TOKEN", help="API token [env DAGCAST_TOKEN]: deploy on --to, read on --from.")
@_json_option()
@click.option("--debug", is_flag=True, help="Show details of errors.")
def promote(source: str, target: str, version: str | None, deploy_id: str | None, wait: bool | None, timeout: float,
            require_all: bool, description: str, force: bool, allow_import_errors: bool, api_url: str | None,
            token: str | None, as_json: bool, debug: bool) -> int:
    """Run on --to exactly the bundle (same sha256) a version of --from ran: copied inside S3, validated
    against --to's limits, nothing uploaded from here."""
    from dagcast import config
    from dagcast import deploy as deploying
    from dagcast.client import ApiClient
    from dagcast.exceptions import ConfigError

    OUTCOME.json = as_json
    result = deploying.DeployResult()
    OUTCOME.doc = result.to_json
    number = _version_number(version)
    try:
        settings = config.resolve(api_url, token, target)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if wait is None:
        wait = sys.stdout.isatty() and not as_json
    say: Callable[[str], None] = _echo_err if as_json else click.echo
    opts = deploying.DeployOptions(dags_path=Path("."), deployment=target, wait=wait, timeout=timeout,
                                   require_all=require_all, force=force, description=description,
                                   allow_import_errors=allow_import_errors)
    api = ApiClient(settings.api_url, settings.token, on_retry=lambda m: _echo_err(f"warning: {m}"))
    try:
        deploying.promote(api, opts, source, number, deploy_id, say, result)
    finally:
        api.close()
    if not as_json:
        click.echo(f"Deploy {result.deploy_id}: {result.state}" + (f" v{result.version}" if result.version else ""))
    return EXIT_OK


@cli.group()
def webhooks() -> None:
    """Signed HTTP callbacks on lifecycle events (deploy.live, deploy.rejected, ...), per deployment."""


@webhooks.command("add")
@click.argument("url")
@click.option("--events", required=True, help="Comma-separated event types (deploy.live,deploy.rejected) or * for all.")
@click.option("--description", default="", help="What it is for.")
@api_options
def webhooks_add(url: str, events: str, description: str, api_url: str | None, token: str | None,
                 deployment: str | None, as_json: bool, debug: bool) -> None:
    """Add a webhook (admin). Its signing secret is printed once: keep it where the receiver reads it."""
    name = _deployment(deployment)
    kinds = [e.strip() for e in events.split(",") if e.strip()]
    doc = _call(api_url, token, as_json, lambda api: api.add_webhook(name, {"url": url, "events": kinds,
                                                                            "description": description}))
    if not as_json:
        hook = doc["webhook"]
        click.echo(f"webhook {hook['webhook_id']} added: {', '.join(hook['events'])} -> {hook['url']}")
        click.echo(f"signing secret (shown once): {doc['secret']}")


@webhooks.command("list")
@api_options
def webhooks_list(api_url: str | None, token: str | None, deployment: str | None, as_json: bool, debug: bool) -> None:
    """The deployment's webhooks (admin)."""
    name = _deployment(deployment)
    doc = _call(api_url, token, as_json, lambda api: api.list_webhooks(name))
    if as_json:
        return
    _table(["id", "events", "url"], [[h["webhook_id"], ",".join(h["events"]), h["url"]] for h in doc["items"]])


@webhooks.command("remove")
@click.argument("webhook_id")
@api_options
def webhooks_remove(webhook_id: str, api_url: str | None, token: str | None, deployment: str | None, as_json: bool,
                    debug: bool) -> None:
    """Remove a webhook (admin); deliveries still queued for it are dropped."""
    name = _deployment(deployment)
    _call(api_url, token, as_json, lambda api: api.remove_webhook(name, webhook_id) or {"removed": webhook_id})
    if not as_json:
        click.echo(f"webhook {webhook_id} removed")


@webhooks.command("deliveries")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@api_options
def webhooks_deliveries(limit: int, api_url: str | None, token: str | None, deployment: str | None, as_json: bool,
                        debug: bool) -> None:
    """The last delivery attempts, newest first, with the receivers' HTTP statuses."""
    name = _deployment(deployment)
    doc = _call(api_url, token, as_json, lambda api: api.list_deliveries(name, limit))
    if as_json:
        return
    _table(["when", "webhook", "event", "try", "status", "result"],
           [[_when(d["at"]), d["webhook_id"], d["event_type"], str(d["attempt"]),
             str(d["status"]) if d.get("status") is not None else "-", "ok" if d["ok"] else d.get("error") or "failed"]
            for d in doc["items"]])


@cli.group()
def deployments() -> None:
    """List and create deployments."""


@deployments.command("list")
@api_options
def deployments_list(api_url: str | None, token: str | None, deployment: str | None, as_json: bool, debug: bool) -> None:
    """The deployments this token can see, with their live version and what they accept."""
    doc = _call(api_url, token, as_json, lambda api: api.list_deployments())
    if as_json:
        return
    _table(["deployment", "dag deploys", "live", "accepts", "parse"],
           [[d["name"], "enabled" if d["mechanism"] == "DAG_ONLY" else "disabled",
             f"v{d['current_version']}" if d["current_version"] else "-", d.get("accept", "both"), d.get("parse_mode", "-")]
            for d in doc["items"]])


@deployments.command("create")
@click.argument("name")
@click.option("--dag-deploy", type=click.Choice(["enabled", "disabled"]), default="enabled", show_default=True,
              help="Accept DAG-only deploys from the start.")
@api_options
def deployments_create(name: str, dag_deploy: str, api_url: str | None, token: str | None, deployment: str | None,
                       as_json: bool, debug: bool) -> None:
    """Create a deployment (admin for all deployments)."""
    mechanism = "DAG_ONLY" if dag_deploy == "enabled" else "IMAGE"
    doc = _call(api_url, token, as_json, lambda api: api.create_deployment({"name": name, "mechanism": mechanism}))
    if not as_json:
        click.echo(f"deployment {doc['name']} created (DAG-only deploys {dag_deploy})")


@cli.group()
def sidecars() -> None:
    """The sidecars of a deployment."""


@sidecars.command("list")
@api_options
def sidecars_list(api_url: str | None, token: str | None, deployment: str | None, as_json: bool, debug: bool) -> None:
    """Name, component, version, live or stale (and behind), last heartbeat and last error."""
    name = _deployment(deployment)
    doc = _call(api_url, token, as_json, lambda api: api.list_sidecars(name))
    if as_json:
        return
    if not doc["items"]:
        click.echo(f"no sidecar has registered for {name}")
        return
    rows = []
    for s in doc["items"]:
        state = "live" if s["live"] else "stale"
        if s.get("version") and not s.get("on_current"):
            state += ", behind"
        rows.append([s["name"], s["component"], f"v{s['version']}" if s["version"] else "none",
                     _paint(state, "live" if state == "live" else ("stale" if not s["live"] else "behind")),
                     f"{_when(s['last_heartbeat'])} ({s.get('last_seen_s', 0):.0f} s ago)", (s.get("last_error") or "-")[:60]])
    _table(["sidecar", "component", "version", "state", "last heartbeat", "last error"], rows)


@cli.group()
def tokens() -> None:
    """API tokens (admin for all deployments): list, create (the secret is shown once), revoke."""


@tokens.command("list")
@api_options
def tokens_list(api_url: str | None, token: str | None, deployment: str | None, as_json: bool, debug: bool) -> None:
    """Every token: name, role, scope, revoked (never a secret)."""
    doc = _call(api_url, token, as_json, lambda api: api.list_tokens())
    if as_json:
        return
    _table(["name", "role", "deployments", "sidecar names", "state", "created"],
           [[t["name"], t["role"], ",".join(t["deployments"]), ",".join(t.get("sidecar_names") or []) or "-",
             _paint("revoked", "REJECTED") if t["revoked"] else "active", _when(t["created_at"])]
            for t in sorted(doc["items"], key=lambda t: t["name"])])


@tokens.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "deployer", "sidecar", "admin"]), required=True)
@click.option("--scope", "scopes", multiple=True, help="A deployment it may act on (repeat; default: all).")
@click.option("--sidecar-name", "sidecar_names", multiple=True, help="Sidecar tokens: a name or pattern it may register.")
@api_options
def tokens_create(name: str, role: str, scopes: tuple[str, ...], sidecar_names: tuple[str, ...], api_url: str | None,
                  token: str | None, deployment: str | None, as_json: bool, debug: bool) -> None:
    """Create a token; its secret is printed once (only its hash is stored)."""
    body: dict[str, Any] = {"name": name, "role": role, "deployments": list(scopes) or ["*"]}
    if sidecar_names:
        body["sidecar_names"] = list(sidecar_names)
    doc = _call(api_url, token, as_json, lambda api: api.create_token(body))
    if not as_json:
        info = doc["info"]
        click.echo(f"token {info['name']} ({info['role']}, {','.join(info['deployments'])}) created; "
                   "its secret, shown once:", err=True)
        click.echo(doc["token"])


@tokens.command("revoke")
@click.argument("name")
@api_options
def tokens_revoke(name: str, api_url: str | None, token: str | None, deployment: str | None, as_json: bool,
                  debug: bool) -> None:
    """Revoke a token: refused at once here, within the API's token cache time everywhere."""
    doc = _call(api_url, token, as_json, lambda api: api.revoke_token(name))
    if not as_json:
        click.echo(f"token {doc['name']} revoked")


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: `eval "$(dagcast completion bash)"` in ~/.bashrc."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "dagcast", "_DAGCAST_COMPLETE").source())


# --- operators --------------------------------------------------------------------------------


@cli.group()
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

    from dagcast import extras

    extras.require("server", "`dagcast admin create-token`")
    import boto3
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError as BotoClientError

    from chalicelib.auth import hash_token, new_token
    from chalicelib.exceptions import DagcastError
    from chalicelib.models import Role, Token
    from chalicelib.store import Store

    secret = new_token()
    token = Token(token_hash=hash_token(secret), name=name, role=Role(role), deployments=list(deployments) or ["*"],
                  created_at=int(time.time() * 1000))
    try:
        Store(boto3.resource("dynamodb").Table(table)).put_token(token)
    except (DagcastError, BotoCoreError, BotoClientError) as exc:
        raise ClientError(f"cannot create the token in {table}: {exc}") from exc
    _echo_err(f"token {name!r} ({role}) created; it is shown only this once:")
    click.echo(secret)


@cli.group()
def local() -> None:
    """The embedded stack on this machine (moto server on 127.0.0.1, no AWS account)."""


@local.command("up")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path), help="Where the state and local.json are kept.")
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="API port (default: the one of the last run on this state folder, else a free one).")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address the API and the embedded AWS listen on; anything but loopback exposes them (warned).")
@click.option("--sidecars", type=click.IntRange(0, 200), default=2, show_default=True, help="Sidecars to start.")
@click.option("--deployment", default="demo", show_default=True, help="Deployment to create.")
@click.option("--janitor-interval", type=click.FloatRange(min=0.1), default=30, show_default=True,
              help="Seconds between runs of the scheduled janitor.")
@click.option("--parse", "parse_mode", type=click.Choice(["auto", "report", "gate", "off"]), default="auto",
              show_default=True, help="The sidecars' --parse: with Airflow in this environment they load each version "
              "with Airflow's loader and report it (see `dagcast sidecar --help`).")
def local_up(state_dir: Path, port: int, bind: str, sidecars: int, deployment: str, janitor_interval: float,
             parse_mode: str) -> None:
    """Run the embedded stack in the foreground until SIGINT/SIGTERM; started again on the same
    state folder, it carries on with the same state, ports and tokens."""
    import threading

    from dagcast import extras
    from dagcast.local import EmbeddedStack

    extras.require("local", "`dagcast local up`")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if bind not in ("127.0.0.1", "localhost", "::1"):
        _echo_err(f"warning: listening on {bind}: the API takes tokens, but the embedded AWS (moto server) has no "
                  "authentication at all; anyone who can reach it can read and change the stack's data")
    stack = EmbeddedStack(state_dir, port=port, sidecars=sidecars, deployment=deployment,
                          janitor_interval=janitor_interval, bind=bind, sidecar_args=["--parse", parse_mode])
    try:
        info = stack.start()
        click.echo(f"dagcast local stack ready: API {info.api_url}, deployment {info.deployment!r}")
        click.echo(f"  console:    {info.console_url}")
        for s in info.sidecars:
            click.echo(f"  sidecar {s.name}: dags folder {s.dags_path}")
        click.echo(f"  state:      {state_dir} (local.json holds an admin token; `dagcast local env --state-dir "
                   f"{state_dir}` prints it as export lines)")
        click.echo("Press Ctrl-C to stop.", nl=True)
        sys.stdout.flush()
        stack.supervise(stop)
    except Exception as exc:  # noqa: BLE001 - the top of the command: report in one line, clean up
        stack.stop()
        raise ClientError(f"the local stack stopped: {exc.__class__.__name__}: {exc}; logs are in {state_dir / 'logs'}") from exc
    started = time.monotonic()
    stack.stop()
    click.echo(f"dagcast local stack stopped in {time.monotonic() - started:.1f}s; its state is kept in {state_dir}")


def _local_info(state_dir: Path) -> dict[str, Any]:
    from dagcast.local import read_info

    info = read_info(state_dir)
    if info is None:
        raise UsageProblem(f"{state_dir} holds no embedded stack (no local.json): start one with `dagcast local up`")
    return info


@local.command("status")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path), help="The stack's state folder.")
@_json_option()
def local_status(state_dir: Path, as_json: bool) -> int:
    """Is the stack of this state folder up: its URL, live version and sidecars."""
    from dagcast.client import ApiClient
    from dagcast.local import running_pid

    OUTCOME.json = as_json
    info = _local_info(state_dir)
    pid = running_pid(state_dir)
    doc: dict[str, Any] = {"up": False, "pid": pid, "api_url": info.get("api_url"), "deployment": info.get("deployment"),
                           "current_version": None, "sidecars": []}
    OUTCOME.doc = lambda: doc
    if pid is not None:
        api = ApiClient(info["api_url"], info["token"], attempts=1, timeout=5)
        try:
            dep = api.get_deployment(info["deployment"])
            listed = api.request("GET", f"/deployments/{info['deployment']}/sidecars")["items"]
            doc.update(up=True, current_version=dep["current_version"],
                       sidecars=[{k: s[k] for k in ("name", "version", "live", "on_current")} for s in listed])
        except ClientError as exc:
            doc["error_detail"] = str(exc)
        finally:
            api.close()
    if not as_json:
        if doc["up"]:
            click.echo(f"up (pid {pid}): API {doc['api_url']}, deployment {doc['deployment']!r} on v{doc['current_version']}")
            for s in doc["sidecars"]:
                state = ("live" if s["live"] else "stale") + (", on it" if s["on_current"] else "")
                click.echo(f"  sidecar {s['name']:<20} v{s['version']:<5} {state}")
        else:
            click.echo(f"down: no stack runs on {state_dir}" if pid is None else
                       f"starting or not answering (pid {pid}): {doc.get('error_detail', '')}")
    return EXIT_OK if doc["up"] else EXIT_ERROR


@local.command("down")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path), help="The stack's state folder.")
@click.option("--timeout", type=click.FloatRange(min=1), default=30, show_default=True, help="Seconds to wait for it.")
@_json_option()
def local_down(state_dir: Path, timeout: float, as_json: bool) -> int:
    """Stop the stack running on this state folder (SIGTERM, then wait until it has stopped)."""
    from dagcast.local import process_gone, running_pid

    OUTCOME.json = as_json
    pid = running_pid(state_dir)
    doc: dict[str, Any] = {"was_up": pid is not None, "pid": pid, "stopped": pid is None}
    OUTCOME.doc = lambda: doc
    if pid is None:
        if not as_json:
            click.echo(f"no stack runs on {state_dir}")
        return EXIT_OK
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running_pid(state_dir) is not None or (pid > 0 and not process_gone(pid)):
        if time.monotonic() > deadline:
            raise ClientError(f"the stack (pid {pid}) did not stop within {timeout:g}s")
        time.sleep(0.1)
    doc["stopped"] = True
    if not as_json:
        click.echo(f"stopped the stack on {state_dir} (pid {pid}); its state is kept")
    return EXIT_OK


@local.command("env")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path), help="The stack's state folder.")
def local_env(state_dir: Path) -> None:
    """Print `export DAGCAST_...` lines for the stack (use: eval "$(dagcast local env --state-dir DIR)")."""
    import shlex

    info = _local_info(state_dir)
    for name, key in (("DAGCAST_API_URL", "api_url"), ("DAGCAST_TOKEN", "token"), ("DAGCAST_DEPLOYMENT", "deployment")):
        click.echo(f"export {name}={shlex.quote(str(info[key]))}")


if __name__ == "__main__":
    main()
