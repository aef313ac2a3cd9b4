"""The `dagcast` process around the work: what the deploy command has imported when its clock
starts, and an exit that skips the interpreter's teardown but nothing an exit must do (atexit
handlers, logging's flush, stdout's buffer, non-daemon threads), on the program's own command
line only. Each check runs in a fresh interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGCAST_") and k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_deploy_command_starts_its_clock_before_importing_pydantic_and_the_validator(tmp_path: Path) -> None:
    """The deploy's stages import what they use, while the look-ahead waits on the API; the process
    overhead (wall time minus timings.total_s) is the interpreter, click and httpx."""
    code = """
import json, sys
from dagcast import deploy
seen = []
real = deploy.DeployResult
deploy.DeployResult = lambda *a, **k: (seen.append(sorted(sys.modules)), real(*a, **k))[1]
from dagcast.cli import main
try:
    main(["deploy", "--dags", "--json"])  # no API URL: a usage error once the result exists
except SystemExit as exc:
    print(json.dumps({"code": exc.code, "modules": seen[0]}))
"""
    proc = python(code, tmp_path)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == 2, proc.stderr
    heavy = {m for m in out["modules"] if m.split(".")[0] == "pydantic" or m.startswith("chalicelib.bundle.")
             or m in ("chalicelib.manifest", "dagcast.bundler", "dagcast.compile_cache", "tarfile")}
    assert heavy == set()


def test_the_program_ends_after_running_atexit_handlers_and_flushing_logs_and_stdout(tmp_path: Path) -> None:
    code = """
import atexit, logging, logging.handlers, sys
target = logging.FileHandler("log.txt")
logging.getLogger("probe").addHandler(logging.handlers.MemoryHandler(100, target=target))  # written at shutdown
logging.getLogger("probe").warning("kept")
atexit.register(lambda: open("atexit.txt", "w").write("ran"))
atexit.register(lambda: sys.stdout.write("written at exit"))  # stdout is a pipe: block-buffered
sys.argv = ["dagcast", "--version"]
from dagcast.cli import main
main()
"""
    proc = python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dagcast ") and proc.stdout.endswith("\nwritten at exit")
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "log.txt").read_text() == "kept\n"


def test_the_program_waits_for_a_non_daemon_thread_as_the_interpreter_does(tmp_path: Path) -> None:
    code = """
import sys, threading, time
threading.Thread(target=lambda: (time.sleep(0.5), open("thread.txt", "w").write("done"))).start()
sys.argv = ["dagcast", "--version"]
from dagcast.cli import main
main()
"""
    proc = python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "thread.txt").read_text() == "done"


def test_main_called_with_arguments_raises_systemexit_for_its_caller(tmp_path: Path) -> None:
    code = """
import atexit
atexit.register(lambda: print("still running after main"))
from dagcast.cli import main
try:
    main(["--version"])
except SystemExit as exc:
    print("SystemExit", exc.code)
"""
    proc = python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["SystemExit 0", "still running after main"]


def test_the_cli_imports_neither_httpxs_own_command_line_nor_rich_and_pygments_with_it(tmp_path: Path) -> None:
    """httpx imports its command line (click, rich, pygments: ~35 ms) when they are installed; the
    dagcast package keeps it out of every process of its own, and httpx still works."""
    code = """
import json, sys
import dagcast.deploy, dagcast.client, httpx
print(json.dumps({"loaded": sorted(m for m in ("httpx._main", "rich", "pygments") if sys.modules.get(m)),
                  "client": type(httpx.Client()).__name__}))
"""
    proc = python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"loaded": [], "client": "Client"}


def test_only_https_loads_the_ca_certificates_and_plain_http_gets_a_context_that_trusts_nothing() -> None:
    import ssl

    from dagcast.client import tls_context, verify_for

    assert verify_for("https://api.example.com/") is tls_context()
    plain = verify_for("http://127.0.0.1:5000")
    assert plain is not tls_context()
    assert plain.verify_mode is ssl.CERT_REQUIRED and plain.check_hostname
    assert plain.cert_store_stats()["x509_ca"] == 0, "no CA: a TLS handshake with it can only fail"
