"""The optional parts of dagcast and the packages each needs (pyproject.toml's extras).

`pip install dagcast` is the CLI and the sidecar's code only; a command that needs more checks
here first, without importing anything, and stops with one line naming the extra to install.
"""
from __future__ import annotations

import importlib.util

from dagcast.exceptions import MissingExtra

# The top-level modules each extra brings that dagcast imports (not the whole dependency tree).
EXTRAS: dict[str, tuple[str, ...]] = {
    "sidecar": ("boto3", "cryptography"),
    "server": ("boto3", "aws_lambda_powertools", "aws_xray_sdk", "cryptography", "chalice"),
    "local": ("boto3", "aws_lambda_powertools", "aws_xray_sdk", "cryptography", "chalice", "moto",
              "yaml"),
}


def missing(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here (found without importing them)."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """Raise MissingExtra (exit 1, a configuration problem) when `what` cannot run for lack of `extra`."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(what, extra, ", ".join(absent))
