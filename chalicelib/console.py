"""The web console: one static page (HTML, CSS, a small script) served by the API itself.

The files live in ``chalicelib/console/`` so that Chalice ships them with the Lambda; they
are read once, on first use, and served with a strict Content-Security-Policy (no inline
script or style, no other origin), so the page can only talk to the API that served it.
"""
from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["CSP", "Asset", "asset", "index"]

CONSOLE_DIR = Path(__file__).resolve().parent / "console"

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}

# Served under /console/{asset}; index.html is served at / only.
ASSETS = frozenset({"console.css", "console.js"})


class Asset:
    """One file of the console, with the headers to serve it with."""

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.body = body
        self.headers = {
            "Content-Type": _TYPES[name],
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            # Small files that change with every release of the API: always revalidate.
            "Cache-Control": "no-cache",
        }


@functools.cache
def _load(name: str) -> Asset:
    return Asset(name, (CONSOLE_DIR / name).read_text(encoding="utf-8"))


def index() -> Asset:
    return _load("index.html")


def asset(name: str) -> Asset | None:
    """The named stylesheet or script, or None for anything that is not part of the console."""
    return _load(name) if name in ASSETS else None
