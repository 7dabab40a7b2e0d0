"""Per-proxy states and the pure decision table.

`decide(state, facts)` is the whole policy of what to do next; it has no I/O
and is table-tested. The runner (proxy.py) gathers facts, calls it, and
applies the result in one place, logging every transition by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(Enum):
    STARTING = "starting"      # children launched, not yet serving as configured (deadline)
    RUNNING = "running"        # serving: Running, right control, prefs and serve config as configured
    DEGRADED = "degraded"      # tailscaled Running, but something configured cannot be served now
    RECOVERING = "recovering"  # the one recovery (wipe or re-auth) is under way (deadline)
    BACKOFF = "backoff"        # a crash; waiting to relaunch (deadline: the delay)
    FAILED = "failed"          # given up; children stopped; reason kept
    STOPPED = "stopped"        # stopped on purpose


TRANSITIONAL = (State.STARTING, State.RECOVERING, State.BACKOFF)
HEALTHY_STATES = (State.RUNNING,)


class Signal(Enum):
    """What just happened to a proxy, already classified (policy.py, reconcile.py)."""

    BOOT = "boot"                    # supervisor start: launch, budget as recorded
    START = "start"                  # operator start/restart or config change: re-arms
    STOP = "stop"
    RUNNING = "running"              # observed == desired: serving as configured
    DEGRADED = "degraded"            # tailscaled Running, but observed != desired and not fixed
    NOT_RUNNING = "not_running"      # tailscaled left Running (e.g. logged out, Stopped)
    AUTH_FAILURE = "auth_failure"    # control rejected the node
    CORRUPT_STATE = "corrupt_state"  # tailscaled.state unreadable (power loss)
    KEY_EXPIRED = "key_expired"      # node exists but its key expired
    FORCE_RECOVER = "force_recover"  # the operator says the state is stale (`recover NAME`)
    REREGISTER = "reregister"        # the state belongs to another control: a planned fresh start
    CRASH = "crash"                  # tailscaled exited, hung, or never answered
    DEADLINE = "deadline"            # starting/recovering took longer than start_timeout
    NO_LOGIN_KEY = "no_login_key"    # the deadline passed and no key could be had to log in with
    OS_ERROR = "os_error"            # our own bookkeeping failed (ENOSPC, EACCES): not a crash
    BACKOFF_OVER = "backoff_over"
    HEALTHY = "healthy"              # running for the healthy period


class Action(Enum):
    NOTHING = "nothing"
    LAUNCH = "launch"                    # (stop anything left, then) start children
    RECOVER = "recover"                  # spend budget, stop, restore (corrupt state) or wipe, relaunch
    REAUTH = "reauth"                    # spend budget, log in again in place (keeps name and IP)
    REREGISTER = "reregister"            # stop, fresh statedir, relaunch; budget untouched
    SCHEDULE_RESTART = "schedule_restart"  # stop children, relaunch after backoff (counts)
    RETRY_LATER = "retry_later"          # stop children, relaunch after backoff (does not count)
    STOP = "stop"                        # stop children and stay down
    REARM = "rearm"                      # give the one-recovery budget back


@dataclass(frozen=True)
class Facts:
    signal: Signal
    budget_armed: bool = True   # the one recovery is still available
    recent_restarts: int = 0    # crash restarts inside the start window
    start_limit: int = 5
    wipe_pending: bool = False  # this incident restored state; a rejection of it gets the one wipe


@dataclass(frozen=True)
class Decision:
    action: Action
    state: State
    event: str  # transition name for the event log ("" when nothing changes)


_LIVE = (State.STARTING, State.RUNNING, State.DEGRADED, State.RECOVERING)


def decide(state: State, facts: Facts) -> Decision:
    s = facts.signal
    stay = Decision(Action.NOTHING, state, "")

    if s is Signal.STOP:
        return stay if state is State.STOPPED else Decision(Action.STOP, State.STOPPED, "stopped")
    if s is Signal.START:
        return Decision(Action.LAUNCH, State.STARTING, "started")
    if s is Signal.BOOT:
        return Decision(Action.LAUNCH, State.STARTING, "booted")
    if s is Signal.FORCE_RECOVER:  # the operator's call, from any state: one recovery, fresh budget
        return Decision(Action.RECOVER, State.RECOVERING, "recovering")
    if s is Signal.BACKOFF_OVER:
        return Decision(Action.LAUNCH, State.STARTING, "relaunched") if state is State.BACKOFF else stay

    if state not in _LIVE:
        return stay  # late news from children we already stopped

    if s is Signal.RUNNING:
        if state is State.RUNNING:
            return stay
        return Decision(Action.NOTHING, State.RUNNING,
                        "recovered" if state is State.RECOVERING else "running")
    if s is Signal.DEGRADED:
        return stay if state is State.DEGRADED else Decision(Action.NOTHING, State.DEGRADED, "degraded")
    if s is Signal.NOT_RUNNING:
        if state in (State.RUNNING, State.DEGRADED):
            return Decision(Action.NOTHING, State.STARTING, "stalled")  # the start deadline applies again
        return stay
    if s is Signal.HEALTHY:
        return Decision(Action.REARM, state, "healthy") if state is State.RUNNING else stay
    if s is Signal.REREGISTER:
        return Decision(Action.REREGISTER, State.STARTING, "reregistering")

    if s is Signal.KEY_EXPIRED and state is State.RECOVERING:
        # the expired key's own next steps (tailscaled's "has expired" line, then an AuthURL)
        # during the in-place login that answers them; if that login does not help, its
        # rejection (AUTH_FAILURE) or the recovery's deadline says so. Never a wipe.
        return stay
    if s in (Signal.AUTH_FAILURE, Signal.CORRUPT_STATE, Signal.KEY_EXPIRED):
        if state is State.RECOVERING and facts.wipe_pending:
            return Decision(Action.RECOVER, State.RECOVERING, "recovering")  # the restored state failed: wipe
        if state is State.RECOVERING or not facts.budget_armed:
            return Decision(Action.STOP, State.FAILED,
                            "recovery_failed" if state is State.RECOVERING else "failed")
        if s is Signal.KEY_EXPIRED:
            return Decision(Action.REAUTH, State.RECOVERING, "reauthenticating")
        return Decision(Action.RECOVER, State.RECOVERING, "recovering")

    if s is Signal.NO_LOGIN_KEY:  # (a revoked OAuth client, the API down): an operator must act
        if state not in (State.STARTING, State.RECOVERING):
            return stay
        return Decision(Action.STOP, State.FAILED, "failed")

    if s is Signal.OS_ERROR:
        return Decision(Action.RETRY_LATER, State.BACKOFF, "bookkeeping_error")

    if s in (Signal.CRASH, Signal.DEADLINE):
        if s is Signal.DEADLINE and state not in (State.STARTING, State.RECOVERING):
            return stay  # a late timer: only transitional states have this deadline
        if facts.recent_restarts >= facts.start_limit:
            return Decision(Action.STOP, State.FAILED, "start_limit")
        return Decision(Action.SCHEDULE_RESTART, State.BACKOFF,
                        "crashed" if s is Signal.CRASH else "timed_out")

    raise AssertionError(f"unhandled signal {s}")  # pragma: no cover
