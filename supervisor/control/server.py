"""The embedded control server: ts2021 on loopback, plus DERP, STUN and an admin API.

One TCP port serves, by path: `GET /key`, the `POST /ts2021` upgrade to
Noise + HTTP/2 (register and the streaming map), `/derp` (the relay),
`/generate_204` (netcheck's captive-portal probe). STUN answers on a UDP
port of its own. The control's own admin API (`/admin/`: keys, nodes,
capabilities, events, faults) is served only on a unix socket, 0600, in the
control dir (`admin_socket_path`), to connections whose peer uid (SO_PEERCRED,
checked by the kernel) is the control's own or root; the TCP port answers
`/admin/` with 404. `endpoint.json` names the process (pid, create time) and
the control's public key so that a client can tell a live control from a
stale file (cli.AdminClient). Decisions live in `tailnet.Tailnet`; this
module only translates them to the wire.

Cost with many nodes: a peer change is sent as `PeersChanged`/`PeersRemoved`
deltas, coalesced per loop turn, with each changed node's JSON built once;
only a node's first map message carries the whole peer list. A node's own
capabilities (`Node.CapMap`) and `DNSConfig.CertDomains` go to that node only;
every message naming a node carries its owner's `UserProfiles` entry.

Peers follow the tailnet's peers policy (tailnet.peers_visible): by default the
supervisor's proxies see client nodes but not each other, so a proxy that joins,
restarts or goes offline sends nothing to the other proxies, and each proxy's
netmap holds the clients only. A change of the rule (`set_peers`, or a node that
logs in again as the other kind) tells each node what it gained and lost.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import ipaddress
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

import psutil

from supervisor import paths
from supervisor.control import limits, noise, zstdframe
from supervisor.control.api import ApiServer
from supervisor.control.derp import DerpServer
from supervisor.control.stun import StunServer
from supervisor.control.tailnet import (NO_CAPS, PEERS_CLIENTS, AdminError, Node, Tailnet, peers_visible,
                                        rfc3339)
from supervisor.tsapi import Credential

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_BODY = 1 << 20
HEAD_TIMEOUT = 10.0
MAX_WRITE_BUFFER = 8 << 20  # a session that stops reading is dropped, not buffered forever
MINT_KEY_LIFETIME = 3600.0
TRUST_DEADLINE = 10.0  # upgrade -> a registered node's machine key (like derpserver's 10 s handshake)
SESSION_IDLE_TIMEOUT = 120.0  # no request, no stream: > 1.78's own 60 s idle close, = its map watchdog
CLOSE_TIMEOUT = 2.0  # what a closed connection may take to flush before it is dropped
ALLOW_ALL = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]


class ControlServer:
    """A tailnet control plane for tailscaled, bound to loopback only. The constructor
    reads `data_dir/state.json`: StateError (one line) if it has the wrong shape.

    Bad input costs one connection: an HTTP error or a close, logged at debug level
    (DERP: one warning line, a storm of them one line per 10 s with a count); a request
    body of the wrong shape gets 400 naming the field. Only a bug is logged as an error
    (and answered 500).

    Local users can all reach the port, so a connection is held only while it proves
    itself (limits.py): a ts2021 session must speak for a registered node's machine
    key (at the handshake, or by a register that succeeds) within `trust_deadline`
    seconds, DERP serves only registered node keys, an /api/v2 request is proven by
    a credential that checks out (api.py), an HTTP/1 request head must come within
    10 s; a trusted session with no request or stream for `idle_timeout` seconds gets
    GOAWAY. At most `max_connections` = (all, untrusted) are held (from
    RLIMIT_NOFILE by default, keeping a reserve for supervision); over it the oldest
    untrusted one is shed, and a proven node is never displaced.

    `peers`: the peers policy, "clients" (proxies see client nodes, not each other)
    or "all"; ValueError for another."""

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int = 0,
                 ephemeral_reap_after: float = 30.0, domain: str = "tailnet.test",
                 keepalive: float = 50.0, trust_deadline: float = TRUST_DEADLINE,
                 idle_timeout: float = SESSION_IDLE_TIMEOUT,
                 max_connections: tuple[int, int] | None = None, peers: str = PEERS_CLIENTS) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the control binds to loopback only, not {host}")
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.ephemeral_reap_after = ephemeral_reap_after
        self.keepalive = keepalive
        self.trust_deadline = trust_deadline
        self.idle_timeout = idle_timeout
        self.tailnet = Tailnet(self.data_dir / "state.json", domain=domain, on_change=self._on_change,
                               peers=peers)
        self.derp = DerpServer(admit=self._admit_derp)
        self.nofile = limits.nofile_soft_limit()
        self._conns: limits.ConnectionTable[asyncio.BaseTransport] = limits.ConnectionTable(
            *(max_connections or limits.connection_caps(self.nofile)))
        self.notes = limits.Summarized(log.warning)  # one line per 10 s for a storm of alike
        self._restore_exception_handler: Any = None
        self.stun = StunServer()
        self.api = ApiServer(self.tailnet, self.online, self._trust)  # /api/v2/ on the TCP port (api.py)
        self.fault_status: int | None = None  # every /machine/ request answers this (outage)
        self.register_status: int | None = None  # register answers this instead (facts §4f)
        self.port_moved = ""  # one line when the port used last time was taken (see _listen)
        self._server: asyncio.Server | None = None
        self._admin_server: asyncio.AbstractServer | None = None
        self._admin_ino = 0
        self._admin_tasks: set[asyncio.Task[None]] = set()
        self._streams: dict[int, set[_MapStream]] = {}
        self._sessions: set[_Session] = set()
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._reapers: dict[int, asyncio.TimerHandle] = {}
        self._changed: set[int] = set()
        self._removed: dict[int, bool] = {}  # node id -> was a proxy
        self._roles = {n.id: n.proxy for n in self.tailnet.nodes.values()}  # as peers were last told
        self._flush_scheduled = False
        self._keepalive_task: asyncio.Task[None] | None = None
        self._private = b""
        self._stopping = False

    # -- life cycle ------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # state, the admin socket: this user's alone
        if not self.tailnet.server_private:
            self.tailnet.server_private = noise.generate_private().hex()
            self.tailnet.save()
        self._private = bytes.fromhex(self.tailnet.server_private)
        (self.data_dir / "admin-token").unlink(missing_ok=True)  # earlier releases' bearer token
        self._admin_server = await self._listen_admin()
        await self.stun.start(self.host)
        self._server = await self._listen()
        self.port = self._server.sockets[0].getsockname()[1]
        if self.port != self.tailnet.port:
            self.tailnet.port = self.port
            self.tailnet.save()
        self._keepalive_task = asyncio.create_task(self._keepalives())
        self._restore_exception_handler = limits.limit_accept_errors(asyncio.get_running_loop(), self.notes)
        _write_endpoint(self.data_dir / "endpoint.json", {
            "url": self.url, "pid": os.getpid(), "create_time": psutil.Process().create_time(),
            "public_key": self.public_key, "admin_socket": str(admin_socket_path(self.data_dir))})
        self.tailnet.event("control_started", url=self.url)

    @property
    def public_key(self) -> str:
        """The control's Noise public key as `GET /key` gives it ("mkey:" + 64 hex)."""
        return "mkey:" + noise.public_key(self._private).hex()

    async def _listen(self) -> asyncio.Server:
        """The configured port, else the one used last time (nodes remember it), else any."""
        async def listen(port: int) -> asyncio.Server:
            return await asyncio.start_server(self._on_connection, self.host, port, limit=MAX_HEAD * 2)
        if self.port or not self.tailnet.port:
            return await listen(self.port)
        old = self.tailnet.port
        try:
            return await listen(old)
        except OSError as e:
            why = "held by another process" if e.errno == errno.EADDRINUSE else e.strerror
            server = await listen(0)
            new = f"http://{self.host}:{server.sockets[0].getsockname()[1]}"
            self.port_moved = (f"control port {old} is {why}; listening on {new} instead: nodes "
                               f"configured with http://{self.host}:{old} must be re-pointed "
                               f"(the supervisor's embedded proxies re-register by themselves)")
            self.tailnet.event("control_port_changed", reason=self.port_moved)
            return server

    async def _listen_admin(self) -> asyncio.AbstractServer:
        """The admin socket, mode 0600 before it accepts anyone (chmod between bind and
        listen). A leftover socket nobody answers on is replaced; OSError (one line) if
        another control answers on it."""
        path = admin_socket_path(self.data_dir)
        if path.parent != self.data_dir:  # the control dir's path is too long for a socket
            paths.ensure_runtime_dir(self.data_dir)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            try:
                probe.connect(str(path))
            except OSError:
                pass  # nothing answers: a leftover of a killed control, or nothing at all
            else:
                raise OSError(errno.EADDRINUSE, f"another control serves {self.data_dir} "
                                                f"(its admin socket {path} answers)")
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            self._admin_ino = os.lstat(path).st_ino
            sock.listen(64)
            sock.setblocking(False)
            return await asyncio.start_unix_server(self._on_admin_connection, sock=sock,
                                                   limit=MAX_HEAD * 2)
        except BaseException:
            sock.close()
            raise

    async def stop(self) -> None:
        """Close everything: listeners, sessions (nodes see the control vanish), DERP, STUN."""
        if self._server is None or self._stopping:
            await self._close_admin()  # a start that failed after the admin socket was bound
            return
        self._stopping = True  # from here on, closing streams schedules no reaping
        self._server.close()
        if self._restore_exception_handler:
            self._restore_exception_handler()
        if self._keepalive_task:
            self._keepalive_task.cancel()
        for s in list(self._sessions):
            s.abort()
        await self.derp.close()
        self.stun.close()
        for t in list(self._conn_tasks):
            t.cancel()
        await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        for handle in self._reapers.values():
            handle.cancel()
        self._reapers.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)
        self._server = None
        self._streams.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "endpoint.json").unlink()
        await self._close_admin()
        self.tailnet.event("control_stopped")

    # -- admin (Python) --------------------------------------------------------

    async def mint_key(self, *, ephemeral: bool = False, tags: list[str] | None = None) -> str:
        """A single-use key for the supervisor's own `up` (a proxy's); it is spent at once."""
        _, secret = self.tailnet.create_key(reusable=False, ephemeral=ephemeral,
                                            expiry=MINT_KEY_LIFETIME, tags=tags, proxy=True)
        return secret

    def api_credential(self) -> Credential:
        """An API access token of the tailnet's admin user for /api/v2/, made with this
        server and kept in memory only (never in endpoint.json or any file)."""
        return self.api.credential()

    def online(self, node_id: int) -> bool:
        return bool(self._streams.get(node_id))

    def list_nodes(self) -> list[dict[str, Any]]:
        return [self.tailnet.public_node(n, self.online(n.id)) for n in self.tailnet.nodes.values()]

    def list_keys(self) -> list[dict[str, Any]]:
        now = self.tailnet.now()
        return [k.public(now) for k in self.tailnet.keys.values()]

    def admin(self, op: str, **args: Any) -> Any:
        """The one entry point for admin operations (Python and HTTP share it).

        Capabilities: `set_caps(node=ID, https=bool, funnel=bool, funnel_ports=[443, "8000-8010"])`
        grants exactly those to one node (absent: not granted), `node` absent/None makes them
        the tailnet default, `set_caps(node=ID, inherit=True)` returns a node to that default;
        every node whose grant changed gets a new netmap at once. `list_caps` gives
        {"default": caps, "nodes": {id: caps}}. Owners: `create_key(user="alice@example.com")`;
        `create_key(proxy=True)` makes a key whose nodes count as the supervisor's proxies.
        Peers: `peers` gives {"peers": policy}; `set_peers(peers="all" | "clients")` changes
        the policy (until the next start) and tells every online node which peers it gained
        and lost: {"peers", "pushed": [node ids]}.
        `control` says which control answers: {"url", "public_key", "pid"}."""
        t = self.tailnet
        if op == "control":
            return {"url": self.url, "public_key": self.public_key, "pid": os.getpid()}
        if op in ApiServer.ADMIN_OPS:  # OAuth clients, API tokens, tag owners
            return self.api.admin(op, **args)
        if op == "create_key":
            key, secret = t.create_key(reusable=bool(args.get("reusable", False)),
                                       ephemeral=bool(args.get("ephemeral", False)),
                                       expiry=_opt_float(args.get("expiry", 90 * 86400.0)),
                                       tags=list(args.get("tags") or []),
                                       user=args.get("user") or "", proxy=bool(args.get("proxy", False)))
            return {**key.public(t.now()), "secret": secret}
        if op == "list_keys":
            return self.list_keys()
        if op == "revoke_key":
            return t.revoke_key(str(args["id"])).public(t.now())
        if op == "expire_key":
            return t.expire_key(str(args["id"])).public(t.now())
        if op == "list_nodes":
            return self.list_nodes()
        if op == "delete_node":
            node = t.delete_node(t.node_ref(args["id"]).id)
            return t.public_node(node, False)
        if op == "expire_node":
            node = t.expire_node(t.node_ref(args["id"]).id)
            return t.public_node(node, self.online(node.id))
        if op == "set_caps":
            nid = None if args.get("node") is None else t.node_ref(args["node"]).id
            unknown = set(args) - {"node", "inherit", *NO_CAPS}
            if unknown:
                raise AdminError(f"set_caps: unknown argument {sorted(unknown)[0]!r}")
            inherit = args.get("inherit", False)
            if type(inherit) is not bool:
                raise AdminError(f"set_caps: inherit wants true or false, got {inherit!r:.40}")
            grant = None if inherit else {k: args[k] for k in NO_CAPS if k in args}
            changed = t.set_caps(nid, grant)
            return {"node": nid, "caps": t.default_caps if nid is None else t.caps(t.node(nid)),
                    "pushed": [n.id for n in changed]}
        if op == "list_caps":
            return {"default": t.default_caps, "nodes": {str(n.id): t.caps(n) for n in t.nodes.values()}}
        if op == "peers":
            return {"peers": t.peers}
        if op == "set_peers":
            old = t.peers
            t.set_peers(args.get("peers"))
            pushed = self._peers_regrouped(lambda v, p: peers_visible(old, v.proxy, p.proxy))
            return {"peers": t.peers, "pushed": pushed}
        if op == "events":
            return t.events_since(float(args.get("since") or 0))
        if op == "set_fault":  # each switch changes only when named; None clears it
            if "status" in args:
                self.fault_status = _opt_status(args["status"])
            if "register_status" in args:
                self.register_status = _opt_status(args["register_status"])
            if "api_status" in args:  # every /api/v2 request answers it; the protocol works on
                self.api.fault_status = _opt_status(args["api_status"])
            faults = {"status": self.fault_status, "register_status": self.register_status,
                      "api_status": self.api.fault_status}
            t.event("fault_set", **faults)
            return faults
        raise AdminError(f"unknown admin operation {op!r}")

    # -- peer changes -----------------------------------------------------------

    def _on_change(self, kind: str, node: Node) -> None:
        if kind == "removed":
            self._removed[node.id] = self._roles.pop(node.id, node.proxy)
            self._changed.discard(node.id)
            for stream in list(self._streams.pop(node.id, ())):
                stream.end()  # hosted control ends a deleted node's long poll (§4b)
            handle = self._reapers.pop(node.id, None)
            if handle:
                handle.cancel()
        else:
            self._changed.add(node.id)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_changes)

    def _flush_changes(self) -> None:
        """Send what changed since the last turn to the nodes that see it: each changed
        node's JSON built once, and one message per kind of viewer (proxy or client)
        for every viewer that did not change itself."""
        self._flush_scheduled = False
        t = self.tailnet
        nodes = {i: t.nodes[i] for i in self._changed if i in t.nodes}
        removed = dict(self._removed)
        self._changed.clear()
        self._removed.clear()
        if not nodes and not removed:
            return
        was = {i: self._roles[i] for i, n in nodes.items() if self._roles.get(i, n.proxy) != n.proxy}
        self._roles.update((i, n.proxy) for i, n in nodes.items())
        if was:  # logged in again as the other kind: its peers and its viewers change
            self._peers_regrouped(lambda v, p: peers_visible(t.peers, was.get(v.id, v.proxy),
                                                             was.get(p.id, p.proxy)))
        changed = {i: self._node_json(n) for i, n in nodes.items()}
        shared: dict[bool, bytes | None] = {}  # per kind of viewer, for those not in `changed`
        for nid, streams in list(self._streams.items()):
            viewer = t.nodes.get(nid)
            if viewer is None:
                continue
            if nid in changed:
                data = self._delta(viewer, nodes, changed, removed)
            else:
                if viewer.proxy not in shared:
                    shared[viewer.proxy] = self._delta(viewer, nodes, changed, removed)
                data = shared[viewer.proxy]
            if data:
                for stream in list(streams):
                    stream.send(data)

    def _delta(self, viewer: Node, nodes: dict[int, Node], changed: dict[int, dict[str, Any]],
               removed: dict[int, bool]) -> bytes | None:
        """One viewer's map message for a turn's changes (None: nothing it sees changed).
        It depends on the viewer only through its kind, unless it is among the changed."""
        t = self.tailnet
        seen = [n for i, n in nodes.items() if i != viewer.id and t.visible(viewer, n)]
        gone = sorted(i for i, proxy in removed.items() if peers_visible(t.peers, viewer.proxy, proxy))
        msg: dict[str, Any] = {}
        if seen:
            msg["PeersChanged"] = [changed[n.id] for n in seen]
        if gone:
            msg["PeersRemoved"] = gone
        if viewer.id in changed:
            msg.update(self._self_parts(viewer, changed[viewer.id]))
            seen = [*seen, viewer]
        if seen:
            msg["UserProfiles"] = self._profiles(seen)
        return zstdframe.message(json.dumps(msg).encode()) if msg else None

    def _peers_regrouped(self, before: Callable[[Node, Node], bool]) -> list[int]:
        """After the rule of who sees whom changed (`before(viewer, peer)` is the old
        rule): tell every node with a map stream the peers it gained (PeersChanged) and
        lost (PeersRemoved). A delta, not a whole `Peers` list: tailscaled ignores an empty
        one (controlclient/map.go updatePeersStateFromResponse), so a proxy left with no
        peers would keep the old ones. Returns the ids of the nodes told."""
        t = self.tailnet
        built: dict[int, dict[str, Any]] = {}
        told = []
        for nid, streams in list(self._streams.items()):
            viewer = t.nodes.get(nid)
            if viewer is None:
                continue
            gained, lost = [], []
            for p in t.nodes.values():
                if p.id == nid:
                    continue
                old, new = before(viewer, p), t.visible(viewer, p)
                if new and not old:
                    gained.append(p)
                elif old and not new:
                    lost.append(p.id)
            if not gained and not lost:
                continue
            msg: dict[str, Any] = {}
            if gained:
                for p in gained:
                    if p.id not in built:  # each node's JSON built once, whoever gains it
                        built[p.id] = self._node_json(p)
                msg["PeersChanged"] = [built[p.id] for p in gained]
                msg["UserProfiles"] = self._profiles(gained)
            if lost:
                msg["PeersRemoved"] = sorted(lost)
            data = zstdframe.message(json.dumps(msg).encode())
            for stream in list(streams):
                stream.send(data)
            told.append(nid)
        return told

    def _node_json(self, n: Node) -> dict[str, Any]:
        now = self.tailnet.now()
        addrs = [n.ipv4 + "/32", n.ipv6 + "/128"]
        return {"ID": n.id, "StableID": n.stable_id, "Name": self.tailnet.fqdn(n),
                "User": self.tailnet.profile(self.tailnet.owner(n))["ID"],
                "Key": n.node_key, "KeyExpiry": rfc3339(n.key_expiry),
                "Expired": n.expired(now), "Machine": n.machine_key,
                "DiscoKey": n.disco_key or "discokey:" + "00" * 32,
                "Addresses": addrs, "AllowedIPs": addrs, "Endpoints": n.endpoints,
                "HomeDERP": n.home_derp,
                "DERP": f"127.3.3.40:{n.home_derp}" if n.home_derp else "",
                "Hostinfo": {**n.hostinfo, "Hostname": n.hostinfo.get("Hostname", n.hostname)},
                "Created": rfc3339(n.created), "Tags": n.tags,
                "Online": self.online(n.id), "MachineAuthorized": True,
                "LastSeen": rfc3339(n.last_seen) if n.last_seen else None}

    def _derp_map(self) -> dict[str, Any]:
        return {"Regions": {"900": {
            "RegionID": 900, "RegionCode": "loop", "RegionName": "Loopback",
            "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": self.host,
                       "IPv4": self.host, "IPv6": "none", "STUNPort": self.stun.port,
                       "DERPPort": self.port, "CanPort80": False}]}},
            "OmitDefaultRegions": True}

    def _self_parts(self, node: Node, node_json: dict[str, Any]) -> dict[str, Any]:
        """What only the node itself hears about itself: `Node` with its CapMap (peers'
        CapMaps mean something else), and the `DNSConfig` carrying its CertDomains. Both
        are whole values in every message, so a withdrawn grant disappears."""
        cap_map = self.tailnet.cap_map(node)
        cert_domains = self.tailnet.cert_domains(node)
        return {"Node": {**node_json, **({"CapMap": cap_map} if cap_map else {})},
                "DNSConfig": {"CertDomains": cert_domains} if cert_domains else {}}

    def _profiles(self, nodes: Any) -> list[dict[str, Any]]:
        """UserProfiles for the owners of these nodes: tailscaled keeps each profile it has
        heard of, and WhoIs (serve's identity headers) needs the one of every peer."""
        t = self.tailnet
        return [t.profile(login) for login in sorted({t.owner(n) for n in nodes})]

    def _full_map(self, node: Node, with_peers: bool) -> dict[str, Any]:
        t = self.tailnet
        peers = [p for p in t.nodes.values() if p.id != node.id and t.visible(node, p)] if with_peers else []
        msg: dict[str, Any] = {
            **self._self_parts(node, self._node_json(node)), "DERPMap": self._derp_map(),
            "Domain": self.tailnet.domain, "PacketFilter": ALLOW_ALL,
            "UserProfiles": self._profiles([node, *peers]), "ControlTime": rfc3339(time.time())}
        if peers:
            msg["Peers"] = [self._node_json(p) for p in peers]
        return msg

    async def _keepalives(self) -> None:
        data = zstdframe.message(b'{"KeepAlive":true}')
        while True:
            await asyncio.sleep(self.keepalive)
            for streams in list(self._streams.values()):
                for s in list(streams):
                    s.send(data)

    def _stream_started(self, stream: _MapStream) -> None:
        nid = stream.node_id
        handle = self._reapers.pop(nid, None)
        if handle:
            handle.cancel()
        first = not self._streams.get(nid)
        self._streams.setdefault(nid, set()).add(stream)
        self.tailnet.event("map_started", node=nid)
        if first and nid in self.tailnet.nodes:
            self._on_change("changed", self.tailnet.nodes[nid])  # now online

    def _stream_ended(self, stream: _MapStream) -> None:
        nid = stream.node_id
        streams = self._streams.get(nid)
        if not streams or stream not in streams:
            return
        streams.discard(stream)
        node = self.tailnet.nodes.get(nid)
        self.tailnet.event("map_ended", node=nid)
        if streams or node is None:
            return
        del self._streams[nid]
        node.last_seen = self.tailnet.now()
        self._on_change("changed", node)  # now offline
        if node.ephemeral and not self._stopping:
            self._reapers[nid] = asyncio.get_running_loop().call_later(
                self.ephemeral_reap_after, self._reap, nid)

    def _reap(self, nid: int) -> None:
        self._reapers.pop(nid, None)
        if nid in self.tailnet.nodes and not self._streams.get(nid):
            self.tailnet.delete_node(nid, reason="node_reaped")

    # -- HTTP/1.1 front door -------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        transport = writer.transport
        admitted, shed = self._conns.admit(transport)
        for old in shed:
            old.abort()
        if shed or not admitted:
            self.notes.note("cap", f"control: {len(self._conns) + (not admitted)} connections held, "
                                   f"{self._conns.untrusted} of them not yet a registered node's (cap "
                                   f"{self._conns.cap}, {self._conns.untrusted_cap} unproven; "
                                   f"RLIMIT_NOFILE {self.nofile}): shedding the oldest unproven",
                            "control: connections shed or refused at the cap")
        if not admitted:
            transport.abort()
            return
        self._conn_tasks.add(task)
        try:
            await self._serve_http1(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
                asyncio.TimeoutError, noise.NoiseError, zstdframe.FrameError) as e:
            log.debug("connection dropped: %s", e)
        except asyncio.CancelledError:
            pass
        except Exception:  # one bad client never takes the server down
            log.exception("control connection failed")
        finally:
            self._conn_tasks.discard(task)
            self._conns.discard(transport)
            _close_soon(writer)

    def _trust(self, writer: asyncio.StreamWriter) -> None:
        """This connection speaks for a registered node (or carries a live API credential):
        never shed, no trust deadline."""
        self._conns.trust(writer.transport)

    def _known_machine(self, machine_key: bytes) -> bool:
        mkey = "mkey:" + machine_key.hex()
        return any(n.machine_key == mkey for n in self.tailnet.nodes.values())

    def _admit_derp(self, key: bytes, writer: asyncio.StreamWriter) -> bool:
        """DERP serves a node key only once it is registered (the handshake proved the
        client holds it): derpserver's --verify-clients, with the tailnet as the list."""
        if "nodekey:" + key.hex() not in self.tailnet.by_node_key:
            return False
        self._trust(writer)
        return True

    async def _serve_http1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            return _reply(writer, 431, "request head too large")
        try:
            method, target, path, headers = _parse_head(head)
        except ValueError as e:
            return _reply(writer, 400, f"bad request: {e}")
        if path.startswith("/derp"):
            return await self.derp.handle(reader, writer, method, target, headers)
        if path == "/key":
            body = {"legacyPublicKey": "mkey:" + "00" * 32,
                    "publicKey": "mkey:" + noise.public_key(self._private).hex()}
            return _reply(writer, 200, json.dumps(body), "application/json")
        if path == "/generate_204":
            return _reply(writer, 204, "")
        if path == "/ts2021" and method == "POST":
            return await self._upgrade(reader, writer, headers)
        if path.startswith("/api/v2/"):
            return await self.api.handle(reader, writer, method, target, headers)
        _reply(writer, 404, "not found")  # /admin/ too: it is on the admin socket only

    async def _upgrade(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       headers: dict[str, str]) -> None:
        if headers.get("upgrade", "").lower() != "tailscale-control-protocol":
            return _reply(writer, 400, "missing Upgrade: tailscale-control-protocol")
        try:
            init = base64.b64decode(headers.get("x-tailscale-handshake", ""), validate=True)
            response, session = noise.respond(self._private, init)
        except (binascii.Error, ValueError) as e:
            return _reply(writer, 400, f"bad X-Tailscale-Handshake: {e}")
        except noise.NoiseError as e:
            return _reply(writer, 400, f"handshake failed: {e}")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\n"
                     b"Connection: upgrade\r\n\r\n" + response)
        if self._known_machine(session.machine_key):  # Noise IK proved it holds the key
            self._trust(writer)
        s = _Session(self, reader, writer, session)
        self._sessions.add(s)
        try:
            await s.run()
        finally:
            self._sessions.discard(s)
            s.close_streams()

    # -- admin over HTTP on the admin socket ------------------------------------------

    async def _on_admin_connection(self, reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.1 request per connection. The peer's uid, as the kernel reports it,
        must be this process's or root's, whatever the socket's mode (a NAS's ACLs can
        make modes meaningless): 403 otherwise, once the head is read (never the body)."""
        task = asyncio.current_task()
        assert task is not None
        self._admin_tasks.add(task)
        try:
            pid, uid, _ = peer_credentials(writer.get_extra_info("socket"))
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except asyncio.LimitOverrunError:
                return _reply(writer, 431, "request head too large")
            if uid not in (0, os.geteuid()):
                self.tailnet.event("admin_refused", reason=f"peer uid {uid} (pid {pid})")
                return _reply(writer, 403, json.dumps({"error": f"uid {uid} may not administer "
                                                                "this control"}), "application/json")
            try:
                method, target, path, headers = _parse_head(head)
            except ValueError as e:
                return _reply(writer, 400, f"bad request: {e}")
            if not path.startswith("/admin/"):
                return _reply(writer, 404, json.dumps({"error": f"no admin route {path[:60]}"}),
                              "application/json")
            await self._admin_http(reader, writer, method, target, headers)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
                asyncio.TimeoutError) as e:
            log.debug("admin connection dropped: %s", e)
        except asyncio.CancelledError:
            pass
        except Exception:  # one bad client never takes the server down
            log.exception("admin connection failed")
        finally:
            self._admin_tasks.discard(task)
            writer.close()

    async def _close_admin(self) -> None:
        """Stop the admin socket: close it, end its connections, unlink it (if it is still
        the one this control bound)."""
        if self._admin_server is None:
            return
        self._admin_server.close()
        for t in list(self._admin_tasks):
            t.cancel()
        await asyncio.gather(*self._admin_tasks, return_exceptions=True)
        self._admin_server = None
        path = admin_socket_path(self.data_dir)
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path).st_ino == self._admin_ino:
                path.unlink()

    async def _admin_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          method: str, target: str, headers: dict[str, str]) -> None:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= 64 * 1024:
            return _reply(writer, 400, json.dumps({"error": "bad Content-Length"}), "application/json")
        raw = await asyncio.wait_for(reader.readexactly(length), HEAD_TIMEOUT)
        try:
            body = _json_object(raw)
            op, args = _admin_route(method, target, body)
            result = self.admin(op, **args)
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            return _reply(writer, 400, json.dumps({"error": f"bad request: {e}"}), "application/json")
        except AdminError as e:
            return _reply(writer, 404, json.dumps({"error": str(e)}), "application/json")
        _reply(writer, 200, json.dumps(result), "application/json")

    # -- the machine endpoints (called by _Session) ---------------------------------------

    async def machine_request(self, session: _Session, sid: int, path: str, body: bytes) -> None:
        mkey = "mkey:" + session.noise.machine_key.hex()
        if self.fault_status is not None:
            return session.respond(sid, self.fault_status, b"control plane fault injected")
        try:
            req = _json_object(body)
            if path == "/machine/register":
                return await self._register(session, sid, req, mkey)
            if path == "/machine/map":
                return self._map(session, sid, req, mkey)
        except PermissionError as e:
            self.tailnet.event("request_refused", path=path, reason=str(e))
            return session.respond(sid, 403, str(e).encode())
        except ValueError as e:  # the tailnet's checks name the field; anything else is a bug (500)
            return session.respond(sid, 400, f"bad request: {e}".encode())
        session.respond(sid, 200, b"{}", "application/json")

    async def _register(self, session: _Session, sid: int, req: dict[str, Any], mkey: str) -> None:
        if self.register_status is not None:
            self.tailnet.event("register_rejected", reason=f"http {self.register_status}")
            body = (b"invalid key: API key does not exist" if self.register_status < 500
                    else b"internal server error")  # an outage says nothing about the key
            return session.respond(sid, self.register_status, body)
        result = self.tailnet.register(req, mkey, self.url)
        if result.wait_followup:
            await session.closed.wait()  # nobody visits AuthURLs here; hold until the trust deadline
            return
        if result.node is not None:
            self._trust(session.writer)
        session.respond(sid, 200, json.dumps(result.response).encode(), "application/json")

    def _map(self, session: _Session, sid: int, req: dict[str, Any], mkey: str) -> None:
        node = self.tailnet.map_node(str(req.get("NodeKey", "")), mkey)
        if node is None:
            self.tailnet.event("map_rejected", reason="node not found",
                               node_key=str(req.get("NodeKey", ""))[:16])
            return session.respond(sid, 404, b"node not found")
        self._trust(session.writer)
        if self.tailnet.update_from_map(node, req):
            self._on_change("changed", node)
        session.start_response(sid, 200, "application/octet-stream")
        if not req.get("Stream"):  # a "lite" update: one message, then done
            msg = self._full_map(node, with_peers=not req.get("OmitPeers"))
            session.send(sid, zstdframe.message(json.dumps(msg).encode()), end=True)
            return
        stream = _MapStream(session, sid, node.id)
        session.streams[sid] = stream
        self._stream_started(stream)  # first, so the node's own map already says Online
        stream.send(zstdframe.message(json.dumps(self._full_map(node, True)).encode()))


@dataclass(eq=False)
class _MapStream:
    session: _Session
    sid: int
    node_id: int

    def send(self, data: bytes) -> None:
        self.session.send(self.sid, data)

    def end(self) -> None:
        self.session.end_stream(self.sid)


@dataclass(eq=False)
class _Session:
    """One Noise connection from one machine, carrying HTTP/2. Closed (GOAWAY, so Go's
    transport retries elsewhere whatever it had not sent) when it has not proven a
    registered node's machine key by the server's trust deadline, or, proven, when it
    has had no request or stream for the idle timeout."""

    server: ControlServer
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    noise: noise.Session
    streams: dict[int, _MapStream] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        cfg = h2.config.H2Configuration(client_side=False)  # headers stay bytes: any bytes may come
        self.h2 = h2.connection.H2Connection(cfg)
        self.h2.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
        self.h2.initiate_connection()
        self._pending: dict[int, bytearray] = {}
        self._ending: set[int] = set()
        self._bodies: dict[int, bytearray] = {}
        self._paths: dict[int, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.started = self.last_active = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._flush()

    async def run(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(
            min(self.server.trust_deadline, self.server.idle_timeout), self._check_time)
        try:
            while True:
                header = await self.reader.readexactly(3)
                ct = await self.reader.readexactly(noise.parse_record_header(header))
                self.last_active = time.monotonic()
                plaintext = self.noise.rx.decrypt(ct)
                if plaintext:
                    self._on_events(self.h2.receive_data(plaintext))
                    self._flush()
        except h2.exceptions.ProtocolError as e:
            log.debug("h2 protocol error: %s", e)
        finally:
            if self._timer:
                self._timer.cancel()
            self.closed.set()
            for t in list(self._tasks):
                t.cancel()

    def _check_time(self) -> None:
        """The trust deadline, then the idle timeout; re-armed for the next due time."""
        now = time.monotonic()
        srv = self.server
        if not srv._conns.is_trusted(self.writer.transport):
            due = self.started + srv.trust_deadline
            if now >= due:
                return self.close(f"no registered node's key after {srv.trust_deadline:g} s")
        elif self.streams or self._tasks or self._bodies or self._pending:
            due = now + srv.idle_timeout  # a long poll or a request in flight is not idle
        else:
            due = self.last_active + srv.idle_timeout
            if now >= due:
                return self.close(f"idle for {now - self.last_active:.0f} s")
        self._timer = asyncio.get_running_loop().call_later(max(0.01, due - now), self._check_time)

    def close(self, why: str) -> None:
        """GOAWAY (requests it had not yet processed are retried by the client on a new
        connection), then close once that is flushed."""
        log.debug("closing a ts2021 session from mkey:%s: %s", self.noise.machine_key.hex()[:16], why)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        self._flush()
        _close_soon(self.writer)

    def _on_events(self, events: list[h2.events.Event]) -> None:
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                hdrs = dict(ev.headers)
                self._paths[ev.stream_id] = hdrs.get(b":path", b"").decode("utf-8", "replace")
                self._bodies[ev.stream_id] = bytearray()
                if ev.stream_ended:
                    self._dispatch(ev.stream_id)
            elif isinstance(ev, h2.events.DataReceived):
                body = self._bodies.get(ev.stream_id)
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if body is None:
                    continue
                body += ev.data
                if len(body) > MAX_BODY:
                    self._bodies.pop(ev.stream_id)
                    self.respond(ev.stream_id, 413, b"request body too large")
            elif isinstance(ev, h2.events.StreamEnded):
                if ev.stream_id in self._bodies:
                    self._dispatch(ev.stream_id)
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                for sid in list(self._pending):
                    self._pump(sid)
            elif isinstance(ev, h2.events.StreamReset):
                self._forget(ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                raise asyncio.IncompleteReadError(b"", None)

    def _dispatch(self, sid: int) -> None:
        body = bytes(self._bodies.pop(sid))
        path = self._paths.pop(sid, "")
        task = asyncio.create_task(self._handle(sid, path, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, sid: int, path: str, body: bytes) -> None:
        try:
            if path.startswith("/machine/"):
                await self.server.machine_request(self, sid, path, body)
            else:
                self.respond(sid, 404, b"not found")
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("request %s failed", path)
            with contextlib.suppress(Exception):
                self.respond(sid, 500, b"internal error")

    # -- writing ----------------------------------------------------------------------

    def respond(self, sid: int, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.start_response(sid, status, ctype, len(body))
        self.send(sid, body, end=True)

    def start_response(self, sid: int, status: int, ctype: str, length: int | None = None) -> None:
        headers = [(":status", str(status)), ("content-type", ctype)]
        if length is not None:
            headers.append(("content-length", str(length)))
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.send_headers(sid, headers)
        self._flush()

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        """Queue data on a stream and send what flow control allows now."""
        if self.closed.is_set():
            return
        self._pending.setdefault(sid, bytearray()).extend(data)
        if end:
            self._ending.add(sid)
        self._pump(sid)

    def end_stream(self, sid: int) -> None:
        self.send(sid, b"", end=True)

    def _pump(self, sid: int) -> None:
        buf = self._pending.get(sid)
        if buf is None:
            return
        try:
            while buf:
                window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = bytes(buf[:window])
                del buf[:window]
                self.h2.send_data(sid, chunk)
            if not buf:
                del self._pending[sid]
                if sid in self._ending:
                    self._ending.discard(sid)
                    self.h2.end_stream(sid)
                    self._forget(sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self._forget(sid)
        self._flush()

    def _forget(self, sid: int) -> None:
        self.last_active = time.monotonic()
        self._pending.pop(sid, None)
        self._ending.discard(sid)
        stream = self.streams.pop(sid, None)
        if stream is not None:
            self.server._stream_ended(stream)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if not data or self.writer.is_closing():
            return
        self.writer.write(noise.seal(self.noise.tx, data))
        if self.writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.abort()

    def close_streams(self) -> None:
        for sid in list(self.streams):
            self._forget(sid)

    def abort(self) -> None:
        self.closed.set()
        self.writer.transport.abort()


def _close_soon(writer: asyncio.StreamWriter) -> None:
    """Close after flushing what is queued, but drop the connection if the peer does not
    read it within CLOSE_TIMEOUT: a closed connection never keeps its descriptor."""
    transport = writer.transport
    writer.close()
    if transport.get_write_buffer_size():
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """(method, target, path, headers with lower-case names) of an HTTP/1 request head;
    ValueError for anything else."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1 request line: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"malformed header line {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    path = urlsplit(parts[1]).path  # ValueError for e.g. an unbalanced "[" in the host
    return parts[0], parts[1], path, headers


def _json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object ({} when empty); ValueError for anything else."""
    try:
        value = json.loads(raw) if raw else {}
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("body is not a JSON object")
    return value


_REASONS = {101: "Switching Protocols", 200: "OK", 204: "No Content", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 413: "Payload Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def _reply(writer: asyncio.StreamWriter, status: int, body: str, ctype: str = "text/plain") -> None:
    data = body.encode()
    writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
                 f"Content-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + data)


def _admin_route(method: str, target: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Map an admin HTTP request to (operation, arguments). A node in a path is its
    numeric id or its stable ID (Tailnet.find_node)."""
    url = urlsplit(target)
    parts = [unquote(p) for p in url.path.split("/") if p][1:]  # drop "admin"
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    routes = {
        ("GET", "keys"): "list_keys", ("POST", "keys"): "create_key",
        ("GET", "nodes"): "list_nodes", ("GET", "events"): "events",
        ("POST", "fault"): "set_fault", ("GET", "caps"): "list_caps", ("POST", "caps"): "set_caps",
        ("GET", "control"): "control", ("GET", "peers"): "peers", ("POST", "peers"): "set_peers",
        ("GET", "oauth-clients"): "list_oauth_clients", ("POST", "oauth-clients"): "create_oauth_client",
        ("GET", "tokens"): "list_api_tokens", ("POST", "tokens"): "create_api_token",
        ("GET", "tag-owners"): "tag_owners", ("POST", "tag-owners"): "set_tag_owners",
    }
    if len(parts) == 1 and (method, parts[0]) in routes:
        return routes[(method, parts[0])], {**query, **body}
    if len(parts) == 3 and method == "POST":
        op = {("keys", "revoke"): "revoke_key", ("keys", "expire"): "expire_key",
              ("nodes", "delete"): "delete_node", ("nodes", "expire"): "expire_node",
              ("oauth-clients", "revoke"): "revoke_oauth_client"}.get((parts[0], parts[2]))
        if op:
            return op, {"id": parts[1]}
    raise AdminError(f"no admin route {method} {url.path}")


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_status(value: Any) -> int | None:
    if value is None:
        return None
    status = int(value)
    if not 400 <= status <= 599:
        raise ValueError(f"fault status must be 4xx or 5xx, not {status}")
    return status


def admin_socket_path(control_dir: Path) -> Path:
    """The admin socket: CONTROL_DIR/admin.sock, or, when that path does not fit in a
    socket address (107 bytes), `control-admin.sock` in the private runtime dir named
    after the control dir (paths.socket_path): the same path for server and client."""
    return paths.socket_path(control_dir / "admin.sock", control_dir, "control-admin.sock")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a unix socket's peer as the kernel recorded them at connect
    (SO_PEERCRED, Linux: struct ucred is three C ints)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _write_endpoint(path: Path, info: dict[str, Any]) -> None:
    """Write endpoint.json whole (a reader never sees half of it), 0600 like all else in
    the control dir, though nothing in it is secret."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
    os.replace(tmp, path)
