"""What every measuring script does first (bench, bench-serve, bench-gomem, soak)."""
from __future__ import annotations

import os
import resource


def enter(name: str) -> None:
    """Refuse to run outside the private network namespace (real tailscaled
    only there: scripts/netns sets TS_SUPERVISOR_NETNS=1), and raise the soft
    RLIMIT_NOFILE to the hard limit (hundreds of tailscaleds and sockets)."""
    if os.environ.get("TS_SUPERVISOR_NETNS") != "1":
        raise SystemExit(f"{name}: run me through scripts/{name} (real tailscaled only in the "
                         "private namespace)")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
