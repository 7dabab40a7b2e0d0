"""Where things live under the data dir, and unix socket paths that always fit.

A unix socket address holds at most 107 bytes of path (sun_path is 108
with the NUL). A NAS data dir such as /volume1/@appdata/... plus a long
proxy name overflows it, and tailscaled then dies at start with `bind:
invalid argument`. So a socket lives where it always has (beside its
state) while that fits, and otherwise in a short private runtime dir named
after the data dir: the same path for the supervisor and for the CLI.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

SUN_PATH_MAX = 107  # bytes: sizeof(sockaddr_un.sun_path) - 1 on Linux


class RuntimeDirError(OSError):
    pass


def proxy_dir(data_dir: Path, name: str) -> Path:
    return data_dir / "proxies" / name


def statedir(data_dir: Path, name: str) -> Path:
    return proxy_dir(data_dir, name) / "state"


def fits(path: Path) -> bool:
    return len(os.fsencode(str(path))) <= SUN_PATH_MAX


def runtime_dir(data_dir: Path) -> Path:
    """A short directory private to this user and data dir:
    $XDG_RUNTIME_DIR/ts-supervisor-H (if this user owns it: setpriv and su pass on
    root's), else /run/ts-supervisor-H for root, else /tmp/ts-supervisor-UID-H
    (H: 8 hex of the data dir's absolute path). It depends on the user and the
    environment, so a CLI run by another user finds the supervisor's socket through
    what the supervisor recorded (ipc.socket_for). Not created here: see
    ensure_runtime_dir()."""
    h = hashlib.sha256(os.fsencode(str(data_dir.absolute()))).hexdigest()[:8]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and len(xdg) <= 40 and os.path.isabs(xdg) and _owned(xdg):
        return Path(xdg) / f"ts-supervisor-{h}"
    if os.geteuid() == 0:
        return Path("/run") / f"ts-supervisor-{h}"
    return Path("/tmp") / f"ts-supervisor-{os.geteuid()}-{h}"


def _owned(path: str) -> bool:
    try:
        return os.stat(path).st_uid == os.geteuid()
    except OSError:
        return False


def ensure_runtime_dir(data_dir: Path) -> Path:
    """Create the runtime dir 0700, or check an existing one is ours: a
    directory (not a symlink), owned by us, with no access for anyone else.
    Raises RuntimeDirError with one line otherwise (someone else made it)."""
    d = runtime_dir(data_dir)
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeDirError(f"{d}: not a private directory of uid {os.geteuid()} "
                              f"(owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); remove it")
    return d


def socket_path(preferred: Path, data_dir: Path, name: str) -> Path:
    """`preferred` if it fits in a socket address, else runtime_dir/NAME."""
    return preferred if fits(preferred) else runtime_dir(data_dir) / name


def proxy_socket(data_dir: Path, name: str) -> Path:
    """A proxy's tailscaled LocalAPI socket (what `tailscale --socket=` takes)."""
    return socket_path(statedir(data_dir, name) / "tailscaled.sock", data_dir, f"{name}.sock")


def supervisor_socket(data_dir: Path) -> Path:
    """The running supervisor's control socket (ipc.py)."""
    return socket_path(data_dir / "supervisor.sock", data_dir, "supervisor.sock")
