"""One proxy's runner: owns its tailscaled and the short-lived `tailscale`
CLI children (up, serve, set), turns what they say into signals, and
applies `decide()`.

Structure (after Supervisor's process.py and trio's ownership rule):
- `run()` is the only place that changes state: it takes one signal at a
  time from the inbox, asks `decide()`, and applies the decision;
- each launch is a generation with its own TaskGroup; everything the launch
  starts is reaped in its `finally`, and signals from an older generation are
  dropped, so a dying child can never trigger a second recovery;
- `_timers()` holds every time-driven transition, including the deadline
  of every transitional state;
- `_reconcile()` is level-triggered: on each IPN bus change and on a timer it
  observes the node (status, prefs, serve config), compares it with the
  config (reconcile.py) and fixes what can be fixed in place; the proxy is
  `running` only while nothing differs.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from supervisor import credentials, paths, policy, procs, statefile, upstream
from supervisor import identity, memory, tsapi
from supervisor import reconcile as rc
from supervisor import tailscale as ts
from supervisor.config import ProxyConfig, Settings
from supervisor.events import Event, EventLog, RotatingLog, redact
from supervisor.policy import Budget, Verdict
from supervisor.states import Action, Decision, Facts, Signal, State, decide


def _no_api(cfg: ProxyConfig) -> Any:
    return None


@dataclass
class Context:
    """What every proxy shares: settings, binaries, the event log, and where
    keys and control URLs come from (the embedded control, or the config).

    `login_key(cfg, expiry_seconds)` gives the key for one `tailscale up`
    (credentials.LoginKey: the configured key, or one minted for this login
    that lives `expiry_seconds`), raising
    credentials.KeyUnavailable; `api(cfg)` the proxy's tsapi.Client, or None
    without an API credential (the same cached client each time)."""

    settings: Settings
    bins: ts.Binaries
    data_dir: Path
    events: EventLog
    control_url: Callable[[ProxyConfig], str | None]
    login_key: Callable[[ProxyConfig, int], Awaitable[credentials.LoginKey]]
    death_pipe: procs.ParentDeathPipe | None = None
    api: Callable[[ProxyConfig], Any] = _no_api


@dataclass(frozen=True)
class ProxySnapshot:
    """Frozen view of one proxy for the table and `status --json`."""

    name: str
    hostname: str
    state: str
    tailscale_ips: tuple[str, ...]
    dns_name: str
    target: str
    pid: int | None
    restarts: int
    recoveries: int
    last_error: str
    since: float  # wall clock of the last state change
    child_pids: tuple[int, ...] = ()
    key_expiry: str | None = None
    running_since: float | None = None  # wall clock
    reason: str = ""          # why the proxy is not `running` now ("" when it is)
    node_id: str = ""         # the node's stable ID (Self.ID) once known
    upstream: str | None = None  # last probe of the target: "ok", "refused", "timeout", "TLS: ..."; None: not probed yet
    services: tuple[tuple[int, str, str, str, bool], ...] = ()  # configured (port, mode, path, target, funnel)
    credential: str = ""      # the login credential's kind (credentials.Readiness.kind)
    credential_expires: float | None = None  # wall clock: the plain auth key's expiry, where the API tells
    credential_warning: str = ""  # e.g. "auth key expires in 3 days", "one-off key already used"
    memory: "memory.Usage | None" = None  # the children's PSS/USS/RSS/CPU at the last sample (memory.py)

    @classmethod
    def from_json(cls, p: dict) -> "ProxySnapshot":
        """The inverse of to_json(), for `status` drawing what the socket said."""
        from datetime import datetime
        return cls(name=p["name"], hostname=p["hostname"], state=p["state"],
                   tailscale_ips=tuple(p["tailscale_ips"]), dns_name=p["dns_name"],
                   target=p["target"], pid=p["pid"], restarts=p["restarts"],
                   recoveries=p["recoveries"], last_error=p["last_error"],
                   since=datetime.fromisoformat(p["since"]).timestamp(),
                   key_expiry=p.get("key_expiry"), reason=p.get("reason", ""),
                   node_id=p.get("node_id", ""), upstream=p.get("upstream"),
                   running_since=(datetime.fromisoformat(p["running_since"]).timestamp()
                                  if p.get("running_since") else None),
                   services=tuple((x["port"], x["mode"], x["path"], x["target"], x["funnel"])
                                  for x in p.get("services", ())),
                   credential=p.get("credential", ""), credential_warning=p.get("credential_warning", ""),
                   credential_expires=(datetime.fromisoformat(p["credential_expires"]).timestamp()
                                       if p.get("credential_expires") else None),
                   memory=memory.Usage.from_json(p.get("memory")))

    def to_json(self) -> dict:
        """One proxy in `status --json` (schema: README, "status --json")."""
        from supervisor.events import iso
        return {"name": self.name, "hostname": self.hostname, "state": self.state,
                "reason": redact(self.reason), "last_error": redact(self.last_error),
                "since": iso(self.since), "node_id": self.node_id,
                "tailscale_ips": list(self.tailscale_ips), "dns_name": self.dns_name,
                "key_expiry": self.key_expiry, "target": self.target, "upstream": self.upstream,
                "services": [{"port": p, "mode": m, "path": path, "target": t, "funnel": f}
                             for p, m, path, t, f in self.services],
                "running_since": iso(self.running_since) if self.running_since else None,
                "pid": self.pid, "restarts": self.restarts, "recoveries": self.recoveries,
                "credential": self.credential,
                "credential_expires": iso(self.credential_expires) if self.credential_expires else None,
                "credential_warning": redact(self.credential_warning),
                "memory": self.memory.to_json() if self.memory else None}


_REJECTIONS = (Signal.AUTH_FAILURE, Signal.KEY_EXPIRED, Signal.CORRUPT_STATE)
CLI_TIMEOUT = 20.0       # seconds for one `tailscale serve`/`set` invocation


@dataclass
class Launch:
    """One generation of children. Dropped as a whole on stop or relaunch."""

    gen: int
    task: asyncio.Task | None = None
    tg: asyncio.TaskGroup | None = None
    tailscaled: procs.Child | None = None
    up: procs.Child | None = None
    cli: set = field(default_factory=set)  # short-lived tailscale CLI children in flight
    tail: deque = field(default_factory=lambda: deque(maxlen=40))
    stopping: bool = False
    dirty: asyncio.Event = field(default_factory=asyncio.Event)  # observe again, now
    login_retry_at: float = 0.0
    login_attempts: int = 0
    login_error: str = ""
    transient: str = ""  # tailscaled's last transient complaint this launch (e.g. the control not answering)
    key_error: str = ""  # the last login attempt found no key (credentials.KeyUnavailable), "" otherwise
    serve_retry_at: float = 0.0
    serve_attempts: int = 0
    serve_error: str = ""
    hostname_retry_at: float = 0.0
    hostname_attempts: int = 0
    logged_in: bool = False  # a `tailscale up` of this launch succeeded
    config_changed: bool = False  # the desired serve set changed: the next difference is ours, not drift
    api: "ts.LocalAPI | None" = None  # reconcile's and the liveness probe's, one kept-alive connection
    answered_at: float = 0.0  # monotonic: tailscaled's LocalAPI last answered (an observation, a bus line, a ping)
    remembered: tuple | None = None  # (state file's inode, mtime_ns, size; record) _remember last kept
    reprobe: asyncio.Event = field(default_factory=asyncio.Event)  # probe the upstreams now
    identity_checked: bool = False  # the old device was dealt with before this launch's first login
    identity_task: asyncio.Task | None = None  # identity.keep for a new node (_keep_identity)
    identity_done: bool = False  # that has said its outcome: node.json may name the new node
    key_expired: bool = False  # this launch's tailscaled said its node key expired (an AuthURL next means in place)
    auth_url_logged: asyncio.Event = field(default_factory=asyncio.Event)  # stderr read up to an AuthURL


def wipe_statedir(statedir: Path) -> None:
    """Remove everything tailscaled keeps, except `certs/`: a proxy that
    recovers twice in a week must not hit Let's Encrypt's limit of 5
    identical certificates per 7 days (tsdproxy keeps them the same way)."""
    try:
        entries = list(statedir.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name == "certs" and entry.is_dir() and not entry.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


class Proxy:
    def __init__(self, cfg: ProxyConfig, ctx: Context):
        self.cfg = cfg
        self.ctx = ctx
        self.dir = paths.proxy_dir(ctx.data_dir, cfg.name)
        self.statedir = paths.statedir(ctx.data_dir, cfg.name)
        self.socket = paths.proxy_socket(ctx.data_dir, cfg.name)  # fits a unix socket address
        self.budget = Budget(self.dir / "recovery.json", cfg.fingerprint())
        self.state = State.STOPPED
        self.since = time.time()
        self.last_error = ""
        self.reason = "not started"  # why the proxy is not running ("" while it is)
        self.restarts = 0
        self.recoveries = 0
        self.observed: ts.Observed | None = None
        self.upstream: str | None = None  # the last probe of the target (upstream.probe)
        self.memory: memory.Usage | None = None  # set by the fleet's sampler (memory.run)
        self._record = identity.read_record(self.dir / identity.RECORD_NAME)  # who the node was
        self._restart_times: deque[float] = deque()
        self._os_errors = 0
        self._inbox: asyncio.Queue[tuple[int | None, Signal, str, float]] = asyncio.Queue()
        self.detections: deque[float] = deque(maxlen=1000)  # seconds, signal seen -> state changed
        self._gen = 0
        self._launch: Launch | None = None
        self._backoff_until: float | None = None
        self._deadline: float | None = None  # monotonic: when a transitional state gives up
        self._running_since: float | None = None  # monotonic
        self._exit_when_stopped = False
        self._log: RotatingLog | None = None
        self._reauth_at = 0.0  # monotonic: when the last in-place re-login started
        self.readiness = credentials.Readiness(credentials.configured_kind(cfg))
        self._recheck = asyncio.Event()  # check the credential again now (a reload changed it)
        self._background: set[asyncio.Future] = set()  # minted-key cleanups, key bookkeeping
        self._watcher: asyncio.Task | None = None  # the credential check (_watch_credential)
        self._memory = credentials.KeyMemory(self.dir / credentials.MEMORY_NAME)

    # -- public ---------------------------------------------------------------

    def request(self, sig: Signal, reason: str = "") -> None:
        """Operator or fleet input (start/stop/restart); applied in order by run()."""
        self._inbox.put_nowait((None, sig, reason, time.monotonic()))

    def force_recovery(self) -> None:
        """The operator says the state is stale: one recovery, with a fresh
        budget, from any state (a `failed` proxy included)."""
        self.budget.rearm()
        self.request(Signal.FORCE_RECOVER, "operator forced a stale-state recovery")

    def shutdown(self, reason: str = "supervisor stopping") -> None:
        """Stop the children and make run() return; `reason` is what the event says."""
        self._exit_when_stopped = True
        self.request(Signal.STOP, reason)

    def desired(self) -> rc.Desired:
        """What the config asks of the node (reconcile.Desired)."""
        c = self.cfg
        wanted = {rc.desired_service(s.mode, s.port, s.target, s.path, s.funnel) for s in c.services}
        return rc.Desired(
            control_url=rc.normalize_control_url(self.ctx.control_url(c)),
            hostname=c.hostname, tags=tuple(c.tags), services=frozenset(wanted))

    def update_services(self, cfg: ProxyConfig) -> None:
        """A changed [[serve]] set or a rotated API secret (nothing that shapes the
        node changed): applied in place by the next reconcile, without restarting
        tailscaled."""
        services_changed = cfg.services != self.cfg.services
        self.cfg = cfg
        self._recheck.set()
        if not services_changed:
            return
        self._note("config_changed", "serve config changed; applying it in place")
        L = self._launch
        if L is not None:
            L.serve_retry_at = 0.0
            L.config_changed = True
            L.dirty.set()
            L.reprobe.set()

    def children(self) -> list[procs.Child]:
        """The live children of the current launch: tailscaled, `tailscale up`,
        and short-lived CLI children in flight."""
        L = self._launch
        if L is None:
            return []
        return [c for c in (L.tailscaled, L.up, *L.cli) if c is not None and c.alive]

    def snapshot(self) -> ProxySnapshot:
        L = self._launch
        td = L.tailscaled if L and L.tailscaled and L.tailscaled.alive else None
        node = self.observed if self.state in (State.RUNNING, State.DEGRADED, State.RECOVERING,
                                               State.STARTING) else None
        pids = tuple(c.pid for c in self.children())
        running_wall = (time.time() - (time.monotonic() - self._running_since)
                        if self._running_since is not None else None)
        return ProxySnapshot(
            name=self.cfg.name, hostname=self.cfg.hostname, state=self.state.value,
            tailscale_ips=node.tailscale_ips if node else (),
            dns_name=node.dns_name if node else "", target=self.cfg.target,
            pid=td.pid if td else None, restarts=self.restarts, recoveries=self.recoveries,
            last_error=self.last_error, since=self.since,
            child_pids=pids, key_expiry=node.key_expiry if node else None,
            running_since=running_wall, reason=self.reason,
            node_id=node.node_id if node else "", upstream=self.upstream,
            services=tuple((x.port, x.mode, x.path, x.target, x.funnel) for x in self.cfg.services),
            credential=self.readiness.kind, credential_expires=self.readiness.expires,
            credential_warning=self.readiness.warning, memory=self.memory if pids else None)

    async def run(self) -> None:
        """The proxy's main loop. Returns only after shutdown() has stopped everything."""
        try:
            self._log = RotatingLog(self.dir / "tailscaled.log")
        except OSError as e:  # a full or read-only data dir: run without the log file
            self._note("transient", f"cannot open {self.dir / 'tailscaled.log'}: {e.strerror or e}")
        with contextlib.suppress(OSError):  # an older version's key file: keys never touch disk now
            (self.dir / "authkey").unlink(missing_ok=True)
        self._watcher = asyncio.create_task(self._watch_credential(), name=f"{self.cfg.name}-credential")
        try:
            if self.budget.failed_reason:
                # failed on auth in an earlier run: stay failed, no new registration attempt
                self._transition(State.FAILED, "failed", self.budget.failed_reason)
            else:
                self.request(Signal.BOOT)
            while True:
                item = await self._next_signal()
                if item is None:
                    continue
                gen, sig, reason, seen = item
                if gen is not None and (self._launch is None or gen != self._launch.gen):
                    continue  # news from children of an earlier launch
                if gen is not None and seen < self._reauth_at and sig in _REJECTIONS:
                    continue  # observed before the re-login that answers it
                d = decide(self.state, self._facts(sig))
                if gen is not None and d.event and d.state is not self.state:
                    self.detections.append(time.monotonic() - seen)
                try:
                    await self._apply(d, sig, reason)
                except OSError as e:  # our own files (budget, wipe) on a full or read-only disk
                    self.request(Signal.OS_ERROR, f"supervisor bookkeeping failed: {e}")
                if self._exit_when_stopped and self.state is State.STOPPED:
                    return
        finally:
            await self._stop_children()
            await self._stop_background()
            if self._log:
                self._log.close()

    # -- the loop ---------------------------------------------------------------

    async def _next_signal(self) -> tuple[int | None, Signal, str, float] | None:
        deadline = self._next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(timeout):  # (3.11's wait_for can eat a cancel)
                return await self._inbox.get()
        except TimeoutError:
            return self._timers(time.monotonic())

    def _next_deadline(self) -> float | None:
        times = []
        if self.state is State.BACKOFF and self._backoff_until is not None:
            times.append(self._backoff_until)
        if self.state in (State.STARTING, State.RECOVERING) and self._deadline is not None:
            times.append(self._deadline)
        if self.state is State.RUNNING and self._running_since is not None and not self.budget.armed:
            times.append(self._running_since + self.ctx.settings.healthy_period)
        return min(times) if times else None

    def _timers(self, now: float) -> tuple[int | None, Signal, str, float] | None:
        """Every time-driven transition lives here."""
        if self.state is State.BACKOFF and self._backoff_until is not None and now >= self._backoff_until:
            self._backoff_until = None
            return (None, Signal.BACKOFF_OVER, "backoff over", now)
        if (self.state in (State.STARTING, State.RECOVERING) and self._deadline is not None
                and now >= self._deadline):
            self._deadline = None
            t = self.ctx.settings.start_timeout
            if self._launch is not None and self._launch.key_error:  # retried till now: an operator must act
                return (None, Signal.NO_LOGIN_KEY, f"no key to log in with after {t:g}s: "
                                                   f"{self._launch.key_error}", now)
            return (None, Signal.DEADLINE, f"not serving after {t:g}s: {self.reason or 'no answer'}", now)
        if (self.state is State.RUNNING and self._running_since is not None and not self.budget.armed
                and now >= self._running_since + self.ctx.settings.healthy_period):
            return (None, Signal.HEALTHY, f"running for {self.ctx.settings.healthy_period:g}s", now)
        return None

    def _facts(self, sig: Signal) -> Facts:
        window = self.ctx.settings.start_window
        now = time.monotonic()
        while self._restart_times and self._restart_times[0] < now - window:
            self._restart_times.popleft()
        return Facts(signal=sig, budget_armed=self.budget.armed,
                     recent_restarts=len(self._restart_times),
                     start_limit=self.ctx.settings.start_limit,
                     wipe_pending=self.budget.wipe_pending)

    def _transition(self, state: State, event: str, reason: str) -> None:
        """The one place state changes; every change is an event."""
        entering = state is not self.state
        self.state = state
        self.since = time.time()
        now = time.monotonic()
        self._running_since = now if state is State.RUNNING else None
        if state in (State.STARTING, State.RECOVERING) and (entering or event in ("started", "reregistering")):
            self._deadline = now + self.ctx.settings.start_timeout
        if state is State.RUNNING:
            self.reason = ""
            self._os_errors = 0
        elif reason:
            self.reason = reason
        if state in (State.FAILED, State.BACKOFF, State.RECOVERING, State.DEGRADED) and reason:
            self.last_error = reason
        self.ctx.events.emit(Event(self.cfg.name, event, state.value, reason, detail=self._detail()))

    def _detail(self) -> dict:
        d = {"restarts": self.restarts, "recoveries": self.recoveries}
        if self.state is State.RUNNING and self.observed:
            d.update(ips=list(self.observed.tailscale_ips), dns_name=self.observed.dns_name)
        return d

    def _note(self, kind: str, reason: str) -> None:
        """An event that is not a transition (transient errors, serve applies)."""
        self.ctx.events.emit(Event(self.cfg.name, kind, None, reason))

    def _backoff(self, attempt: int) -> float:
        return policy.backoff_delay(attempt, self.ctx.settings.backoff_initial, self.ctx.settings.backoff_max)

    async def _apply(self, d: Decision, sig: Signal, reason: str) -> None:
        a = d.action
        if a is Action.LAUNCH and sig is Signal.START:
            self.budget.rearm()  # operator restart or changed config gives the budget back
        if (a is Action.RECOVER or a is Action.REAUTH) and not self.budget.wipe_pending:
            self.budget.spend(reason)  # durable before anything is destroyed
            self.recoveries += 1
        if a is Action.SCHEDULE_RESTART:
            self.restarts += 1
            self._restart_times.append(time.monotonic())
        if a is Action.STOP:  # stopped or failed means the children are gone: stop them first
            await self._stop_children(logout=self.cfg.ephemeral and d.state is State.STOPPED,
                                      clear_serve=d.state is State.STOPPED)
        if d.state is State.FAILED and sig in _REJECTIONS and d.event in ("failed", "recovery_failed"):
            # no recovery left: say which one was used, when, and what tries again
            reason = policy.exhausted_reason(reason, self.budget.record, self.cfg.name, time.time(),
                                             self.ctx.settings.healthy_period, d.event == "recovery_failed")
        if d.event:
            self._transition(d.state, d.event, reason)
        elif sig is Signal.DEGRADED and self.state is State.DEGRADED and reason != self.reason:
            self.reason = self.last_error = reason  # still degraded, for another reason
            self._note("degraded", reason)

        if a is Action.LAUNCH:
            await self._stop_children()
            self._start_launch()
        elif a is Action.RECOVER or a is Action.REREGISTER:
            await self._stop_children()
            if a is Action.RECOVER and sig is Signal.CORRUPT_STATE and self.budget.may_restore:
                what = await asyncio.to_thread(statefile.restore, self.statedir, self.dir / statefile.COPY_NAME)
                if what:  # repair before wipe: the same node, name and IP
                    self.budget.mark_restored()
                    self._note("restored", what)
                    self._start_launch()
                    return
            if a is Action.RECOVER:
                self.budget.mark_wiped()
            await asyncio.to_thread(wipe_statedir, self.statedir)
            self._note("wiped", f"removed {self.statedir}, kept its certs/" + (
                "" if a is Action.RECOVER else " (config changed: login_server)"))
            self._start_launch()
        elif a is Action.REAUTH:
            L = self._launch
            self._reauth_at = time.monotonic()
            if L and L.tg and not (L.up and L.up.alive):
                L.login_retry_at = float("inf")
                L.tg.create_task(self._login(L))
        elif a is Action.SCHEDULE_RESTART:
            await self._stop_children()
            self._backoff_until = time.monotonic() + self._backoff(len(self._restart_times))
        elif a is Action.RETRY_LATER:  # our own bookkeeping failed: heal when it can, never count
            await self._stop_children()
            self._os_errors += 1
            self._backoff_until = time.monotonic() + self._backoff(self._os_errors)
        elif a is Action.STOP:
            if d.state is State.FAILED and sig in (Signal.AUTH_FAILURE, Signal.CORRUPT_STATE,
                                                    Signal.KEY_EXPIRED):
                self.budget.mark_failed(reason)
        elif a is Action.REARM:
            self.budget.rearm()
            self._note("rearmed", "recovery budget available again")

    # -- launches ---------------------------------------------------------------

    def post(self, L: Launch, v: Verdict) -> None:
        if v.signal is None:
            L.transient = v.reason  # part of the reason while not running: the deadline names it
            if v.reason != self.last_error:
                self.last_error = v.reason
                self._note("transient", v.reason)
            return
        if v.signal is Signal.KEY_EXPIRED:
            L.key_expired = True
        self._inbox.put_nowait((L.gen, v.signal, v.reason, time.monotonic()))

    async def _key_expired_before_auth_url(self, L: Launch) -> bool:
        """Whether the AuthURL just seen (bus, status) follows an expired node key:
        first read tailscaled's output up to its "AuthURL is" line, which it prints
        before the AuthURL goes anywhere else, so its "has expired" line is in."""
        if not L.key_expired:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):  # the line is never missing; a bound all the same
                    await L.auth_url_logged.wait()
        return L.key_expired

    def _start_launch(self) -> None:
        self._gen += 1
        L = Launch(self._gen)
        self._launch = L
        self.observed = None
        L.task = asyncio.create_task(self._launch_main(L), name=f"{self.cfg.name}-launch{L.gen}")

    async def _stop_children(self, logout: bool = False, clear_serve: bool = False) -> None:
        L = self._launch
        if L is None or L.task is None:
            return
        if clear_serve and L.tailscaled and L.tailscaled.alive:
            # stopped means stopped: no serve config left in the state for a later start to serve
            with contextlib.suppress(OSError, asyncio.CancelledError):  # a hung tailscaled: give up soon
                await self._cli(L, ts.serve_reset_command(self.ctx.bins, self.socket), timeout=3.0)
        if logout and L.tailscaled and L.tailscaled.alive:
            L.stopping = True
            await self._logout(L)
        L.stopping = True
        L.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await L.task
        self._launch = None

    async def _launch_main(self, L: Launch) -> None:
        try:
            corrupt = await asyncio.to_thread(policy.check_state_file, self.statedir)
            if corrupt is None:  # logged in on another control: tailscaled would dial that one first
                corrupt = await asyncio.to_thread(policy.check_control, self.statedir, self.desired().control_url)
            if corrupt is not None:  # before tailscaled can overwrite it (1.78.1 would)
                self.post(L, corrupt)
                return
            async with asyncio.TaskGroup() as tg:
                L.tg = tg
                L.api = ts.LocalAPI(self.socket, keep_alive=True)
                await self._spawn_tailscaled(L)
                tg.create_task(self._watch(L))
                tg.create_task(self._reconcile(L))
                tg.create_task(self._probe(L))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or an OS error must not take the fleet down
            errs = e.exceptions if isinstance(e, BaseExceptionGroup) else [e]
            first = errs[0]
            if self._is_bookkeeping(first):
                self.post(L, Verdict(Signal.OS_ERROR, redact(f"supervisor bookkeeping failed: {first}")))
            else:
                self.post(L, Verdict(Signal.CRASH, redact(f"launch failed: {first}")))
        finally:
            if L.api is not None:
                L.api.close()
            await asyncio.shield(self._reap(L))

    def _is_bookkeeping(self, e: BaseException) -> bool:
        """Our own files failed (a full or read-only data dir): not tailscaled's fault."""
        if isinstance(e, procs.SpawnError):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                                   errno.EACCES, errno.EPERM):
            return str(e.filename or "").startswith(str(self.ctx.data_dir))
        return False

    async def _reap(self, L: Launch) -> None:
        """Stop bottom-up: CLI children first, then tailscaled. Always reaps."""
        grace = self.ctx.settings.stop_grace
        for child in (*list(L.cli), L.up, L.tailscaled):
            if child is not None:
                await procs.stop(child, grace)

    async def _spawn_tailscaled(self, L: Launch) -> None:
        assert L.tg is not None
        self.statedir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.socket.parent != self.statedir:
            await asyncio.to_thread(paths.ensure_runtime_dir, self.ctx.data_dir)
        control = self.ctx.control_url(self.cfg)
        pipe = self.ctx.death_pipe
        argv, env = ts.tailscaled_command(
            self.ctx.bins, self.statedir, self.socket,
            quiet_control_url=control if self.cfg.local_control else None,
            parent_death_fd=pipe.read_fd if pipe else None,
            go_env=self.ctx.settings.tailscaled_go_env())
        L.tailscaled = await procs.spawn("tailscaled", argv, env, pidfile=self.dir / "pids" / "tailscaled.pid",
                                         pass_fds=(pipe.read_fd,) if pipe else ())
        L.tg.create_task(self._follow_tailscaled(L, L.tailscaled))

    async def _follow_tailscaled(self, L: Launch, child: procs.Child) -> None:
        assert child.proc.stdout is not None
        async for line in procs.lines(child.proc.stdout):
            L.tail.append(line)
            if self._log:
                self._log.write(line)
            if policy.logs_auth_url(line):
                L.auth_url_logged.set()
            v = policy.from_stderr(line)
            if v is not None and not L.stopping:
                self.post(L, v)
        rc_ = await child.proc.wait()
        if not L.stopping:
            self.post(L, policy.from_exit(rc_, list(L.tail)))

    async def _watch(self, L: Launch) -> None:
        """Follow the IPN bus: classify what it says, and have the node
        observed again on every change that is not just a netmap."""
        api = ts.LocalAPI(self.socket)
        while not L.stopping:
            try:
                await api.ping()
            except (OSError, ts.LocalAPIError, asyncio.IncompleteReadError):
                self.reason = "waiting for tailscaled's LocalAPI"
                await asyncio.sleep(0.01)
                continue
            try:
                async for ev in api.watch_bus():
                    L.answered_at = time.monotonic()
                    expired = bool(ev.browse_to_url) and await self._key_expired_before_auth_url(L)
                    for v in policy.from_bus(ev, key_expired=expired):
                        self.post(L, v)
                    if not ev.netmap or self.state is not State.RUNNING:
                        L.dirty.set()  # a netmap brings grants (HTTPS, Funnel) a degraded proxy waits for
            except (OSError, ts.LocalAPIError, asyncio.IncompleteReadError):
                pass
            if not (L.tailscaled and L.tailscaled.alive):
                return
            await asyncio.sleep(0.1)  # bus dropped but tailscaled lives: follow it again

    # -- reconcile: observed vs desired -------------------------------------------

    async def _reconcile(self, L: Launch) -> None:
        """Level-triggered: observe on every bus change (coalesced) and every
        `reconcile_period` seconds, compare with the config, fix what can be fixed in
        place, and say whether the proxy is serving."""
        api = L.api or ts.LocalAPI(self.socket)
        assert L.tg is not None
        L.tg.create_task(self._watch_upstream(L))
        while not L.stopping:
            now = time.monotonic()
            wake = min([now + self.ctx.settings.reconcile_period] + [t for t in (L.login_retry_at, L.serve_retry_at,
                                                               L.hostname_retry_at) if t > now])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wake - now):
                    await L.dirty.wait()
            L.dirty.clear()
            try:
                obs = await api.observe()
            except (OSError, ts.LocalAPIError, asyncio.IncompleteReadError) as e:
                self.reason = f"tailscaled's LocalAPI does not answer: {e}"
                continue
            L.answered_at = time.monotonic()
            self.observed = obs
            try:
                await self._act(L, api, self.desired(), obs)
            except (OSError, ts.LocalAPIError, asyncio.IncompleteReadError) as e:
                self.reason = f"tailscaled's LocalAPI does not answer: {e}"

    async def _act(self, L: Launch, api: ts.LocalAPI, want: rc.Desired, obs: ts.Observed) -> None:
        st = obs.backend_state
        now = time.monotonic()
        if st is not ts.BackendState.RUNNING:
            login_in_flight = bool(L.up and L.up.alive) or L.login_retry_at == float("inf")
            if st is ts.BackendState.NEEDS_LOGIN and not login_in_flight:
                v = policy.from_needs_login(obs, key_expired=bool(obs.auth_url)
                                            and await self._key_expired_before_auth_url(L))
                if v is not None and not (v.signal is Signal.KEY_EXPIRED and self.state is State.RECOVERING):
                    self.post(L, v)
                    return
                # fresh or logged-out statedir, or the re-login of an expired key (again, if it
                # did not take: the recovery's deadline bounds it)
                await self._before_new_node(L)  # the old device goes first (identity.py)
                self._start_login(L, with_key=True, logged_out=obs.logged_out)
            elif st is ts.BackendState.STOPPED:
                self._start_login(L, with_key=False)  # logged in, just not wanted up
            why = rc.reconcile(want, obs)[0].reason + (f"; tailscale up: {L.login_error}" if L.login_error else "")
            if L.transient and L.transient not in why:
                why += f"; {L.transient}"
            self.reason = why
            if self.state in (State.RUNNING, State.DEGRADED):
                self.post(L, Verdict(Signal.NOT_RUNNING, why))
            return

        if not obs.tailscale_ips:  # Running, but no netmap yet (1.78.1 says so briefly): serve would fail
            self.reason = "tailscaled is Running, waiting for its first netmap"
            return
        diffs = rc.reconcile(want, obs)
        kinds = {d.kind for d in diffs}
        if rc.Kind.CONTROL in kinds:
            self.post(L, Verdict(Signal.REREGISTER, "config changed: login_server (" +
                                 next(d.reason for d in diffs if d.kind is rc.Kind.CONTROL) + ")"))
            return
        refused = rc.serve_preflight(want, obs)
        servable = frozenset(want.services - refused.keys())
        if self.state is State.RUNNING and diffs and not L.config_changed:  # changed under it, by hand
            self._note("drift", "; ".join(d.reason for d in diffs))
        L.config_changed = False
        fixed = False
        if rc.Kind.HOSTNAME in kinds and now >= L.hostname_retry_at:
            err = await self._cli(L, ts.set_hostname_command(self.ctx.bins, self.socket,
                                                              want.hostname))
            L.hostname_attempts = L.hostname_attempts + 1 if err else 0
            L.hostname_retry_at = now + self._backoff(L.hostname_attempts) if err else 0.0
            fixed = True
        if obs.services != servable and now >= L.serve_retry_at:
            err = await self._apply_serve(L, servable)
            L.serve_error = err or ""
            L.serve_attempts = L.serve_attempts + 1 if err else 0
            L.serve_retry_at = now + self._backoff(L.serve_attempts) if err else 0.0
            fixed = True
        if fixed:
            obs = await api.observe()
            self.observed = obs
            diffs = rc.reconcile(want, obs)
            if obs.services != servable and not L.serve_error:
                # the CLI said yes but the config is not there (a control that answers the
                # feature query with nothing): count it as a failure, so retries back off
                L.serve_error = "tailscale serve reported success, but the serve config still differs"
                L.serve_attempts += 1
                L.serve_retry_at = time.monotonic() + self._backoff(L.serve_attempts)
        if not diffs:
            if L.serve_error:
                L.serve_error = ""
            self.post(L, Verdict(Signal.RUNNING, ", ".join(obs.tailscale_ips)))
            await self._remember_if_changed(L, obs, self._settled_record(L, obs))
            return
        reasons = [f"{s.describe()}: {why}" for s, why in sorted(refused.items())]
        reasons += [d.reason for d in diffs if not (d.kind is rc.Kind.SERVE and refused
                                                    and obs.services == servable)]
        if L.serve_error:
            reasons.append(L.serve_error)
        self.post(L, Verdict(Signal.DEGRADED, policy.whole("; ".join(reasons))))

    async def _remember_if_changed(self, L: Launch, obs: ts.Observed, record: identity.Record | None) -> None:
        """_remember, unless neither tailscaled.state (tailscaled replaces it on every
        write, so its inode, mtime and size say) nor the record changed since this
        launch last kept them: at rest that is every observation, and reading and
        parsing the state in a thread was a tenth of the supervisor's CPU at 200."""
        try:
            st = os.stat(self.statedir / ts.STATE_FILE)
            key: tuple | None = (st.st_ino, st.st_mtime_ns, st.st_size, record)
        except OSError:
            key = None
        if key is not None and key == L.remembered:
            return
        if await asyncio.to_thread(self._remember, obs, record):
            L.remembered = key

    def _remember(self, obs: ts.Observed, record: identity.Record | None) -> bool:
        """While serving: keep a copy of good state (whenever it changed) and
        record who the node is (node.json, identity.Record), outside the state
        dir, for a recovery that must keep the node's identity. `record` None:
        not now (a new node's identity steps are still under way). False if
        the disk refused (tried again at the next observation)."""
        try:
            statefile.keep_copy(self.statedir, self.dir / statefile.COPY_NAME)
            if record is not None:
                identity.write_record(self.dir / identity.RECORD_NAME, record)
        except OSError:
            return False  # a full disk costs the copy, never the proxy
        return True

    # -- identity: a new node keeps the old one's name and IP (identity.py) ------------

    def _api(self) -> tuple[Any, str | None]:
        """(the proxy's tsapi.Client or None, why there is none)."""
        try:
            api = self.ctx.api(self.cfg)
        except ValueError as e:  # tsapi refuses the base or the secret
            return None, redact(f"cannot use the API credential: {e}")
        return api, None if api is not None else "no API credential; the name may carry -1"

    def _settled_record(self, L: Launch, obs: ts.Observed) -> identity.Record | None:
        """The record to write for the running node `obs`; None while it replaces the
        recorded node and the identity steps (started here, once a launch) are under way."""
        if not obs.node_id:
            return None
        new = identity.Record.of(obs, control_url=self.desired().control_url, embedded=self.cfg.embedded)
        old = self._record
        if old is None or old.node_id == new.node_id or self.cfg.ephemeral or L.identity_done:
            self._record = new
            return new
        if L.identity_task is None and L.tg is not None:
            L.identity_task = L.tg.create_task(self._keep_identity(L, old, obs))
        return None

    async def _before_new_node(self, L: Launch) -> None:
        """Before the first login of a launch whose state dir never logged in (a wipe, a
        fresh dir) on the control the recorded node is on: delete that node once it is
        offline, waiting at most half of what is left of the start deadline. Each
        outcome is an `identity_step` line; problems are left to the outcome."""
        if L.identity_checked:
            return
        L.identity_checked = True
        old = self._record
        if old is None or self.cfg.ephemeral:
            return
        if not await asyncio.to_thread(identity.state_never_logged_in, self.statedir):
            return  # the same node logs in again: never delete it
        api, why = self._api()
        if identity.skip_reason(old, control_url=self.desired().control_url, embedded=self.cfg.embedded,
                                api_problem=why) is not None:
            return  # said once the new node runs
        wait = identity.offline_wait(time.monotonic(), self._deadline)
        self.reason = f"deleting the old device {old.node_id} (once offline) before the new login"
        try:
            result = await identity.delete_when_offline(api, old.node_id, wait)
        except Exception as e:  # tsapi.APIError; anything else is a bug, same outcome: log in anyway
            self._note("identity_step", redact(f"old device not deleted before the login: "
                                               f"{e if isinstance(e, tsapi.APIError) else repr(e)}"))
            return
        self._note("identity_step", identity.describe_delete(result, old, before_login=True))

    async def _keep_identity(self, L: Launch, old: identity.Record, obs: ts.Observed) -> None:
        """A new node runs in place of the recorded one: the identity steps, then one
        `identity` event with the outcome (also to webhooks), then node.json names
        the new node."""
        cfg = self.cfg
        want_name = identity.target_name(old, cfg.hostname)
        api, why = self._api()
        skip = identity.skip_reason(old, control_url=self.desired().control_url, embedded=cfg.embedded,
                                    api_problem=why)
        try:
            if skip is not None:
                line = identity.outcome(name=obs.dns_name.split(".", 1)[0],
                                        ipv4=identity.ipv4_of(obs.tailscale_ips),
                                        want_name=want_name, want_ipv4=old.ipv4, problems=[skip],
                                        skipped=True)
            else:
                local = ts.LocalAPI(self.socket)
                line = await identity.keep(api, old, obs, want_name=want_name,
                                           wait=identity.offline_wait(0.0, self.ctx.settings.start_timeout),
                                           observe=local.observe,
                                           step=lambda text: self._note("identity_step", text))
        except Exception as e:  # a bug costs the steps, never the proxy
            line = f"identity not kept: {e!r}"
        self._note("identity", redact(line))
        L.identity_done = True
        L.dirty.set()  # observe again: status shows the new name and address (a netmap alone does not wake it)
        try:  # node.json names the new node from now on: a wipe right after must find it
            now = await ts.LocalAPI(self.socket).observe()
        except (OSError, ts.LocalAPIError, asyncio.IncompleteReadError):
            return  # the next observation records it
        if now.backend_state is ts.BackendState.RUNNING and now.tailscale_ips:
            await self._remember_if_changed(L, now, self._settled_record(L, now))

    async def _apply_serve(self, L: Launch, services: frozenset[ts.Service]) -> str | None:
        """The serve config as one unit: reset, then one `tailscale serve --bg`
        per service. Returns None, or the first failure in tailscale's words."""
        sock = self.socket
        err = await self._cli(L, ts.serve_reset_command(self.ctx.bins, sock))
        for s in sorted(services):
            if err:
                break
            err = await self._cli(L, ts.serve_apply_command(self.ctx.bins, sock, s))
            if err:
                err = f"{s.describe()}: {err}"
        self._note("serve_applied" if not err else "serve_failed",
                   err or f"{len(services)} service(s) applied")
        return err

    async def _cli(self, L: Launch, argv: list[str], timeout: float = CLI_TIMEOUT) -> str | None:
        """Run one short-lived tailscale CLI command owned by this launch.
        Returns None on success, else its last line (or why it did not finish)."""
        child = await procs.spawn(argv[2] if len(argv) > 2 else "cli", argv, ts.cli_env())
        L.cli.add(child)
        try:
            assert child.proc.stdout is not None
            try:
                async with asyncio.timeout(timeout):
                    out = (await child.proc.stdout.read()).decode(errors="replace")
                    code = await child.proc.wait()
            except TimeoutError:
                return f"`tailscale {argv[2] if len(argv) > 2 else ''}` did not finish within {timeout:g}s"
        finally:
            await procs.stop(child, 1)
            L.cli.discard(child)
        if code == 0:
            return None
        last = next((l for l in reversed(out.splitlines()) if l.strip()), f"exit status {code}")
        return redact(policy.whole(last))

    async def _watch_upstream(self, L: Launch) -> None:
        """Probe each target the way serve reaches it, every reconcile period
        and at once when the services change. One line for the proxy: "ok",
        the single target's result, or with several targets the first failing
        one as "TARGET: result". Seen, never acted on: not a proxy state."""
        while not L.stopping:
            targets = sorted({s.target for s in self.cfg.services})
            results = await asyncio.gather(*(upstream.probe(t) for t in targets))
            bad = [(t, r) for t, r in zip(targets, results) if r != "ok"]
            result = "ok" if not bad else bad[0][1] if len(targets) == 1 else f"{bad[0][0]}: {bad[0][1]}"
            if result != self.upstream:
                self._note("upstream", result if len(targets) > 1 else f"{targets[0]}: {result}")
            self.upstream = result
            L.reprobe.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ctx.settings.reconcile_period):
                    await L.reprobe.wait()

    def _start_login(self, L: Launch, with_key: bool, logged_out: bool = False) -> None:
        if L.stopping or (L.up and L.up.alive) or time.monotonic() < L.login_retry_at or L.tg is None:
            return
        if L.logged_in and with_key and not logged_out:
            return  # NeedsLogin right after a good login is the state catching up (1.78.1), not news
        L.login_retry_at = float("inf")  # until this attempt ends (a login in flight)
        L.tg.create_task(self._login(L, with_key))

    async def _login(self, L: Launch, with_key: bool = True) -> None:
        """`tailscale up`, the key handed over a pipe (`--auth-key=file:/dev/fd/N`),
        so it is never in argv and never on disk. The key is the configured one,
        or one minted for this login (credentials.obtain), deleted once up has
        finished, whatever the outcome. Only ever run on a statedir that needs
        login, never on a working node (facts §4e): a healthy node never mints.
        A failure that is not a rejection is retried with backoff within this
        launch; when no key can be had, the start deadline ends in `failed`."""
        if L.up and L.up.alive:
            return
        key = None
        if with_key:
            expiry = credentials.mint_expiry(self.ctx.settings.start_timeout)
            try:
                key = await self.ctx.login_key(self.cfg, expiry)
            except Exception as e:  # credentials.KeyUnavailable; anything else is a bug, same outcome
                if not L.key_error:  # readiness was checked at start: say now what a refused
                    self._recheck.set()  # credential (a client revoked since) means, once per launch
                L.key_error = redact(policy.whole(str(e) if isinstance(e, credentials.KeyUnavailable)
                                                  else f"cannot get an auth key: {e!r}"))
                self._login_failed(L, L.key_error)
                return
            L.key_error = ""
            if key.minted:
                self._note("auth_key", credentials.describe_minted(self.cfg, key, expiry))
        try:
            code, out = await self._up(L, key)
        finally:
            if key is not None and key.minted:
                self._keep(self._discard(key))
        if L.stopping:
            return
        if code == 0:
            L.login_error, L.login_attempts, L.login_retry_at = "", 0, 0.0
            L.logged_in = with_key
            L.dirty.set()
            if key is not None and not key.minted and key.key_id:
                self._mark_used(key.key_id)
            return
        last = next((l for l in reversed(out.splitlines()) if l.strip()), f"exit status {code}")
        text = last.removeprefix("backend error: ")
        if policy.is_rejection(text):
            L.login_retry_at = 0.0
            self.post(L, Verdict(Signal.AUTH_FAILURE, redact(f"tailscale up: {policy.whole(text)}")))
        else:
            self._login_failed(L, redact(f"tailscale up: {policy.whole(text)}"))

    async def _up(self, L: Launch, key: credentials.LoginKey | None) -> tuple[int, str]:
        """Run `tailscale up` with `key` written into a pipe whose read end only
        the child inherits; (exit status, output)."""
        read_fd = None
        try:
            if key is not None:
                read_fd, write_fd = os.pipe()  # both close-on-exec; pass_fds opens one for the child
                try:
                    os.write(write_fd, key.secret.encode() + b"\n")  # < PIPE_BUF: never blocks
                finally:
                    os.close(write_fd)  # the child reads to EOF
            argv = ts.up_command(self.ctx.bins, self.socket,
                                 login_server=self.ctx.control_url(self.cfg), hostname=self.cfg.hostname,
                                 auth_key_fd=read_fd, tags=self.cfg.tags,
                                 timeout=self.ctx.settings.start_timeout)
            L.up = await procs.spawn("up", argv, ts.cli_env(),
                                     pass_fds=(read_fd,) if read_fd is not None else ())
        finally:
            if read_fd is not None:
                os.close(read_fd)
        assert L.up.proc.stdout is not None
        out = (await L.up.proc.stdout.read()).decode(errors="replace")
        return await L.up.proc.wait(), out

    async def _discard(self, key: credentials.LoginKey) -> None:
        """Delete a minted key after its login; a failed delete is one event line."""
        why = await credentials.discard(key)
        if why:
            self._note("auth_key", why)

    def _mark_used(self, key_id: str) -> None:
        """A plain key logged this proxy in: remembered, so a one-off key shows as used."""
        self._keep(asyncio.to_thread(self._memory.add, "used", key_id))
        r = self.readiness
        if r.kind == credentials.ONE_OFF and r.key_id == key_id:
            self.readiness = replace(r, warning="one-off key already used", expiring=False)

    def _keep(self, coro: Awaitable[Any]) -> None:
        """Run `coro` beside the loop; awaited (briefly) when the proxy ends."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop_background(self) -> None:
        """Cancel the credential watch; give minted-key cleanups a few seconds."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        tasks = list(self._background)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_credential(self) -> None:
        """Readiness: checked at start, every CHECK_PERIOD (RETRY_PERIOD after an
        API that did not answer) and when a reload changed the config; never per
        render. An expiring key is noted once per key (remembered across
        restarts in credential.json). A warning never changes the state."""
        while True:
            self._recheck.clear()
            try:
                r, answered = await credentials.check(self.cfg, self.ctx.api(self.cfg),
                                                      set(self._memory.used))
            except Exception as e:  # a bug here costs the readiness line, never the proxy
                r = credentials.Readiness(credentials.configured_kind(self.cfg),
                                          warning=redact(f"credential check failed: {e!r}"))
                answered = False
            self.readiness = r
            if r.expiring and r.key_id and await asyncio.to_thread(self._memory.add, "warned", r.key_id):
                self._note("key_expiring", f"{r.warning} (key {r.key_id}); replace it before a login "
                                           "needs it, or use an OAuth client")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(credentials.CHECK_PERIOD if answered else credentials.RETRY_PERIOD):
                    await self._recheck.wait()

    def _login_failed(self, L: Launch, why: str) -> None:
        L.login_attempts += 1
        L.login_error = why
        delay = self._backoff(L.login_attempts)
        L.login_retry_at = time.monotonic() + delay
        self.post(L, Verdict(None, f"{why} (retrying in {delay:g}s)"))
        L.dirty.set()  # the loop recomputes its wake-up time

    async def _probe(self, L: Launch) -> None:
        """Liveness: a stopped or wedged tailscaled keeps its socket but stops
        answering. Unanswered for hang_timeout -> treated as a crash.

        A ping is sent only after hang_timeout/2 without any answer (an
        observation or a bus line counts), so a busy node is not pinged, and a
        stop is still noticed between hang_timeout and 1.5 x hang_timeout
        after tailscaled's last answer, as with a ping every hang_timeout/2."""
        api = L.api or ts.LocalAPI(self.socket)
        hang = self.ctx.settings.hang_timeout
        last = time.monotonic()  # the first ping half a hang_timeout after the launch
        while True:
            quiet = time.monotonic() - max(last, L.answered_at)
            if quiet < hang / 2:
                await asyncio.sleep(hang / 2 - quiet)
                continue
            last = time.monotonic()
            try:
                await asyncio.wait_for(api.ping(), hang)
                L.answered_at = time.monotonic()
            except TimeoutError:
                self.post(L, Verdict(Signal.CRASH, f"tailscaled did not answer for {hang:g}s (hung)"))
                return
            except (OSError, ts.LocalAPIError, asyncio.IncompleteReadError):
                pass  # not up yet, or exiting: _follow_tailscaled reports exits

    async def _logout(self, L: Launch) -> None:
        """Ephemeral nodes leave the tailnet on a clean stop."""
        argv = ts.logout_command(self.ctx.bins, self.socket)
        child = await procs.spawn("logout", argv, ts.cli_env())
        try:
            await asyncio.wait_for(child.proc.communicate(), 10)
            self._note("logged_out", "ephemeral node logged out")
        except TimeoutError:
            self._note("transient", "tailscale logout timed out")
        finally:
            await procs.stop(child, 1)
