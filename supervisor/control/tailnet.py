"""The tailnet the embedded control keeps: auth keys, nodes, and every decision.

Plain synchronous code with no I/O but one JSON file, so the protocol layer
(server.py) stays a thin translator. Register decisions follow hosted
control as the facts file records them (§2.1, §4, §5): unknown or revoked
keys get `invalid key: API key does not exist`, expired or spent one-off keys
`invalid key: API key <id> not valid`, an unknown node key without an auth
key gets an AuthURL, a known node whose key expired gets `NodeKeyExpired`.
Secrets are stored only as SHA-256 hashes, so the state file leaks nothing.

Owners and capabilities follow hosted control too. A node registered with an
untagged key is owned by the key's user (`alice@example.com`; the tailnet's
`admin@DOMAIN` when the key names none); a tagged node by `tagged-devices`.
`tailscale serve` sends identity headers only for user-owned peers.
Capabilities (`https`, `funnel`, `funnel-ports`) are granted per node or as a
tailnet-wide default; none are granted unless an admin op says so.

Everything that comes in is checked by one set of rules: `state.json` on
load (any other shape is one StateError line naming the file, key and
reason) and the fields of register/map requests (ValueError naming the
field), so nothing a node sends can make the state unloadable or reach its
peers' netmaps in a type tailscaled cannot decode.
"""
from __future__ import annotations

import calendar
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import time
from collections import deque
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

ZERO_NODE_KEY = "nodekey:" + "00" * 32
GO_ZERO_TIME = "0001-01-01T00:00:00Z"
DEFAULT_NODE_KEY_LIFETIME = 180 * 86400.0  # hosted control's default
NOT_EXIST = "invalid key: API key does not exist"
V4_NET = ipaddress.ip_network("100.64.0.0/10")
V6_NET = ipaddress.ip_network("fd7a:115c:a1e0::/48")
TAGGED_DEVICES = "tagged-devices"  # the login hosted control gives the owner of every tagged node
CAP_HTTPS = "https"  # tailcfg.CapabilityHTTPS
CAP_FUNNEL = "funnel"  # tailcfg.NodeAttrFunnel
CAP_FUNNEL_PORTS = "https://tailscale.com/cap/funnel-ports"  # tailcfg.CapabilityFunnelPorts, + ?ports=
NO_CAPS: dict[str, Any] = {"https": False, "funnel": False, "funnel_ports": ""}


def rfc3339(t: float | None) -> str:
    if t is None:
        return GO_ZERO_TIME
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_rfc3339(text: str | None) -> float | None:
    """Seconds since the epoch, or None for Go's zero time (or nothing)."""
    if not text or text.startswith("0001-01-01"):
        return None
    m = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        raise ValueError(f"not an RFC 3339 time: {text[:40]!r}")
    y, mo, d, h, mi, s = (int(x) for x in m.groups()[:6])
    t = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) + float(m.group(7) or 0)
    tz = m.group(8)
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        t -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return t


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def dns_label(hostname: str) -> str:
    """A hostname as hosted control turns it into a MagicDNS label."""
    label = re.sub(r"[^a-z0-9-]+", "-", hostname.lower()).strip("-")[:63]
    return label or "node"


@dataclass
class AuthKey:
    id: str
    secret_hash: str
    reusable: bool = False
    ephemeral: bool = False
    tags: list[str] = field(default_factory=list)
    created: float = 0.0
    expires: float | None = None
    revoked: bool = False
    uses: int = 0
    user: str = ""  # login of the untagged nodes' owner; "" is the tailnet's default user

    def state(self, now: float) -> str:
        if self.revoked:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        if not self.reusable and self.uses:
            return "used"
        return "valid"

    def public(self, now: float) -> dict[str, Any]:
        d = asdict(self)
        del d["secret_hash"]
        d["state"] = self.state(now)
        return d


@dataclass
class Node:
    id: int
    node_key: str
    machine_key: str
    hostname: str
    name: str  # unique DNS label
    ipv4: str
    ipv6: str
    key_id: str = ""
    ephemeral: bool = False
    tags: list[str] = field(default_factory=list)
    created: float = 0.0
    key_expiry: float | None = None
    disco_key: str = ""
    endpoints: list[str] = field(default_factory=list)
    home_derp: int = 0
    hostinfo: dict[str, Any] = field(default_factory=dict)
    last_seen: float | None = None
    user: str = ""  # the owner's login when untagged; "" is the tailnet's default user
    caps: dict[str, Any] | None = None  # granted capabilities (NO_CAPS shape); None: the tailnet default

    def expired(self, now: float) -> bool:
        return self.key_expiry is not None and now >= self.key_expiry


@dataclass
class RegisterResult:
    """What to answer a register with; `response` is a tailcfg.RegisterResponse."""

    response: dict[str, Any]
    node: Node | None = None
    wait_followup: bool = False  # hold the answer: an AuthURL nobody will visit


class AdminError(Exception):
    """An admin request naming something that does not exist, or bad arguments."""


class StateError(ValueError):
    """`state.json` unreadable or of the wrong shape: one line naming the file, key and reason."""


# -- checking what comes in: state.json and request fields ---------------------------------
# Each check returns the value (normalised) or raises ValueError(reason). The
# same checks guard requests, so nothing a node sends can make the state unloadable.

MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the last time rfc3339 can write
MAX_NODE_ID = V4_NET.num_addresses - 1  # every id has an address in V4_NET
MAX_KEY_LIFETIME = 100 * 365 * 86400.0
MAX_COUNT = 2**53  # exact in every JSON reader
TAG = r"tag:[a-z0-9][a-z0-9-]*"
USER_LOGIN = r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,190}"
NODE_KEY = r"nodekey:[0-9a-f]{64}"
DISCO_KEY = r"discokey:[0-9a-f]{64}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _integer(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:  # true/false are not integers here
            raise ValueError(f"want an integer {lo}..{hi}, got {_short(v)}")
        return v
    return check


def _flag(v: Any) -> bool:
    if type(v) is not bool:
        raise ValueError(f"want true or false, got {_short(v)}")
    return v


def _time(v: Any) -> float:
    if type(v) not in (int, float) or not 0 <= v <= MAX_TIME:  # NaN fails the range too
        raise ValueError(f"want seconds since 1970 (up to year 9999), got {_short(v)}")
    return float(v)


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def _text(pattern: str = r"(?s).*", what: str = "a string") -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or not re.fullmatch(pattern, v):
            raise ValueError(f"want {what}, got {_short(v)}")
        return v
    return check


def _list_of(check: Callable[[Any], Any], what: str, limit: int = 1024) -> Callable[[Any], list]:
    def check_list(v: Any) -> list:
        if not isinstance(v, list) or len(v) > limit:
            raise ValueError(f"want a list of {what}, got {_short(v)}")
        try:
            return [check(x) for x in v]
        except ValueError:
            raise ValueError(f"want a list of {what}, got {_short(v)}") from None
    return check_list


def _address(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if isinstance(v, str) and re.fullmatch(r"[0-9a-f.:]+", v):
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(v) in net:
                    return str(ipaddress.ip_address(v))
        raise ValueError(f"want an address in {net}, got {_short(v)}")
    return check


def _object(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"want an object, got {_short(v)}")
    return v


def _hostinfo(v: Any) -> dict[str, Any]:
    return _slim_hostinfo(_object(v))


def _ports(v: Any) -> str:
    """Funnel ports as tailscale's CheckFunnelPort reads them: "443,8443,10000-10010" from
    that string or a list of port numbers and "FIRST-LAST" strings; "" (none) for null or []."""
    if v is None or v == "":
        return ""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > 64:
        raise ValueError(f"want ports like [443, 8443, \"10000-10010\"], got {_short(v)}")
    out = []
    for item in items:
        text = str(item) if type(item) is int else item
        m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", text) if isinstance(text, str) else None
        first, last = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"want a port 1..65535 or a range FIRST-LAST, got {_short(item)}")
        out.append(text)
    return ",".join(out)


def _caps(v: Any) -> dict[str, Any]:
    """A capability grant, normalised to the NO_CAPS shape; absent keys are not granted."""
    v = _object(v)
    for name in v:
        if name not in NO_CAPS:
            raise ValueError(f"unknown capability {_short(name)}: want https, funnel, funnel_ports")
    out = {}
    for name, check in (("https", _flag), ("funnel", _flag), ("funnel_ports", _ports)):
        try:
            out[name] = check(v.get(name, NO_CAPS[name]))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return out


def _field(req: dict[str, Any], name: str, check: Callable[[Any], Any]) -> Any:
    """A request field checked, None when absent or null (Go's zero value)."""
    value = req.get(name)
    if value is None:
        return None
    try:
        return check(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


_TAGS = _list_of(_text(TAG, "tag:name"), "tag:name strings")
_USER = _text(f"|{USER_LOGIN}", "a login like alice@example.com")
_KEY_FIELDS: dict[str, Callable[[Any], Any]] = {
    "id": _text(r"[A-Za-z0-9_-]{1,64}", "a key id"), "secret_hash": _text(r"[0-9a-f]{64}", "a SHA-256 hex"),
    "reusable": _flag, "ephemeral": _flag, "tags": _TAGS, "created": _time,
    "expires": _optional(_time), "revoked": _flag, "uses": _integer(0, MAX_COUNT), "user": _USER}
_NODE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "id": _integer(1, MAX_NODE_ID), "node_key": _text(NODE_KEY, "nodekey:<64 hex>"),
    "machine_key": _text(r"mkey:[0-9a-f]{64}", "mkey:<64 hex>"), "hostname": _text(),
    "name": _text(r"[a-z0-9-]+", "a DNS label"), "ipv4": _address(V4_NET), "ipv6": _address(V6_NET),
    "key_id": _text(), "ephemeral": _flag, "tags": _TAGS, "created": _time,
    "key_expiry": _optional(_time), "disco_key": _text(f"|{DISCO_KEY}", "discokey:<64 hex> or empty"),
    "endpoints": _list_of(_text(), "strings"), "home_derp": _integer(0, 2**31 - 1),
    "hostinfo": _hostinfo, "last_seen": _optional(_time), "user": _USER, "caps": _optional(_caps)}


def _record(cls: type, checks: dict[str, Callable[[Any], Any]], where: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: want an object, got {_short(raw)}")
    for name in raw:
        if name not in checks:
            raise ValueError(f"{where}: unknown key {_short(name)}")
    for f in fields(cls):
        if f.name not in raw and f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{where}.{f.name}: missing")
    values = {}
    for name, value in raw.items():
        try:
            values[name] = checks[name](value)
        except ValueError as e:
            raise ValueError(f"{where}.{name}: {e}") from None
    return cls(**values)


def _parse_state(raw: Any) -> dict[str, Any]:
    """The fields of a state document, checked; ValueError("where: reason") otherwise."""
    if not isinstance(raw, dict):
        raise ValueError(f"want a JSON object, got {_short(raw)}")
    checks = {"server_private": _text(r"|[0-9a-f]{64}", "64 hex digits"), "port": _integer(0, 65535),
              "next_node_id": _integer(1, MAX_NODE_ID + 1), "next_key_id": _integer(1, MAX_COUNT),
              "keys": _list_of(lambda v: v, "objects", MAX_COUNT),
              "nodes": _list_of(lambda v: v, "objects", MAX_COUNT), "default_caps": _caps}
    defaults: dict[str, Any] = {"server_private": "", "port": 0, "next_node_id": 1, "next_key_id": 1,
                                "keys": [], "nodes": [], "default_caps": NO_CAPS}
    state = {}
    for name, check in checks.items():
        try:
            state[name] = check(raw.get(name, defaults[name]))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    state["keys"] = [_record(AuthKey, _KEY_FIELDS, f"keys[{i}]", k) for i, k in enumerate(state["keys"])]
    state["nodes"] = [_record(Node, _NODE_FIELDS, f"nodes[{i}]", n) for i, n in enumerate(state["nodes"])]
    for what, items, ident in (("keys", state["keys"], "id"), ("nodes", state["nodes"], "id"),
                               ("nodes", state["nodes"], "node_key")):
        seen: set[Any] = set()
        for i, item in enumerate(items):
            value = getattr(item, ident)
            if value in seen:
                raise ValueError(f"{what}[{i}].{ident}: {_short(value)} appears twice")
            seen.add(value)
    top = max((n.id for n in state["nodes"]), default=0)
    if state["next_node_id"] <= top:
        raise ValueError(f"next_node_id: {state['next_node_id']} is not above node id {top}")
    return state


class Tailnet:
    """Keys and nodes, persisted in `state.json`; `on_change` hears about peer changes.
    StateError from the constructor if the file is there but not a state this control wrote."""

    def __init__(self, path: Path, *, domain: str = "tailnet.test",
                 now: Callable[[], float] = time.time,
                 on_change: Callable[[str, Node], None] | None = None) -> None:
        self.path = path
        self.domain = domain
        self.now = now
        self.on_change = on_change or (lambda kind, node: None)
        self.keys: dict[str, AuthKey] = {}
        self.nodes: dict[int, Node] = {}
        self.by_node_key: dict[str, Node] = {}
        self.next_node_id = 1
        self.next_key_id = 1
        self.server_private = ""  # hex; the control's Noise key survives restarts
        self.port = 0  # and so does its port: nodes keep the login URL in their state
        self.default_caps: dict[str, Any] = dict(NO_CAPS)  # for nodes without a grant of their own
        self.events: deque[dict[str, Any]] = deque(maxlen=20000)
        self._load()

    # -- persistence ---------------------------------------------------------

    def _load(self) -> None:
        """Read `state.json`, if there is one; StateError if it is not a state this control wrote."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as e:
            raise StateError(f"{self.path}: cannot read control state: {_one_line(e)}") from None
        try:
            state = _parse_state(raw)
        except ValueError as e:
            raise StateError(f"{self.path}: {e}") from None
        self.server_private, self.port = state["server_private"], state["port"]
        self.next_node_id, self.next_key_id = state["next_node_id"], state["next_key_id"]
        self.default_caps = state["default_caps"]
        self.keys = {k.id: k for k in state["keys"]}
        for node in state["nodes"]:
            self.nodes[node.id] = node
            self.by_node_key[node.node_key] = node

    def save(self) -> None:
        data = {"server_private": self.server_private, "port": self.port, "next_node_id": self.next_node_id,
                "next_key_id": self.next_key_id, "default_caps": self.default_caps,
                "keys": [asdict(k) for k in self.keys.values()],
                "nodes": [asdict(n) for n in self.nodes.values()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- the events log ------------------------------------------------------

    def event(self, kind: str, **detail: Any) -> dict[str, Any]:
        """Record a control decision with a monotonic time (benchmarks diff against it)."""
        ev = {"t": time.monotonic(), "wall": self.now(), "kind": kind, **detail}
        self.events.append(ev)
        return ev

    def events_since(self, since: float = 0.0) -> list[dict[str, Any]]:
        return [e for e in self.events if e["t"] > since]

    # -- keys ----------------------------------------------------------------

    def create_key(self, *, reusable: bool = False, ephemeral: bool = False,
                   expiry: float | None = 90 * 86400.0, tags: list[str] | None = None,
                   user: str = "") -> tuple[AuthKey, str]:
        """A new key and its secret; only the hash is kept. `expiry`: seconds from now
        (None: never). `user`: the login that owns the key's nodes ("" the default user);
        a tagged key's nodes are owned by tagged-devices, so it takes no user.
        AdminError for a bad tag, user or expiry."""
        for t in tags or []:
            if not isinstance(t, str) or not re.fullmatch(TAG, t):
                raise AdminError(f"bad tag {_short(t)}: want tag:name")
        if not isinstance(user, str) or user and not re.fullmatch(USER_LOGIN, user):
            raise AdminError(f"bad user {_short(user)}: want a login like alice@example.com")
        if user and tags:
            raise AdminError(f"a tagged key's nodes are owned by {TAGGED_DEVICES}: "
                             "give tags or a user, not both")
        if expiry is not None and not (isinstance(expiry, (int, float)) and 0 < expiry <= MAX_KEY_LIFETIME):
            raise AdminError(f"bad expiry {_short(expiry)}: want seconds, at most {MAX_KEY_LIFETIME:.0f}")
        kid = f"k{self.next_key_id:04d}{secrets.token_hex(3)}"
        self.next_key_id += 1
        secret = f"tskey-auth-{kid}-{secrets.token_hex(16)}"
        now = self.now()
        key = AuthKey(kid, _hash_secret(secret), reusable, ephemeral, list(tags or []), now,
                      None if expiry is None else now + expiry, user=user)
        self.keys[kid] = key
        self.save()
        self.event("key_created", key=kid, reusable=reusable, ephemeral=ephemeral, user=user)
        return key, secret

    def _key(self, kid: str) -> AuthKey:
        try:
            return self.keys[kid]
        except KeyError:
            raise AdminError(f"no key {kid}") from None

    def revoke_key(self, kid: str) -> AuthKey:
        key = self._key(kid)
        key.revoked = True
        self.save()
        self.event("key_revoked", key=kid)
        return key

    def expire_key(self, kid: str) -> AuthKey:
        key = self._key(kid)
        key.expires = self.now()
        self.save()
        self.event("key_expired", key=kid)
        return key

    def find_key(self, secret: str) -> AuthKey | None:
        h = _hash_secret(secret)
        return next((k for k in self.keys.values() if k.secret_hash == h), None)

    # -- nodes ---------------------------------------------------------------

    def node(self, node_id: int) -> Node:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise AdminError(f"no node {node_id}") from None

    def _unique_name(self, hostname: str, node: Node | None = None) -> str:
        base = dns_label(hostname)
        taken = {n.name for n in self.nodes.values() if n is not node}
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}-{i}"
        return name

    def _addresses(self, node_id: int) -> tuple[str, str]:
        v4 = V4_NET.network_address + node_id
        v6 = V6_NET.network_address + (int(v4) & 0xFFFFFFFF)
        if v4 not in V4_NET:
            raise AdminError("address pool exhausted")
        return str(v4), str(v6)

    def fqdn(self, node: Node) -> str:
        return f"{node.name}.{self.domain}."

    def delete_node(self, node_id: int, reason: str = "node_deleted") -> Node:
        node = self.node(node_id)
        del self.nodes[node_id]
        self.by_node_key.pop(node.node_key, None)
        self.save()
        self.event(reason, node=node.id, hostname=node.name)
        self.on_change("removed", node)
        return node

    def expire_node(self, node_id: int) -> Node:
        node = self.node(node_id)
        node.key_expiry = self.now() - 1
        self.save()
        self.event("node_expired", node=node.id, hostname=node.name)
        self.on_change("changed", node)
        return node

    def public_node(self, node: Node, online: bool) -> dict[str, Any]:
        """A node as the admin API shows it."""
        return {"id": node.id, "hostname": node.hostname, "name": node.name,
                "addresses": [node.ipv4, node.ipv6], "node_key": node.node_key,
                "key_id": node.key_id, "ephemeral": node.ephemeral, "tags": node.tags,
                "user": self.owner(node), "caps": self.caps(node), "caps_inherited": node.caps is None,
                "created": node.created, "key_expiry": node.key_expiry,
                "expired": node.expired(self.now()), "online": online, "last_seen": node.last_seen}

    # -- users ---------------------------------------------------------------

    @property
    def default_user(self) -> str:
        return "admin@" + self.domain

    def owner(self, node: Node) -> str:
        """The login that owns a node: tagged-devices for a tagged one (as hosted control)."""
        return TAGGED_DEVICES if node.tags else node.user or self.default_user

    def profile(self, login: str) -> dict[str, Any]:
        """The tailcfg.UserProfile of a login. IDs derive from the login (the default user
        is 1), so users need no state of their own."""
        if login == self.default_user:
            uid, name = 1, "Admin"
        else:
            uid = 2 + int.from_bytes(hashlib.sha256(login.encode()).digest()[:6], "big")
            name = ("Tagged Devices" if login == TAGGED_DEVICES
                    else " ".join(w.capitalize() for w in re.split(r"[._+-]+", login.split("@")[0]) if w))
        return {"ID": uid, "LoginName": login, "DisplayName": name or login}

    # -- capabilities --------------------------------------------------------

    def caps(self, node: Node) -> dict[str, Any]:
        """What a node is granted (NO_CAPS shape): its own grant, else the tailnet default."""
        return dict(node.caps if node.caps is not None else self.default_caps)

    def cap_map(self, node: Node) -> dict[str, None]:
        """tailcfg.Node.CapMap for the node itself: the granted capabilities, no values."""
        caps = self.caps(node)
        out: dict[str, None] = {}
        if caps["https"]:
            out[CAP_HTTPS] = None
        if caps["funnel"]:
            out[CAP_FUNNEL] = None
        if caps["funnel_ports"]:
            out[f"{CAP_FUNNEL_PORTS}?ports={caps['funnel_ports']}"] = None
        return out

    def cert_domains(self, node: Node) -> list[str]:
        """DNSConfig.CertDomains: the node's FQDN (no trailing dot) once HTTPS is granted."""
        return [self.fqdn(node).rstrip(".")] if self.caps(node)["https"] else []

    def set_caps(self, node_id: int | None, caps: dict[str, Any] | None) -> list[Node]:
        """Grant exactly `caps` ({"https": bool, "funnel": bool, "funnel_ports": [443, "8000-8010"]},
        absent keys not granted) to one node, or as the tailnet default (node_id None) to every
        node without a grant of its own; `caps` None returns a node to the default. Returns the
        nodes whose grant changed, each announced through on_change. AdminError for bad arguments."""
        node = None if node_id is None else self.node(node_id)
        if caps is None and node is None:
            raise AdminError("only a node can return to the tailnet default")
        try:
            grant = None if caps is None else _caps(caps)
        except ValueError as e:
            raise AdminError(f"bad capabilities: {e}") from None
        targets = [node] if node else [n for n in self.nodes.values() if n.caps is None]
        before = {n.id: self.caps(n) for n in targets}
        if node is None:
            self.default_caps = dict(grant or NO_CAPS)
        else:
            node.caps = grant
        self.save()
        changed = [n for n in targets if self.caps(n) != before[n.id]]
        self.event("caps_set", node=node_id, caps=grant, changed=[n.id for n in changed])
        for n in changed:
            self.on_change("changed", n)
        return changed

    # -- the protocol's decisions ---------------------------------------------

    def _reject(self, text: str, **detail: Any) -> RegisterResult:
        self.event("register_rejected", reason=text, **detail)
        return RegisterResult({"Error": text})

    def _auth_url(self, base_url: str, node_key: str, followup: str | None) -> RegisterResult:
        if followup:
            return RegisterResult({"AuthURL": followup}, wait_followup=True)
        url = f"{base_url}/a/{secrets.token_hex(8)}"
        self.event("register_auth_url", node_key=node_key[:16])
        return RegisterResult({"AuthURL": url})

    def _success(self, node: Node) -> RegisterResult:
        who = self.profile(self.owner(node))
        return RegisterResult({"User": who, "Login": who, "MachineAuthorized": True,
                               "NodeKeyExpired": False}, node=node)

    def register(self, req: dict[str, Any], machine_key: str, base_url: str) -> RegisterResult:
        """Decide a RegisterRequest (any JSON object); ValueError names a field of the wrong
        shape (nothing has changed then), PermissionError a node key of another machine."""
        now = self.now()
        node_key = _field(req, "NodeKey", _text(NODE_KEY, "nodekey:<64 hex>")) or ""
        if not node_key or node_key == ZERO_NODE_KEY:
            raise ValueError("register without a valid NodeKey")
        old_key = _field(req, "OldNodeKey", _text()) or ZERO_NODE_KEY
        auth = _field(req, "Auth", _object) or {}
        secret = (_field(auth, "AuthKey", _text()) or "").strip()
        hostinfo = _field(req, "Hostinfo", _hostinfo) or {}
        followup = _field(req, "Followup", _text())
        expiry = parse_rfc3339(_field(req, "Expiry", _text()))
        node = self.by_node_key.get(node_key)
        if node is None and old_key != ZERO_NODE_KEY:
            node = self.by_node_key.get(old_key)
        if node is not None and node.machine_key != machine_key:
            raise PermissionError("node key belongs to another machine")

        if expiry is not None and expiry <= now:  # tailscale logout (facts §4g)
            if node is not None:
                if node.ephemeral:
                    self.delete_node(node.id, reason="node_logged_out")
                else:
                    node.key_expiry = max(expiry, 0.0)  # Go's time.Unix(123, 0), not before 1970
                    self.save()
                    self.event("node_logged_out", node=node.id, hostname=node.name)
                    self.on_change("changed", node)
            return RegisterResult({"NodeKeyExpired": True})

        if secret:
            key = self.find_key(secret)
            if key is None or key.revoked:
                return self._reject(NOT_EXIST, node=node.id if node else None)
            if key.state(now) != "valid":
                return self._reject(f"invalid key: API key {key.id} not valid", key=key.id,
                                    node=node.id if node else None)
            key.uses += 1
            if node is None:
                node = self._new_node(node_key, machine_key, hostinfo, key, now)
            else:
                self._rekey(node, node_key, now, key)
            self.save()
            self.event("register_ok", node=node.id, hostname=node.name, key=key.id)
            self.on_change("changed", node)
            return self._success(node)

        if node is None:
            return self._auth_url(base_url, node_key, followup)
        if node.node_key != node_key:  # rotation without credentials: log in again (§4d)
            return self._auth_url(base_url, node_key, followup)
        if node.expired(now):
            self.event("register_key_expired", node=node.id, hostname=node.name)
            return RegisterResult({"NodeKeyExpired": True, "MachineAuthorized": True})
        self.event("register_ok", node=node.id, hostname=node.name)
        return self._success(node)

    def _new_node(self, node_key: str, machine_key: str, hostinfo: dict[str, Any],
                  key: AuthKey, now: float) -> Node:
        nid = self.next_node_id
        self.next_node_id += 1
        v4, v6 = self._addresses(nid)
        hostname = str(hostinfo.get("Hostname") or "node")
        node = Node(nid, node_key, machine_key, hostname, self._unique_name(hostname), v4, v6,
                    key.id, key.ephemeral, list(key.tags), now,
                    now + DEFAULT_NODE_KEY_LIFETIME, hostinfo=_slim_hostinfo(hostinfo),
                    user="" if key.tags else key.user)
        self.nodes[nid] = node
        self.by_node_key[node_key] = node
        self.event("node_created", node=nid, hostname=node.name, key=key.id)
        return node

    def _rekey(self, node: Node, node_key: str, now: float, key: AuthKey) -> None:
        if node.node_key != node_key:
            self.by_node_key.pop(node.node_key, None)
            node.node_key = node_key
            self.by_node_key[node_key] = node
        node.key_expiry = now + DEFAULT_NODE_KEY_LIFETIME
        node.key_id = key.id

    def map_node(self, node_key: str, machine_key: str) -> Node | None:
        """The node a map request is for; None means 404 `node not found` (§4b)."""
        node = self.by_node_key.get(node_key)
        if node is not None and node.machine_key != machine_key:
            raise PermissionError("node key belongs to another machine")
        return node

    def update_from_map(self, node: Node, req: dict[str, Any]) -> bool:
        """Take endpoints, disco key and hostinfo from a map request (any JSON object);
        True if peers must hear. ValueError names a field of the wrong shape (the node
        is unchanged then)."""
        disco = _field(req, "DiscoKey", _text(f"|{DISCO_KEY}", "discokey:<64 hex>"))
        endpoints = _field(req, "Endpoints", _list_of(_text(), "strings"))
        hostinfo = _field(req, "Hostinfo", _hostinfo)
        netinfo = _field(req.get("Hostinfo") or {}, "NetInfo", _object) or {}
        derp = _field(netinfo, "PreferredDERP", _integer(0, 2**31 - 1))
        before = (node.disco_key, node.endpoints, node.home_derp, node.hostinfo)
        if disco:
            node.disco_key = disco
        if endpoints is not None:
            node.endpoints = endpoints[:64]
        if req.get("Hostinfo"):
            node.hostinfo = hostinfo
            node.home_derp = derp or node.home_derp
        return before != (node.disco_key, node.endpoints, node.home_derp, node.hostinfo)


def _slim_hostinfo(hostinfo: dict[str, Any]) -> dict[str, Any]:
    """The Hostinfo fields peers see, of the types tailscaled decodes (others are
    dropped, so one node's odd Hostinfo cannot break its peers' netmaps); the
    rest (NetInfo etc.) is the node's business."""
    out: dict[str, Any] = {k: hostinfo[k] for k in ("Hostname", "OS", "OSVersion", "IPNVersion")
                           if isinstance(hostinfo.get(k), str)}
    services = hostinfo.get("Services")
    if isinstance(services, list):
        out["Services"] = [{"Proto": s["Proto"], "Port": s["Port"],
                            **({"Description": s["Description"]} if isinstance(s.get("Description"), str) else {})}
                           for s in services[:64]
                           if isinstance(s, dict) and isinstance(s.get("Proto"), str)
                           and type(s.get("Port")) is int and 0 <= s["Port"] <= 65535]
    return out
