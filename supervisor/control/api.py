"""The embedded control's Tailscale v2 API subset, served under `/api/v2/` on its TCP port.

Endpoints (hosted control's paths and JSON shapes; facts file
`tailscale-api-facts.md`, "Minimal server behaviour"):

    POST   /api/v2/oauth/token                      client credentials -> 1 h access token
    GET    /api/v2/tailnet/{tailnet}/keys           POST: create an auth key
    GET    /api/v2/tailnet/{tailnet}/keys/{id}      DELETE: delete it
    GET    /api/v2/tailnet/{tailnet}/devices
    GET    /api/v2/device/{id}                      DELETE: delete the device
    POST   /api/v2/device/{id}/ip | /name | /tags

`{tailnet}` is `-` or the tailnet's domain; `{id}` a device's numeric id or its
nodeId. The token endpoint takes the client secret as the Basic-auth password or
as the `client_secret` form field (x/oauth2 tries both) and ignores `scope`.
Other endpoints take the access token as `Authorization: Bearer` or as the
Basic-auth user name. Success is always 200 with a JSON body (`{}` for POSTs,
empty for DELETE); failure a JSON `{"message", "status"}` (the token endpoint:
RFC 6749 `{"error", "error_description"}`). No Content-Type is required.

This module only translates HTTP; the decisions (scopes, tag rules, names,
addresses) are tailnet.Tailnet's. One request per connection, like the rest
of the HTTP/1 front door. A request of any shape costs one 4xx answer.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from supervisor.control.tailnet import AdminError, Actor, AuthKey, Node, Refused, Tailnet, rfc3339
from supervisor.tsapi import Credential

log = logging.getLogger(__name__)

MAX_API_BODY = 64 * 1024
BODY_TIMEOUT = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


class ApiServer:
    """The /api/v2/ handler of one ControlServer. `online(node_id)` says whether a node
    holds a map stream (the API's `connectedToControl`). `trust(writer)` is called once a
    request's head carries a credential that checks out (an access or API token, or an
    OAuth client secret as the Basic password of the token request), before its body is
    read: the server then never sheds that connection for a local user's flood (limits.py).
    `fault_status`: while set, every /api/v2 request answers it with a JSON body (the
    protocol is untouched)."""

    ADMIN_OPS = frozenset({"create_oauth_client", "revoke_oauth_client", "list_oauth_clients",
                           "create_api_token", "list_api_tokens", "set_tag_owners", "tag_owners"})

    def __init__(self, tailnet: Tailnet, online: Callable[[int], bool],
                 trust: Callable[[asyncio.StreamWriter], None] = lambda writer: None) -> None:
        self.tailnet = tailnet
        self.online = online
        self.trust = trust
        self.fault_status: int | None = None
        self._credential = Credential("token", tailnet.issue_admin_token(proxy_keys=True))

    def credential(self) -> Credential:
        """An access token of the tailnet's admin user, made with this server and kept in
        memory only (never in endpoint.json or any file). It is the supervisor's: the keys
        it creates log in the supervisor's proxies (AuthKey.proxy, the peers policy)."""
        return self._credential

    def admin(self, op: str, **args: Any) -> Any:
        """`create_oauth_client(scopes=[...], tags=[...])` and `create_api_token(expiry=S)` ->
        {"id", "secret", ...} (the only answers that carry a secret; the control keeps its
        hash); `revoke_oauth_client(id=...)`; `list_oauth_clients`, `list_api_tokens` (no
        secrets); `set_tag_owners(owners={...})` replaces the map, `tag_owners` shows it."""
        t = self.tailnet
        if op == "create_oauth_client":
            scopes, tags = args.get("scopes") or [], args.get("tags") or []
            if not isinstance(scopes, list) or not isinstance(tags, list):
                raise AdminError("create_oauth_client: scopes and tags are lists")
            client, secret = t.create_oauth_client(scopes, tags)
            return {"id": client.id, "secret": secret, "scopes": client.scopes, "tags": client.tags}
        if op == "create_api_token":
            token, secret = t.create_api_token(**({"expiry": args["expiry"]} if "expiry" in args else {}))
            return {"id": token.id, "secret": secret, "expires": token.expires}
        if op == "list_oauth_clients":
            return [{"id": c.id, "scopes": c.scopes, "tags": c.tags, "created": c.created,
                     "revoked": c.revoked} for c in t.oauth_clients.values()]
        if op == "list_api_tokens":
            return [{"id": k.id, "created": k.created, "expires": k.expires, "revoked": k.revoked}
                    for k in t.api_tokens.values()]
        if op == "tag_owners":
            return t.tag_owners
        if op == "revoke_oauth_client":
            client = t.revoke_oauth_client(str(args.get("id")))
            return {"id": client.id, "revoked": client.revoked}
        if op == "set_tag_owners":
            owners = args.get("owners")
            if not isinstance(owners, dict):
                raise AdminError("set_tag_owners: owners is {\"tag:a\": [\"tag:b\", ...]}")
            return t.set_tag_owners(owners)
        raise AdminError(f"unknown admin operation {op!r}")

    # -- HTTP -----------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     method: str, target: str, headers: dict[str, str]) -> None:
        """Answer one request whose path starts with /api/v2/. A bug is logged and answered
        500; a client that stops sending its body raises what the reader raises."""
        try:
            status, body = await self._answer(reader, method, target, headers, lambda: self.trust(writer))
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            raise
        except Exception:
            log.exception("API request %s %s failed", method, urlsplit(target).path[:80])
            status, body = _error(500, "internal error")
        data = b"" if body is None else json.dumps(body).encode()
        writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data)

    async def _answer(self, reader: asyncio.StreamReader, method: str, target: str,
                      headers: dict[str, str], vouched: Callable[[], None]) -> tuple[int, Any]:
        if self.fault_status is not None:
            return _error(self.fault_status, f"API fault injected (HTTP {self.fault_status})")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return _error(411, "a request body needs a Content-Length")
        length = headers.get("content-length", "0").strip()
        if not length.isdigit() or len(length) > 7:  # isdigit: no sign, no spaces
            return _error(400, "bad Content-Length")
        if int(length) > MAX_API_BODY:
            return _error(413, "request body too large")
        parts = [unquote(p) for p in urlsplit(target).path.split("/")[3:]]  # after "", "api", "v2"
        if self._credential_checks_out(parts, headers):
            vouched()
        raw = await asyncio.wait_for(reader.readexactly(int(length)), BODY_TIMEOUT)
        try:
            if parts == ["oauth", "token"]:
                return self._token(method, headers, raw)
            return self._route(method, parts, headers, raw)
        except Refused as e:
            return _error(e.status, e.message)

    def _credential_checks_out(self, parts: list[str], headers: dict[str, str]) -> bool:
        """Does the request head carry a live credential (what `_actor` or `_token` would
        accept)? No event, no grant minted."""
        if parts == ["oauth", "token"]:
            secret = _basic(headers)[1]
            return bool(secret) and self.tailnet.oauth_client(secret) is not None
        try:
            self._actor(headers)
        except Refused:
            return False
        return True

    def _token(self, method: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        """POST /api/v2/oauth/token (RFC 6749 client credentials; x/oauth2 clientcredentials)."""
        if method != "POST":
            return _error(405, "use POST")
        try:
            form = {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True,
                                                  max_num_fields=32).items()}
        except ValueError:
            return 400, {"error": "invalid_request", "error_description": "too many form fields"}
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type",
                         "error_description": "grant_type must be client_credentials"}
        secret = form.get("client_secret") or _basic(headers)[1]
        try:
            token, lifetime, client = self.tailnet.access_token(secret)
        except Refused:
            return 401, {"error": "invalid_client", "error_description": "unknown or revoked OAuth client"}
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": int(lifetime),
                     "scope": " ".join(client.scopes)}

    def _actor(self, headers: dict[str, str]) -> Actor:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else _basic(headers)[0]
        if not token:
            raise Refused(401, "API token required")
        return self.tailnet.actor(token)

    def _route(self, method: str, parts: list[str], headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        t = self.tailnet
        if len(parts) >= 3 and parts[0] == "tailnet" and parts[2] in ("keys", "devices"):
            actor = self._actor(headers)
            if parts[1] not in ("-", t.domain):
                return _error(404, "user tailnet does not match")
            if parts[2:] == ["devices"]:
                return _need_method(method, "GET") or (
                    200, {"devices": [self._device(n) for n in t.api_devices(actor)]})
            if parts[2:] == ["keys"]:
                if method == "GET":
                    return 200, {"keys": [_key(k, t.now()) for k in t.api_keys(actor)]}
                if method == "POST":
                    return self._create_key(actor, _json_object(raw))
                return _error(405, "use GET or POST")
            if len(parts) == 4 and parts[2] == "keys":
                if method == "GET":
                    return 200, _key(t.api_key(actor, parts[3]), t.now())
                if method == "DELETE":
                    t.api_delete_key(actor, parts[3])
                    return 200, None
                return _error(405, "use GET or DELETE")
        if parts and parts[0] == "device" and len(parts) in (2, 3):
            actor = self._actor(headers)
            if len(parts) == 2:
                if method == "GET":
                    return 200, self._device(t.api_device(actor, parts[1]))
                if method == "DELETE":
                    node = t.api_device(actor, parts[1], write=True)
                    t.delete_node(node.id)
                    return 200, None
                return _error(405, "use GET or DELETE")
            action = parts[2]
            if action not in ("ip", "name", "tags"):
                return _error(404, f"no API endpoint /api/v2/device/{{id}}/{action[:40]}")
            if method != "POST":
                return _error(405, "use POST")
            node = t.api_device(actor, parts[1], write=True)
            body = _json_object(raw)
            if action == "ip":
                t.api_set_ipv4(node, body.get("ipv4"))
            elif action == "name":
                t.api_rename(node, body.get("name"))
            else:
                t.api_set_tags(actor, node, body.get("tags"))
            return 200, {}
        return _error(404, "no such API endpoint")

    def _create_key(self, actor: Actor, body: dict[str, Any]) -> tuple[int, Any]:
        """POST keys: {"capabilities": {"devices": {"create": {reusable, ephemeral,
        preauthorized, tags}}}, "expirySeconds", "description"} (publicapi/tailnet.md)."""
        if body.get("keyType", "auth") not in ("auth", ""):
            return _error(400, "only keyType auth is supported here")
        caps = body.get("capabilities")
        devices = caps.get("devices") if isinstance(caps, dict) else None
        create = devices.get("create", {}) if isinstance(devices, dict) else None
        if not isinstance(create, dict):
            return _error(400, "capabilities.devices.create: want an object")
        flags = {}
        for name in ("reusable", "ephemeral", "preauthorized"):
            value = create.get(name, False)
            if type(value) is not bool:
                return _error(400, f"capabilities.devices.create.{name}: want true or false")
            flags[name] = value
        expiry = body.get("expirySeconds") or 0
        if type(expiry) not in (int, float):
            return _error(400, "expirySeconds: want seconds")
        key, secret = self.tailnet.api_create_key(
            actor, tags=create.get("tags") or [], expiry_seconds=expiry,
            description=body.get("description") or "", **flags)
        return 200, {**_key(key, self.tailnet.now()), "key": secret}

    def _device(self, n: Node) -> dict[str, Any]:
        """A device object (publicapi/device.md "Attributes"; CGV2 devices.go)."""
        t = self.tailnet
        online = self.online(n.id)
        return {
            "id": str(n.id), "nodeId": n.stable_id, "name": t.fqdn(n).rstrip("."),
            "hostname": n.hostname, "addresses": [n.ipv4, n.ipv6], "user": t.owner(n),
            "os": str(n.hostinfo.get("OS", "")), "clientVersion": str(n.hostinfo.get("IPNVersion", "")),
            "created": rfc3339(n.created), "expires": rfc3339(n.key_expiry),
            "keyExpiryDisabled": n.key_expiry is None, "authorized": True, "isExternal": False,
            "isEphemeral": n.ephemeral, "updateAvailable": False, "blocksIncomingConnections": False,
            "tags": list(n.tags), "machineKey": n.machine_key, "nodeKey": n.node_key,
            "tailnetLockKey": "", "tailnetLockError": "", "connectedToControl": online,
            # CGV2 devices.go: "Will be nil if ConnectedToControl is true"
            "lastSeen": None if online else rfc3339(n.last_seen or n.created)}


def _key(k: AuthKey, now: float) -> dict[str, Any]:
    """A key object without its secret (publicapi/tailnet.md "Get key"; CGV2 keys.go `Key`)."""
    out: dict[str, Any] = {
        "id": k.id, "keyType": "auth", "description": k.description, "created": rfc3339(k.created),
        "expires": rfc3339(k.expires), "invalid": k.state(now) != "valid", "tags": list(k.tags),
        "userId": "", "capabilities": {"devices": {"create": {
            "reusable": k.reusable, "ephemeral": k.ephemeral, "preauthorized": k.preauthorized,
            "tags": list(k.tags)}}}}
    if k.expires is not None:
        out["expirySeconds"] = max(0, int(k.expires - k.created))
    if k.revoked:
        out["revoked"] = rfc3339(k.revoked_at or k.created)
    return out


def _error(status: int, message: str) -> tuple[int, Any]:
    return status, {"message": message, "status": status}


def _need_method(method: str, want: str) -> tuple[int, Any] | None:
    return None if method == want else _error(405, f"use {want}")


def _basic(headers: dict[str, str]) -> tuple[str, str]:
    """(user, password) of a Basic Authorization header, each URL-unescaped as x/oauth2
    escapes them; ("", "") for anything else."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError):
        return "", ""
    return unquote(user), unquote(password)


def _json_object(raw: bytes) -> dict[str, Any]:
    """A POST body as a JSON object ({} when empty), whatever its Content-Type; Refused 400."""
    try:
        value = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        raise Refused(400, "request body is not JSON") from None
    if not isinstance(value, dict):
        raise Refused(400, "request body is not a JSON object")
    return value

