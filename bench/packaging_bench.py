"""What installing dagcast costs, and what the API's cold start costs.

Usage: python bench/packaging_bench.py [--skip-install] [--skip-zip] [--runs N]

- Installs: each of `pip install .` (CI, laptops), `pip install '.[sidecar]'` (the sidecar
  image) and `pip install '.[server]'` (what the Lambda functions import) into a fresh venv;
  reports the packages pip added (`pip list` less what a new venv has) and the growth of
  site-packages in MB (as pip leaves it: with the compiled .pyc files).
- Cold start: wall time of `python -c "import app"` against `python -c "import boto3"` (the one
  package every function must import), interleaved in fresh processes of the dev venv, both
  with their .pyc files, tracing off as on a machine outside Lambda. The target is the ratio, so that a busy or slow
  machine moves both sides alike: `import app` within 1.5 times `import boto3` (about 250 ms
  where boto3 takes 165 ms), as the median of each round's ratio (the two imports run back to
  back, under the same load).
- Lambda zip: `chalice package` (downloads the wheels of requirements.txt from PyPI) and the
  size of deployment.zip, with the share of the packages the Lambda runtime also ships.

Writes bench/results/packaging.json; the README's table comes from it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
MB = 1_000_000

INSTALL_TARGETS = {"": {"max_mb": 40, "max_packages": 20}}  # the CI/laptop install; the others are reported
IMPORT_RATIO_TARGET = 1.5
# What any API on these libraries imports before its own code: boto3, pydantic and one model.
FLOOR = "import boto3, pydantic\nclass M(pydantic.BaseModel):\n    x: int"
RUNTIME_PROVIDED = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six.py")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def packages(py: Path) -> set[str]:
    out = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], check=True, capture_output=True, text=True)
    return {p["name"].lower().replace("_", "-") for p in json.loads(out.stdout)}


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def measure_install(extra: str, work: Path) -> dict[str, Any]:
    venv = work / f"venv{extra or '-base'}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    before, size_before = packages(py), du(site_packages(venv))
    spec = f".[{extra}]" if extra else "."
    started = time.monotonic()
    subprocess.run([str(py), "-m", "pip", "install", "-q", spec], cwd=REPO, check=True, capture_output=True)
    seconds = time.monotonic() - started
    added = sorted(packages(py) - before)
    heavy = {p: du(site_packages(venv) / p) for p in ("boto3", "botocore", "chalice", "moto", "cryptography")
             if (site_packages(venv) / p).exists()}
    return {
        "install": f"pip install {spec!r}" if extra else "pip install .",
        "packages": len(added),
        "mb": round((du(site_packages(venv)) - size_before) / MB, 1),
        "seconds": round(seconds, 1),
        "added": added,
        "heavy_mb": {k: round(v / MB, 1) for k, v in heavy.items()},
    }


def time_import(stmt: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one fresh interpreter running stmt."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([str(VENV_PY), "-c", stmt], cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure_imports(runs: int, work: Path) -> dict[str, Any]:
    # Both sides with their .pyc files (boto3 has them from pip; dagcast's own modules get them
    # here, in a cache of this run, even where PYTHONDONTWRITEBYTECODE is set), tracing off.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_LAMBDA", "LAMBDA_", "_X_AMZN")) and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(AWS_DEFAULT_REGION="us-east-1", PYTHONPYCACHEPREFIX=str(work / "pycache"))
    for stmt in ("import boto3", FLOOR, "import app"):  # warm the page cache, write the .pyc files of changed sources
        time_import(stmt, env)
    stmts = {"pass": "pass", "import boto3": "import boto3", "floor": FLOOR, "import app": "import app"}
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in stmts}
    for _ in range(runs):
        for label, stmt in stmts.items():
            samples[label].append(time_import(stmt, env))
    wall = {k: [w for w, _ in v] for k, v in samples.items()}
    cpu = {k: [c for _, c in v] for k, v in samples.items()}
    best = {k: min(v) for k, v in wall.items()}
    median = {k: statistics.median(v) for k, v in wall.items()}
    cpu_best = {k: min(v) for k, v in cpu.items()}
    modules = subprocess.run([str(VENV_PY), "-c", "import app, sys; print(sorted({m.split('.')[0] for m in sys.modules}))"],
                             cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    return {
        "runs": runs,
        "best_ms": {k: round(v * 1000, 1) for k, v in best.items()},
        "median_ms": {k: round(v * 1000, 1) for k, v in median.items()},
        "cpu_best_ms": {k: round(v * 1000, 1) for k, v in cpu_best.items()},
        "ratio_best": round(best["import app"] / best["import boto3"], 2),
        "ratio_median": round(median["import app"] / median["import boto3"], 2),
        "ratio_cpu": round(cpu_best["import app"] / cpu_best["import boto3"], 2),
        "floor_ratio_paired_median": round(statistics.median(a / b for a, b in zip(wall["floor"], wall["import boto3"],
                                                                                    strict=True)), 2),
        # each round's app / boto3, back to back under the same load: the figure the target is on
        "ratio_paired_median": round(statistics.median(a / b for a, b in zip(wall["import app"], wall["import boto3"],
                                                                              strict=True)), 2),
        "aws_xray_sdk_imported": "aws_xray_sdk" in modules,
    }


def measure_zip(work: Path) -> dict[str, Any]:
    chalice = REPO / ".venv" / "bin" / "chalice"
    out = work / "pkg"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_DEFAULT_REGION"] = "us-east-1"
    subprocess.run([str(chalice), "package", "--stage", "dev", "--merge-template", "infra/resources.yaml",
                    "--pkg-format", "cloudformation", "--template-format", "yaml", str(out)],
                   cwd=REPO, env=env, check=True, capture_output=True)
    z = zipfile.ZipFile(out / "deployment.zip")
    provided = [i for i in z.infolist() if i.filename.split("/")[0].split("-")[0] in RUNTIME_PROVIDED]
    return {
        "zip_mb": round((out / "deployment.zip").stat().st_size / MB, 1),
        "unzipped_mb": round(sum(i.file_size for i in z.infolist()) / MB, 1),
        "runtime_provided_zipped_mb": round(sum(i.compress_size for i in provided) / MB, 1),
        "has_cryptography": any(i.filename.startswith("cryptography/") for i in z.infolist()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-install", action="store_true", help="Do not measure the installs (they download).")
    ap.add_argument("--skip-zip", action="store_true", help="Do not run `chalice package`.")
    ap.add_argument("--runs", type=int, default=15, help="Runs of each import.")
    args = ap.parse_args()
    doc: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "targets": {"install_mb": 40, "install_packages": 20, "import_ratio_to_boto3": IMPORT_RATIO_TARGET},
    }
    with tempfile.TemporaryDirectory(prefix="dagcast-pkg-") as tmp:
        work = Path(tmp)
        if not args.skip_install:
            doc["installs"] = [measure_install(extra, work) for extra in ("", "sidecar", "server")]
            base = doc["installs"][0]
            doc["met_install"] = base["mb"] <= 40 and base["packages"] <= 20
        doc["imports"] = measure_imports(args.runs, work)
        doc["met_import"] = doc["imports"]["ratio_paired_median"] <= IMPORT_RATIO_TARGET
        if not args.skip_zip:
            doc["lambda_zip"] = measure_zip(work)
        shutil.rmtree(work, ignore_errors=True)
    out = REPO / "bench" / "results" / "packaging.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    for row in doc.get("installs", []):
        print(f"{row['install']:<30} {row['packages']:>3} packages {row['mb']:>6.1f} MB  {row['seconds']:>5.1f} s")
    imp = doc["imports"]
    print(f"import app {imp['best_ms']['import app']} ms, import boto3 {imp['best_ms']['import boto3']} ms (best of "
          f"{imp['runs']}): ratio {imp['ratio_paired_median']} (median of the rounds; of the bests "
          f"{imp['ratio_best']}, of the CPU times {imp['ratio_cpu']}), target <= {IMPORT_RATIO_TARGET}; boto3 + "
          f"pydantic + one model: {imp['floor_ratio_paired_median']}")
    if "lambda_zip" in doc:
        z = doc["lambda_zip"]
        print(f"lambda zip {z['zip_mb']} MB ({z['unzipped_mb']} MB unzipped), of which runtime-provided "
              f"{z['runtime_provided_zipped_mb']} MB")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
