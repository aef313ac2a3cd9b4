"""dagcast client programs: the CLI, the sidecar and the embedded local stack."""

from chalicelib import __version__

__all__ = ["__version__"]
