"""Recovery policy: what tailscaled's output means, how long to back off, and
the one-recovery budget kept on disk.

Classification is deliberately narrow. Only a control-plane *rejection*
(facts §4–5) becomes AUTH_FAILURE; an outage (connection refused, HTTP 5xx)
is transient and never a reason to touch state.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from supervisor import statefile
from supervisor.reconcile import normalize_control_url
from supervisor.states import Signal
from supervisor.tailscale import STATE_FILE, BackendState, BusEvent, NodeStatus, Observed


@dataclass(frozen=True)
class Verdict:
    """A classified observation. signal None: transient, shown but never acted on."""

    signal: Signal | None
    reason: str


LOGGED_OUT = "You are logged out. The last login error was: "
_REJECTION = re.compile(r"invalid key|register request: http 40[13]\b")
_NODE_GONE = "PollNetMap: initial fetch failed 404: node not found"
# A login with a node key the control knows but has expired (facts §4d; printed by
# tailscale/tailscale control/controlclient/direct.go doLogin, the same words in 1.78.1
# and 1.96.4): tailscaled makes a new key and the control then answers with an AuthURL.
_KEY_EXPIRED = re.compile(r"server reports new node key \S+ has expired")
# Logged by doLogin (direct.go) before the AuthURL reaches LocalBackend, the IPN bus
# and status: once this line is read, every line before it (_KEY_EXPIRED's) is too.
_AUTH_URL_LOGGED = "control: AuthURL is "
STALE_STATE = "control asks for interactive login (stale state: node unknown to control)"
EXPIRED_LOGIN = "node key expired: the control asks for a new login of the same node"
# The state cannot be read (tailscale's own words, 1.78.1 and 1.96.4): the
# store will not open, the saved prefs do not parse, or a TPM-sealed state
# does not unseal. 1.96.4's harmless "TPM: error opening" at every start is
# deliberately not here.
_STATE_STORE = re.compile(r"State store failed to initialize|\bstore\.New: |parsing saved prefs|"
                          r"state store is unhealthy|failed to unseal (?:state file|encryption key|data)")
_TIMESTAMP = re.compile(r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)? ")
_TRANSIENT_STDERR = re.compile(
    r"fetch control key: .*|PollNetMap: initial fetch failed 5\d\d: .*|"
    r"register request: http 5\d\d: .*|control: .*connection refused.*")


def is_rejection(text: str) -> bool:
    """True when the control said no to this node or key (not: was unreachable)."""
    return bool(_REJECTION.search(text))


def whole(text: str, limit: int = 300) -> str:
    """A reason on one line, in tailscale's own words: whitespace folded, a
    log line's `DATE TIME ` prefix removed where there is one, and, when it
    must be shortened, the middle cut so the cause at the end survives
    (`... bind: invalid argument`)."""
    text = " ".join(_TIMESTAMP.sub("", text.strip()).split())
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " … " + text[-(limit - head - 3):]



def _login_url(key_expired: bool) -> Verdict:
    """The control answered a login with an AuthURL. After "node key expired" in
    the same launch that is the expired key's next step (facts §4d): a re-login in
    place with the auth key keeps the node, its name and IP. Otherwise the control
    does not know the node key at all: stale state (facts §4c)."""
    if key_expired:
        return Verdict(Signal.KEY_EXPIRED, EXPIRED_LOGIN)
    return Verdict(Signal.AUTH_FAILURE, STALE_STATE)


def from_bus(ev: BusEvent, key_expired: bool = False) -> list[Verdict]:
    """`key_expired`: this launch of tailscaled already said its node key expired."""
    out: list[Verdict] = []
    if ev.malformed:  # one bad frame costs one line, never the watch
        return [Verdict(None, f"ignored a malformed IPN bus message: {ev.malformed}")]
    if ev.err_message:
        sig = Signal.AUTH_FAILURE if is_rejection(ev.err_message) else None
        out.append(Verdict(sig, whole(ev.err_message)))
    if ev.browse_to_url:
        out.append(_login_url(key_expired))
    for code, text in (ev.health or {}).items():
        if _STATE_STORE.search(text):
            out.append(Verdict(Signal.CORRUPT_STATE, whole(text)))
        elif code == "login-state" and text.startswith(LOGGED_OUT):
            last = text[len(LOGGED_OUT):]
            out.append(Verdict(Signal.AUTH_FAILURE if is_rejection(last) else None, whole(last)))
    return out


def from_stderr(line: str) -> Verdict | None:
    """tailscaled's log line; only the deleted-node 404 matters at once (facts §4b:
    status stays Running for ~9 minutes, stderr is the only prompt signal)."""
    if _NODE_GONE in line:
        return Verdict(Signal.AUTH_FAILURE, "node deleted on the control (map poll: 404 node not found)")
    m = _KEY_EXPIRED.search(line)
    if m:  # at a (re)start on a state whose key expired: the status shows only an AuthURL
        return Verdict(Signal.KEY_EXPIRED, f"node key expired ({m.group(0)})")
    if _STATE_STORE.search(line):
        return Verdict(Signal.CORRUPT_STATE, "state file unreadable: " + whole(line))
    m = _TRANSIENT_STDERR.search(line)
    if m:
        return Verdict(None, whole(m.group(0)))
    return None


def from_exit(returncode: int | None, tail: list[str]) -> Verdict:
    """tailscaled exited. 1.78.1 exits on an unreadable state file instead of
    reporting health, so the stderr tail decides between corrupt state and crash."""
    for line in reversed(tail):
        if _STATE_STORE.search(line):
            return Verdict(Signal.CORRUPT_STATE, "state file unreadable: " + whole(line))
    if returncode is not None and returncode < 0:  # a signal has no last words of its own
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return Verdict(Signal.CRASH, f"tailscaled was killed by {name}")
    last = next((l for l in reversed(tail) if l.strip()), "")
    detail = f": {whole(last)}" if last else ""
    return Verdict(Signal.CRASH, f"tailscaled exited with status {returncode}{detail}")


def logs_auth_url(line: str) -> bool:
    """tailscaled's line saying the control answered a login with an AuthURL; it is
    printed before the AuthURL shows on the bus or in status (direct.go doLogin)."""
    return _AUTH_URL_LOGGED in line


def from_needs_login(status: NodeStatus | Observed, key_expired: bool = False) -> Verdict | None:
    """NeedsLogin: why? None means the statedir simply needs a login with the
    key (fresh or logged out), which is the only time a key is ever sent.
    `key_expired`: this launch of tailscaled already said its node key expired."""
    if status.backend_state != BackendState.NEEDS_LOGIN:
        return None
    if status.auth_url:
        return _login_url(key_expired)
    if status.expired:
        return Verdict(Signal.KEY_EXPIRED, f"node key expired ({status.key_expiry})")
    return None


def check_state_file(statedir: Path) -> Verdict | None:
    """Before a launch: is `tailscaled.state` readable state? A missing file
    is a fresh node (None), and so is `{}`, what tailscaled 1.96.4 writes at
    start before any login (a proxy that never got a key, say: it holds no
    node to lose, as identity.never_logged_in agrees). Zero bytes, or
    anything else that is not a JSON object with `_machinekey`, is corrupt:
    1.78.1 would treat a zero-byte file as missing, overwrite it and silently
    register a new node. A TPM-sealed
    file (1.96.4 `--encrypt-state`: {"key", "nonce", "data"}) cannot be
    checked here and passes; tailscaled reports an unseal failure itself."""
    path = statedir / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        return Verdict(Signal.CORRUPT_STATE, f"state file unreadable: {path}: {e.strerror or e}")
    if not raw.strip():
        return Verdict(Signal.CORRUPT_STATE, f"state file is empty ({len(raw)} bytes): {path}")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return Verdict(Signal.CORRUPT_STATE, f"state file is not JSON: {path}")
    if isinstance(data, dict) and {"key", "nonce", "data"} <= data.keys():
        return None  # sealed by a TPM
    if data == {}:
        return None  # written before any login: nothing of a node in it
    if not isinstance(data, dict) or not data.get("_machinekey"):
        return Verdict(Signal.CORRUPT_STATE, f"state file has no machine key: {path}")
    return None


def check_control(statedir: Path, control_url: str | None) -> Verdict | None:
    """Before a launch: is the state logged in on the control the proxy is to use
    (`control_url`, normalized as reconcile does)? If not, tailscaled would dial the
    other control at start, and after the embedded control had to change ports that
    old address may be anyone's listener, so the node is re-registered on the right
    one first (Signal.REREGISTER: a planned fresh start, the budget untouched). None
    when there is no state, it cannot be read (check_state_file's part), prefs leave
    ControlURL unset, or it is the same control."""
    try:
        raw = (statedir / STATE_FILE).read_bytes()
    except OSError:
        return None
    seen = statefile.control_url(raw)
    if not seen or normalize_control_url(seen) == normalize_control_url(control_url):
        return None
    return Verdict(Signal.REREGISTER, f"config changed: login_server (logged in on {seen}, "
                                      f"configured for {normalize_control_url(control_url)})")


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Exponential: initial, 2x, 4x ... capped. attempt counts from 1."""
    return min(maximum, initial * (2 ** max(0, attempt - 1)))


# ---------------------------------------------------------------------------
# The one-recovery budget, on disk so a supervisor restart never wipes twice.


def _ago(seconds: float) -> str:
    """A duration for a reason line: "40 s", "12 min", "3 h", "2 d"."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


def exhausted_reason(reason: str, record: BudgetRecord, name: str, now: float,
                     healthy_period: float, during_recovery: bool) -> str:
    """A `failed` reason for a rejection that found no recovery left, in one line:
    `reason` (what happened), then what the one recovery did and when
    (`record`: spent_at is wall-clock seconds; `now` too), when it would have
    come back (`healthy_period` s running), and the command that tries again.
    `during_recovery`: the recovery itself was rejected (it did not help)."""
    if record.restored and record.wiped:
        what = "restored state, then wiped it"
    elif record.restored:
        what = "restored state"
    elif record.wiped:
        what = "wiped state"
    else:
        what = "logged in again"
    retry = f"`ts-supervisor restart {name}` gives it back and tries again"
    if during_recovery:
        return f"{reason}; the one recovery ({what}) did not help — {retry}"
    when = f" {_ago(now - record.spent_at)} ago" if record.spent_at else ""
    return (f"{reason}; the one recovery was used{when} ({what}) and returns only after "
            f"{_ago(healthy_period)} running — {retry}")


@dataclass
class BudgetRecord:
    armed: bool = True
    fingerprint: str = ""
    spent_reason: str = ""
    spent_at: float = 0.0
    failed_reason: str = ""  # a proxy failed by auth stays failed across supervisor restarts
    restored: bool = False   # this incident's one restore of tailscaled.state is used
    wiped: bool = False      # this incident's one wipe is used


class Budget:
    """One recovery per incident: a re-auth, or at most one restore of a
    corrupt state file and one wipe. Re-armed only by a healthy period, an
    operator restart, or a config change (a new fingerprint)."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.record = self._load()
        if self.record.fingerprint != fingerprint:
            self.record = BudgetRecord(fingerprint=fingerprint)
            try:
                self._save()
            except OSError:
                pass  # a full disk: the fresh record lives in memory; spend() must still persist

    def _load(self) -> BudgetRecord:
        try:
            raw = json.loads(self.path.read_text())
            rec = BudgetRecord(**{k: raw[k] for k in BudgetRecord.__dataclass_fields__ if k in raw})
            if not all(isinstance(getattr(rec, f), type(getattr(BudgetRecord(), f)))
                       for f in BudgetRecord.__dataclass_fields__):
                raise TypeError("wrong types")
            return rec
        except (OSError, ValueError, TypeError):
            return BudgetRecord()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self.record), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # the spend must be durable before the wipe starts

    @property
    def armed(self) -> bool:
        return self.record.armed

    @property
    def failed_reason(self) -> str:
        return self.record.failed_reason

    def spend(self, reason: str) -> None:
        self.record.armed = False
        self.record.spent_reason = reason
        self.record.spent_at = time.time()
        self.record.restored = self.record.wiped = False
        self._save()

    @property
    def may_restore(self) -> bool:
        return not self.record.restored and not self.record.wiped

    @property
    def wipe_pending(self) -> bool:
        """The incident restored state, and may still wipe once if that is rejected."""
        return self.record.restored and not self.record.wiped

    def mark_restored(self) -> None:
        self.record.restored = True
        self._save()

    def mark_wiped(self) -> None:
        self.record.wiped = True
        self._save()

    def rearm(self) -> None:
        if not self.record.armed or self.record.failed_reason or self.record.restored or self.record.wiped:
            self.record.armed = True
            self.record.failed_reason = ""
            self.record.restored = self.record.wiped = False
            self._save()

    def mark_failed(self, reason: str) -> None:
        self.record.failed_reason = reason
        self._save()
