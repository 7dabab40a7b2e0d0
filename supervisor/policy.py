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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from supervisor.states import Signal
from supervisor.tailscale import BackendState, BusEvent, NodeStatus


@dataclass(frozen=True)
class Verdict:
    """A classified observation. signal None: transient, shown but never acted on."""

    signal: Signal | None
    reason: str


LOGGED_OUT = "You are logged out. The last login error was: "
_REJECTION = re.compile(r"invalid key|register request: http 40[13]\b")
_NODE_GONE = "PollNetMap: initial fetch failed 404: node not found"
_STATE_STORE = re.compile(r"State store failed to initialize|getLocalBackend error: store\.New")
_TRANSIENT_STDERR = re.compile(
    r"fetch control key: .*|PollNetMap: initial fetch failed 5\d\d: .*|"
    r"register request: http 5\d\d: .*|control: .*connection refused.*")


def is_rejection(text: str) -> bool:
    """True when the control said no to this node or key (not: was unreachable)."""
    return bool(_REJECTION.search(text))


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def from_bus(ev: BusEvent) -> list[Verdict]:
    out: list[Verdict] = []
    if ev.malformed:  # one bad frame costs one line, never the watch
        return [Verdict(None, f"ignored a malformed IPN bus message: {ev.malformed}")]
    if ev.err_message:
        sig = Signal.AUTH_FAILURE if is_rejection(ev.err_message) else None
        out.append(Verdict(sig, _short(ev.err_message)))
    if ev.browse_to_url:
        out.append(Verdict(Signal.AUTH_FAILURE,
                           "control asks for interactive login (stale state: node unknown to control)"))
    for code, text in (ev.health or {}).items():
        if _STATE_STORE.search(text):
            out.append(Verdict(Signal.CORRUPT_STATE, _short(text)))
        elif code == "login-state" and text.startswith(LOGGED_OUT):
            last = text[len(LOGGED_OUT):]
            out.append(Verdict(Signal.AUTH_FAILURE if is_rejection(last) else None, _short(last)))
    return out


def from_stderr(line: str) -> Verdict | None:
    """tailscaled's log line; only the deleted-node 404 matters at once (facts §4b:
    status stays Running for ~9 minutes, stderr is the only prompt signal)."""
    if _NODE_GONE in line:
        return Verdict(Signal.AUTH_FAILURE, "node deleted on the control (map poll: 404 node not found)")
    m = _TRANSIENT_STDERR.search(line)
    if m:
        return Verdict(None, _short(m.group(0)))
    return None


def from_exit(returncode: int | None, tail: list[str]) -> Verdict:
    """tailscaled exited. 1.78.1 exits on an unreadable state file instead of
    reporting health, so the stderr tail decides between corrupt state and crash."""
    for line in reversed(tail):
        if _STATE_STORE.search(line):
            return Verdict(Signal.CORRUPT_STATE,
                           "state file unreadable: " + _short(line.split(" ", 2)[-1]))
    last = next((l for l in reversed(tail) if l.strip()), "")
    detail = f": {_short(last.split(' ', 2)[-1], 160)}" if last else ""
    return Verdict(Signal.CRASH, f"tailscaled exited with status {returncode}{detail}")


def from_needs_login(status: NodeStatus) -> Verdict | None:
    """NeedsLogin: why? None means the statedir simply needs a login with the
    key (fresh or logged out), which is the only time a key is ever sent."""
    if status.backend_state != BackendState.NEEDS_LOGIN:
        return None
    if status.auth_url:
        return Verdict(Signal.AUTH_FAILURE,
                       "control asks for interactive login (stale state: node unknown to control)")
    if status.expired:
        return Verdict(Signal.KEY_EXPIRED, f"node key expired ({status.key_expiry})")
    return None


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Exponential: initial, 2x, 4x ... capped. attempt counts from 1."""
    return min(maximum, initial * (2 ** max(0, attempt - 1)))


# ---------------------------------------------------------------------------
# The one-recovery budget, on disk so a supervisor restart never wipes twice.


@dataclass
class BudgetRecord:
    armed: bool = True
    fingerprint: str = ""
    spent_reason: str = ""
    spent_at: float = 0.0
    failed_reason: str = ""  # a proxy failed by auth stays failed across supervisor restarts


class Budget:
    """One wipe (or re-auth) per incident. Re-armed only by a healthy period,
    an operator restart, or a config change (a new fingerprint)."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.record = self._load()
        if self.record.fingerprint != fingerprint:
            self.record = BudgetRecord(fingerprint=fingerprint)
            self._save()

    def _load(self) -> BudgetRecord:
        try:
            raw = json.loads(self.path.read_text())
            return BudgetRecord(**{k: raw[k] for k in BudgetRecord.__dataclass_fields__ if k in raw})
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
        self._save()

    def rearm(self) -> None:
        if not self.record.armed or self.record.failed_reason:
            self.record.armed = True
            self.record.failed_reason = ""
            self._save()

    def mark_failed(self, reason: str) -> None:
        self.record.failed_reason = reason
        self._save()
