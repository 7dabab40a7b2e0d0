"""Proxy files (conf.d/NAME.toml) and the optional global settings file.

Every problem becomes a ConfigError naming the file, the key and the reason,
and one bad file never stops the good ones from loading.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

EMBEDDED = "embedded"
SERVE_MODES = ("http", "https", "tcp")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_HOST_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_TAG_RE = re.compile(r"^tag:[a-z0-9][a-z0-9-]*$", re.I)


@dataclass(frozen=True)
class ConfigError:
    path: Path
    key: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}: {self.key}" if self.key else str(self.path)
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class ProxyConfig:
    """One proxy: a tailscaled node named `hostname` serving `target` on `port`."""

    name: str
    path: Path
    hostname: str
    target: str
    serve: str
    port: int
    login_server: str | None  # None: Tailscale's hosted control; "embedded"; or a URL
    auth_key_file: Path | None = None
    auth_key_env: str | None = None
    ephemeral: bool = False
    tags: tuple[str, ...] = ()

    @property
    def embedded(self) -> bool:
        return self.login_server == EMBEDDED

    @property
    def local_control(self) -> bool:
        """A control on this machine (embedded or a loopback URL): tailscaled gets
        the quiet flags, because nothing it does should reach the Internet."""
        if self.embedded:
            return True
        if not self.login_server:
            return False
        host = urlsplit(self.login_server).hostname or ""
        try:
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def fingerprint(self) -> str:
        """Changes whenever anything that shapes the node changes; a changed
        fingerprint restarts the proxy and re-arms its recovery budget."""
        h = hashlib.sha256()
        for f in fields(self):
            if f.name != "path":
                h.update(f"{f.name}={getattr(self, f.name)!r};".encode())
        return h.hexdigest()[:16]

    def read_auth_key(self) -> str:
        """The secret itself; callers must never log it."""
        if self.auth_key_file is not None:
            return self.auth_key_file.read_text().strip()
        if self.auth_key_env is not None:
            return os.environ.get(self.auth_key_env, "").strip()
        raise LookupError(f"{self.path}: no auth key configured")


_PROXY_KEYS = {"hostname", "target", "serve", "port", "login_server", "auth_key_file",
               "auth_key_env", "ephemeral", "tags"}


class _Errors:
    def __init__(self, path: Path):
        self.path = path
        self.items: list[ConfigError] = []

    def add(self, key: str | None, reason: str) -> None:
        self.items.append(ConfigError(self.path, key, reason))


def _typed(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], errs: _Errors,
           what: str) -> Any:
    value = raw.get(key)
    if value is None:
        return None
    # bool is an int in Python; a port of `true` is still a mistake
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        errs.add(key, f"must be {what}, got {type(value).__name__} {value!r}")
        return None
    return value


def parse_proxy(path: Path, raw: dict[str, Any]) -> tuple[ProxyConfig | None, list[ConfigError]]:
    """Validate one parsed proxy file. Returns the config, or None and every error found."""
    errs = _Errors(path)
    name = path.stem
    if not _NAME_RE.match(name):
        errs.add(None, "file name must be letters, digits, '-' or '_' (it names the proxy)")
    for key in sorted(set(raw) - _PROXY_KEYS):
        errs.add(key, f"unknown key (known: {', '.join(sorted(_PROXY_KEYS))})")

    hostname = _typed(raw, "hostname", str, errs, "a string")
    if hostname is None and "hostname" not in raw:
        hostname = name.lower().replace("_", "-")
    if hostname is not None and not _HOST_RE.match(hostname):
        errs.add("hostname", f"{hostname!r} is not a DNS label (a-z, 0-9, '-', at most 63)")

    target = _typed(raw, "target", str, errs, "a URL string")
    target_scheme = None
    target_port = None
    if "target" not in raw:
        errs.add("target", "missing (e.g. target = \"http://127.0.0.1:8096\")")
    elif target is not None:
        parts = urlsplit(target)
        try:
            target_port = parts.port
        except ValueError:
            target_port = -1
        if parts.scheme not in ("http", "https", "tcp") or not parts.hostname:
            errs.add("target", f"{target!r} must look like http://HOST:PORT, https://HOST:PORT or tcp://HOST:PORT")
        elif target_port == -1 or (parts.scheme == "tcp" and not target_port):
            errs.add("target", f"{target!r} needs a valid port")
        else:
            target_scheme = parts.scheme

    serve = _typed(raw, "serve", str, errs, "a string")
    if serve is None and "serve" not in raw and target_scheme:
        serve = "tcp" if target_scheme == "tcp" else "http"
    if serve is not None and serve not in SERVE_MODES:
        errs.add("serve", f"{serve!r} must be one of {', '.join(SERVE_MODES)}")
        serve = None
    if serve and target_scheme:
        if (serve == "tcp") != (target_scheme == "tcp"):
            errs.add("serve", f"serve = {serve!r} does not fit a {target_scheme}:// target")

    port = _typed(raw, "port", int, errs, "an integer")
    if port is None and "port" not in raw and serve:
        port = {"http": 80, "https": 443}.get(serve, target_port if target_port and target_port > 0 else None)
    if port is not None and not 1 <= port <= 65535:
        errs.add("port", f"{port} is not a port (1-65535)")
    if port is None and "port" not in raw and serve == "tcp":
        errs.add("port", "missing (the tailnet-side port)")

    login_server = _typed(raw, "login_server", str, errs, "a URL string or \"embedded\"")
    if login_server is not None and login_server != EMBEDDED:
        parts = urlsplit(login_server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            errs.add("login_server", f"{login_server!r} must be \"embedded\" or an http(s):// URL")
    if serve == "https" and login_server == EMBEDDED:
        errs.add("serve", "\"https\" needs a tailnet that issues certificates; the embedded "
                          "control does not (use serve = \"http\")")

    key_file = _typed(raw, "auth_key_file", str, errs, "a path string")
    key_env = _typed(raw, "auth_key_env", str, errs, "an environment variable name")
    key_path = None
    if key_file is not None and key_env is not None:
        errs.add("auth_key_env", "give auth_key_file or auth_key_env, not both")
    elif login_server == EMBEDDED and (key_file or key_env):
        errs.add("auth_key_file" if key_file else "auth_key_env",
                 "not used with login_server = \"embedded\": the supervisor makes its own keys")
    elif key_file is not None:
        key_path = Path(key_file).expanduser()
        if not key_path.is_absolute():
            key_path = (path.parent / key_path).resolve()
        try:
            if not key_path.read_text().strip():
                errs.add("auth_key_file", f"{key_path} is empty")
        except OSError as e:
            errs.add("auth_key_file", f"cannot read {key_path}: {e.strerror or e}")
    elif key_env is not None:
        if not os.environ.get(key_env, "").strip():
            errs.add("auth_key_env", f"environment variable {key_env} is not set or empty")
    elif login_server != EMBEDDED and "login_server" not in errs_keys(errs):
        errs.add("auth_key_file", "missing: a proxy on a real tailnet needs auth_key_file or "
                                  "auth_key_env (or set login_server = \"embedded\")")

    ephemeral = _typed(raw, "ephemeral", bool, errs, "true or false")
    tags_raw = _typed(raw, "tags", list, errs, "a list of strings like \"tag:web\"")
    tags: tuple[str, ...] = ()
    if tags_raw is not None:
        bad = [t for t in tags_raw if not isinstance(t, str) or not _TAG_RE.match(t)]
        if bad:
            errs.add("tags", f"{bad!r}: each tag must look like \"tag:name\"")
        else:
            tags = tuple(tags_raw)

    if errs.items:
        return None, errs.items
    return ProxyConfig(
        name=name, path=path, hostname=hostname, target=target, serve=serve, port=port,
        login_server=login_server, auth_key_file=key_path, auth_key_env=key_env,
        ephemeral=bool(ephemeral), tags=tags), []


def errs_keys(errs: _Errors) -> set[str | None]:
    return {e.key for e in errs.items}


def load_proxy_file(path: Path) -> tuple[ProxyConfig | None, list[ConfigError]]:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        return None, [ConfigError(path, None, f"malformed TOML: {e}")]
    except (OSError, UnicodeDecodeError) as e:
        return None, [ConfigError(path, None, f"cannot read: {getattr(e, 'strerror', None) or e}")]
    return parse_proxy(path, raw)


def load_dir(config_dir: Path, incumbents: dict[str, str] | None = None
             ) -> tuple[list[ProxyConfig], list[ConfigError]]:
    """Load every *.toml in `config_dir`.

    Hostnames must be unique: the proxy already running with a hostname
    (`incumbents`: hostname -> proxy name) keeps it; otherwise the file that
    sorts first does, and the later one is refused.
    """
    try:
        paths = sorted(p for p in config_dir.iterdir() if p.suffix == ".toml" and p.is_file())
    except OSError as e:
        return [], [ConfigError(config_dir, None, f"cannot read config dir: {e.strerror or e}")]
    loaded: list[ProxyConfig] = []
    errors: list[ConfigError] = []
    for p in paths:
        cfg, errs = load_proxy_file(p)
        errors.extend(errs)
        if cfg:
            loaded.append(cfg)
    present = {c.name for c in loaded}
    broken = {p.stem for p in paths} - present
    owner = {h: n for h, n in (incumbents or {}).items() if n in present}
    # A running proxy whose file just turned bad keeps running, so keeps its name too.
    reserved = {h: n for h, n in (incumbents or {}).items() if n in broken}
    loaded.sort(key=lambda c: (owner.get(c.hostname) != c.name, c.name))
    taken: dict[str, ProxyConfig] = {}
    result: list[ProxyConfig] = []
    for cfg in loaded:
        first = taken.get(cfg.hostname)
        holder = first.path.name if first is not None else (
            f"{reserved[cfg.hostname]}.toml (running)" if cfg.hostname in reserved else None)
        if holder is not None:
            errors.append(ConfigError(cfg.path, "hostname", f"{cfg.hostname!r} is already used "
                                      f"by {holder}; this proxy is not started"))
            continue
        taken[cfg.hostname] = cfg
        result.append(cfg)
    result.sort(key=lambda c: c.name)
    return result, errors


# ---------------------------------------------------------------------------
# Global settings: ts-supervisor.toml


@dataclass(frozen=True)
class Settings:
    """Knobs that apply to every proxy. Only in ts-supervisor.toml, never per proxy."""

    tailscale: Path | None = None       # a NAS install's binaries; default: the pinned copy
    tailscaled: Path | None = None
    healthy_period: float = 600.0       # running this long re-arms the one-wipe budget
    start_limit: int = 5                # crash restarts allowed within start_window...
    start_window: float = 60.0          # ...before the proxy goes to failed
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    stop_grace: float = 5.0             # SIGTERM -> SIGKILL
    start_timeout: float = 60.0         # launch -> Running, else treated as a crash
    hang_timeout: float = 20.0          # LocalAPI unanswered this long = hung tailscaled
    embedded_port: int = 0              # 0: pick once, then keep it (nodes remember the URL)
    reconcile_period: float = 30.0      # seconds between observations of a quiet node
    metrics: str = ""                   # "127.0.0.1:9101": serve Prometheus text there (loopback)
    webhooks: tuple[Any, ...] = ()      # [[webhook]] tables: url, format, events


_SETTINGS_TYPES: dict[str, tuple[type, ...]] = {
    "tailscale": (str,), "tailscaled": (str,), "healthy_period": (int, float),
    "start_limit": (int,), "start_window": (int, float), "backoff_initial": (int, float),
    "backoff_max": (int, float), "stop_grace": (int, float), "start_timeout": (int, float),
    "hang_timeout": (int, float), "embedded_port": (int,), "metrics": (str,),
    "reconcile_period": (int, float),
}


class SettingsError(Exception):
    pass


def load_settings(path: Path | None) -> Settings:
    """Read ts-supervisor.toml. A missing default file means defaults; a
    missing file named explicitly, or any bad key, is an error."""
    if path is None:
        return Settings()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: malformed TOML: {e}") from None
    except OSError as e:
        raise SettingsError(f"{path}: cannot read: {e.strerror or e}") from None
    problems = []
    values: dict[str, Any] = {}
    if "webhook" in raw:
        from supervisor.notify import parse_webhooks
        values["webhooks"], bad = parse_webhooks(raw.pop("webhook"), str(path))
        problems += bad
    if isinstance(raw.get("metrics"), str):
        host, _, port = raw["metrics"].rpartition(":")
        try:
            ok = ipaddress.ip_address(host.strip("[]")).is_loopback and 0 <= int(port) < 65536
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"{path}: metrics: must be a loopback HOST:PORT such as 127.0.0.1:9101")
    for key, value in raw.items():
        kinds = _SETTINGS_TYPES.get(key)
        if kinds is None:
            known = ", ".join(sorted([*_SETTINGS_TYPES, "webhook"]))
            problems.append(f"{path}: {key}: unknown setting (known: {known})")
        elif not isinstance(value, kinds) or isinstance(value, bool):
            problems.append(f"{path}: {key}: must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        elif isinstance(value, (int, float)) and value < 0:
            problems.append(f"{path}: {key}: must not be negative")
        else:
            values[key] = Path(value).expanduser() if key in ("tailscale", "tailscaled") else value
    if problems:
        raise SettingsError("\n".join(problems))
    return Settings(**values)
