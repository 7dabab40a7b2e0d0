"""Proxy files (conf.d/NAME.toml) and the optional global settings file.

Every problem becomes a ConfigError naming the file, the key and the reason,
and one bad file never stops the good ones from loading. Nothing a file holds
(any bytes, any TOML value) makes these functions raise anything else.
"""
from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from supervisor.control.tailnet import PEER_POLICIES
from supervisor.trust import Policy, parse_acl_paths

EMBEDDED = "embedded"
WEB_MODES = ("http", "https")
TCP_MODES = ("tcp", "tls-terminated-tcp")
SERVE_MODES = WEB_MODES + TCP_MODES  # as `tailscale serve` names them (--http=, --tcp=, ...)
FUNNEL_PORTS = (443, 8443, 10000)    # the ports tailscale's Funnel allows (ipn.CheckFunnelPort)
MAX_SERVICES = 32                    # [[serve]] tables per proxy
SERVICE_KEYS = ("port", "mode", "target", "path", "funnel")
# what `tailscale serve` forwards to (ipn.ExpandProxyTargetValue), besides unix:/PATH
TARGET_SCHEMES = ("http", "https", "https+insecure", "tcp")
UNIX_TARGET_SINCE = (1, 94, 0)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")  # used with fullmatch: no "x\n"
_HOST_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_TAG_RE = re.compile(r"^tag:[a-z0-9][a-z0-9-]*$", re.I)
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
FILE_LIMIT = 64 * 1024  # bytes; a proxy or settings file is a few lines
KEY_LIMIT = 4096        # bytes; an auth key is about 100


def one_line(text: str) -> str:
    """`text` with every newline or other non-printable character escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show(value: Any, limit: int = 60) -> str:
    """A value for an error line: its repr, cut to about `limit` characters.
    Never raises (an int too long for str() or a too-deep list is named instead)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__} too large to show>"
    return one_line(text if len(text) <= limit else text[:limit] + "...")


def show_key(key: str) -> str:
    """A TOML key for an error line: as is if it is a plain word, else shown quoted."""
    return key if _BARE_KEY_RE.match(key) else show(key)


def url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    """Why `url` is not a SCHEME://HOST[:PORT]... URL with a scheme from `schemes`
    and a valid port, or None if it is one."""
    if not url.isprintable() or any(c.isspace() for c in url):
        return f"{show(url)} must not contain spaces or control characters"
    try:  # urlsplit and .port raise ValueError on e.g. "http://[::1:80", "http://h:99999"
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        host = None
    if host is None or parts.scheme not in schemes:
        return f"{show(url)} must look like {' or '.join(f'{s}://HOST:PORT' for s in schemes)}"
    if "@" in parts.netloc:  # never echo it: it may be a password
        return ("must not carry USER:PASSWORD@ (it would be shown in status, events and logs; "
                "let the upstream trust the tailnet identity headers instead)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    return f"{show(url)} needs a valid port (1-65535)" if port == 0 else None


class Unreadable(Exception):
    """A file that cannot be read as text; str() is the one-line reason."""


def read_text(path: Path, limit: int = FILE_LIMIT) -> str:
    """The UTF-8 text of the regular file at `path`, at most `limit` bytes.
    Raises Unreadable (never blocks on a FIFO, never reads a device or a huge file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Unreadable("cannot read: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise Unreadable(f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unreadable("cannot read: not a regular file")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise Unreadable(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise Unreadable(f"larger than {limit} bytes; this is not the file you meant")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unreadable(f"not UTF-8 text (byte {e.start})") from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read and parse one TOML file (at most FILE_LIMIT bytes). Raises Unreadable
    with a one-line reason for anything else: unreadable, not UTF-8, not TOML."""
    text = read_text(path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Unreadable(f"malformed TOML: {e}") from None
    except RecursionError:
        raise Unreadable("malformed TOML: arrays or tables nested too deeply") from None
    except Exception as e:  # tomllib on hostile text: e.g. ValueError for a 5000-digit integer
        raise Unreadable(f"malformed TOML: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class ConfigError:
    path: Path
    key: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}: {self.key}" if self.key else str(self.path)
        return one_line(f"{where}: {self.reason}")


@dataclass(frozen=True)
class ServiceConfig:
    """One thing a proxy serves: tailnet-side `port` (and `path`, for web
    modes) forwarded to `target`, as one `tailscale serve --MODE=PORT` does."""

    port: int          # tailnet-side port, 1-65535
    mode: str          # "http" | "https" | "tcp" | "tls-terminated-tcp"
    target: str        # http://, https://, https+insecure://, tcp://HOST:PORT, or unix:/ABS/PATH
    path: str = "/"    # mount path for http/https ("/" default); "" for tcp modes
    funnel: bool = False  # only on https, on a port in FUNNEL_PORTS


@dataclass(frozen=True)
class ProxyConfig:
    """One proxy: a tailscaled node named `hostname` serving `services`.
    `target`, `serve` and `port` are the first service's (for display and
    callers that know one service)."""

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
    services: tuple[ServiceConfig, ...] = ()  # sorted by (port, path); never empty when loaded
    # The API credential (at most one): an OAuth client secret or an API access token,
    # named by a file or an environment variable like the auth key. `api_secret` is
    # the secret itself, read once when the file loads (registered for redaction);
    # it is compared (a reload sees a rotated secret) but never fingerprinted or shown.
    oauth_client_secret_file: Path | None = None
    oauth_client_secret_env: str | None = None
    api_token_file: Path | None = None
    api_token_env: str | None = None
    api_secret: str = field(default="", repr=False)

    @property
    def embedded(self) -> bool:
        return self.login_server == EMBEDDED

    @property
    def api_kind(self) -> str | None:
        """The configured API credential: "oauth" (an OAuth client secret), "token"
        (an API access token) or None. The embedded control's own credential is
        not configured here (the fleet passes it in process)."""
        if self.oauth_client_secret_file or self.oauth_client_secret_env:
            return "oauth"
        if self.api_token_file or self.api_token_env:
            return "token"
        return None

    @property
    def has_auth_key(self) -> bool:
        """A plain auth key is configured: logins use it instead of minting one."""
        return self.auth_key_file is not None or self.auth_key_env is not None

    @property
    def local_control(self) -> bool:
        """A control on this machine (embedded or a loopback URL): tailscaled gets
        the quiet flags, because nothing it does should reach the Internet."""
        if self.embedded:
            return True
        if not self.login_server:
            return False
        try:
            host = urlsplit(self.login_server).hostname or ""
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def fingerprint(self) -> str:
        """Changes whenever anything that shapes the node changes; a changed
        fingerprint restarts the proxy and re-arms its recovery budget. What
        it serves is not part of it: a changed `services` tuple (compare them
        with ==) is applied in place, without restarting tailscaled."""
        h = hashlib.sha256()
        for f in fields(self):
            if f.name not in _NOT_FINGERPRINTED:
                h.update(f"{f.name}={getattr(self, f.name)!r};".encode())
        return h.hexdigest()[:16]

    def read_auth_key(self) -> str:
        """The secret itself; callers must never log it."""
        if self.auth_key_file is not None:
            try:
                return read_text(self.auth_key_file, KEY_LIMIT).strip()
            except Unreadable as e:
                raise LookupError(f"{self.auth_key_file}: {e}") from None
        if self.auth_key_env is not None:
            return os.environ.get(self.auth_key_env, "").strip()
        raise LookupError(f"{self.path}: no auth key configured")


_NOT_FINGERPRINTED = {"path", "services", "target", "serve", "port", "api_secret"}
_API_KEYS = ("oauth_client_secret_file", "oauth_client_secret_env", "api_token_file", "api_token_env")
_PROXY_KEYS = {"hostname", "target", "serve", "port", "login_server", "auth_key_file",
               "auth_key_env", "ephemeral", "tags", *_API_KEYS}


class _Errors:
    def __init__(self, path: Path):
        self.path = path
        self.items: list[ConfigError] = []

    def add(self, key: str | None, reason: str) -> None:
        self.items.append(ConfigError(self.path, key, reason))


def _typed(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], errs: _Errors,
           what: str, label: str | None = None) -> Any:
    """raw[key] if it is a `kind`, else None (and an error on `label`, default `key`)."""
    value = raw.get(key)
    if value is None:
        return None
    # bool is an int in Python; a port of `true` is still a mistake
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        errs.add(label or key, f"must be {what}, got {type(value).__name__} {show(value)}")
        return None
    return value


def _version(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def target_problem(target: str, tailscale_version: tuple[int, ...] | None = None) -> str | None:
    """Why `target` is not something `tailscale serve` forwards to (an
    http://, https://, https+insecure:// or tcp:// URL with a port, or
    unix:/ABSOLUTE/PATH on tailscale 1.94 or later), or None if it is one."""
    if target.startswith("unix:"):
        # tailscale serve proxies HTTP to a unix socket from 1.94 (ipn.ExpandProxyTargetValue)
        sock = target[len("unix:"):]
        if not sock.startswith("/") or not sock.isprintable() or len(os.fsencode(sock)) > 107:
            return f"{show(target)} must be unix:/ABSOLUTE/PATH of a socket (at most 107 bytes)"
        if tailscale_version is not None and tailscale_version < UNIX_TARGET_SINCE:
            return (f"unix: upstreams need tailscale {_version(UNIX_TARGET_SINCE)} or later; "
                    f"this tailscale is {_version(tailscale_version)}")
        return None
    problem = url_problem(target, TARGET_SCHEMES)
    if problem is None and urlsplit(target).scheme == "tcp" and not urlsplit(target).port:
        problem = f"{show(target)} needs a valid port (1-65535)"
    return problem


_URL_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")


def mount_problem(mount: str) -> str | None:
    """Why `mount` is not a mount path `tailscale serve --set-path` keeps as
    given ("/", "/api", "/api/"), or None if it is one."""
    if not mount.startswith("/"):
        return f"{show(mount)} must start with \"/\" (e.g. \"/api\")"
    if not _URL_PATH_RE.fullmatch(mount):
        return (f"{show(mount)} must be a plain URL path: letters, digits and -._~!$&'()*+,;=:@/ "
                "(no spaces, ?, # or %XX: mounts match the decoded path)")
    inner = mount[1:].removesuffix("/").split("/")
    if mount != "/" and any(seg in ("", ".", "..") for seg in inner):
        return f"{show(mount)} must not contain \"//\", \"/./\" or \"/../\" (tailscale refuses it)"
    return None


def parse_proxy(path: Path, raw: dict[str, Any], tailscale_version: tuple[int, ...] | None = None
                ) -> tuple[ProxyConfig | None, list[ConfigError]]:
    """Validate one parsed proxy file. Returns the config, or None and every error found.
    `tailscale_version` (e.g. (1, 78, 1)), when known, refuses what that release lacks."""
    errs = _Errors(path)
    name = path.stem
    if not _NAME_RE.fullmatch(name):
        errs.add(None, "file name must be 1-63 letters, digits, '-' or '_', starting with a letter or "
                       "digit (it names the proxy)")
    for key in sorted(set(raw) - _PROXY_KEYS):
        errs.add(show_key(key), f"unknown key (known: {', '.join(sorted(_PROXY_KEYS))})")

    hostname = _typed(raw, "hostname", str, errs, "a string")
    if hostname is None and "hostname" not in raw:
        hostname = name.replace("_", "-")
    if hostname is not None:
        hostname = hostname.lower()  # as tailscale does: "Jellyfin" is jellyfin
    if hostname is not None and not _HOST_RE.match(hostname):
        errs.add("hostname", f"{show(hostname)} is not a DNS label (a-z, 0-9, '-', at most 63)")

    login_server = _typed(raw, "login_server", str, errs, "a URL string or \"embedded\"")
    if login_server is not None and login_server != EMBEDDED:
        if url_problem(login_server, ("http", "https")):
            errs.add("login_server", f"{show(login_server)} must be \"embedded\" or an "
                                     "http(s)://HOST[:PORT] URL")
    services = _parse_services(raw, errs, login_server == EMBEDDED, tailscale_version)

    # The login: an auth key, an API credential (an OAuth client, or an access token), or both
    # an auth key and an access token (the key logs in; the token reads its expiry).
    key_key, oauth_key, token_key = (env if env in raw and file not in raw else file for file, env in (
        ("auth_key_file", "auth_key_env"), ("oauth_client_secret_file", "oauth_client_secret_env"),
        ("api_token_file", "api_token_env")))
    has_key, has_oauth, has_token = key_key in raw, oauth_key in raw, token_key in raw
    key_path = key_env = key = oauth_path = oauth_env = oauth = token_path = token_env = token = None
    if login_server == EMBEDDED:  # nothing is read: the embedded control has its own
        if has_key:
            errs.add(key_key, "not used with login_server = \"embedded\": the supervisor makes its own keys")
        if has_oauth or has_token:
            errs.add(oauth_key if has_oauth else token_key, "not used with login_server = \"embedded\": "
                     "the supervisor has its own API credential for the embedded control")
    else:
        key_path, key_env, key = _secret_pair(raw, errs, path, "auth_key_file", "auth_key_env")
        oauth_path, oauth_env, oauth = _secret_pair(raw, errs, path, "oauth_client_secret_file",
                                                    "oauth_client_secret_env")
        token_path, token_env, token = _secret_pair(raw, errs, path, "api_token_file", "api_token_env")
        if has_oauth and has_token:
            errs.add(token_key, f"give one API credential: {oauth_key} or {token_key}, not both")
        elif has_oauth and has_key:
            errs.add(key_key, f"not used with {oauth_key}: the OAuth client mints a single-use key "
                              "for each login (remove the auth key)")
        elif not (has_key or has_oauth or has_token) and "login_server" not in errs_keys(errs):
            errs.add("auth_key_file", "missing: a proxy on a real tailnet needs auth_key_file or "
                                      "auth_key_env, or an API credential (oauth_client_secret_file, "
                                      "api_token_file, or their _env forms) (or set login_server = "
                                      "\"embedded\")")
    for what, label, value in (("auth key", key_key, key), ("OAuth client secret", oauth_key, oauth),
                               ("API access token", token_key, token)):
        env = {key_key: key_env, oauth_key: oauth_env, token_key: token_env}.get(label)
        source = f"environment variable {env}" if label.endswith("_env") and env else ""
        if value is not None and (problem := _secret_problem(what, value, source)):
            errs.add(label, problem)

    ephemeral = _typed(raw, "ephemeral", bool, errs, "true or false")
    tags_raw = _typed(raw, "tags", list, errs, "a list of strings like \"tag:web\"")
    tags: tuple[str, ...] = ()
    if tags_raw is not None:
        bad = [t for t in tags_raw if not isinstance(t, str) or not _TAG_RE.match(t)]
        if bad:
            errs.add("tags", f"{show(bad)}: each tag must look like \"tag:name\"")
        else:
            tags = tuple(tags_raw)

    if oauth is not None and not tags and "tags" not in errs_keys(errs):
        errs.add("tags", f"missing: {oauth_key} mints keys, and an OAuth client's keys must be "
                         "tagged; give the tags it owns (e.g. tags = [\"tag:web\"])")

    if errs.items:
        return None, errs.items
    first = services[0]
    return ProxyConfig(
        name=name, path=path, hostname=hostname, target=first.target, serve=first.mode,
        port=first.port, login_server=login_server, auth_key_file=key_path, auth_key_env=key_env,
        ephemeral=bool(ephemeral), tags=tags, services=services,
        oauth_client_secret_file=oauth_path, oauth_client_secret_env=oauth_env,
        api_token_file=token_path, api_token_env=token_env, api_secret=oauth or token or ""), []


# What each kind of secret starts with on Tailscale's control (facts §0): a
# secret given under the wrong key is named, never shown.
_PREFIXES = {"auth key": "tskey-auth-", "OAuth client secret": "tskey-client-",
             "API access token": "tskey-api-"}
_KEY_FOR = {"auth key": "auth_key_file", "OAuth client secret": "oauth_client_secret_file",
            "API access token": "api_token_file"}


# What a secret is made of. Tailscale's keys are `tskey-KIND-ID-SECRET`
# (tailscale/tailscale client/tailscale/keys.go); headscale's pre-auth keys are
# `hskey-auth-PREFIX-SECRET` (base64url, 0.26 and later) or 48 hex characters,
# its API keys `PREFIX.SECRET` (juanfont/headscale hscontrol/db/api_key.go,
# util.GenerateRandomStringURLSafe: base64url). So: letters, digits, `_`, `-`, `.`.
_SECRET_RE = re.compile(r"[A-Za-z0-9_.-]+")


def _secret_problem(what: str, secret: str, source: str = "") -> str | None:
    """Why `secret`, given as a `what` ("auth key", "OAuth client secret", "API
    access token") from `source` (e.g. "environment variable X"), cannot be
    used, or None. Never quotes the secret: it must look like a key, at least
    events.SECRET_MIN characters (shorter ones would not be redacted) from
    _SECRET_RE's alphabet (a path, a word list or a URL is not a key)."""
    from supervisor.events import SECRET_MIN
    src = f" ({source})" if source else ""
    if not secret.isprintable() or any(c.isspace() for c in secret):
        return f"the {what}{src} has spaces or control characters inside; a secret is one word"
    for other, prefix in _PREFIXES.items():
        if other != what and secret.startswith(prefix):
            hint = (" (the supervisor then mints one single-use key per login and deletes it)"
                    if other == "OAuth client secret" else "")
            return f"this is an {other} ({prefix}...), not an {what}: give it as {_KEY_FOR[other]}{hint}"
    if what == "OAuth client secret" and "?" in secret:
        return ("the secret carries ?attributes (the CLI's form); give the bare secret: ephemeral "
                "and tags come from this file, and minted keys are always preauthorized")
    if len(secret) < SECRET_MIN:
        return (f"the {what}{src} is {len(secret)} characters; a key is at least {SECRET_MIN} "
                "(e.g. tskey-auth-...): this is not the key you meant")
    if not _SECRET_RE.fullmatch(secret):
        return (f"the {what}{src} does not look like a key: a key has only letters, digits, "
                "'_', '-' and '.' (e.g. tskey-auth-...), not a path, a list or a URL")
    return None


def _secret_pair(raw: dict[str, Any], errs: _Errors, path: Path, file_key: str, env_key: str
                 ) -> tuple[Path | None, str | None, str | None]:
    """One secret given as FILE_KEY (a path, relative to the proxy file's
    directory) or ENV_KEY (an environment variable): (path, variable, secret).
    The secret is read here, once, and registered for redaction; errors go to
    `errs` on the key concerned, and the secret is None when there is none."""
    from supervisor.events import register_secret
    file_value = _typed(raw, file_key, str, errs, "a path string")
    env_value = _typed(raw, env_key, str, errs, "an environment variable name")
    if file_value is not None and env_value is not None:
        errs.add(env_key, f"give {file_key} or {env_key}, not both")
        return None, None, None
    secret = None
    if file_value is not None:
        secret_path = _key_path(path, file_value, errs, file_key)
        if secret_path is None:
            return None, None, None
        try:
            secret = read_text(secret_path, KEY_LIMIT).strip()
        except Unreadable as e:
            errs.add(file_key, f"{secret_path}: {e}")
            return secret_path, None, None
        if not secret:
            errs.add(file_key, f"{secret_path} is empty")
        register_secret(secret)
        return secret_path, None, secret or None
    if env_value is not None:
        if not _ENV_RE.match(env_value):
            errs.add(env_key, f"{show(env_value)} is not an environment variable name "
                              "(letters, digits, '_')")
        elif not (secret := os.environ.get(env_value, "").strip()):
            errs.add(env_key, f"environment variable {env_value} is not set or empty")
        else:
            register_secret(secret)
            return None, env_value, secret
        return None, env_value, None
    return None, None, None


def _parse_services(raw: dict[str, Any], errs: _Errors, embedded: bool,
                    version: tuple[int, ...] | None) -> tuple[ServiceConfig, ...]:
    """The services a file declares: its [[serve]] tables, or the one the
    top-level target/serve/port keys make. Errors go to `errs`, each on
    `serve[N].KEY` (N counts tables from 1) or, for the one-target form, the
    top-level key; the result is sorted by (port, path) and empty if any is bad."""
    tables = raw.get("serve")
    if isinstance(tables, dict):
        errs.add("serve", "must be a mode string or [[serve]] tables; write [[serve]] "
                          "(an array of tables), not [serve]")
        return ()
    if not isinstance(tables, list):  # the one-target form
        if "target" not in raw:
            errs.add("target", "missing (e.g. target = \"http://127.0.0.1:8096\", or [[serve]] tables)")
            return ()
        old = {k: raw[k] for k in ("target", "serve", "port") if k in raw}
        if "serve" in old and not isinstance(old["serve"], str):
            errs.add("serve", "must be a mode string or [[serve]] tables, got "
                              f"{type(old['serve']).__name__} {show(old['serve'])}")
            del old["serve"]
        one = _parse_service({"mode" if k == "serve" else k: v for k, v in old.items()},
                             lambda k: "serve" if k == "mode" else k, errs, embedded, version)
        return (one,) if one else ()

    for key in ("target", "port"):
        if key in raw:
            errs.add(key, "give top-level target/serve/port (one service) or [[serve]] tables, "
                          "not both")
            break
    if not tables:
        errs.add("serve", "no services: give at least one [[serve]] table")
        return ()
    if len(tables) > MAX_SERVICES:
        errs.add("serve", f"{len(tables)} [[serve]] tables; at most {MAX_SERVICES} per proxy")
        return ()
    found: list[tuple[int, ServiceConfig]] = []
    for i, table in enumerate(tables, 1):
        where = f"serve[{i}]"
        if not isinstance(table, dict):
            errs.add(where, f"must be a table ({', '.join(SERVICE_KEYS)}), "
                            f"got {type(table).__name__} {show(table)}")
            continue
        one = _parse_service(table, lambda k, w=where: f"{w}.{k}", errs, embedded, version)
        if one is not None:
            found.append((i, one))

    # Across services: what one tailnet port can carry.
    first_on_port: dict[int, tuple[int, ServiceConfig]] = {}
    mounts: dict[tuple[int, str], int] = {}
    ok = len(found) == len(tables)
    for i, svc in found:
        where = f"serve[{i}]"
        j, other = first_on_port.setdefault(svc.port, (i, svc))
        web, other_web = svc.mode in WEB_MODES, other.mode in WEB_MODES
        if web != other_web:
            errs.add(f"{where}.mode", f"port {svc.port} already carries {other.mode} (serve[{j}]); "
                                      "a port carries web (http, https) or TCP (tcp, "
                                      "tls-terminated-tcp), never both")
        elif web and svc.mode != other.mode:
            errs.add(f"{where}.mode", f"port {svc.port} is {other.mode} in serve[{j}]; one port "
                                      "serves http or https, not both")
        elif (svc.port, svc.path) in mounts:
            what = f"path {svc.path!r} on port {svc.port}" if web else f"port {svc.port}"
            errs.add(f"{where}.{'path' if web else 'port'}",
                     f"{what} is already served by serve[{mounts[svc.port, svc.path]}]")
        elif svc.funnel != other.funnel:
            errs.add(f"{where}.funnel", f"port {svc.port} has funnel = {str(other.funnel).lower()} "
                                        f"in serve[{j}]; Funnel is on or off for a whole port")
        else:
            mounts[svc.port, svc.path] = i
            continue
        ok = False
    if not ok:
        return ()
    return tuple(sorted((svc for _, svc in found), key=lambda s: (s.port, s.path)))


def _parse_service(t: dict[str, Any], label: Callable[[str], str], errs: _Errors, embedded: bool,
                   version: tuple[int, ...] | None) -> ServiceConfig | None:
    """One service from its keys (port, mode, target, path, funnel), or None
    after adding its errors; `label(key)` names a key in an error line."""
    before = len(errs.items)
    for key in sorted(set(t) - set(SERVICE_KEYS)):
        errs.add(label(show_key(key)), f"unknown key (known: {', '.join(sorted(SERVICE_KEYS))})")

    target = _typed(t, "target", str, errs, "a URL string", label("target"))
    scheme = None
    if "target" not in t:
        errs.add(label("target"), "missing (e.g. target = \"http://127.0.0.1:8096\")")
    elif target is not None:
        problem = target_problem(target, version)
        if problem:
            errs.add(label("target"), problem)
        else:
            scheme = "unix" if target.startswith("unix:") else urlsplit(target).scheme

    mode = _typed(t, "mode", str, errs, "a string", label("mode"))
    if mode is None and "mode" not in t and scheme:
        mode = "tcp" if scheme == "tcp" else "http"
    if mode is not None and mode not in SERVE_MODES:
        errs.add(label("mode"), f"{show(mode)} must be one of {', '.join(SERVE_MODES)}")
        mode = None
    if mode and scheme and (mode in TCP_MODES) != (scheme == "tcp"):
        errs.add(label("mode"), f"{mode} does not fit target {show(target)} (tcp and "
                                "tls-terminated-tcp take tcp://HOST:PORT; http and https take "
                                "http://, https://, https+insecure:// or unix:/PATH)")
    if mode in ("https", "tls-terminated-tcp") and embedded:
        errs.add(label("mode"), f"\"{mode}\" needs a tailnet that issues certificates; the "
                                "embedded control does not (use "
                                f"{label('mode').rpartition('.')[2]} = "
                                f"\"{'http' if mode == 'https' else 'tcp'}\")")

    port = _typed(t, "port", int, errs, "an integer", label("port"))
    if port is None and "port" not in t and mode and scheme:
        port = {"http": 80, "https": 443}.get(mode) or urlsplit(target).port
    if port is not None and not 1 <= port <= 65535:
        errs.add(label("port"), f"{show(port)} is not a port (1-65535)")

    mount = None
    if "path" in t and mode in TCP_MODES:
        errs.add(label("path"), f"only for http and https services; a {mode} port has no paths")
    else:
        mount = _typed(t, "path", str, errs, "a string like \"/api\"", label("path"))
        if mount is not None and (problem := mount_problem(mount)):
            errs.add(label("path"), problem)

    funnel = _typed(t, "funnel", bool, errs, "true or false", label("funnel"))
    if funnel and embedded:
        errs.add(label("funnel"), "Funnel needs Tailscale's ingress and certificates; the "
                                  "embedded control has neither")
    elif funnel and mode and mode != "https":
        errs.add(label("funnel"), f"only on https services (this one is {mode})")
    elif funnel and isinstance(port, int) and 1 <= port <= 65535 and port not in FUNNEL_PORTS:
        errs.add(label("funnel"), f"port {port} cannot be funneled; tailscale allows "
                                  f"{', '.join(map(str, FUNNEL_PORTS))}")

    if len(errs.items) > before or not (mode and port and target):
        return None
    return ServiceConfig(port=port, mode=mode, target=target,
                         path="" if mode in TCP_MODES else (mount or "/"), funnel=bool(funnel))


def parse_version(text: str) -> tuple[int, ...] | None:
    """`tailscale version`'s first line ("1.78.1-t8903926f7-...") as (1, 78, 1)."""
    m = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in m.groups()) if m else None


def errs_keys(errs: _Errors) -> set[str | None]:
    return {e.key for e in errs.items}


def _expand(text: str) -> Path | None:
    """`text` as a path with ~ expanded, or None if it cannot be one
    (empty, a NUL, "~nosuchuser/...")."""
    if not text or "\0" in text:
        return None
    try:
        return Path(text).expanduser()
    except RuntimeError:  # no such user, or no home
        return None


def _key_path(path: Path, key_file: str, errs: _Errors, label: str = "auth_key_file") -> Path | None:
    """A secret's file (`label`, e.g. auth_key_file) as an absolute path
    (relative to the proxy file's directory)."""
    key_path = _expand(key_file)
    try:
        if key_path is not None and not key_path.is_absolute():
            key_path = (path.parent / key_path).resolve()
    except (RuntimeError, OSError, ValueError):  # a symlink loop; a lone surrogate from argv
        key_path = None
    if key_path is None:
        errs.add(label, f"{show(key_file)} is not a usable path")
    return key_path


def load_proxy_file(path: Path, tailscale_version: tuple[int, ...] | None = None
                    ) -> tuple[ProxyConfig | None, list[ConfigError]]:
    """Read and validate one proxy file: (config, []) or (None, errors); never raises.
    A file that cannot be read or parsed is one error without a key."""
    try:
        raw = read_toml(path)
    except Unreadable as e:
        return None, [ConfigError(path, None, str(e))]
    return parse_proxy(path, raw, tailscale_version)


def load_dir(config_dir: Path, incumbents: dict[str, str] | None = None,
             tailscale_version: tuple[int, ...] | None = None, trust: Policy | None = None
             ) -> tuple[list[ProxyConfig], list[ConfigError]]:
    """Load every *.toml in `config_dir`.

    Root trusts only root (trust.py, `trust` default: strict): a config dir
    others can write is one error for the dir and loads nothing; a proxy file,
    or a key file it names, that others can write is an error on that file.

    Hostnames must be unique: the proxy already running with a hostname
    (`incumbents`: hostname -> proxy name) keeps it; otherwise the file that
    sorts first does, and the later one is refused.
    """
    try:
        paths = sorted(p for p in config_dir.iterdir() if p.suffix == ".toml" and p.is_file())
    except OSError as e:
        return [], [ConfigError(config_dir, None, f"cannot read config dir: {e.strerror or e}")]
    trust = trust if trust is not None else Policy()
    if (why := trust.problem(config_dir)) is not None:
        return [], [ConfigError(config_dir, None, why)]
    loaded: list[ProxyConfig] = []
    errors: list[ConfigError] = []
    for p in paths:
        try:
            cfg, errs = load_proxy_file(p, tailscale_version)
            untrusted = [ConfigError(p, None, why) for why in [trust.problem(p)] if why] + \
                [ConfigError(p, key, why) for key, why in (trust.key_problems(cfg) if cfg else [])]
            if untrusted:
                cfg, errs = None, errs + untrusted
        except Exception as e:  # a bug here must cost this file, never the running fleet
            cfg, errs = None, [ConfigError(p, None, f"internal error while checking this file: {e!r}")]
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
            errors.append(ConfigError(cfg.path, "hostname", f"{show(cfg.hostname)} is already used "
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
    embedded_peers: str = "clients"     # the embedded control's peers policy: "clients" (proxies
                                        # see client nodes, not each other) or "all"
    reconcile_period: float = 30.0      # seconds between observations of a quiet node
    memory_period: float = 60.0         # seconds between samples of the children's PSS/USS/CPU (memory.py); 0: off
    metrics: str = ""                   # "127.0.0.1:9101": serve Prometheus text there (loopback)
    webhooks: tuple[Any, ...] = ()      # [[webhook]] tables: url, format, events
    trust_acl_paths: tuple[Path, ...] = ()  # ACL file systems: owner/mode not checked below these
    api_base: str = "https://api.tailscale.com"  # the Tailscale v2 API, for proxies with an API credential
    tailscaled_gogc: str = ""           # GOGC for every tailscaled; "": Go's default (100). README "Go runtime knobs"
    tailscaled_gomemlimit: str = ""     # GOMEMLIMIT for every tailscaled, e.g. "16MiB"; "": no limit

    def tailscaled_go_env(self) -> dict[str, str]:
        """Go's runtime knobs for tailscaled_command(go_env=...): {"GOGC": ..., "GOMEMLIMIT": ...},
        "" where Go's default applies (tailscaled_command leaves those out)."""
        return {"GOGC": self.tailscaled_gogc, "GOMEMLIMIT": self.tailscaled_gomemlimit}


_SETTINGS_TYPES: dict[str, tuple[type, ...]] = {
    "tailscale": (str,), "tailscaled": (str,), "healthy_period": (int, float),
    "start_limit": (int,), "start_window": (int, float), "backoff_initial": (int, float),
    "backoff_max": (int, float), "stop_grace": (int, float), "start_timeout": (int, float),
    "hang_timeout": (int, float), "embedded_port": (int,), "metrics": (str,),
    "reconcile_period": (int, float), "api_base": (str,), "embedded_peers": (str,),
    "memory_period": (int, float), "tailscaled_gogc": (int, str), "tailscaled_gomemlimit": (int, str),
}


def api_base_problem(base: str) -> str | None:
    """Why `base` cannot be the API base URL, or None: https://HOST[:PORT][/PREFIX],
    or http:// to a loopback address only (the API credential would cross the
    network in clear), with no user, query or fragment."""
    if "@" in base:  # never echo it: it may be a password
        return "must not carry USER:PASSWORD@ (the API credential is the only secret it needs)"
    problem = url_problem(base, ("http", "https"))
    if problem:
        return problem
    parts = urlsplit(base)
    if parts.query or parts.fragment or "?" in base or "#" in base:
        return f"{show(base)} must not carry a ?query or #fragment"
    if parts.path.rstrip("/").endswith("/api/v2"):  # the supervisor adds /api/v2/... itself
        return (f"{show(base)}: give the base without /api/v2 (e.g. https://api.tailscale.com): "
                "the supervisor adds the API's paths itself")
    if parts.scheme == "http":
        from supervisor.tsapi import loopback_host  # the client refuses the same
        if not loopback_host(parts.hostname):
            return (f"{show(base)} must be https:// (http:// only to a loopback address: the API "
                    "credential would cross the network in clear)")
    return None


class SettingsError(Exception):
    """Everything wrong with the settings file: `lines`, one problem each, each
    starting with the file's path; str() joins them with newlines."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = [one_line(line) for line in lines]
        super().__init__("\n".join(self.lines))


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def load_settings(path: Path | None) -> Settings:
    """Read ts-supervisor.toml. A missing default file means defaults; a
    missing file named explicitly, or any bad key, is an error.
    Raises SettingsError (one line per problem), never anything else."""
    if path is None:
        return Settings()
    try:
        raw = read_toml(path)
    except Unreadable as e:
        raise SettingsError([f"{path}: {e}"]) from None
    problems = []
    values: dict[str, Any] = {}
    if "webhook" in raw:
        from supervisor.notify import parse_webhooks
        values["webhooks"], bad = parse_webhooks(raw.pop("webhook"), str(path))
        problems += bad
    if "trust_acl_paths" in raw:
        values["trust_acl_paths"], bad = parse_acl_paths(raw.pop("trust_acl_paths"), str(path))
        problems += bad
    if isinstance(raw.get("metrics"), str):
        host, _, port = raw["metrics"].rpartition(":")
        try:
            ok = (ipaddress.ip_address(host.strip("[]")).is_loopback and "%" not in host
                  and port.isascii() and port.isdigit() and int(port) < 65536)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"{path}: metrics: must be a loopback HOST:PORT such as 127.0.0.1:9101")
    if isinstance(raw.get("api_base"), str) and (problem := api_base_problem(raw["api_base"])):
        problems.append(f"{path}: api_base: {problem}")
    if isinstance(raw.get("embedded_peers"), str) and raw["embedded_peers"] not in PEER_POLICIES:
        problems.append(f"{path}: embedded_peers: {show(raw['embedded_peers'])} must be \"clients\" "
                        "(proxies see client nodes, not each other) or \"all\" (every node sees every node)")
    for key, knob in (("tailscaled_gogc", "GOGC"), ("tailscaled_gomemlimit", "GOMEMLIMIT")):
        if key in raw and isinstance(raw[key], (int, str)) and not isinstance(raw[key], bool):
            from supervisor.tailscale import go_knob_problem
            value = raw.pop(key)
            if str(value) and (problem := go_knob_problem(knob, str(value))):  # "": Go's default
                problems.append(f"{path}: {key}: {show(value)} {problem}")
            else:
                values[key] = str(value)
    for key, value in raw.items():
        kinds = _SETTINGS_TYPES.get(key)
        if kinds is None:
            known = ", ".join(sorted([*_SETTINGS_TYPES, "webhook", "trust_acl_paths"]))
            problems.append(f"{path}: {show_key(key)}: unknown setting (known: {known})")
        elif not isinstance(value, kinds) or isinstance(value, bool):
            problems.append(f"{path}: {key}: must be {' or '.join(k.__name__ for k in kinds)}, "
                            f"got {show(value)}")
        elif key in ("tailscale", "tailscaled"):
            values[key] = _expand(value)
            if values[key] is None:
                problems.append(f"{path}: {key}: {show(value)} is not a usable path")
        elif isinstance(value, str):  # metrics, api_base and embedded_peers, checked above
            values[key] = value.rstrip("/") if key == "api_base" else value
        elif value < 0:
            problems.append(f"{path}: {key}: must not be negative")
        elif not _finite(value):
            problems.append(f"{path}: {key}: must be a finite number, got {show(value)}")
        elif key == "embedded_port" and value > 65535:
            problems.append(f"{path}: {key}: {value} is not a port (0-65535)")
        else:
            values[key] = value
    if problems:
        raise SettingsError(problems)
    return Settings(**values)
