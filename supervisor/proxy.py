"""One proxy's runner: owns its tailscaled, `tailscale up` and `tailscale serve`
children, turns what they say into signals, and applies `decide()`.

Structure (after Supervisor's process.py and trio's ownership rule):
- `run()` is the only place that changes state: it takes one signal at a
  time from the inbox, asks `decide()`, and applies the decision;
- each launch is a generation with its own TaskGroup; everything the launch
  starts is reaped in its `finally`, and signals from an older generation are
  dropped, so a dying child can never trigger a second recovery;
- `_timers()` holds every time-driven transition.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from supervisor import policy, procs
from supervisor import tailscale as ts
from supervisor.config import ProxyConfig, Settings
from supervisor.events import Event, EventLog, RotatingLog, redact, register_secret
from supervisor.policy import Budget, Verdict
from supervisor.states import Action, Decision, Facts, Signal, State, decide


@dataclass
class Context:
    """What every proxy shares: settings, binaries, the event log, and where
    keys and control URLs come from (the embedded control, or the config)."""

    settings: Settings
    bins: ts.Binaries
    data_dir: Path
    events: EventLog
    control_url: Callable[[ProxyConfig], str | None]
    auth_key: Callable[[ProxyConfig], Awaitable[str]]
    death_pipe: procs.ParentDeathPipe | None = None


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
    serve_pid: int | None = None
    child_pids: tuple[int, ...] = ()
    key_expiry: str | None = None
    running_since: float | None = None  # wall clock

    def to_json(self) -> dict:
        from supervisor.events import iso
        return {"name": self.name, "hostname": self.hostname, "state": self.state,
                "tailscale_ips": list(self.tailscale_ips), "dns_name": self.dns_name,
                "target": self.target, "pid": self.pid, "restarts": self.restarts,
                "recoveries": self.recoveries, "last_error": redact(self.last_error),
                "since": iso(self.since)}


@dataclass
class Launch:
    """One generation of children. Dropped as a whole on stop or relaunch."""

    gen: int
    task: asyncio.Task | None = None
    tg: asyncio.TaskGroup | None = None
    tailscaled: procs.Child | None = None
    serve: procs.Child | None = None
    up: procs.Child | None = None
    tail: deque = field(default_factory=lambda: deque(maxlen=40))
    stopping: bool = False
    serve_restart_at: float | None = None


class Proxy:
    def __init__(self, cfg: ProxyConfig, ctx: Context):
        self.cfg = cfg
        self.ctx = ctx
        self.dir = ctx.data_dir / "proxies" / cfg.name
        self.statedir = self.dir / "state"
        self.budget = Budget(self.dir / "recovery.json", cfg.fingerprint())
        self.state = State.STOPPED
        self.since = time.time()
        self.last_error = ""
        self.restarts = 0
        self.recoveries = 0
        self.node: ts.NodeStatus | None = None
        self._restart_times: deque[float] = deque()
        self._inbox: asyncio.Queue[tuple[int | None, Signal, str, float]] = asyncio.Queue()
        self.detections: deque[float] = deque(maxlen=1000)  # seconds, signal seen -> state changed
        self._gen = 0
        self._launch: Launch | None = None
        self._backoff_until: float | None = None
        self._running_since: float | None = None  # monotonic
        self._exit_when_stopped = False
        self._log: RotatingLog | None = None

    # -- public ---------------------------------------------------------------

    def request(self, sig: Signal, reason: str = "") -> None:
        """Operator or fleet input (start/stop/restart); applied in order by run()."""
        self._inbox.put_nowait((None, sig, reason, time.monotonic()))

    def force_recovery(self) -> None:
        """The operator says the state is stale: one wipe and relaunch, with a fresh budget."""
        self.budget.rearm()
        self.request(Signal.AUTH_FAILURE, "operator forced a stale-state recovery")

    def shutdown(self) -> None:
        """Stop the children and make run() return."""
        self._exit_when_stopped = True
        self.request(Signal.STOP, "supervisor stopping")

    def snapshot(self) -> ProxySnapshot:
        L = self._launch
        td = L.tailscaled if L and L.tailscaled and L.tailscaled.alive else None
        sv = L.serve if L and L.serve and L.serve.alive else None
        node = self.node if self.state in (State.RUNNING, State.RECOVERING, State.STARTING) else None
        pids = tuple(c.pid for c in (td, sv, L.up if L else None) if c and c.alive)
        running_wall = (time.time() - (time.monotonic() - self._running_since)
                        if self._running_since is not None else None)
        return ProxySnapshot(
            name=self.cfg.name, hostname=self.cfg.hostname, state=self.state.value,
            tailscale_ips=node.tailscale_ips if node else (),
            dns_name=node.dns_name if node else "", target=self.cfg.target,
            pid=td.pid if td else None, restarts=self.restarts, recoveries=self.recoveries,
            last_error=self.last_error, since=self.since, serve_pid=sv.pid if sv else None,
            child_pids=pids, key_expiry=node.key_expiry if node else None,
            running_since=running_wall)

    async def run(self) -> None:
        """The proxy's main loop. Returns only after shutdown() has stopped everything."""
        self._log = RotatingLog(self.dir / "tailscaled.log")
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
                d = decide(self.state, self._facts(sig))
                if gen is not None and d.event and d.state is not self.state:
                    self.detections.append(time.monotonic() - seen)
                await self._apply(d, sig, reason)
                if self._exit_when_stopped and self.state is State.STOPPED:
                    return
        finally:
            await self._stop_children()
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
        if self.state is State.RUNNING and self._running_since is not None and not self.budget.armed:
            times.append(self._running_since + self.ctx.settings.healthy_period)
        if self._launch and self._launch.serve_restart_at is not None:
            times.append(self._launch.serve_restart_at)
        return min(times) if times else None

    def _timers(self, now: float) -> tuple[int | None, Signal, str, float] | None:
        """Every time-driven transition lives here."""
        if self.state is State.BACKOFF and self._backoff_until is not None and now >= self._backoff_until:
            self._backoff_until = None
            return (None, Signal.BACKOFF_OVER, "backoff over", now)
        if (self.state is State.RUNNING and self._running_since is not None and not self.budget.armed
                and now >= self._running_since + self.ctx.settings.healthy_period):
            return (None, Signal.HEALTHY, f"running for {self.ctx.settings.healthy_period:g}s", now)
        L = self._launch
        if L and L.serve_restart_at is not None and now >= L.serve_restart_at:
            L.serve_restart_at = None
            if L.tg is not None and not L.stopping:
                L.tg.create_task(self._start_serve(L))
        return None

    def _facts(self, sig: Signal) -> Facts:
        window = self.ctx.settings.start_window
        now = time.monotonic()
        while self._restart_times and self._restart_times[0] < now - window:
            self._restart_times.popleft()
        return Facts(signal=sig, budget_armed=self.budget.armed,
                     recent_restarts=len(self._restart_times),
                     start_limit=self.ctx.settings.start_limit)

    def _transition(self, state: State, event: str, reason: str) -> None:
        """The one place state changes; every change is an event."""
        self.state = state
        self.since = time.time()
        if state is State.RUNNING:
            self._running_since = time.monotonic()
        else:
            self._running_since = None
        if state in (State.FAILED, State.BACKOFF, State.RECOVERING) and reason:
            self.last_error = reason
        self.ctx.events.emit(Event(self.cfg.name, event, state.value, reason, detail=self._detail()))

    def _detail(self) -> dict:
        d = {"restarts": self.restarts, "recoveries": self.recoveries}
        if self.state is State.RUNNING and self.node:
            d.update(ips=list(self.node.tailscale_ips), dns_name=self.node.dns_name)
        return d

    def _note(self, kind: str, reason: str) -> None:
        """An event that is not a transition (transient errors, serve restarts)."""
        self.ctx.events.emit(Event(self.cfg.name, kind, None, reason))

    async def _apply(self, d: Decision, sig: Signal, reason: str) -> None:
        a = d.action
        if a is Action.LAUNCH and sig is Signal.START:
            self.budget.rearm()  # operator restart or changed config gives the budget back
        if a is Action.RECOVER or a is Action.REAUTH:
            self.budget.spend(reason)  # durable before anything is destroyed
            self.recoveries += 1
        if a is Action.SCHEDULE_RESTART or a is Action.RESTART_SERVE:
            self.restarts += 1
            self._restart_times.append(time.monotonic())
        if a is Action.STOP:  # stopped or failed means the children are gone: stop them first
            await self._stop_children(logout=self.cfg.ephemeral and d.state is State.STOPPED)
        if d.event:
            self._transition(d.state, d.event, reason)

        if a is Action.LAUNCH:
            await self._stop_children()
            self._start_launch()
        elif a is Action.RECOVER:
            await self._stop_children()
            await asyncio.to_thread(shutil.rmtree, self.statedir, True)
            self._note("wiped", f"removed {self.statedir}")
            self._start_launch()
        elif a is Action.REAUTH:
            L = self._launch
            if L and L.tg:
                L.tg.create_task(self._login(L))
        elif a is Action.RESTART_SERVE:
            L = self._launch
            if L:
                delay = policy.backoff_delay(len(self._restart_times), self.ctx.settings.backoff_initial,
                                             self.ctx.settings.backoff_max)
                self._note("serve_restarting", f"{reason}; restarting serve in {delay:g}s")
                L.serve_restart_at = time.monotonic() + delay
        elif a is Action.SCHEDULE_RESTART:
            await self._stop_children()
            delay = policy.backoff_delay(len(self._restart_times), self.ctx.settings.backoff_initial,
                                         self.ctx.settings.backoff_max)
            self._backoff_until = time.monotonic() + delay
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
            if v.reason != self.last_error:
                self.last_error = v.reason
                self._note("transient", v.reason)
            return
        self._inbox.put_nowait((L.gen, v.signal, v.reason, time.monotonic()))

    def _start_launch(self) -> None:
        self._gen += 1
        L = Launch(self._gen)
        self._launch = L
        self.node = None
        L.task = asyncio.create_task(self._launch_main(L), name=f"{self.cfg.name}-launch{L.gen}")

    async def _stop_children(self, logout: bool = False) -> None:
        L = self._launch
        if L is None or L.task is None:
            return
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
            async with asyncio.TaskGroup() as tg:
                L.tg = tg
                await self._spawn_tailscaled(L)
                tg.create_task(self._watch(L))
                tg.create_task(self._probe(L))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or an OS error must not take the fleet down
            errs = e.exceptions if isinstance(e, BaseExceptionGroup) else [e]
            self.post(L, Verdict(Signal.CRASH, redact(f"launch failed: {errs[0]}")))
        finally:
            await asyncio.shield(self._reap(L))

    async def _reap(self, L: Launch) -> None:
        """Stop bottom-up: serve and up first, then tailscaled. Always reaps."""
        grace = self.ctx.settings.stop_grace
        for child in (L.serve, L.up, L.tailscaled):
            if child is not None:
                await procs.stop(child, grace)
        (self.dir / "authkey").unlink(missing_ok=True)

    async def _spawn_tailscaled(self, L: Launch) -> None:
        assert L.tg is not None
        self.statedir.mkdir(parents=True, exist_ok=True, mode=0o700)
        control = self.ctx.control_url(self.cfg)
        pipe = self.ctx.death_pipe
        argv, env = ts.tailscaled_command(
            self.ctx.bins, self.statedir,
            quiet_control_url=control if self.cfg.local_control else None,
            parent_death_fd=pipe.read_fd if pipe else None)
        L.tailscaled = await procs.spawn("tailscaled", argv, env, pidfile=self.dir / "pids" / "tailscaled.pid",
                                         pass_fds=(pipe.read_fd,) if pipe else ())
        L.tg.create_task(self._follow_tailscaled(L, L.tailscaled))

    async def _follow_tailscaled(self, L: Launch, child: procs.Child) -> None:
        assert child.proc.stdout is not None
        async for line in procs.lines(child.proc.stdout):
            L.tail.append(line)
            if self._log:
                self._log.write(line)
            v = policy.from_stderr(line)
            if v is not None and not L.stopping:
                self.post(L, v)
        rc = await child.proc.wait()
        if not L.stopping:
            self.post(L, policy.from_exit(rc, list(L.tail)))

    async def _watch(self, L: Launch) -> None:
        """Follow the IPN bus; log in when (and only when) the state needs it;
        start serve once Running. Exits are _follow_tailscaled's to report."""
        api = ts.LocalAPI(self.statedir / ts.SOCKET_FILE)
        deadline = time.monotonic() + self.ctx.settings.start_timeout
        while not L.stopping:
            try:
                await api.ping()
            except (OSError, ts.LocalAPIError):
                if time.monotonic() > deadline:
                    self.post(L, Verdict(Signal.CRASH, f"tailscaled's LocalAPI did not answer within "
                                                       f"{self.ctx.settings.start_timeout:g}s"))
                    return
                await asyncio.sleep(0.01)
                continue
            try:
                async for ev in api.watch_bus():
                    await self._on_bus(L, api, ev)
            except (OSError, ts.LocalAPIError, asyncio.IncompleteReadError, ValueError):
                pass
            if not (L.tailscaled and L.tailscaled.alive):
                return
            await asyncio.sleep(0.1)  # bus dropped but tailscaled lives: follow it again

    async def _on_bus(self, L: Launch, api: ts.LocalAPI, ev: ts.BusEvent) -> None:
        assert L.tg is not None
        for v in policy.from_bus(ev):
            self.post(L, v)
        if L.stopping or ev.state is None:
            return
        if ev.state is ts.BackendState.NEEDS_LOGIN and not (L.up and L.up.alive):
            v = policy.from_needs_login(await api.status())
            if v is not None:
                self.post(L, v)
            else:
                L.tg.create_task(self._login(L))  # fresh or logged-out statedir
        elif ev.state is ts.BackendState.STOPPED and not (L.up and L.up.alive):
            L.tg.create_task(self._login(L, with_key=False))  # logged in, just not wanted up
        elif ev.state is ts.BackendState.RUNNING:
            L.tg.create_task(self._on_running(L, api))

    async def _login(self, L: Launch, with_key: bool = True) -> None:
        """`tailscale up`, with the key in a 0600 file (never argv) that is
        removed when up exits. Only ever run on a statedir that needs login,
        never on a working node (facts §4e)."""
        if L.up and L.up.alive:
            return
        key_file = None
        if with_key:
            try:
                key = await self.ctx.auth_key(self.cfg)
            except Exception as e:
                self.post(L, Verdict(Signal.CRASH, redact(f"cannot get an auth key: {e}")))
                return
            register_secret(key)
            key_file = self.dir / "authkey"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key)
        argv = ts.up_command(self.ctx.bins, self.statedir / ts.SOCKET_FILE,
                             login_server=self.ctx.control_url(self.cfg), hostname=self.cfg.hostname,
                             auth_key_file=key_file, tags=self.cfg.tags,
                             timeout=self.ctx.settings.start_timeout)
        L.up = await procs.spawn("up", argv, ts.cli_env())
        assert L.up.proc.stdout is not None
        out = (await L.up.proc.stdout.read()).decode(errors="replace")
        rc = await L.up.proc.wait()
        if key_file:
            key_file.unlink(missing_ok=True)
        if rc != 0 and not L.stopping:
            last = next((l for l in reversed(out.splitlines()) if l.strip()), f"exit status {rc}")
            text = last.removeprefix("backend error: ")
            self.post(L, Verdict(Signal.AUTH_FAILURE if policy.is_rejection(text) else None,
                                 redact(f"tailscale up: {text}")))

    async def _on_running(self, L: Launch, api: ts.LocalAPI) -> None:
        try:
            self.node = await api.status()
            if not (L.serve and L.serve.alive):
                await self._start_serve(L)
            if await self._serve_ready(L, api):
                self.post(L, Verdict(Signal.RUNNING, ", ".join(self.node.tailscale_ips)))
        except (OSError, ts.LocalAPIError):
            pass  # tailscaled went away meanwhile; its exit is reported elsewhere

    async def _start_serve(self, L: Launch) -> None:
        if L.stopping or (L.serve and L.serve.alive):
            return
        argv = ts.serve_command(self.ctx.bins, self.statedir / ts.SOCKET_FILE,
                                mode=self.cfg.serve, port=self.cfg.port, target=self.cfg.target)
        L.serve = await procs.spawn("serve", argv, ts.cli_env(), pidfile=self.dir / "pids" / "serve.pid")
        assert L.tg is not None
        L.tg.create_task(self._follow_serve(L, L.serve))

    async def _follow_serve(self, L: Launch, child: procs.Child) -> None:
        assert child.proc.stdout is not None
        tail: deque[str] = deque(maxlen=5)
        async for line in procs.lines(child.proc.stdout):
            if line.strip():
                tail.append(line)
                if self._log:
                    self._log.write(f"[serve] {line}")
        rc = await child.proc.wait()
        if not L.stopping and await self._tailscaled_exits(L):
            return  # serve only lost its tailscaled; that exit is the one to report
        if not L.stopping:
            last = tail[-1] if tail else ""
            self.post(L, Verdict(Signal.SERVE_CRASH, redact(f"tailscale serve exited with status {rc}"
                                                            + (f": {last}" if last else ""))))

    @staticmethod
    async def _tailscaled_exits(L: Launch, grace: float = 1.0) -> bool:
        """Did tailscaled die too? serve exits first when tailscaled is killed, and
        one death must count as one restart, not a serve crash plus a crash."""
        if L.tailscaled is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(L.tailscaled.proc.wait()), grace)
            return True
        except TimeoutError:
            return False

    async def _serve_ready(self, L: Launch, api: ts.LocalAPI, timeout: float = 15.0) -> bool:
        """Running means the serve config is really in place, not just spawned."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and L.serve and L.serve.alive:
            try:
                if self.cfg.port in await api.serve_ports():
                    return True
            except (OSError, ts.LocalAPIError):
                pass
            await asyncio.sleep(0.02)
        return False

    async def _probe(self, L: Launch) -> None:
        """Liveness: a stopped or wedged tailscaled keeps its socket but stops
        answering. Unanswered for hang_timeout -> treated as a crash."""
        api = ts.LocalAPI(self.statedir / ts.SOCKET_FILE)
        hang = self.ctx.settings.hang_timeout
        while True:
            await asyncio.sleep(hang / 2)
            try:
                await asyncio.wait_for(api.ping(), hang)
            except TimeoutError:
                self.post(L, Verdict(Signal.CRASH, f"tailscaled did not answer for {hang:g}s (hung)"))
                return
            except (OSError, ts.LocalAPIError):
                pass  # not up yet, or exiting: _follow_tailscaled reports exits

    async def _logout(self, L: Launch) -> None:
        """Ephemeral nodes leave the tailnet on a clean stop."""
        argv = ts.logout_command(self.ctx.bins, self.statedir / ts.SOCKET_FILE)
        child = await procs.spawn("logout", argv, ts.cli_env())
        try:
            await asyncio.wait_for(child.proc.communicate(), 10)
            self._note("logged_out", "ephemeral node logged out")
        except TimeoutError:
            self._note("transient", "tailscale logout timed out")
        finally:
            await procs.stop(child, 1)
