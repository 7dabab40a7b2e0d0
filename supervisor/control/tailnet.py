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

The tailnet also answers the v2 API's decisions (api.py translates them to
HTTP): OAuth clients and API tokens (secrets kept as hashes; OAuth access
tokens only in memory, one hour each), auth keys created through the API
with hosted control's tag rule, and devices read, deleted, renamed, re-tagged
or given an IPv4 address by hand. Refusals are `Refused(status, message)` with
the facts file's status and wording ("Minimal server behaviour"). Every node
has a stable node ID in hosted control's form (`n` + letters and digits +
`CNTRL`), which tailscaled shows as status `Self.ID`.

Who sees whom (the peers policy, `peers_visible`): on a real tailnet the ACL
decides, and two nodes are peers when either may reach the other. Here a node
is one of the supervisor's proxies when it logged in with a key the supervisor
minted (through its in-process API credential, or `create_key(proxy=True)`):
the key carries the mark as a tagged key carries its tags. With the default
policy `clients`, proxies see every client node and every client sees every
proxy, but proxies do not see each other, as on a tailnet whose ACL lets members
reach `tag:proxy` and nothing lets `tag:proxy` reach `tag:proxy`; `all` is the
allow-all policy (every node sees every node).

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
EVENTS_KEPT = 4096  # control decisions kept for `control events` and the tests (a ring)
NOT_EXIST = "invalid key: API key does not exist"
V4_NET = ipaddress.ip_network("100.64.0.0/10")
V6_NET = ipaddress.ip_network("fd7a:115c:a1e0::/48")
TAGGED_DEVICES = "tagged-devices"  # the login hosted control gives the owner of every tagged node
CAP_HTTPS = "https"  # tailcfg.CapabilityHTTPS
CAP_FUNNEL = "funnel"  # tailcfg.NodeAttrFunnel
CAP_FUNNEL_PORTS = "https://tailscale.com/cap/funnel-ports"  # tailcfg.CapabilityFunnelPorts, + ?ports=
NO_CAPS: dict[str, Any] = {"https": False, "funnel": False, "funnel_ports": ""}
# addresses hosted control never hands out (https://tailscale.com/kb/1610/reserved-ip-addresses)
V4_RESERVED = tuple(ipaddress.ip_network(n) for n in ("100.100.0.0/24", "100.100.100.0/24", "100.115.92.0/23"))
# OAuth scopes that mean something here (KB1215, KB1623); a write scope implies its read scope
SCOPE_KEYS, SCOPE_DEVICES = "auth_keys", "devices:core"
ACCESS_TOKEN_LIFETIME = 3600.0  # "An API access token expires after one hour" (KB1215)
API_TOKEN_LIFETIME = 90 * 86400.0  # user API tokens live 1-90 days (facts §0)
MAX_API_KEY_EXPIRY = 90 * 86400.0  # the API's auth keys: default and maximum 90 days (facts §2)
PEERS_CLIENTS = "clients"  # proxies see client nodes, not each other (the default)
PEERS_ALL = "all"  # every node sees every node (hosted control's allow-all policy)
PEER_POLICIES = (PEERS_CLIENTS, PEERS_ALL)
NO_PERMISSION = "calling actor does not have enough permissions to perform this function"


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


_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def peers_visible(policy: str, viewer_is_proxy: bool, peer_is_proxy: bool) -> bool:
    """Does a node see a peer in its netmap? Symmetric, as on a real tailnet (two nodes
    are peers when either may reach the other: hosted control's rule, which headscale
    follows, juanfont/headscale#1961). Under `clients` two proxies are not peers; under
    `all` everyone is. ValueError for an unknown policy."""
    if policy == PEERS_ALL:
        return True
    if policy == PEERS_CLIENTS:
        return not (viewer_is_proxy and peer_is_proxy)
    raise ValueError(f"unknown peers policy {_short(policy)}: want {' or '.join(PEER_POLICIES)}")


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
    preauthorized: bool = True  # as given to the API (nodes here are always authorized)
    description: str = ""
    tailnet_owned: bool = False  # created by an OAuth client (facts §2: OAuth keys are the tailnet's)
    revoked_at: float | None = None  # when `revoked` became true
    proxy: bool = False  # minted by the supervisor for one of its proxies (the peers policy)

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
    stable_id: str = ""  # tailcfg.StableNodeID, the API's nodeId; "" only before loading fills it
    proxy: bool = False  # logged in with a proxy's key (AuthKey.proxy) at its last login

    def expired(self, now: float) -> bool:
        return self.key_expiry is not None and now >= self.key_expiry


@dataclass
class OAuthClient:
    """An OAuth client: its secret `tskey-client-<id>-...` is kept as a hash only."""

    id: str
    secret_hash: str
    scopes: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    created: float = 0.0
    revoked: bool = False


@dataclass
class ApiToken:
    """A user API access token `tskey-api-<id>-...` of the tailnet's admin user (hash only)."""

    id: str
    secret_hash: str
    created: float = 0.0
    expires: float | None = None
    revoked: bool = False


@dataclass(frozen=True)
class Actor:
    """Who calls the API: the admin user (an API token) or an OAuth client's access token."""

    kind: str  # "user" or "oauth"
    scopes: frozenset[str]
    tags: tuple[str, ...] = ()  # an OAuth client's tags
    client_id: str = ""
    login: str = ""  # a user's login
    proxy_keys: bool = False  # the keys it creates log in the supervisor's proxies (AuthKey.proxy)

    def may(self, scope: str, write: bool) -> bool:
        return self.kind == "user" or scope in self.scopes or (not write and f"{scope}:read" in self.scopes)


class Refused(Exception):
    """An API request the tailnet refuses: `status` (4xx) and the message hosted control gives."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
    "expires": _optional(_time), "revoked": _flag, "uses": _integer(0, MAX_COUNT), "user": _USER,
    "preauthorized": _flag, "description": _text(r"[A-Za-z0-9 _-]{0,50}", "up to 50 letters, digits, - _ or spaces"),
    "tailnet_owned": _flag, "revoked_at": _optional(_time), "proxy": _flag}
STABLE_ID = r"n[A-Za-z0-9]{1,40}CNTRL"
SCOPE = r"[a-z_]{1,40}(:[a-z_]{1,40}){0,2}"
_CLIENT_FIELDS: dict[str, Callable[[Any], Any]] = {
    "id": _KEY_FIELDS["id"], "secret_hash": _KEY_FIELDS["secret_hash"],
    "scopes": _list_of(_text(SCOPE, "a scope like auth_keys"), "scopes", 64), "tags": _TAGS,
    "created": _time, "revoked": _flag}
_TOKEN_FIELDS: dict[str, Callable[[Any], Any]] = {
    "id": _KEY_FIELDS["id"], "secret_hash": _KEY_FIELDS["secret_hash"], "created": _time,
    "expires": _optional(_time), "revoked": _flag}
_OWNER = _text(f"{TAG}|{USER_LOGIN}|autogroup:admin", "tag:name, a login or autogroup:admin")


def _tag_owners(v: Any) -> dict[str, list[str]]:
    """tagOwners: {"tag:a": ["tag:b", "alice@example.com"], ...}."""
    v = _object(v)
    if len(v) > 1024:
        raise ValueError("want at most 1024 tags")
    out = {}
    for tag, owners in v.items():
        if not re.fullmatch(TAG, tag):
            raise ValueError(f"want tag:name keys, got {_short(tag)}")
        try:
            out[tag] = _list_of(_OWNER, "owners (tag:name, a login or autogroup:admin)", 64)(owners)
        except ValueError as e:
            raise ValueError(f"{tag}: {e}") from None
    return out
_NODE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "id": _integer(1, MAX_NODE_ID), "node_key": _text(NODE_KEY, "nodekey:<64 hex>"),
    "machine_key": _text(r"mkey:[0-9a-f]{64}", "mkey:<64 hex>"), "hostname": _text(),
    "name": _text(r"[a-z0-9-]+", "a DNS label"), "ipv4": _address(V4_NET), "ipv6": _address(V6_NET),
    "key_id": _text(), "ephemeral": _flag, "tags": _TAGS, "created": _time,
    "key_expiry": _optional(_time), "disco_key": _text(f"|{DISCO_KEY}", "discokey:<64 hex> or empty"),
    "endpoints": _list_of(_text(), "strings"), "home_derp": _integer(0, 2**31 - 1),
    "hostinfo": _hostinfo, "last_seen": _optional(_time), "user": _USER, "caps": _optional(_caps),
    "stable_id": _text(f"|{STABLE_ID}", "n<letters and digits>CNTRL"), "proxy": _flag}


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


def legacy_stable_id(node_id: int) -> str:
    """The stable ID this control gave a node before state.json kept one."""
    return f"n{node_id:06d}CNTRL"


def _parse_state(raw: Any) -> dict[str, Any]:
    """The fields of a state document, checked; ValueError("where: reason") otherwise."""
    if not isinstance(raw, dict):
        raise ValueError(f"want a JSON object, got {_short(raw)}")
    checks = {"server_private": _text(r"|[0-9a-f]{64}", "64 hex digits"), "port": _integer(0, 65535),
              "next_node_id": _integer(1, MAX_NODE_ID + 1), "next_key_id": _integer(1, MAX_COUNT),
              "keys": _list_of(lambda v: v, "objects", MAX_COUNT),
              "nodes": _list_of(lambda v: v, "objects", MAX_COUNT), "default_caps": _caps,
              "oauth_clients": _list_of(lambda v: v, "objects", MAX_COUNT),
              "api_tokens": _list_of(lambda v: v, "objects", MAX_COUNT), "tag_owners": _tag_owners,
              "reserved_v4": _list_of(_address(V4_NET), f"addresses in {V4_NET}", MAX_COUNT)}
    defaults: dict[str, Any] = {"server_private": "", "port": 0, "next_node_id": 1, "next_key_id": 1,
                                "keys": [], "nodes": [], "default_caps": NO_CAPS, "oauth_clients": [],
                                "api_tokens": [], "tag_owners": {}, "reserved_v4": []}
    state = {}
    for name, check in checks.items():
        try:
            state[name] = check(raw.get(name, defaults[name]))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    state["keys"] = [_record(AuthKey, _KEY_FIELDS, f"keys[{i}]", k) for i, k in enumerate(state["keys"])]
    state["nodes"] = [_record(Node, _NODE_FIELDS, f"nodes[{i}]", n) for i, n in enumerate(state["nodes"])]
    state["oauth_clients"] = [_record(OAuthClient, _CLIENT_FIELDS, f"oauth_clients[{i}]", c)
                              for i, c in enumerate(state["oauth_clients"])]
    state["api_tokens"] = [_record(ApiToken, _TOKEN_FIELDS, f"api_tokens[{i}]", t)
                           for i, t in enumerate(state["api_tokens"])]
    for node in state["nodes"]:
        if not node.stable_id:  # a state written before stable IDs: the one its nodes were told
            node.stable_id = legacy_stable_id(node.id)
    for what, items, ident in (("keys", state["keys"], "id"), ("nodes", state["nodes"], "id"),
                               ("nodes", state["nodes"], "node_key"), ("nodes", state["nodes"], "stable_id"),
                               ("oauth_clients", state["oauth_clients"], "id"),
                               ("api_tokens", state["api_tokens"], "id")):
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
                 on_change: Callable[[str, Node], None] | None = None,
                 peers: str = PEERS_CLIENTS) -> None:
        self.path = path
        self.domain = domain
        self.peers = peers  # the peers policy (PEER_POLICIES); set_peers changes it
        peers_visible(peers, False, False)  # ValueError for an unknown one
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
        self.oauth_clients: dict[str, OAuthClient] = {}
        self.api_tokens: dict[str, ApiToken] = {}
        self.tag_owners: dict[str, list[str]] = {}
        self.reserved_v4: set[str] = set()  # set by hand: the allocator never hands them out
        self._grants: dict[str, tuple[Actor, float | None]] = {}  # in memory: token hash -> (actor, expiry)
        # the decision log, newest last: about 750 B an event, so at most ~3 MiB of a
        # long-running supervisor (20,000 held ~15 MiB, filling over days of churn)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
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
        self.oauth_clients = {c.id: c for c in state["oauth_clients"]}
        self.api_tokens = {t.id: t for t in state["api_tokens"]}
        self.tag_owners = state["tag_owners"]
        self.reserved_v4 = set(state["reserved_v4"])
        for node in state["nodes"]:
            self.nodes[node.id] = node
            self.by_node_key[node.node_key] = node

    def save(self) -> None:
        data = {"server_private": self.server_private, "port": self.port, "next_node_id": self.next_node_id,
                "next_key_id": self.next_key_id, "default_caps": self.default_caps,
                "keys": [asdict(k) for k in self.keys.values()],
                "nodes": [asdict(n) for n in self.nodes.values()],
                "oauth_clients": [asdict(c) for c in self.oauth_clients.values()],
                "api_tokens": [asdict(t) for t in self.api_tokens.values()],
                "tag_owners": self.tag_owners, "reserved_v4": sorted(self.reserved_v4)}
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

    # -- the peers policy ----------------------------------------------------

    def visible(self, viewer: Node, peer: Node) -> bool:
        """Is `peer` in `viewer`'s netmap under the current policy (peers_visible)?"""
        return peers_visible(self.peers, viewer.proxy, peer.proxy)

    def set_peers(self, policy: Any) -> None:
        """Change the peers policy (not kept in state.json: the supervisor's setting
        `embedded_peers` gives it at each start). AdminError for an unknown policy."""
        if policy not in PEER_POLICIES:
            raise AdminError(f"unknown peers policy {_short(policy)}: want {' or '.join(PEER_POLICIES)}")
        if policy != self.peers:
            self.peers = policy
            self.event("peers_set", peers=policy)

    # -- keys ----------------------------------------------------------------

    def create_key(self, *, reusable: bool = False, ephemeral: bool = False,
                   expiry: float | None = 90 * 86400.0, tags: list[str] | None = None,
                   user: str = "", preauthorized: bool = True, description: str = "",
                   tailnet_owned: bool = False, proxy: bool = False) -> tuple[AuthKey, str]:
        """A new key and its secret; only the hash is kept. `expiry`: seconds from now
        (None: never). `user`: the login that owns the key's nodes ("" the default user);
        a tagged key's nodes are owned by tagged-devices, so it takes no user. `proxy`:
        its nodes are the supervisor's proxies (the peers policy).
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
        kid = self._new_id()
        secret = f"tskey-auth-{kid}-{secrets.token_hex(16)}"
        now = self.now()
        key = AuthKey(kid, _hash_secret(secret), reusable, ephemeral, list(tags or []), now,
                      None if expiry is None else now + expiry, user=user, preauthorized=preauthorized,
                      description=description, tailnet_owned=tailnet_owned, proxy=bool(proxy))
        self.keys[kid] = key
        self.save()
        self.event("key_created", key=kid, reusable=reusable, ephemeral=ephemeral, preauthorized=preauthorized,
                   tags=list(tags or []), user=user, proxy=key.proxy)
        return key, secret

    def _new_id(self) -> str:
        """An id for a key, OAuth client or API token (one counter: never two alike)."""
        kid = f"k{self.next_key_id:04d}{secrets.token_hex(3)}"
        self.next_key_id += 1
        return kid

    def _key(self, kid: str) -> AuthKey:
        try:
            return self.keys[kid]
        except KeyError:
            raise AdminError(f"no key {kid}") from None

    def revoke_key(self, kid: str) -> AuthKey:
        key = self._key(kid)
        key.revoked = True
        key.revoked_at = key.revoked_at or self.now()
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

    def find_node(self, ident: int | str) -> Node | None:
        """A node by its numeric id (an int or its digits) or its stable ID (`n…CNTRL`,
        tailcfg.StableNodeID: `Self.ID` in `tailscale status --json`, the API's `nodeId`),
        as the v2 API accepts either (publicapi/device.md). None if there is none."""
        if isinstance(ident, int) and not isinstance(ident, bool):
            return self.nodes.get(ident)
        ident = str(ident)
        if re.fullmatch(r"[0-9]{1,15}", ident):
            return self.nodes.get(int(ident))
        return next((n for n in self.nodes.values() if n.stable_id == ident), None) if ident else None

    def node_ref(self, ident: int | str) -> Node:
        """find_node, or AdminError("no node IDENT") for the admin API."""
        node = self.find_node(ident)
        if node is None:
            raise AdminError(f"no node {str(ident)[:40]}")
        return node

    def _unique_name(self, hostname: str, node: Node | None = None) -> str:
        base = dns_label(hostname)
        taken = {n.name for n in self.nodes.values() if n is not node}
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}-{i}"
        return name

    def _addresses(self, node_id: int) -> tuple[str, str]:
        """A new node's (IPv4, IPv6): the node id's place in 100.64.0.0/10, else the next
        one up that no node holds, nobody set by hand, and hosted control reserves."""
        used4 = {n.ipv4 for n in self.nodes.values()} | self.reserved_v4
        used6 = {n.ipv6 for n in self.nodes.values()}
        v4 = V4_NET.network_address + node_id
        while v4 in V4_NET:
            v6 = V6_NET.network_address + (int(v4) & 0xFFFFFFFF)
            if str(v4) not in used4 and str(v6) not in used6 and not any(v4 in r for r in V4_RESERVED):
                return str(v4), str(v6)
            v4 += 1
        raise AdminError("address pool exhausted")

    def _new_stable_id(self) -> str:
        """tailcfg.StableNodeID in hosted control's form ("n5SUKe8CNTRL"), never one in use."""
        taken = {n.stable_id for n in self.nodes.values()}
        while True:
            sid = "n" + "".join(secrets.choice(_ALNUM) for _ in range(7)) + "CNTRL"
            if sid not in taken:
                return sid

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
        """A node as the admin API shows it: `id` the numeric id, `node_id` the stable ID."""
        return {"id": node.id, "node_id": node.stable_id, "hostname": node.hostname, "name": node.name,
                "addresses": [node.ipv4, node.ipv6], "node_key": node.node_key,
                "key_id": node.key_id, "ephemeral": node.ephemeral, "tags": node.tags,
                "user": self.owner(node), "caps": self.caps(node), "caps_inherited": node.caps is None,
                "proxy": node.proxy,
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

    # -- the v2 API's credentials --------------------------------------------

    def admin_actor(self) -> Actor:
        return Actor("user", frozenset(), login=self.default_user)

    def issue_admin_token(self, proxy_keys: bool = False) -> str:
        """A fresh access token of the admin user, kept in memory only (gone at restart).
        `proxy_keys`: the keys it creates are the supervisor's proxies' (AuthKey.proxy)."""
        secret = f"tskey-api-{self._new_id()}-{secrets.token_hex(16)}"
        actor = self.admin_actor()
        if proxy_keys:
            actor = Actor(actor.kind, actor.scopes, actor.tags, actor.client_id, actor.login, proxy_keys=True)
        self._grants[_hash_secret(secret)] = (actor, None)
        return secret

    def create_oauth_client(self, scopes: list[str], tags: list[str]) -> tuple[OAuthClient, str]:
        """A new OAuth client and its secret `tskey-client-<id>-...` (only the hash is kept).
        Tags are required with `auth_keys` or `devices:core` (terraform-provider-tailscale
        docs/resources/oauth_client.md). AdminError for bad scopes or tags."""
        try:
            scopes = _CLIENT_FIELDS["scopes"](list(scopes))
            tags = _TAGS(list(tags))
        except (ValueError, TypeError) as e:
            raise AdminError(f"bad OAuth client: {e}") from None
        if not scopes:
            raise AdminError("an OAuth client needs at least one scope")
        if not tags and {SCOPE_KEYS, SCOPE_DEVICES} & set(scopes):
            raise AdminError(f"an OAuth client with {SCOPE_KEYS} or {SCOPE_DEVICES} needs tags")
        cid = self._new_id()
        secret = f"tskey-client-{cid}-{secrets.token_hex(16)}"
        client = OAuthClient(cid, _hash_secret(secret), scopes, tags, self.now())
        self.oauth_clients[cid] = client
        self.save()
        self.event("oauth_client_created", client=cid, scopes=scopes, tags=tags)
        return client, secret

    def revoke_oauth_client(self, cid: str) -> OAuthClient:
        """Revoke a client; its access tokens stop working at once."""
        client = self.oauth_clients.get(cid)
        if client is None:
            raise AdminError(f"no OAuth client {cid}")
        client.revoked = True
        self._grants = {h: g for h, g in self._grants.items() if g[0].client_id != cid}
        self.save()
        self.event("oauth_client_revoked", client=cid)
        return client

    def create_api_token(self, expiry: float | None = API_TOKEN_LIFETIME) -> tuple[ApiToken, str]:
        """A user API access token `tskey-api-<id>-...` of the admin user (hash only)."""
        if expiry is not None and not (isinstance(expiry, (int, float)) and 0 < expiry <= MAX_KEY_LIFETIME):
            raise AdminError(f"bad expiry {_short(expiry)}: want seconds")
        tid = self._new_id()
        secret = f"tskey-api-{tid}-{secrets.token_hex(16)}"
        now = self.now()
        token = ApiToken(tid, _hash_secret(secret), now, None if expiry is None else now + expiry)
        self.api_tokens[tid] = token
        self.save()
        self.event("api_token_created", token=tid)
        return token, secret

    def set_tag_owners(self, owners: dict[str, list[str]]) -> dict[str, list[str]]:
        """Replace tagOwners ({"tag:a": ["tag:b"], ...}): an OAuth client may also mint and
        set the tags its own tags own. AdminError for a bad map."""
        try:
            self.tag_owners = _tag_owners(owners)
        except ValueError as e:
            raise AdminError(f"bad tag owners: {e}") from None
        self.save()
        self.event("tag_owners_set", owners=self.tag_owners)
        return self.tag_owners

    def access_token(self, client_secret: str) -> tuple[str, float, OAuthClient]:
        """POST /api/v2/oauth/token: (access token, lifetime seconds, client) for a client
        secret; every scope of the client whatever `scope` asked for (facts §1: hosted
        ignored the CLI's bogus `scope=device`). Refused(401, "invalid_client") otherwise."""
        client = self.oauth_client(client_secret)
        if client is None:
            self.event("api_refused", reason="unknown or revoked OAuth client")
            raise Refused(401, "invalid_client")
        now = self.now()
        self._grants = {k: g for k, g in self._grants.items() if g[1] is None or g[1] > now}
        token = f"tskey-api-{client.id}-{secrets.token_hex(16)}"
        actor = Actor("oauth", frozenset(client.scopes), tuple(client.tags), client.id)
        self._grants[_hash_secret(token)] = (actor, now + ACCESS_TOKEN_LIFETIME)
        self.event("oauth_token_issued", client=client.id)
        return token, ACCESS_TOKEN_LIFETIME, client

    def oauth_client(self, client_secret: str) -> OAuthClient | None:
        """The live (not revoked) OAuth client whose secret this is, else None; no side effect."""
        h = _hash_secret(client_secret)
        client = next((c for c in self.oauth_clients.values() if c.secret_hash == h), None)
        return None if client is None or client.revoked else client

    def actor(self, token: str) -> Actor:
        """Who holds this access token. Refused 401 for an unknown, expired or revoked token,
        403 for an OAuth client secret used as one (facts: tailscale#15969)."""
        h = _hash_secret(token)
        now = self.now()
        grant = self._grants.get(h)
        if grant is not None:
            actor, expiry = grant
            if expiry is None or now < expiry:
                return actor
            del self._grants[h]
            raise Refused(401, "API token expired")
        api = next((t for t in self.api_tokens.values() if t.secret_hash == h), None)
        if api is not None and not api.revoked and (api.expires is None or now < api.expires):
            return self.admin_actor()
        if any(c.secret_hash == h for c in self.oauth_clients.values()):
            raise Refused(403, NO_PERMISSION)
        raise Refused(401, "API token invalid")

    def _need(self, actor: Actor, scope: str, write: bool) -> None:
        if not actor.may(scope, write):
            raise Refused(403, NO_PERMISSION)

    def tags_permitted(self, actor: Actor, tags: list[str]) -> bool:
        """May this actor give these tags? The admin user any; an OAuth client its own tags
        and the tags they own in tagOwners (publicapi/tailnet.md "Create auth key")."""
        if actor.kind == "user":
            return True
        mine = set(actor.tags)
        return all(t in mine or mine & set(self.tag_owners.get(t, ())) for t in tags)

    def _check_tags(self, actor: Actor, tags: Any, required: bool) -> list[str]:
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise Refused(400, "tags: want a list of tag:name strings")
        bad = [t for t in tags if not re.fullmatch(TAG, t)]
        if bad or not self.tags_permitted(actor, tags) or (required and not tags):
            raise Refused(400, f"requested tags [{' '.join(tags)}] are invalid or not permitted")
        return sorted(set(tags))

    # -- the v2 API: keys -----------------------------------------------------

    def api_create_key(self, actor: Actor, *, reusable: bool, ephemeral: bool, preauthorized: bool,
                       tags: Any, expiry_seconds: float, description: str) -> tuple[AuthKey, str]:
        """POST /api/v2/tailnet/-/keys. An OAuth client's keys must carry tags it may give;
        a user's may be untagged. `expiry_seconds` <= 0 means the default, 90 days (facts §2)."""
        self._need(actor, SCOPE_KEYS, write=True)
        tags = self._check_tags(actor, tags, required=actor.kind == "oauth")
        if not (isinstance(expiry_seconds, (int, float)) and expiry_seconds == expiry_seconds):
            raise Refused(400, "expirySeconds: want seconds")
        expiry = MAX_API_KEY_EXPIRY if expiry_seconds <= 0 else float(expiry_seconds)
        if expiry > MAX_API_KEY_EXPIRY:
            raise Refused(400, f"expirySeconds: at most {MAX_API_KEY_EXPIRY:.0f} (90 days)")
        if not isinstance(description, str) or not re.fullmatch(r"[A-Za-z0-9 _-]{0,50}", description):
            raise Refused(400, "description: up to 50 letters, digits, hyphens, underscores or spaces")
        # untagged keys are the admin user's (the only user with API tokens here)
        return self.create_key(reusable=reusable, ephemeral=ephemeral, expiry=expiry, tags=tags,
                               preauthorized=preauthorized, description=description,
                               tailnet_owned=actor.kind == "oauth", proxy=actor.proxy_keys)

    def api_key(self, actor: Actor, kid: str) -> AuthKey:
        """A key by id (any key of the tailnet); Refused 404 if there is none (deleted)."""
        self._need(actor, SCOPE_KEYS, write=False)
        key = self.keys.get(kid)
        if key is None:
            raise Refused(404, "key not found")
        return key

    def api_keys(self, actor: Actor) -> list[AuthKey]:
        """The keys this actor sees: an OAuth client the tailnet-owned ones, a user the
        users' ones (publicapi/tailnet.md "List tailnet keys")."""
        self._need(actor, SCOPE_KEYS, write=False)
        return [k for k in self.keys.values() if k.tailnet_owned == (actor.kind == "oauth")]

    def api_delete_key(self, actor: Actor, kid: str) -> None:
        """DELETE a key: it can no longer register anything, and a later GET is 404."""
        self._need(actor, SCOPE_KEYS, write=True)
        if kid not in self.keys:
            raise Refused(404, "key not found")
        del self.keys[kid]
        self.save()
        self.event("key_deleted", key=kid)

    # -- the v2 API: devices --------------------------------------------------

    def api_device(self, actor: Actor, ident: str, write: bool = False) -> Node:
        """A node by the API's numeric `id` or its `nodeId` (publicapi/device.md: both are
        accepted); Refused 404 if there is none."""
        self._need(actor, SCOPE_DEVICES, write=write)
        node = self.find_node(ident)
        if node is None:
            raise Refused(404, "device not found")
        return node

    def api_devices(self, actor: Actor) -> list[Node]:
        self._need(actor, SCOPE_DEVICES, write=False)
        return list(self.nodes.values())

    def api_set_ipv4(self, node: Node, ipv4: Any) -> None:
        """POST /device/{id}/ip: a free address in 100.64.0.0/10 outside the reserved
        ranges (KB1610), else Refused 400. It is never handed out by the allocator again."""
        try:
            if not isinstance(ipv4, str):
                raise ValueError
            addr = ipaddress.IPv4Address(ipv4)
        except ValueError:
            raise Refused(400, "ipv4: want an IPv4 address") from None
        if addr not in V4_NET or any(addr in r for r in V4_RESERVED):
            raise Refused(400, f"address {addr} is outside {V4_NET} or reserved")
        if any(n.ipv4 == str(addr) for n in self.nodes.values() if n is not node):
            raise Refused(400, "address already in use")
        self.reserved_v4.add(str(addr))
        if node.ipv4 == str(addr):
            self.save()
            return
        old, node.ipv4 = node.ipv4, str(addr)
        self.save()
        self.event("node_address_set", node=node.id, old=old, ipv4=node.ipv4)
        self.on_change("changed", node)

    def api_rename(self, node: Node, name: Any) -> None:
        """POST /device/{id}/name: a DNS label (or this tailnet's FQDN of one) no other node
        holds; Refused 400 otherwise (`Name "x" is already taken`, the admin console's words)."""
        if not isinstance(name, str):
            raise Refused(400, "name: want a machine name")
        label = name.strip().rstrip(".").lower().removesuffix("." + self.domain)
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", label):
            raise Refused(400, "name: want a machine name: letters, digits and hyphens, up to 63")
        if any(n.name == label for n in self.nodes.values() if n is not node):
            raise Refused(400, f'Name "{label}" is already taken')
        if node.name == label:
            return
        old, node.name = node.name, label
        self.save()
        self.event("node_renamed", node=node.id, old=old, hostname=label)
        self.on_change("changed", node)

    def api_set_tags(self, actor: Actor, node: Node, tags: Any) -> None:
        """POST /device/{id}/tags: tags this actor may give (an OAuth client at least one);
        a tagged node is owned by tagged-devices, an untagged one by the admin user."""
        tags = self._check_tags(actor, tags, required=actor.kind == "oauth")
        if node.tags == tags:
            return
        node.tags = tags
        if tags:
            node.user = ""
        self.save()
        self.event("node_tags_set", node=node.id, tags=tags)
        self.on_change("changed", node)

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
                    user="" if key.tags else key.user, stable_id=self._new_stable_id(), proxy=key.proxy)
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
        node.proxy = key.proxy  # the key of its latest login says what it is

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
