"""The tailnet the embedded control keeps: auth keys, nodes, and every decision.

Plain synchronous code with no I/O but one JSON file, so the protocol layer
(server.py) stays a thin translator. Register decisions follow hosted
control as the facts file records them (§2.1, §4, §5): unknown or revoked
keys get `invalid key: API key does not exist`, expired or spent one-off keys
`invalid key: API key <id> not valid`, an unknown node key without an auth
key gets an AuthURL, a known node whose key expired gets `NodeKeyExpired`.
Secrets are stored only as SHA-256 hashes, so the state file leaks nothing.
"""
from __future__ import annotations

import calendar
import hashlib
import ipaddress
import json
import os
import re
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ZERO_NODE_KEY = "nodekey:" + "00" * 32
GO_ZERO_TIME = "0001-01-01T00:00:00Z"
DEFAULT_NODE_KEY_LIFETIME = 180 * 86400.0  # hosted control's default
NOT_EXIST = "invalid key: API key does not exist"
V4_NET = ipaddress.ip_network("100.64.0.0/10")
V6_NET = ipaddress.ip_network("fd7a:115c:a1e0::/48")


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

    def expired(self, now: float) -> bool:
        return self.key_expiry is not None and now >= self.key_expiry

    def public(self, now: float, online: bool) -> dict[str, Any]:
        return {"id": self.id, "hostname": self.hostname, "name": self.name,
                "addresses": [self.ipv4, self.ipv6], "node_key": self.node_key,
                "key_id": self.key_id, "ephemeral": self.ephemeral, "tags": self.tags,
                "created": self.created, "key_expiry": self.key_expiry,
                "expired": self.expired(now), "online": online, "last_seen": self.last_seen}


@dataclass
class RegisterResult:
    """What to answer a register with; `response` is a tailcfg.RegisterResponse."""

    response: dict[str, Any]
    node: Node | None = None
    wait_followup: bool = False  # hold the answer: an AuthURL nobody will visit


class AdminError(Exception):
    """An admin request naming something that does not exist, or bad arguments."""


class Tailnet:
    """Keys and nodes, persisted in `state.json`; `on_change` hears about peer changes."""

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
        self.events: deque[dict[str, Any]] = deque(maxlen=20000)
        self._load()

    # -- persistence ---------------------------------------------------------

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: cannot read control state: {e}") from None
        try:
            self.server_private = str(raw.get("server_private", ""))
            self.port = int(raw.get("port", 0))
            self.next_node_id = int(raw.get("next_node_id", 1))
            self.next_key_id = int(raw.get("next_key_id", 1))
            keys = [AuthKey(**k) for k in raw.get("keys", [])]
            nodes = [Node(**n) for n in raw.get("nodes", [])]
        except (AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: control state has the wrong shape: {e}") from None
        self.keys = {k.id: k for k in keys}
        for node in nodes:
            self.nodes[node.id] = node
            self.by_node_key[node.node_key] = node

    def save(self) -> None:
        data = {"server_private": self.server_private, "port": self.port, "next_node_id": self.next_node_id,
                "next_key_id": self.next_key_id,
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
                   expiry: float | None = 90 * 86400.0, tags: list[str] | None = None
                   ) -> tuple[AuthKey, str]:
        """A new key and its secret; only the hash is kept."""
        for t in tags or []:
            if not re.fullmatch(r"tag:[a-z0-9][a-z0-9-]*", t):
                raise AdminError(f"bad tag {t!r}: want tag:name")
        kid = f"k{self.next_key_id:04d}{secrets.token_hex(3)}"
        self.next_key_id += 1
        secret = f"tskey-auth-{kid}-{secrets.token_hex(16)}"
        now = self.now()
        key = AuthKey(kid, _hash_secret(secret), reusable, ephemeral, list(tags or []), now,
                      None if expiry is None else now + expiry)
        self.keys[kid] = key
        self.save()
        self.event("key_created", key=kid, reusable=reusable, ephemeral=ephemeral)
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

    # -- the protocol's decisions ---------------------------------------------

    def _reject(self, text: str, **detail: Any) -> RegisterResult:
        self.event("register_rejected", reason=text, **detail)
        return RegisterResult({"Error": text})

    def _auth_url(self, base_url: str, node_key: str, req: dict[str, Any]) -> RegisterResult:
        if req.get("Followup"):
            return RegisterResult({"AuthURL": req["Followup"]}, wait_followup=True)
        url = f"{base_url}/a/{secrets.token_hex(8)}"
        self.event("register_auth_url", node_key=node_key[:16])
        return RegisterResult({"AuthURL": url})

    def _success(self, node: Node) -> RegisterResult:
        who = {"ID": 1, "LoginName": "admin@" + self.domain, "DisplayName": "Admin"}
        return RegisterResult({"User": who, "Login": who, "MachineAuthorized": True,
                               "NodeKeyExpired": False}, node=node)

    def register(self, req: dict[str, Any], machine_key: str, base_url: str) -> RegisterResult:
        now = self.now()
        node_key = req.get("NodeKey") or ""
        if not re.fullmatch(r"nodekey:[0-9a-f]{64}", node_key) or node_key == ZERO_NODE_KEY:
            raise ValueError("register without a valid NodeKey")
        old_key = req.get("OldNodeKey") or ZERO_NODE_KEY
        node = self.by_node_key.get(node_key)
        if node is None and old_key != ZERO_NODE_KEY:
            node = self.by_node_key.get(old_key)
        if node is not None and node.machine_key != machine_key:
            raise PermissionError("node key belongs to another machine")

        expiry = parse_rfc3339(req.get("Expiry"))
        if expiry is not None and expiry <= now:  # tailscale logout (facts §4g)
            if node is not None:
                if node.ephemeral:
                    self.delete_node(node.id, reason="node_logged_out")
                else:
                    node.key_expiry = expiry
                    self.save()
                    self.event("node_logged_out", node=node.id, hostname=node.name)
                    self.on_change("changed", node)
            return RegisterResult({"NodeKeyExpired": True})

        secret = ((req.get("Auth") or {}).get("AuthKey") or "").strip()
        hostinfo = req.get("Hostinfo") or {}
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
            return self._auth_url(base_url, node_key, req)
        if node.node_key != node_key:  # rotation without credentials: log in again (§4d)
            return self._auth_url(base_url, node_key, req)
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
                    now + DEFAULT_NODE_KEY_LIFETIME, hostinfo=_slim_hostinfo(hostinfo))
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
        """Take endpoints, disco key and hostinfo from a map request; True if peers must hear."""
        before = (node.disco_key, node.endpoints, node.home_derp, node.hostinfo)
        if req.get("DiscoKey"):
            node.disco_key = req["DiscoKey"]
        if req.get("Endpoints") is not None:
            node.endpoints = [str(e) for e in req["Endpoints"]][:64]
        hostinfo = req.get("Hostinfo")
        if hostinfo:
            node.hostinfo = _slim_hostinfo(hostinfo)
            node.home_derp = int((hostinfo.get("NetInfo") or {}).get("PreferredDERP") or node.home_derp)
        return before != (node.disco_key, node.endpoints, node.home_derp, node.hostinfo)


def _slim_hostinfo(hostinfo: dict[str, Any]) -> dict[str, Any]:
    """The Hostinfo fields peers see; the rest (NetInfo etc.) is the node's business."""
    return {k: hostinfo[k] for k in ("Hostname", "OS", "OSVersion", "IPNVersion", "Services")
            if k in hostinfo}
