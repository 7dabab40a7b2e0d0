"""`ts-supervisor control ...`: run the control standalone, or administer a running one.

The admin commands find the control through its data dir (`--control-dir`,
default the supervisor's `DATA/control`), so they work the same for a
standalone control and for the supervisor's embedded one. They speak HTTP
over the control's admin socket (server.admin_socket_path), never over TCP,
and only to the live process that wrote `endpoint.json`: see AdminClient.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import signal
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import psutil


class AdminClient:
    """The admin API over the control's admin socket, for the CLI and for tests and
    benchmarks in other processes. Errors: ConnectionError (one line) when no live
    control can be proven, RuntimeError (one line) when the control refuses a request.

    Nothing is sent to a socket before it is proven to be the control's: `endpoint.json`
    names a pid and its create time (a killed control leaves the file behind, and its
    pid may be reused), and every connection's peer, as the kernel reports it
    (SO_PEERCRED), must be that pid. A stale file is refused, so a process that took
    over the control's old TCP port after a `kill -9` never hears from the CLI, and
    the admin API has no TCP listener at all. The control's URL is its own answer over
    the proven socket (`url`), never the file's."""

    def __init__(self, socket_path: Path, pid: int, public_key: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.pid = pid
        self.public_key = public_key
        self.timeout = timeout
        self.url = ""

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> "AdminClient":
        """A client proven to talk to the live control of `data_dir` (see the class)."""
        endpoint = data_dir / "endpoint.json"
        try:
            info = json.loads(endpoint.read_text())
            pid, created, public_key = int(info["pid"]), float(info["create_time"]), str(info["public_key"])
        except FileNotFoundError:
            raise ConnectionError(f"no control running with data dir {data_dir} "
                                  f"({endpoint} missing)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConnectionError(f"{endpoint} unreadable ({type(e).__name__}: {e}); "
                                  f"is a control running with data dir {data_dir}?") from None
        if not _alive(pid, created):
            raise ConnectionError(f"stale {endpoint}: the control that wrote it (pid {pid}) is not "
                                  f"running; nothing was sent (start it: ts-supervisor run, or "
                                  f"ts-supervisor control serve)")
        from supervisor.control.server import admin_socket_path  # h2 & co. only when used
        # The control's own record of its socket: when the control dir is too long for a
        # socket address the socket is in a runtime dir that depends on the control's uid
        # and environment (root's CLI would look in /run, a service listens in /tmp). Safe
        # to follow: nothing is sent before the peer is proven to be `pid` (_connect).
        recorded = info.get("admin_socket")
        client = cls(Path(recorded) if isinstance(recorded, str) and recorded else
                     admin_socket_path(data_dir), pid, public_key)
        who = client.call("GET", "control")
        if who.get("public_key") != public_key or who.get("pid") != pid:
            raise ConnectionError(f"the control answering on {client.socket_path} is not the one "
                                  f"{endpoint} names (public key or pid differ)")
        client.url = str(who["url"])
        return client

    def _connect(self) -> socket.socket:
        """A connection to the admin socket whose peer is the control's pid; nothing is
        written to it here. ConnectionError otherwise."""
        from supervisor.control.server import peer_credentials
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
            pid, _, _ = peer_credentials(sock)
        except OSError as e:
            sock.close()
            raise ConnectionError(f"control admin socket {self.socket_path} unreachable: "
                                  f"{e.strerror or e}") from None
        if pid != self.pid:
            sock.close()
            raise ConnectionError(f"{self.socket_path} is served by pid {pid}, not by the "
                                  f"control (pid {self.pid}); nothing was sent")
        return sock

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        conn = _UnixHTTPConnection(self._connect(), self.timeout)
        try:
            conn.request(method, "/admin/" + path, body=data,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ConnectionError(f"control admin socket {self.socket_path}: "
                                  f"{type(e).__name__}: {e}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if resp.status != 200:
            reason = answer.get("error") if isinstance(answer, dict) else resp.reason
            raise RuntimeError(f"control answered {resp.status}: {reason}")
        return answer

    def create_key(self, *, reusable: bool = False, ephemeral: bool = False,
                   expiry: float | None = 90 * 86400.0, tags: list[str] | None = None,
                   user: str = "", proxy: bool = False) -> dict[str, Any]:
        """`proxy`: the key's nodes count as the supervisor's proxies (the peers policy)."""
        return self.call("POST", "keys", {"reusable": reusable, "ephemeral": ephemeral,
                                          "expiry": expiry, "tags": tags or [], "user": user,
                                          "proxy": proxy})

    def peers(self) -> dict[str, Any]:
        """{"peers": "clients" | "all"}: the peers policy."""
        return self.call("GET", "peers")

    def set_peers(self, peers: str) -> dict[str, Any]:
        """Change the peers policy until the control's next start; online nodes hear what
        they gained and lost at once. {"peers", "pushed": [node ids]}."""
        return self.call("POST", "peers", {"peers": peers})

    def keys(self) -> list[dict[str, Any]]:
        return self.call("GET", "keys")

    def nodes(self) -> list[dict[str, Any]]:
        return self.call("GET", "nodes")

    def events(self, since: float = 0.0) -> list[dict[str, Any]]:
        return self.call("GET", f"events?since={since!r}")

    def act(self, kind: str, ident: str | int, verb: str) -> dict[str, Any]:
        """POST {kind}/{ident}/{verb}: a node by stable ID or numeric id, a key or OAuth
        client by its id."""
        return self.call("POST", f"{kind}/{urllib.parse.quote(str(ident), safe='')}/{verb}", {})

    def set_fault(self, status: int | None = None, register_status: int | None = None) -> Any:
        return self.call("POST", "fault", {"status": status, "register_status": register_status})

    def caps(self) -> dict[str, Any]:
        return self.call("GET", "caps")

    def create_oauth_client(self, scopes: list[str], tags: list[str]) -> dict[str, Any]:
        """{"id", "secret", "scopes", "tags"}: the secret (`tskey-client-...`) is in this
        answer only; the control keeps its hash."""
        return self.call("POST", "oauth-clients", {"scopes": scopes, "tags": tags})

    def create_api_token(self, expiry: float | None = None) -> dict[str, Any]:
        """{"id", "secret", "expires"} of a new API access token of the tailnet's admin user
        (`tskey-api-...`, in this answer only); `expiry` seconds, None: the control's default."""
        return self.call("POST", "tokens", {} if expiry is None else {"expiry": expiry})

    def set_tag_owners(self, owners: dict[str, list[str]]) -> dict[str, list[str]]:
        """Replace the tailnet's tagOwners ({"tag:web": ["tag:ops"]}); the new map."""
        return self.call("POST", "tag-owners", {"owners": owners})

    def set_caps(self, node: int | str | None = None, *, https: bool = False, funnel: bool = False,
                 funnel_ports: str | list[int | str] = "", inherit: bool = False) -> dict[str, Any]:
        """Grant exactly these capabilities to `node` (None: the tailnet default); `inherit`
        returns the node to the default. Nodes whose grant changed get a new netmap at once."""
        body: dict[str, Any] = {"node": node, "inherit": inherit}
        if not inherit:
            body.update(https=https, funnel=funnel, funnel_ports=funnel_ports)
        return self.call("POST", "caps", body)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a socket the caller has already connected (and checked)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__("control", timeout=timeout)
        self.sock = sock

    def connect(self) -> None:
        raise ConnectionError("the admin connection is used once")


def _alive(pid: int, create_time: float) -> bool:
    """Whether `pid` is still the process that was created at `create_time` (psutil's
    create time, as procs.find_orphans compares it)."""
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.05
    except (psutil.Error, ValueError, OverflowError):
        return False


def _serve(args: argparse.Namespace) -> int:
    from supervisor.control.server import ControlServer

    async def main() -> None:
        server = ControlServer(args.control_dir, port=args.port,
                               ephemeral_reap_after=args.reap_after, peers=args.peers)
        await server.start()
        if server.port_moved:
            print(f"ts-supervisor control: {server.port_moved}", file=sys.stderr, flush=True)
        print(f"control listening on {server.url} (data {args.control_dir}); Ctrl-C stops",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    try:
        asyncio.run(main())
    except OSError as e:  # another control serves the dir, a port or dir it cannot have: one line
        print(f"ts-supervisor control: error: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _admin(args: argparse.Namespace) -> int:
    try:
        client = AdminClient.from_data_dir(args.control_dir)
        if args.what == "keys":
            if args.verb == "create":  # as oauth-clients/tokens create: `> file` makes a key file
                return _print_secret(client.create_key(reusable=args.reusable, ephemeral=args.ephemeral,
                                                       expiry=args.expiry, tags=args.tag, user=args.user,
                                                       proxy=args.proxy), "auth key", args.json)
            out: Any
            if args.verb == "list":
                out = client.keys()
            else:
                out = client.act("keys", args.id, args.verb)
        elif args.what == "nodes":
            out = client.nodes() if args.verb == "list" else client.act("nodes", args.id, args.verb)
        elif args.what == "oauth-clients":
            if args.verb == "create":
                return _print_secret(client.create_oauth_client(_commas(args.scope), _commas(args.tag)),
                                     "OAuth client", args.json)
            out = (client.call("GET", "oauth-clients") if args.verb == "list"
                   else client.act("oauth-clients", args.id, "revoke"))
        elif args.what == "tokens":
            if args.verb == "create":
                return _print_secret(client.create_api_token(args.expiry), "API access token", args.json)
            out = client.call("GET", "tokens")
        elif args.what == "tag-owners":
            out = (client.call("GET", "tag-owners") if args.verb == "list"
                   else client.set_tag_owners(_tag_owner_pairs(args.owners)))
        elif args.what == "events":
            out = client.events(args.since)
        elif args.what == "peers":
            out = client.peers() if args.policy is None else client.set_peers(args.policy)
        elif args.what == "caps":
            if args.verb == "set" and args.inherit and (args.https or args.funnel or args.funnel_ports):
                raise RuntimeError("caps set: --inherit takes no capabilities (it returns the node "
                                   "to the tailnet default)")
            out = client.caps() if args.verb == "list" else client.set_caps(
                args.node, https=args.https, funnel=args.funnel, funnel_ports=args.funnel_ports,
                inherit=args.inherit)
        else:
            out = client.set_fault(None if args.clear else args.status, args.register_status)
    except (ConnectionError, RuntimeError) as e:
        print(f"ts-supervisor control: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


def _commas(values: list[str]) -> list[str]:
    """Repeated and comma-separated option values as one list: --tag a,b --tag c."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _tag_owner_pairs(pairs: list[str]) -> dict[str, list[str]]:
    """["tag:web=tag:ops,tag:admin", ...] -> {"tag:web": ["tag:ops", "tag:admin"]};
    RuntimeError (one line) for a pair without "=" or a tag given twice."""
    owners: dict[str, list[str]] = {}
    for pair in pairs:
        tag, eq, who = pair.partition("=")
        if not eq or not tag.strip():
            raise RuntimeError(f"tag-owners set: want TAG=OWNER[,OWNER...], got {pair!r:.60}")
        if tag.strip() in owners:
            raise RuntimeError(f"tag-owners set: {tag.strip()} given twice")
        owners[tag.strip()] = _commas([who])
    return owners


def _print_secret(made: dict[str, Any], what: str, as_json: bool) -> int:
    """A new credential's secret goes to stdout once, alone on its line (`> file` keeps
    just the secret), and what it is to stderr without it; `as_json`: the control's whole
    answer on stdout instead. Nothing else ever shows the secret: the control keeps a hash."""
    if as_json:
        print(json.dumps(made, indent=2))
        return 0
    print(made["secret"], flush=True)
    def shown(k: str, v: Any) -> str:
        if isinstance(v, list):
            return ",".join(map(str, v))
        if k == "expires" and isinstance(v, (int, float)):  # the control's wall clock
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v))
        return str(v)
    facts = ", ".join(k if v is True else f"{k} {shown(k, v)}" for k, v in made.items()
                      if k not in ("id", "secret", "created", "state")
                      and v is not False and v not in (None, [], "", 0))
    print(f"{what} {made['id']} created{f' ({facts})' if facts else ''}; its secret is on stdout, "
          f"shown only this once", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    from supervisor.cli import default_data_dir

    help_dir = "the control's data dir (default: the supervisor's DATA/control)"
    p = sub.add_parser("control", help="the embedded control plane: serve it, or administer it")
    p.add_argument("--control-dir", type=Path, default=default_data_dir() / "control", help=help_dir)
    # --control-dir is taken after any subcommand too (`control nodes list --control-dir X`).
    # SUPPRESS: a subcommand that is not given it leaves the value parsed before it alone
    # (argparse copies a subparser's defaults over its parent's values).
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--control-dir", type=Path, default=argparse.SUPPRESS, help=help_dir)

    def parser(subs: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
        return subs.add_parser(name, parents=[where], **kw)

    csub = p.add_subparsers(dest="what", required=True)

    s = parser(csub, "serve", help="run a standalone control on loopback")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--reap-after", type=float, default=30.0,
                   help="seconds after an ephemeral node's map poll ends before it is removed")
    s.add_argument("--peers", choices=("clients", "all"), default="clients",
                   help="clients: proxies see client nodes but not each other (default); all: everyone")
    s.set_defaults(func=_serve)

    keys = parser(csub, "keys", help="create, list, revoke or expire auth keys")
    ksub = keys.add_subparsers(dest="verb", required=True)
    create = parser(ksub, "create", help="a new auth key; its secret is printed once, on stdout")
    create.add_argument("--reusable", action="store_true")
    create.add_argument("--ephemeral", action="store_true")
    create.add_argument("--expiry", type=float, default=90 * 86400.0, help="seconds")
    create.add_argument("--tag", action="append", default=[], help="tag:name (repeatable)")
    create.add_argument("--user", default="", metavar="LOGIN",
                        help="owner of the key's untagged nodes, e.g. alice@example.com "
                             "(default: the tailnet's admin user)")
    create.add_argument("--proxy", action="store_true",
                        help="its nodes count as the supervisor's proxies (for the peers policy)")
    create.add_argument("--json", action="store_true",
                        help="print the whole answer (id, secret, reusable, expires, ...) as JSON")
    parser(ksub, "list")
    for verb in ("revoke", "expire"):
        parser(ksub, verb).add_argument("id")

    nodes = parser(csub, "nodes", help="list, delete or expire nodes")
    nsub = nodes.add_subparsers(dest="verb", required=True)
    parser(nsub, "list", help="every node: id, node_id (its stable ID), name, addresses, ...")
    for verb in ("delete", "expire"):
        parser(nsub, verb).add_argument(
            "id", help="the node's stable ID (nXXXXCNTRL, as status --json shows) or numeric id")

    oauth = parser(csub, "oauth-clients", help="create, list or revoke OAuth clients (the API's)")
    osub = oauth.add_subparsers(dest="verb", required=True)
    ocreate = parser(osub, "create", help="a new client; its secret is printed once, on stdout")
    ocreate.add_argument("--scope", "--scopes", action="append", default=[], required=True,
                         metavar="SCOPES", help="e.g. auth_keys,devices:core (comma-separated, repeatable)")
    ocreate.add_argument("--tag", "--tags", action="append", default=[], metavar="TAGS",
                         help="the tags it may give, e.g. tag:web (comma-separated, repeatable; "
                              "required with auth_keys or devices:core)")
    ocreate.add_argument("--json", action="store_true",
                         help="print the whole answer (id, secret, scopes, tags) as JSON")
    parser(osub, "list", help="the clients (no secrets)")
    parser(osub, "revoke", help="its access tokens stop working at once").add_argument("id")

    tokens = parser(csub, "tokens", help="create or list API access tokens (the API's)")
    tsub = tokens.add_subparsers(dest="verb", required=True)
    tcreate = parser(tsub, "create", help="a token of the tailnet's admin user; printed once, on stdout")
    tcreate.add_argument("--expiry", type=float, help="seconds (default: 90 days)")
    tcreate.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    parser(tsub, "list", help="the tokens (no secrets)")

    owners = parser(csub, "tag-owners", help="show or replace tagOwners: which tags may give which")
    osub2 = owners.add_subparsers(dest="verb", required=True)
    parser(osub2, "list")
    oset = parser(osub2, "set", help="replace the whole map (nothing given: empty it)")
    oset.add_argument("owners", nargs="*", metavar="TAG=OWNER[,OWNER]",
                      help="e.g. tag:web=tag:ops: a client with tag:ops may give tag:web")

    caps = parser(csub, "caps", help="grant nodes HTTPS and Funnel capabilities (none by default)")
    capsub = caps.add_subparsers(dest="verb", required=True)
    parser(capsub, "list", help="the tailnet default and each node's capabilities")
    cset = parser(capsub, "set", help="grant exactly the capabilities given (others withdrawn)")
    cset.add_argument("--node", metavar="ID", help="one node, by stable ID or numeric id "
                                                   "(default: the tailnet-wide default)")
    cset.add_argument("--https", action="store_true", help="the https capability and CertDomains")
    cset.add_argument("--funnel", action="store_true", help="the funnel node attribute")
    cset.add_argument("--funnel-ports", default="", metavar="PORTS",
                      help="the funnel-ports capability, e.g. 443,8443,10000-10010")
    cset.add_argument("--inherit", action="store_true", help="return --node to the tailnet default")

    peers = parser(csub, "peers", help="show or change who sees whom (until the control's next start)")
    peers.add_argument("policy", nargs="?", choices=("clients", "all"),
                       help="clients: proxies see client nodes, not each other; all: every node "
                            "sees every node (default: show the policy)")

    ev = parser(csub, "events", help="the control's decision log (monotonic times)")
    ev.add_argument("--since", type=float, default=0.0)

    fault = parser(csub, "fault", help="make /machine/ answer an HTTP error (an outage)")
    fault.add_argument("--status", type=int)
    fault.add_argument("--register-status", type=int)
    fault.add_argument("--clear", action="store_true")

    for sp in (keys, nodes, oauth, tokens, owners, caps, peers, ev, fault):
        sp.set_defaults(func=_admin)
