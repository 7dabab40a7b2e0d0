"""tailscaled.state on disk: what counts as good state, the copy kept of it,
and repairing a corrupt file before anything is wiped.

A wipe registers a new node: on hosted control that is a new IP and, while
the old machine record exists, a `-1` name. A power cut usually leaves
either an intact `tailscaled.state.tmpNNN` beside a truncated file
(tailscale writes state with an atomic rename) or nothing at all; with a
copy of the last good state taken while the proxy ran, the node, its name
and its IP survive.

Layout (plaintext store, both 1.78.1 and 1.96.4): a JSON object whose values
are base64; `_machinekey` holds the machine key and `_current-profile` names
the key of the current profile's prefs. A TPM-sealed store
({"key", "nonce", "data"}) is not plaintext and is never copied or restored.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from supervisor.tailscale import STATE_FILE

COPY_NAME = "tailscaled.state.good"  # in the proxy's dir, beside (not in) the state dir


def is_good_state(raw: bytes) -> bool:
    """Plaintext state with a machine key and the current profile present."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict) or not isinstance(data.get("_machinekey"), str) or not data["_machinekey"]:
        return False
    current = data.get("_current-profile")
    if not isinstance(current, str):
        return False
    try:
        profile = base64.b64decode(current, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return False
    return bool(profile) and isinstance(data.get(profile), str)


def control_url(raw: bytes) -> str | None:
    """The current profile's `prefs.ControlURL`: the control this state is logged in on
    ("" where prefs leave it unset, tailscale's default). None when that cannot be read:
    not plaintext state (TPM-sealed, corrupt), no current profile, prefs not a JSON
    object, or no string ControlURL (tailscale/tailscale ipn/prefs.go `ControlURL`)."""
    if not is_good_state(raw):
        return None
    data = json.loads(raw)
    profile = base64.b64decode(data["_current-profile"]).decode()
    try:
        prefs = json.loads(base64.b64decode(data[profile], validate=True))
    except (binascii.Error, ValueError, RecursionError):
        return None
    url = prefs.get("ControlURL") if isinstance(prefs, dict) else None
    return url if isinstance(url, str) else None


def _write_private(path: Path, raw: bytes) -> None:
    """Atomically, 0600, fsynced: it holds private keys."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keep_copy(statedir: Path, copy: Path) -> bool:
    """Keep a copy of tailscaled.state if it is good state and differs from
    the copy already kept (only the newest is kept, so a node-key rotation
    never leaves an older key behind). Returns True if a copy was written."""
    try:
        raw = (statedir / STATE_FILE).read_bytes()
    except OSError:
        return False
    if not is_good_state(raw):
        return False
    try:
        if copy.read_bytes() == raw:
            return False
    except OSError:
        pass
    copy.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(copy, raw)
    return True


def restore(statedir: Path, copy: Path) -> str | None:
    """Repair a corrupt tailscaled.state in place with the newest good state at hand:
    an intact `tailscaled.state.tmp*` that tailscale's atomic write left beside it, or
    the kept copy, whichever was written last (a `.tmp` wins a tie: it is the write
    that was under way). A `.tmp` older than the copy is a leftover of an earlier
    interrupted write, superseded since (a node-key rotation would bring an old key
    back). The good `.tmp*` files are removed once the state is restored, so none is
    restored again in a later incident. Returns what was restored (one line), or None
    if there was nothing good to restore."""
    found: list[tuple[float, int, Path, bytes]] = []
    for tmp in statedir.glob(STATE_FILE + ".tmp*"):
        try:
            found.append((tmp.stat().st_mtime, 1, tmp, tmp.read_bytes()))
        except OSError:
            continue
    leftovers = [tmp for _, _, tmp, raw in found if is_good_state(raw)]
    try:
        found.append((copy.stat().st_mtime, 0, copy, copy.read_bytes()))
    except OSError:
        pass
    good = sorted(((when, is_tmp, src, raw) for when, is_tmp, src, raw in found if is_good_state(raw)),
                  key=lambda c: (c[0], c[1]), reverse=True)
    if not good:
        return None
    _, is_tmp, src, raw = good[0]
    statedir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(statedir / STATE_FILE, raw)
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)
    if is_tmp:
        return f"restored {STATE_FILE} from {src.name}, left beside it by an interrupted write"
    return f"restored {STATE_FILE} from the copy kept while the proxy ran"
