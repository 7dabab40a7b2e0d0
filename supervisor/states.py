"""Per-proxy states and the pure decision table.

`decide(state, facts)` is the whole policy of what to do next; it has no I/O
and is table-tested. The runner (proxy.py) gathers facts, calls it, and
applies the result in one place, logging every transition by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(Enum):
    STARTING = "starting"      # children launched, waiting for Running
    RUNNING = "running"        # tailscaled Running and serve in place
    RECOVERING = "recovering"  # the one wipe (or re-auth) is under way
    BACKOFF = "backoff"        # a child crashed; waiting to relaunch
    FAILED = "failed"          # given up; children stopped; reason kept
    STOPPED = "stopped"        # stopped on purpose


class Signal(Enum):
    """What just happened to a proxy, already classified (policy.py)."""

    BOOT = "boot"                    # supervisor start: launch, budget as recorded
    START = "start"                  # operator start/restart or config change: re-arms
    STOP = "stop"
    RUNNING = "running"              # tailscaled Running, serve config in place
    AUTH_FAILURE = "auth_failure"    # control rejected the node
    CORRUPT_STATE = "corrupt_state"  # tailscaled.state unreadable (power loss)
    KEY_EXPIRED = "key_expired"      # node exists but its key expired
    CRASH = "crash"                  # tailscaled exited, hung, or never answered
    SERVE_CRASH = "serve_crash"      # tailscale serve exited
    BACKOFF_OVER = "backoff_over"
    HEALTHY = "healthy"              # running for the healthy period


class Action(Enum):
    NOTHING = "nothing"
    LAUNCH = "launch"                    # (stop anything left, then) start children
    RECOVER = "recover"                  # spend budget, stop, wipe statedir, relaunch
    REAUTH = "reauth"                    # spend budget, log in again in place (keeps name and IP)
    RESTART_SERVE = "restart_serve"
    SCHEDULE_RESTART = "schedule_restart"  # stop children, relaunch after backoff
    STOP = "stop"                        # stop children and stay down
    REARM = "rearm"                      # give the one-recovery budget back


@dataclass(frozen=True)
class Facts:
    signal: Signal
    budget_armed: bool = True   # the one recovery is still available
    recent_restarts: int = 0    # crash restarts inside the start window
    start_limit: int = 5


@dataclass(frozen=True)
class Decision:
    action: Action
    state: State
    event: str  # transition name for the event log ("" when nothing changes)


_LIVE = (State.STARTING, State.RUNNING, State.RECOVERING)


def decide(state: State, facts: Facts) -> Decision:
    s = facts.signal
    stay = Decision(Action.NOTHING, state, "")

    if s is Signal.STOP:
        return stay if state is State.STOPPED else Decision(Action.STOP, State.STOPPED, "stopped")
    if s is Signal.START:
        return Decision(Action.LAUNCH, State.STARTING, "started")
    if s is Signal.BOOT:
        return Decision(Action.LAUNCH, State.STARTING, "booted")
    if s is Signal.BACKOFF_OVER:
        return Decision(Action.LAUNCH, State.STARTING, "relaunched") if state is State.BACKOFF else stay

    if state not in _LIVE:
        return stay  # late news from children we already stopped

    if s is Signal.RUNNING:
        if state is State.RUNNING:
            return stay
        return Decision(Action.NOTHING, State.RUNNING,
                        "recovered" if state is State.RECOVERING else "running")
    if s is Signal.HEALTHY:
        return Decision(Action.REARM, state, "healthy") if state is State.RUNNING else stay

    if s in (Signal.AUTH_FAILURE, Signal.CORRUPT_STATE, Signal.KEY_EXPIRED):
        if state is State.RECOVERING or not facts.budget_armed:
            return Decision(Action.STOP, State.FAILED,
                            "recovery_failed" if state is State.RECOVERING else "failed")
        if s is Signal.KEY_EXPIRED:
            return Decision(Action.REAUTH, State.RECOVERING, "reauthenticating")
        return Decision(Action.RECOVER, State.RECOVERING, "recovering")

    if s in (Signal.CRASH, Signal.SERVE_CRASH):
        if facts.recent_restarts >= facts.start_limit:
            return Decision(Action.STOP, State.FAILED, "start_limit")
        if s is Signal.SERVE_CRASH and state is State.RUNNING:
            return Decision(Action.RESTART_SERVE, State.RUNNING, "serve_restarted")
        return Decision(Action.SCHEDULE_RESTART, State.BACKOFF, "crashed")

    raise AssertionError(f"unhandled signal {s}")  # pragma: no cover
