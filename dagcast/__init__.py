"""dagcast client programs: the CLI, the sidecar and the embedded local stack."""

import sys

from chalicelib import __version__

# httpx imports its own command line (httpx._main: click, rich and pygments, ~35 ms at every start of
# the CLI and the sidecar) whenever those are installed, which they are beside dagcast's CLI; nothing
# here uses it. A None entry makes that import fail as if they were not installed (httpx then keeps
# a stub that says to install httpx[cli]).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

__all__ = ["__version__"]
