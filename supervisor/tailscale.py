"""The tailscale client: the one module that knows tailscale's CLI flags,
LocalAPI paths and JSON shapes.

Everything else in ts-supervisor talks in the typed values defined here
(BusEvent, NodeStatus), so a tailscale release that moves a field breaks one
module, not the supervisor.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VERSION = "1.96.4"

# IPN bus watch options (ipn/backend.go; identical bit values in 1.78.1 and 1.96.4).
NOTIFY_INITIAL_STATE = 1 << 1
NOTIFY_NO_PRIVATE_KEYS = 1 << 4
NOTIFY_INITIAL_HEALTH = 1 << 7
NOTIFY_RATE_LIMIT = 1 << 8  # throttles only netmap/engine spam; State and ErrMessage pass at once
BUS_MASK = NOTIFY_INITIAL_STATE | NOTIFY_NO_PRIVATE_KEYS | NOTIFY_INITIAL_HEALTH | NOTIFY_RATE_LIMIT

STATE_FILE = "tailscaled.state"
MAX_BODY = 32 << 20  # bytes: a LocalAPI answer or bus line larger than this is refused
SOCKET_FILE = "tailscaled.sock"


class BackendState(IntEnum):
    """ipn.State as it travels on the IPN bus (an integer)."""

    @property
    def label(self) -> str:
        """tailscale's own name for the state ("NeedsLogin")."""
        return next(k for k, v in _STATE_NAMES.items() if v is self)

    NO_STATE = 0
    IN_USE_OTHER_USER = 1
    NEEDS_LOGIN = 2
    NEEDS_MACHINE_AUTH = 3
    STOPPED = 4
    STARTING = 5
    RUNNING = 6

    @classmethod
    def parse(cls, value: Any) -> "BackendState | None":
        """An ipn.State as an integer (the bus) or a name (`status`); None for
        anything else, including values a newer tailscale might add."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return cls(value) if value in cls._value2member_map_ else None
        if isinstance(value, str):
            return _STATE_NAMES.get(value)
        return None


_STATE_NAMES: dict[str, BackendState] = {
    "NoState": BackendState.NO_STATE,
    "InUseOtherUser": BackendState.IN_USE_OTHER_USER,
    "NeedsLogin": BackendState.NEEDS_LOGIN,
    "NeedsMachineAuth": BackendState.NEEDS_MACHINE_AUTH,
    "Stopped": BackendState.STOPPED,
    "Starting": BackendState.STARTING,
    "Running": BackendState.RUNNING,
}


# ---------------------------------------------------------------------------
# Binaries and command lines


class BinaryNotFound(Exception):
    pass


@dataclass(frozen=True)
class Binaries:
    tailscale: Path
    tailscaled: Path

    @classmethod
    def locate(cls, tailscale: str | os.PathLike | None = None,
               tailscaled: str | os.PathLike | None = None,
               version: str | None = None) -> "Binaries":
        """Find the binaries: explicit paths (settings file) win, then the
        TS_SUPERVISOR_TAILSCALE / TS_SUPERVISOR_TAILSCALED environment (a NAS
        install), then the project's pinned copy in .tools/, then $PATH."""
        version = version or os.environ.get("TS_SUPERVISOR_TAILSCALE_VERSION") or DEFAULT_VERSION
        tools = Path(os.environ.get("TS_SUPERVISOR_TOOLS", PROJECT_ROOT / ".tools"))
        found = {}
        for name, explicit in (("tailscale", tailscale), ("tailscaled", tailscaled)):
            candidates = [explicit, os.environ.get(f"TS_SUPERVISOR_{name.upper()}"),
                          tools / f"tailscale-{version}" / name, shutil.which(name)]
            path = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
            if path is None:
                raise BinaryNotFound(
                    f"{name} not found: set {name} in ts-supervisor.toml or "
                    f"TS_SUPERVISOR_{name.upper()}, or run scripts/install-tailscale")
            found[name] = path.resolve()
        return cls(**found)

    def version(self) -> str:
        out = subprocess.run([str(self.tailscale), "version"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.split("\n", 1)[0].strip()


def quiet_env(control_url: str) -> dict[str, str]:
    """Environment that keeps tailscaled on a loopback control and off the
    Internet (facts §6): no log upload, no port mapping, no hosted control,
    DERP over plain HTTP to the embedded relay, and every log line kept."""
    return {
        "TS_NO_LOGS_NO_SUPPORT": "true",
        "TS_DISABLE_PORTMAPPER": "1",
        "TS_PANIC_IF_HIT_MAIN_CONTROL": "1",
        "TS_DEBUG_USE_DERP_HTTP": "1",
        "TS_NETCHECK_GENERATE_204_URL": f"{control_url.rstrip('/')}/generate_204",
        "TS_DEBUG_LOG_RATE": "all",
    }


# Go's runtime knobs that tailscaled may get (Settings.tailscaled_gogc and
# tailscaled_gomemlimit). Measured by scripts/bench-gomem (README "Go runtime
# knobs"): unset is the default. GOGC=50 saved 3-7 % of PSS; a 16 MiB limit
# saved 10 % with small netmaps and half with big ones, always for several
# times the CPU at start and on netmap changes: a trade for the owner.
GO_KNOBS = ("GOGC", "GOMEMLIMIT")
_GOMEMLIMIT_RE = re.compile(r"([0-9]+)((?:[KMGT]i)?B)?")
_UNIT = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def go_knob_problem(name: str, value: str) -> str | None:
    """Why `value` cannot be Go's `name` ("GOGC" or "GOMEMLIMIT"), or None.
    GOGC: "off" or a percentage from 1 to 2^31-1 (Go reads anything else as
    100, silently; 0 would collect continuously). GOMEMLIMIT: "off" or a byte
    count below 2^63 matching ^[0-9]+(([KMGT]i)?B)?$ (Go refuses to start on
    anything else: "malformed GOMEMLIMIT"). Source: golang/go
    src/runtime/mgcpacer.go readGOGC and readGOMEMLIMIT, src/runtime/string.go
    parseByteCount."""
    if value == "off":
        return None
    if name == "GOGC":
        ok = value.isascii() and value.isdigit() and 1 <= int(value) < 1 << 31
        return None if ok else "must be \"off\" or a whole percentage from 1 (Go's default is 100)"
    if name == "GOMEMLIMIT":
        m = _GOMEMLIMIT_RE.fullmatch(value) if value.isascii() else None
        ok = m is not None and int(m[1]) * _UNIT[m[2]] < 1 << 63
        return None if ok else ("must be \"off\" or bytes with an optional B, KiB, MiB, GiB or TiB "
                                "suffix, e.g. \"16MiB\"")
    return f"not one of Go's knobs the supervisor sets ({', '.join(GO_KNOBS)})"


def tailscaled_command(bins: Binaries, statedir: Path, socket: Path | None = None, *,
                       quiet_control_url: str | None,
                       parent_death_fd: int | None = None,
                       socks5_server: str | None = None,
                       go_env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment for one tailscaled owning `statedir`.

    quiet_control_url: set for the embedded (loopback) control; adds the
    flags and environment that keep tailscaled off the Internet.
    parent_death_fd: read end of a pipe whose write end the supervisor holds;
    tailscaled exits when it reads EOF, i.e. when the supervisor dies.
    go_env: Go's runtime knobs, {"GOGC": "50", "GOMEMLIMIT": "16MiB"}; only
    GO_KNOBS, each checked by go_knob_problem (ValueError otherwise); an empty
    value is left out (Go's default).
    """
    for k, v in (go_env or {}).items():
        if v and (problem := go_knob_problem(k, v)):
            raise ValueError(f"{k}={v!r}: {problem}")
    argv = [str(bins.tailscaled), f"--statedir={statedir}",
            f"--socket={socket or statedir / SOCKET_FILE}", "--tun=userspace-networking", "--port=0"]
    env = cli_env()
    env["TS_LOGS_DIR"] = str(statedir)
    env["TS_DEBUG_LOG_RATE"] = "all"  # keep every repeated "Received error" line (facts §6)
    if quiet_control_url:
        argv.append("--no-logs-no-support")
        env.update(quiet_env(quiet_control_url))
    if socks5_server:
        argv.append(f"--socks5-server={socks5_server}")
    if parent_death_fd is not None:
        env["TS_PARENT_DEATH_FD"] = str(parent_death_fd)
    env.update({k: v for k, v in (go_env or {}).items() if v})
    return argv, env


# What a child may inherit: nothing else, so a secret in the supervisor's own
# environment (an `auth_key_env` variable, an API token) never reaches one.
# No NOTIFY_SOCKET: tailscaled speaks sd_notify too, and only the supervisor
# may tell systemd it is ready.
CHILD_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
             "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
             "SSL_CERT_FILE", "SSL_CERT_DIR")


def cli_env() -> dict[str, str]:
    """The environment for every tailscale child: an allow-list of ours (CHILD_ENV)."""
    env = {k: os.environ[k] for k in CHILD_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def up_command(bins: Binaries, socket: Path, *, login_server: str | None, hostname: str,
               auth_key_fd: int | None, tags: tuple[str, ...] = (),
               timeout: float = 60.0) -> list[str]:
    """`tailscale up` for a statedir that needs login. The key travels through
    a pipe the child inherits as fd `auth_key_fd` (pass it in pass_fds): the
    CLI reads `--auth-key=file:/dev/fd/N` once, to EOF, in 1.78.1 and 1.96.4
    alike (tailscale/tailscale cmd/tailscale/cli/up.go: getAuthKey /
    resolveValueFromFile, os.ReadFile), so the key is never in argv and never
    on disk. --reset because this only ever runs on a fresh or logged-out
    statedir, where every flag is ours to set."""
    argv = [str(bins.tailscale), f"--socket={socket}", "up", "--reset",
            f"--hostname={hostname}", "--accept-dns=false", f"--timeout={int(timeout)}s"]
    if login_server:
        argv.append(f"--login-server={login_server}")
    if auth_key_fd is not None:
        argv.append(f"--auth-key=file:/dev/fd/{auth_key_fd}")
    if tags:
        argv.append(f"--advertise-tags={','.join(tags)}")
    return argv


def serve_command(bins: Binaries, socket: Path, *, mode: str, port: int, target: str) -> list[str]:
    """Foreground `tailscale serve`: it removes its config when it exits, so
    the serve config lives exactly as long as the child we supervise."""
    if mode not in ("http", "https", "tcp"):
        raise ValueError(f"unknown serve mode {mode!r}")
    return [str(bins.tailscale), f"--socket={socket}", "serve", f"--{mode}={port}", target]


def serve_reset_command(bins: Binaries, socket: Path) -> list[str]:
    """Clear the node's whole serve config (background and foreground)."""
    return [str(bins.tailscale), f"--socket={socket}", "serve", "reset"]


def serve_apply_command(bins: Binaries, socket: Path, service: Service) -> list[str]:
    """Add one service to the node's serve config, in the background (kept
    in tailscaled's state; no child stays running). The CLI performs
    tailscale's own checks (HTTPS, Funnel) and writes the config."""
    verb = "funnel" if service.funnel else "serve"  # funnel: serve, and let the Internet in
    argv = [str(bins.tailscale), f"--socket={socket}", verb, "--bg", "--yes",
            f"--{service.mode}={service.port}"]
    if service.mode in WEB_MODES and service.path not in ("", "/"):
        argv.append(f"--set-path={service.path}")
    target = f"tcp://{service.target}" if service.mode in TCP_MODES else service.target
    return argv + [target]


def set_hostname_command(bins: Binaries, socket: Path, hostname: str) -> list[str]:
    return [str(bins.tailscale), f"--socket={socket}", "set", f"--hostname={hostname}"]


def logout_command(bins: Binaries, socket: Path) -> list[str]:
    return [str(bins.tailscale), f"--socket={socket}", "logout"]


# ---------------------------------------------------------------------------
# LocalAPI over the unix socket


class LocalAPIError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"LocalAPI HTTP {status}: {body.strip()[:200]}")
        self.status = status
        self.body = body


# A Notify whose only news is a netmap (or engine stats): every field that
# comes before NetMap in ipn.Notify is absent or null (1.78.1 writes nulls,
# 1.96.4 omits them) ...
_NETMAP_HEAD = re.compile(rb'\{"Version":"[^"]*",(?:"SessionID":"[^"]*",)?(?:"ErrMessage":null,)?'
                          rb'(?:"LoginFinished":null,)?(?:"State":null,)?(?:"Prefs":null,)?"NetMap":\{')
# ... and nothing that matters comes after it (those fields follow NetMap).
_AFTER_NETMAP = re.compile(rb'"(?:BrowseToURL|Health|ErrMessage|State|LoginFinished)":[^n]')


def is_netmap_only(line: bytes) -> bool:
    """True for an IPN bus line that carries a netmap and nothing supervision
    reads. At 200 proxies each peer change sends every one of them a full
    netmap; these are dropped without decoding. A false "no" only costs a
    decode; a false "yes" would lose news, hence the tail check."""
    return bool(_NETMAP_HEAD.match(line)) and not _AFTER_NETMAP.search(line, max(0, len(line) - 2048))


def _map(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _strs(v: Any) -> tuple[str, ...]:
    return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else ()


@dataclass(frozen=True)
class BusEvent:
    """One IPN bus Notify, reduced to what supervision needs."""

    state: BackendState | None = None
    err_message: str | None = None
    browse_to_url: str | None = None
    # warnable code -> text; None when this Notify carried no health state
    health: Mapping[str, str] | None = None
    login_finished: bool = False
    version: str | None = None

    malformed: str = ""  # set when the line was not a Notify we can read (and nothing else is)
    netmap: bool = False  # a netmap-only Notify, not decoded (is_netmap_only)

    @classmethod
    def parse(cls, n: Any) -> "BusEvent":
        """Total: any JSON value gives a BusEvent. Fields of the wrong type
        count as absent; a value that is not an object gives `malformed`."""
        if not isinstance(n, Mapping):
            return cls(malformed=f"not a JSON object: {type(n).__name__}")
        health = n.get("Health")
        warnings = None
        if isinstance(health, Mapping):
            warnings = {str(code): _str(_map(w).get("Text"))
                        for code, w in _map(health.get("Warnings")).items()}
        return cls(
            state=BackendState.parse(n.get("State")),
            err_message=_str(n.get("ErrMessage")) or None,
            browse_to_url=_str(n.get("BrowseToURL")) or None,
            health=warnings,
            login_finished=n.get("LoginFinished") is not None,
            version=_str(n.get("Version")) or None,
        )

    @classmethod
    def parse_line(cls, line: bytes) -> "BusEvent":
        """One line of the IPN bus stream; never raises."""
        try:
            return cls.parse(json.loads(line))
        except (ValueError, RecursionError) as e:
            return cls(malformed=f"not JSON ({type(e).__name__}, {len(line)} bytes)")


@dataclass(frozen=True)
class NodeStatus:
    """The slice of /localapi/v0/status the supervisor shows and decides on."""

    backend_state: BackendState
    auth_url: str = ""
    tailscale_ips: tuple[str, ...] = ()
    dns_name: str = ""
    hostname: str = ""
    node_id: str = ""
    expired: bool = False
    key_expiry: str | None = None
    online: bool = False
    health: tuple[str, ...] = ()
    version: str = ""
    peers: tuple[Mapping[str, Any], ...] = field(default=(), repr=False)

    @classmethod
    def parse(cls, s: Any) -> "NodeStatus":
        """/localapi/v0/status. Fields of the wrong type count as absent.
        Raises LocalAPIError if the answer is not an object with a BackendState."""
        if not isinstance(s, Mapping):
            raise LocalAPIError(0, f"status: not a JSON object: {type(s).__name__}")
        state = BackendState.parse(s.get("BackendState"))
        if state is None:
            raise LocalAPIError(0, f"status: unknown BackendState {str(s.get('BackendState'))[:40]!r}")
        me = _map(s.get("Self"))
        expiry = me.get("KeyExpiry")
        return cls(
            backend_state=state,
            auth_url=_str(s.get("AuthURL")),
            tailscale_ips=_strs(s.get("TailscaleIPs")),
            dns_name=_str(me.get("DNSName")).rstrip("."),
            hostname=_str(me.get("HostName")),
            node_id=str(me.get("ID") or "") if isinstance(me.get("ID"), (str, int)) else "",
            expired=me.get("Expired") is True,
            key_expiry=expiry if isinstance(expiry, str) else None,
            online=me.get("Online") is True,
            health=_strs(s.get("Health")),
            version=_str(s.get("Version")),
            peers=tuple(p for p in _map(s.get("Peer")).values() if isinstance(p, Mapping)),
        )


WEB_MODES = ("http", "https")
TCP_MODES = ("tcp", "tls-terminated-tcp")


@dataclass(frozen=True, order=True)
class Service:
    """One served endpoint: tailnet-side `port` (and `path` for web modes)
    forwarded to `target`. `mode` is as `tailscale serve` names it."""

    port: int
    path: str  # "" for TCP modes; "/" or "/api" for web modes
    mode: str  # http | https | tcp | tls-terminated-tcp
    target: str
    funnel: bool = False

    def describe(self) -> str:
        where = f":{self.port}{self.path if self.path not in ('', '/') else ''}"
        return f"{self.mode} {where} -> {self.target}" + (" (funnel)" if self.funnel else "")


def _obj(v: object) -> dict:
    return v if isinstance(v, dict) else {}


def serve_services(cfg: object) -> frozenset[Service]:
    """The services an ipn.ServeConfig (LocalAPI /serve-config JSON) serves.

    Shape (ipn/serve.go): {"TCP": {"80": {"HTTP": true} | {"HTTPS": true} |
    {"TCPForward": "127.0.0.1:22", "TerminateTLS": "host"}}, "Web": {"host:80":
    {"Handlers": {"/": {"Proxy": "http://127.0.0.1:8096"}}}}, "AllowFunnel":
    {"host:443": true}, "Foreground": {session: ServeConfig}}. Malformed parts
    are skipped; foreground sessions count like background config.
    """
    out: set[Service] = set()
    layers = [_obj(cfg), *(_obj(v) for v in _obj(_obj(cfg).get("Foreground")).values())]
    for layer in layers:
        funnel_ports = {hp.rpartition(":")[2] for hp, on in _obj(layer.get("AllowFunnel")).items() if on is True}
        web: dict[str, dict] = {}
        for hostport, conf in _obj(layer.get("Web")).items():
            web.setdefault(str(hostport).rpartition(":")[2], {}).update(_obj(_obj(conf).get("Handlers")))
        for port_s, handler in _obj(layer.get("TCP")).items():
            h = _obj(handler)
            if not str(port_s).isdigit():
                continue
            port = int(port_s)
            if isinstance(h.get("TCPForward"), str) and h["TCPForward"]:
                mode = "tls-terminated-tcp" if h.get("TerminateTLS") else "tcp"
                out.add(Service(port, "", mode, h["TCPForward"]))
            elif h.get("HTTP") is True or h.get("HTTPS") is True:
                mode = "https" if h.get("HTTPS") is True else "http"
                for path, hh in web.get(str(port), {}).items():
                    hh = _obj(hh)
                    target = (hh.get("Proxy") if isinstance(hh.get("Proxy"), str) else
                              f"text:{hh['Text']}" if isinstance(hh.get("Text"), str) else
                              f"path:{hh['Path']}" if isinstance(hh.get("Path"), str) else "?")
                    out.add(Service(port, str(path), mode, target.rstrip("/") if "://" in target else target,
                                    str(port) in funnel_ports))
    return frozenset(out)


@dataclass(frozen=True)
class Observed:
    """What the LocalAPI says (status?peers=false, prefs, serve-config), at `at` (monotonic s)."""

    backend_state: BackendState | None
    control_url: str = ""          # prefs.ControlURL, raw
    want_running: bool = False
    logged_out: bool = False
    hostname: str = ""             # prefs.Hostname
    node_id: str = ""              # Self.ID
    tailscale_ips: tuple[str, ...] = ()
    dns_name: str = ""
    tags: tuple[str, ...] = ()     # Self.Tags (granted by control)
    key_expiry: str | None = None
    expired: bool = False          # Self.Expired: the node key has expired
    auth_url: str = ""             # status AuthURL: control wants an interactive login
    online: bool = False
    cert_domains: tuple[str, ...] = ()
    capabilities: frozenset[str] = frozenset()  # Self.CapMap keys and Self.Capabilities
    services: frozenset[Service] = frozenset()
    at: float = 0.0


def parse_observed(status: Any, prefs: Any, serve_config: Any, at: float) -> Observed:
    """An Observed from three LocalAPI answers: /status?peers=false, /prefs and
    /serve-config (shapes: ipnstate.Status, ipn.Prefs, ipn.ServeConfig).
    Raises LocalAPIError if `status` is not a status object."""
    st = NodeStatus.parse(status)
    s = _map(status)
    me = _map(s.get("Self"))
    p = _map(prefs)
    caps = set(_strs(me.get("Capabilities"))) | {str(k) for k in _map(me.get("CapMap"))}
    return Observed(
        backend_state=st.backend_state,
        control_url=_str(p.get("ControlURL")),
        want_running=p.get("WantRunning") is True,
        logged_out=p.get("LoggedOut") is True,
        hostname=_str(p.get("Hostname")),
        node_id=st.node_id,
        tailscale_ips=st.tailscale_ips,
        dns_name=st.dns_name,
        tags=_strs(me.get("Tags")),
        key_expiry=st.key_expiry,
        expired=st.expired,
        auth_url=st.auth_url,
        online=st.online,
        cert_domains=_strs(s.get("CertDomains")),
        capabilities=frozenset(caps),
        services=serve_services(serve_config),
        at=at,
    )


CAP_HTTPS = "https"                                              # tailcfg.CapabilityHTTPS
CAP_FUNNEL = "funnel"                                            # tailcfg.NodeAttrFunnel
CAP_FUNNEL_PORTS = "https://tailscale.com/cap/funnel-ports"      # tailcfg.CapabilityFunnelPorts


def funnel_ports(capabilities: frozenset[str]) -> str:
    """The `ports=` list of the funnel-ports capability ("443,8443,10000"), or
    "" when the node has none (ipn.CheckFunnelPort)."""
    from urllib.parse import parse_qs, urlsplit
    for cap in sorted(capabilities):
        if cap.startswith(CAP_FUNNEL_PORTS + "?"):
            ports = parse_qs(urlsplit(cap).query).get("ports", [""])[0]
            if ports:
                return ports
    return ""


def port_in(ports: str, port: int) -> bool:
    """Is `port` in a funnel-ports list of ports and FIRST-LAST ranges?"""
    for part in ports.split(","):
        first, sep, last = part.partition("-")
        try:
            if (not sep and int(first) == port) or (sep and int(first) <= port <= int(last)):
                return True
        except ValueError:
            continue
    return False


def serve_ports(cfg: Any) -> set[int]:
    """Tailnet ports an ipn.ServeConfig (JSON) listens on, foreground
    sessions (`Foreground[session]`) included. Malformed parts are ignored."""
    cfg = _map(cfg)
    layers = [cfg, *(v for v in _map(cfg.get("Foreground")).values())]
    ports = set()
    for layer in layers:
        for p in _map(_map(layer).get("TCP")):
            if str(p).isdigit() and 0 < int(p) < 65536:
                ports.add(int(p))
    return ports


class LocalAPI:
    """A minimal HTTP/1.1 client for tailscaled's LocalAPI on its unix socket.

    Hand-rolled because the bus is an endless chunked stream of JSON lines and
    the only dependency-free alternative (http.client) blocks the event loop.
    """

    HOST = "local-tailscaled.sock"

    def __init__(self, socket: Path, keep_alive: bool = False):
        """keep_alive: GET requests reuse one idle HTTP/1.1 connection (tailscaled's
        LocalAPI is Go's net/http server, which keeps connections open between
        requests); a request while it is busy opens its own. Call close() when done."""
        self.socket = Path(socket)
        self.keep_alive = keep_alive
        self._idle: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def close(self) -> None:
        """Drop the idle kept-alive connection, if any."""
        if self._idle is not None:
            self._idle[1].close()
            self._idle = None

    async def _open(self, method: str, path: str, body: bytes = b"",
                    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
                    keep: bool = False) -> tuple[
            asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str]]:
        reader, writer = conn or await asyncio.open_unix_connection(str(self.socket), limit=1 << 22)
        try:
            close = "" if keep else "Connection: close\r\n"
            head = (f"{method} {path} HTTP/1.1\r\nHost: {self.HOST}\r\n"
                    f"Sec-Tailscale: localapi\r\nContent-Length: {len(body)}\r\n"
                    f"Content-Type: application/json\r\n{close}\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.decode("latin-1").split(" ", 2)
            if len(parts) < 2 or not parts[1].isdigit() or len(parts[1]) != 3:
                raise LocalAPIError(0, f"bad status line {status_line[:80]!r}")
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            return reader, writer, int(parts[1]), headers
        except BaseException:
            writer.close()
            raise

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readline()
                if not size_line:
                    return
                try:
                    size = int(size_line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    raise LocalAPIError(0, f"bad chunk size {size_line[:40]!r}") from None
                if size == 0:  # then trailers, if any, and an empty line (RFC 9112 7.1)
                    while await reader.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                if size < 0 or size > MAX_BODY:
                    raise LocalAPIError(0, f"chunk of {size} bytes")
                data = await reader.readexactly(size)
                await reader.readexactly(2)
                yield data
                del data  # not kept while the next chunk is awaited (see watch_bus_lines)
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit() or int(length) > MAX_BODY:
                raise LocalAPIError(0, f"bad Content-Length {length[:40]!r}")
            yield await reader.readexactly(int(length))
        else:
            total = 0
            while chunk := await reader.read(65536):
                total += len(chunk)
                if total > MAX_BODY:
                    raise LocalAPIError(0, f"answer over {MAX_BODY} bytes")
                yield chunk

    async def request(self, method: str, path: str, body: Any = None) -> bytes:
        """One request. Raises OSError (socket), LocalAPIError (HTTP >= 300 or a
        malformed answer) or asyncio.IncompleteReadError (cut short)."""
        data = b"" if body is None else json.dumps(body).encode()
        keep = self.keep_alive and method == "GET"
        conn, self._idle = (self._idle, None) if keep else (None, self._idle)
        if conn is not None:
            try:
                return await self._exchange(method, path, data, conn, keep)
            except (OSError, asyncio.IncompleteReadError):
                pass  # the kept connection was closed meanwhile (tailscaled restarted): a new one
            except LocalAPIError as e:
                if e.status:
                    raise
        return await self._exchange(method, path, data, None, keep)

    async def _exchange(self, method: str, path: str, data: bytes,
                        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
                        keep: bool) -> bytes:
        reader, writer, status, headers = await self._open(method, path, data, conn, keep)
        whole = False
        try:
            out = (b"" if status in (204, 304) else  # no body, and no length to say so (RFC 9112 6.3)
                   b"".join([c async for c in self._chunks(reader, headers)]))
            whole = True
        finally:
            framed = (status in (204, 304) or "content-length" in headers
                      or headers.get("transfer-encoding", "").lower() == "chunked")
            if keep and whole and framed and self._idle is None and headers.get("connection", "").lower() != "close":
                self._idle = (reader, writer)
            else:
                writer.close()
        if status >= 300:
            raise LocalAPIError(status, out.decode(errors="replace"))
        return out

    async def get_json(self, path: str) -> Any:
        """GET and decode; a body that is not JSON is a LocalAPIError."""
        raw = await self.request("GET", path)
        try:
            return json.loads(raw or b"null")
        except (ValueError, RecursionError):
            raise LocalAPIError(0, f"{path}: answer is not JSON ({len(raw)} bytes)") from None

    async def status(self) -> NodeStatus:
        return NodeStatus.parse(await self.get_json("/localapi/v0/status"))

    async def status_raw(self) -> dict[str, Any]:
        return await self.get_json("/localapi/v0/status")

    async def observe(self) -> Observed:
        """Status (without peers), prefs and serve config, now. Raises OSError,
        LocalAPIError or asyncio.IncompleteReadError."""
        status = await self.get_json("/localapi/v0/status?peers=false")
        prefs = await self.get_json("/localapi/v0/prefs")
        serve = await self.get_json("/localapi/v0/serve-config")
        return parse_observed(status, prefs, serve, time.monotonic())

    async def serve_ports(self) -> set[int]:
        """Tailnet ports the current serve config listens on."""
        return serve_ports(await self.get_json("/localapi/v0/serve-config"))

    async def ping(self) -> None:
        """The cheapest request that proves tailscaled's LocalAPI is serving."""
        await self.request("GET", "/localapi/v0/status?peers=false")

    async def watch_bus(self, mask: int = BUS_MASK) -> AsyncIterator[BusEvent]:
        """Yield each Notify as it happens (a line that is not one yields a
        BusEvent with `malformed` set), except netmap-only ones, which are
        dropped undecoded. Ends when tailscaled closes the stream."""
        async for line in self.watch_bus_lines(mask):
            ev = BusEvent(netmap=True) if is_netmap_only(line) else BusEvent.parse_line(line)
            del line  # a netmap line is the size of the tailnet: never held across the wait
            yield ev

    async def watch_bus_raw(self, mask: int = BUS_MASK) -> AsyncIterator[Any]:
        """The decoded Notify objects (tests and tools); bad lines are skipped."""
        async for line in self.watch_bus_lines(mask):
            with contextlib.suppress(ValueError, RecursionError):
                yield json.loads(line)

    async def watch_bus_lines(self, mask: int = BUS_MASK) -> AsyncIterator[bytes]:
        reader, writer, status, headers = await self._open(
            "GET", f"/localapi/v0/watch-ipn-bus?mask={mask}")
        try:
            if status >= 300:
                body = b"".join([c async for c in self._chunks(reader, headers)])
                raise LocalAPIError(status, body.decode(errors="replace"))
            # No name here (nor in _chunks or watch_bus) keeps a chunk or a line while
            # the next one is awaited: a bus line carrying a netmap is the size of the
            # tailnet, and 200 proxies each holding their last one (chunk and line) kept
            # about 85 MiB alive in the supervisor with 200 peers apiece.
            buf = b""
            async for chunk in self._chunks(reader, headers):
                buf += chunk
                del chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield line
                    del line
                if len(buf) > MAX_BODY:
                    raise LocalAPIError(0, f"IPN bus line over {MAX_BODY} bytes")
        finally:
            writer.close()
