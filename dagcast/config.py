"""Client settings: flags > environment (DAGCAST_*) > the project's .dagcast/ files.

`.dagcast/config.toml` (api_url, deployment; safe to commit) is written by `dagcast init`;
`.dagcast/credentials.toml` (token; mode 0600, git-ignored) by `dagcast login`.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from dagcast.exceptions import ConfigError

PROJECT_DIR = ".dagcast"


@dataclass
class ClientSettings:
    api_url: str
    token: str
    deployment: str


def cache_home() -> Path:
    """This machine's cache folder for dagcast: $XDG_CACHE_HOME/dagcast (default ~/.cache/dagcast)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dagcast"


def find_project(start: Path | None = None) -> Path | None:
    """The nearest folder at or above `start` that holds a .dagcast/ folder."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PROJECT_DIR).is_dir():
            return folder / PROJECT_DIR
    return None


def _read_toml(path: Path) -> dict[str, str]:
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return {k: str(v) for k, v in doc.items() if isinstance(v, str | int)}


def project_values(start: Path | None = None) -> dict[str, str]:
    folder = find_project(start)
    if folder is None:
        return {}
    return {**_read_toml(folder / "config.toml"), **_read_toml(folder / "credentials.toml")}


def resolve(api_url: str | None, token: str | None, deployment: str | None) -> ClientSettings:
    """Fill what flags and environment (already merged by click) left empty from the project files."""
    project = project_values()
    values = {
        "api_url": api_url or project.get("api_url"),
        "token": token or project.get("token"),
        "deployment": deployment or project.get("deployment"),
    }
    missing = [k for k, v in values.items() if not v]
    if missing:
        flags = ", ".join(f"--{k.replace('_', '-')} (or DAGCAST_{k.upper()})" for k in missing)
        raise ConfigError(f"missing {flags}; or run `dagcast init` and `dagcast login` in the project")
    return ClientSettings(api_url=str(values["api_url"]).rstrip("/"), token=str(values["token"]),
                          deployment=str(values["deployment"]))


def _toml_line(key: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{key} = "{escaped}"\n'


def write_project(root: Path, api_url: str, deployment: str) -> Path:
    folder = root / PROJECT_DIR
    folder.mkdir(exist_ok=True)
    (folder / ".gitignore").write_text("credentials.toml\n")
    path = folder / "config.toml"
    path.write_text(_toml_line("api_url", api_url) + _toml_line("deployment", deployment))
    return path


def write_credentials(folder: Path, token: str) -> Path:
    path = folder / "credentials.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_toml_line("token", token))
    os.chmod(path, 0o600)
    return path
