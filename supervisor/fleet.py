"""The fleet: every proxy in conf.d/, run side by side under one TaskGroup.

It owns what proxies share: the data-dir lock, the orphan sweep at start,
the embedded control, the parent-death pipe, reloads, the IPC socket and the
signal handlers (which only record; the loop acts).
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor import config as cfgmod
from supervisor import credentials, memory, procs, tsapi
from supervisor import tailscale as ts
from supervisor import trust as trustmod
from supervisor.config import ConfigError, ProxyConfig, Settings
from supervisor.events import Event, EventLog, register_configured
from supervisor.ipc import IPCServer
from supervisor.metrics import MetricsServer
from supervisor.notify import Notifier
from supervisor.proxy import Context, Proxy, ProxySnapshot
from supervisor.states import Signal

CONFIG_POLL = 2.0  # seconds between conf.d change checks (a stat() per file)
RUN_RECORD = "run.json"  # DATA/run.json: {"pid", "config_dir", "settings"} of the last run


class LockedError(Exception):
    pass


def acquire_lock(data_dir: Path) -> int:
    """Exclusive flock on DATA/supervisor.lock, held for the process lifetime.
    The kernel drops it when we die, so a kill -9 never leaves it stale."""
    path = data_dir / "supervisor.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LockedError(f"another ts-supervisor (pid {holder}) is already running with data dir {data_dir}") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) where it listens; a no-op anywhere else."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


def _dir_signature(config_dir: Path) -> tuple:
    try:
        return tuple(sorted((p.name, st.st_mtime_ns, st.st_size, st.st_ino)
                            for p in config_dir.glob("*.toml") if (st := p.stat())))
    except OSError:
        return ()


@dataclass
class Fleet:
    config_dir: Path
    data_dir: Path
    settings: Settings
    on_event: Callable[[Event], None] | None = None
    trust: trustmod.Policy | None = None    # what root trusts; default: strict, settings' acl paths
    settings_path: Path | None = None       # recorded in DATA/run.json for the CLI's redaction

    def __post_init__(self) -> None:
        if self.trust is None:
            self.trust = trustmod.Policy(acl_paths=self.settings.trust_acl_paths)
        self.proxies: dict[str, Proxy] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.config_errors: list[ConfigError] = []
        self.events: EventLog | None = None
        self.control: Any = None  # the embedded ControlServer, started on first need
        self._wake = asyncio.Event()
        self._stop_requested = False
        self._reload_requested = False
        self._tg: asyncio.TaskGroup | None = None
        self.started = asyncio.Event()
        self.tailscale_version: tuple[int, ...] | None = None
        self._apis: dict[tuple[str, str, str], tsapi.Client] = {}

    # -- shared services -----------------------------------------------------------

    def control_url(self, cfg: ProxyConfig) -> str | None:
        return self.control.url if cfg.embedded else cfg.login_server

    def api(self, cfg: ProxyConfig) -> tsapi.Client | None:
        """The proxy's Tailscale API client, or None without an API credential.
        An embedded proxy uses the embedded control's API with its in-process
        token, exactly as a real tailnet's proxy uses `api_base` with its
        configured OAuth client or token. One client per (base, credential),
        so an OAuth access token is fetched once for all the proxies sharing it."""
        if cfg.embedded:
            if self.control is None:
                return None
            base, cred = self.control.url, self.control.api_credential()
        elif cfg.api_kind is not None and cfg.api_secret:
            base, cred = self.settings.api_base, tsapi.Credential(cfg.api_kind, cfg.api_secret)
        else:
            return None
        client = self._apis.get((base, cred.kind, cred.secret))
        if client is None:
            client = self._apis[base, cred.kind, cred.secret] = tsapi.Client(base, cred)
        return client

    async def login_key(self, cfg: ProxyConfig, expiry_seconds: int) -> credentials.LoginKey:
        """The key for one login of `cfg`: its plain auth key, or one minted
        through its API client (credentials.obtain). Raises KeyUnavailable."""
        try:
            api = self.api(cfg)
        except ValueError as e:  # tsapi refuses the base or the secret
            raise credentials.KeyUnavailable(f"cannot use the API credential: {e}") from None
        return await credentials.obtain(cfg, api, expiry_seconds=expiry_seconds)

    async def _ensure_control(self, configs: list[ProxyConfig]) -> None:
        if self.control is not None or not any(c.embedded for c in configs):
            return
        from supervisor.control.server import ControlServer  # only when a proxy needs it
        control = ControlServer(self.data_dir / "control", port=self.settings.embedded_port,
                                peers=self.settings.embedded_peers)
        try:
            await control.start()
        except BaseException:
            await control.stop()
            raise
        self.control = control  # only a control that started: proxies dial its URL
        if control.port_moved:  # its last port is taken: one line, before anything dials it
            self._note("-", "control_port_changed", f"embedded {control.port_moved}")
        self._note("-", "control_started", f"embedded control at {self.control.url}")

    # -- events ------------------------------------------------------------------------

    def _note(self, proxy: str, kind: str, reason: str) -> None:
        assert self.events is not None
        self.events.emit(Event(proxy, kind, None, reason))

    def _on_event(self, ev: Event) -> None:
        if self.on_event:
            self.on_event(ev)

    # -- snapshots / IPC -----------------------------------------------------------

    def snapshots(self) -> list[ProxySnapshot]:
        return [self.proxies[n].snapshot() for n in sorted(self.proxies)]

    async def _ipc_status(self, req: dict) -> dict:
        return {"ok": True, "proxies": [s.to_json() for s in self.snapshots()],
                "config_errors": [str(e) for e in self.config_errors]}

    async def _ipc_control(self, req: dict) -> dict:
        return self.control_proxy(str(req.get("cmd")), str(req.get("name", "")))

    def control_proxy(self, cmd: str, name: str) -> dict:
        """start | stop | restart | recover NAME, for the CLI (via the socket) and the console."""
        p = self.proxies.get(name)
        if p is None:
            return {"ok": False, "error": f"no proxy named {name!r}"}
        if cmd == "recover":  # from any state: a failed proxy is exactly where an operator needs it
            p.force_recovery()
            return {"ok": True, "message": f"{name}: stale-state recovery requested"}
        if cmd == "start" and p.state.value not in ("stopped", "failed", "backoff"):
            return {"ok": True, "message": f"{name} is already {p.state.value}"}
        sig = Signal.STOP if cmd == "stop" else Signal.START  # START relaunches: a restart
        p.request(sig, f"operator {cmd}")
        return {"ok": True, "message": f"{name}: {cmd} requested"}

    async def _ipc_reload(self, req: dict) -> dict:
        self.request_reload()
        return {"ok": True, "message": "reload requested"}

    # -- lifecycle -------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    async def run(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.data_dir, 0o700)  # state, logs and the socket: its user's alone, whatever made it
        lock_fd = acquire_lock(self.data_dir)
        procs.become_subreaper()  # what a child forks comes back to us, never lost to init
        pipe = procs.ParentDeathPipe()
        self.events = EventLog(self.data_dir / "events.jsonl")
        self.events.listeners.append(self._on_event)
        loop = asyncio.get_running_loop()
        for sig, fn in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                        (signal.SIGHUP, self.request_reload)):
            loop.add_signal_handler(sig, fn)
        extras: list[Callable[[], Any]] = []
        ipc = IPCServer(self.data_dir, {"status": self._ipc_status, "reload": self._ipc_reload,
                                        "start": self._ipc_control, "stop": self._ipc_control,
                                        "restart": self._ipc_control, "recover": self._ipc_control})
        try:
            killed = await asyncio.to_thread(
                procs.kill_orphans, self.data_dir.glob("proxies/*/pids/*.pid"))
            for desc in killed:
                self._note("-", "orphan_stopped", f"stopped {desc} left by an earlier supervisor")
            self._sweep_and_record()
            register_configured(self.settings)
            bins = ts.Binaries.locate(self.settings.tailscale, self.settings.tailscaled)
            named = (self.settings.tailscale, self.settings.tailscaled,
                     os.environ.get("TS_SUPERVISOR_TAILSCALE"), os.environ.get("TS_SUPERVISOR_TAILSCALED"))
            bad = trustmod.binary_problems(self.trust, (bins.tailscale, bins.tailscaled), named)
            if bad:  # root executes them: they must be root's alone
                raise trustmod.Untrusted(bad[0])
            self._note_waived()
            try:
                self.tailscale_version = cfgmod.parse_version(await asyncio.to_thread(bins.version))
            except (OSError, subprocess.SubprocessError) as e:
                self._note("-", "transient", f"cannot ask {bins.tailscale} its version: {e}")
            self.ctx = Context(settings=self.settings, bins=bins, data_dir=self.data_dir,
                               events=self.events, control_url=self.control_url,
                               login_key=self.login_key, api=self.api, death_pipe=pipe)
            await ipc.start()
            extras = await self._start_extras()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self._reload()
                self.started.set()
                sd_notify("READY=1\nSTATUS=supervising " + ", ".join(sorted(self.proxies)))
                signature = _dir_signature(self.config_dir)
                while not self._stop_requested:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CONFIG_POLL):  # (3.11's wait_for can eat a cancel)
                            await self._wake.wait()
                    self._wake.clear()
                    now_sig = _dir_signature(self.config_dir)
                    if self._reload_requested or now_sig != signature:
                        self._reload_requested = False
                        signature = now_sig
                        await self._reload()
                sd_notify("STOPPING=1")
                await self._stop_all(list(self.proxies))
        finally:
            for stop_extra in extras:
                await stop_extra()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await ipc.close()
            if self.control is not None:
                await self.control.stop()
            self.events.close()
            pipe.close()
            os.close(lock_fd)

    def _sweep_and_record(self) -> None:
        """Remove auth key copies older versions left in proxy dirs (a kill -9
        during `tailscale up`), and record where the config lives, so that
        `logs`, `events` and `status` can read the secrets they must redact."""
        for stale in self.data_dir.glob("proxies/*/authkey"):
            stale.unlink(missing_ok=True)
            self._note(stale.parent.name, "key_swept", f"removed a leftover auth key copy {stale}")
        record = {"pid": os.getpid(), "config_dir": str(self.config_dir.absolute()),
                  "settings": str(self.settings_path.absolute()) if self.settings_path else None}
        tmp = self.data_dir / f".{RUN_RECORD}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.data_dir / RUN_RECORD)

    def _note_waived(self) -> None:
        """One line per path accepted only by trust_acl_paths, and one per secret
        file others may read (`secret_readable`), each once."""
        assert self.trust is not None
        for line in self.trust.take_waived():
            self._note("-", "trust_waived", line)
        for line in self.trust.take_exposed():
            self._note("-", "secret_readable", line)

    async def _start_extras(self) -> list[Callable[[], Any]]:
        """Webhooks and metrics, if configured; returns what stops them."""
        stops: list[Callable[[], Any]] = []
        if self.settings.webhooks:
            notifier = Notifier(self.settings.webhooks, lambda kind, why: self._note("-", kind, why))
            assert self.events is not None
            self.events.listeners.append(notifier.on_event)
            task = asyncio.create_task(notifier.run(), name="webhooks")

            async def stop_notifier() -> None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            stops.append(stop_notifier)
        if self.settings.memory_period > 0:  # children's PSS/USS/CPU into the snapshots (memory.py)
            sampler = asyncio.create_task(memory.run(
                self._children, self._apply_memory, self.settings.memory_period,
                lambda e: self._note("-", "internal_error", f"memory sampler: {e!r}")), name="memory")

            async def stop_sampler() -> None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            stops.append(stop_sampler)
        if self.settings.metrics:
            server = MetricsServer(self.settings.metrics, self._metrics, lambda: self.config_errors)
            await server.start()
            self._note("-", "metrics", f"metrics at http://{server.host}:{server.port}/metrics")
            stops.append(server.close)
        return stops

    def _children(self) -> dict[str, list[memory.ChildRef]]:
        return {n: [memory.ChildRef(c.role, c.pid, c.create_time) for c in p.children()]
                for n, p in self.proxies.items()}

    def _apply_memory(self, usage: dict[str, memory.Usage]) -> None:
        for name, u in usage.items():
            if (p := self.proxies.get(name)) is not None:
                p.memory = u

    def _metrics(self) -> tuple[list[ProxySnapshot], dict[str, list[float]]]:
        return self.snapshots(), {n: list(p.detections) for n, p in self.proxies.items()}

    async def _reload(self) -> None:
        """New proxies start, removed ones stop, changed ones restart; the rest
        are not touched. A running proxy keeps its hostname against newcomers."""
        incumbents = {p.cfg.hostname: n for n, p in self.proxies.items()}
        configs, errors = await asyncio.to_thread(cfgmod.load_dir, self.config_dir, incumbents,
                                                  self.tailscale_version, self.trust)
        await asyncio.to_thread(register_configured, *configs)  # before anything can show them
        self._note_waived()
        new_errors = [e for e in errors if e not in self.config_errors]
        self.config_errors = errors
        for e in new_errors:
            self._note(e.path.stem, "config_error", str(e))
        if any(e.path == self.config_dir for e in errors):
            return  # the config dir itself is unreadable (removed, renamed, EACCES): change nothing
        wanted = {c.name: c for c in configs}
        # A file that turned bad keeps its proxy running as it was: nothing is lost.
        bad_files = {e.path.stem for e in errors}
        removed = [n for n in self.proxies if n not in wanted and n not in bad_files]
        changed = [n for n, c in wanted.items()
                   if n in self.proxies and self.proxies[n].cfg.fingerprint() != c.fingerprint()]
        await self._stop_all(removed, "removed from the config dir")
        await self._stop_all(changed, "config changed: restarting with it")
        for n, c in wanted.items():  # only the [[serve]] set changed: applied in place
            if n in self.proxies and n not in changed and self.proxies[n].cfg != c:
                self.proxies[n].update_services(c)
        try:
            await self._ensure_control(configs)
        except Exception as e:
            self._note("-", "control_error", f"embedded control failed to start: {e}")
            configs = [c for c in configs if not c.embedded]
        for name, c in wanted.items():
            if name in self.proxies or (c.embedded and self.control is None):
                continue
            self._start_proxy(c)

    def _start_proxy(self, cfg: ProxyConfig) -> None:
        assert self._tg is not None
        proxy = Proxy(cfg, self.ctx)
        self.proxies[cfg.name] = proxy
        self.tasks[cfg.name] = self._tg.create_task(self._guard(proxy), name=f"proxy-{cfg.name}")

    async def _guard(self, proxy: Proxy) -> None:
        """A bug in one proxy's runner ends that proxy (children reaped by its
        own finally), never the TaskGroup that holds the others."""
        try:
            await proxy.run()
        except Exception as e:
            self._note(proxy.cfg.name, "internal_error", repr(e))

    async def _stop_all(self, names: list[str], reason: str = "supervisor stopping") -> None:
        for n in names:
            self.proxies[n].shutdown(reason)
        for n in names:
            await self.tasks.pop(n)
            self.proxies.pop(n)

    def proxy(self, name: str) -> Proxy | None:
        return self.proxies.get(name)

    def request(self, name: str, sig: Signal) -> bool:
        p = self.proxies.get(name)
        if p is None:
            return False
        p.request(sig, "operator")
        return True
