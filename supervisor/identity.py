"""Recovery that keeps the node's identity: its machine name and its IPv4.

A wipe (or any state dir that never logged in) registers a new node. On hosted
control the old machine record keeps the name, so the new node is named
`web-1` and gets a new 100.x address (KB1098; facts §5). With an API
credential the supervisor keeps who the node was:

1. **Record the node.** After each `running`, `node.json` in the proxy's dir
   (outside the state dir) names the node: stable ID (LocalAPI `Self.ID`, the
   API's `nodeId`), DNS name, tailnet IPs, hostname, and the control it is
   registered on. It is not overwritten by a new node until the steps below
   are done, so a supervisor that dies half-way tries again.
2. **Delete the old node first.** Before the login of a state dir that never
   logged in, the old device is deleted, but only that exact recorded node ID,
   only while the control lists it, and only once it is offline
   (`connectedToControl` false), waiting a bounded time within the start
   deadline. Still online (a clone of the NAS, say): it is left alone.
3. **Once the new node runs:** the old device, if still listed, is deleted once
   offline (bounded); a `-1` name is renamed to the recorded name (`/name`);
   an IPv4 other than the recorded one is set back (`/ip`) when that address is
   free (a 400 is a note, not an error).
4. **Say what happened:** one outcome line, e.g. "identity kept: web,
   100.64.0.3" or "identity not kept: no API credential; the name may carry -1;
   now web-1, 100.64.0.7 (was web, 100.64.0.3)".

Never for a moved control: a record made on another control URL (a planned
re-registration) leads to no API call at all. The embedded control is one
control whatever port it had to take (its tailnet lives in the data dir).
Ephemeral proxies keep nothing: their nodes are deleted whenever they go away.

Facts: `../shared/docs/tailscale-api-facts.md` §3-§5 (device object,
DELETE/ip/name, `Self.ID` == `nodeId`, the `-1` rule). Pure decisions are
table-tested in tests/unit/test_identity.py; the async steps take a
tsapi.Client and raise tsapi.APIError only for an API that did not answer.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from supervisor import tsapi
from supervisor.tailscale import STATE_FILE

RECORD_NAME = "node.json"   # in the proxy's dir, beside (not in) the state dir
OFFLINE_CAP = 30.0          # seconds: the longest wait for the old device to go offline
OFFLINE_POLL = 0.5          # seconds between looks at the old device
SETTLE_TIMEOUT = 20.0       # seconds for the node to see its name and address in a netmap
SETTLE_POLL = 0.2

# what delete_when_offline found
GONE, DELETED, ONLINE, UNKNOWN = "gone", "deleted", "online", "unknown"


@dataclass(frozen=True)
class Record:
    """Who a proxy's node is (node.json). `dns_name` the MagicDNS name as
    tailscale.py reports it; `hostname` the configured hostname (prefs.Hostname);
    `control_url` normalized (reconcile.normalize_control_url), None in a record
    of an older version that did not say; `embedded`: on the data dir's
    embedded control."""

    node_id: str
    dns_name: str
    tailscale_ips: tuple[str, ...]
    hostname: str
    control_url: str | None = None
    embedded: bool = False

    @property
    def machine_name(self) -> str:
        """The first DNS label: the machine name (facts §3)."""
        return self.dns_name.split(".", 1)[0]

    @property
    def ipv4(self) -> str | None:
        return ipv4_of(self.tailscale_ips)

    @classmethod
    def of(cls, obs: Any, *, control_url: str, embedded: bool) -> "Record":
        """The record of an observed node (tailscale.Observed)."""
        return cls(obs.node_id, obs.dns_name, tuple(obs.tailscale_ips), obs.hostname, control_url, embedded)

    def to_json(self) -> str:
        d = asdict(self)
        d["tailscale_ips"] = list(self.tailscale_ips)
        return json.dumps(d)


def ipv4_of(ips: Any) -> str | None:
    """The first IPv4 address among `ips`, None if there is none."""
    for ip in ips:
        with contextlib.suppress(ValueError, TypeError):
            if ipaddress.ip_address(ip).version == 4:
                return str(ip)
    return None


def parse_record(raw: bytes) -> Record | None:
    """A Record from node.json's bytes; None for anything that is not one (a damaged
    file is no record: nothing is ever deleted on its word)."""
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(d, dict):
        return None
    node_id, dns, host = d.get("node_id"), d.get("dns_name"), d.get("hostname", "")
    ips, url, emb = d.get("tailscale_ips", []), d.get("control_url"), d.get("embedded", False)
    if not (isinstance(node_id, str) and node_id and isinstance(dns, str) and isinstance(host, str)
            and isinstance(ips, list) and all(isinstance(i, str) for i in ips)
            and (url is None or isinstance(url, str)) and isinstance(emb, bool)):
        return None
    return Record(node_id, dns, tuple(ips), host, url or None, emb)


def read_record(path: Path) -> Record | None:
    try:
        return parse_record(path.read_bytes())
    except OSError:
        return None


def write_record(path: Path, record: Record) -> bool:
    """Atomically replace node.json with `record` if it differs; True if written.
    OSError for a full or read-only disk (the caller decides)."""
    text = record.to_json()
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def never_logged_in(raw: bytes | None) -> bool:
    """Is this tailscaled.state (None: no file) of a node that never logged in, so that
    its login registers a new node? True for no file and for plaintext state without
    a current profile (what 1.78.1 and 1.96.4 write before the first login). False
    for anything else: a logged-in profile, TPM-sealed state (cannot tell), or bytes
    that are not a JSON object."""
    if raw is None:
        return True
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict) or {"key", "nonce", "data"} <= data.keys():
        return False
    return not data.get("_current-profile")


def state_never_logged_in(statedir: Path) -> bool:
    try:
        raw = (statedir / STATE_FILE).read_bytes()
    except FileNotFoundError:
        raw = None
    except OSError:
        return False
    return never_logged_in(raw)


# -- pure decisions ----------------------------------------------------------------------


def same_control(record: Record, control_url: str, embedded: bool) -> bool:
    """Was the recorded node registered on the control the proxy uses now? The embedded
    control is the same one whatever port it had to take; a URL must match exactly
    (both normalized). A record that does not name its control is never the same."""
    if record.embedded or embedded:
        return record.embedded and embedded
    return record.control_url is not None and record.control_url == control_url


def skip_reason(record: Record, *, control_url: str, embedded: bool, api_problem: str | None) -> str | None:
    """Why no identity step may run for this replaced node (one line), or None when
    they may. `api_problem`: why there is no usable API client ("" or None: there is)."""
    if not same_control(record, control_url, embedded):
        if record.control_url is None and not record.embedded:
            return "the record does not say which control the old node is on: nothing deleted"
        was = "the embedded control" if record.embedded else record.control_url
        return f"the control moved (the old node is on {was}): nothing deleted or changed there"
    if api_problem:
        return api_problem
    return None


def target_name(record: Record, hostname: str) -> str | None:
    """The machine name to keep: the recorded one, while the configured hostname is the
    one it was recorded with (a changed hostname is the operator's new name)."""
    if record.hostname != hostname or not record.machine_name:
        return None
    return record.machine_name


def offline_wait(now: float, deadline: float | None, cap: float = OFFLINE_CAP) -> float:
    """Seconds to wait for the old device to go offline before a login: at most `cap`
    and half of what is left until `deadline` (monotonic), so the login keeps the
    other half; `cap` when there is no deadline."""
    if deadline is None:
        return cap
    return max(0.0, min(cap, (deadline - now) / 2))


def verdict(device: tsapi.Device | None) -> str:
    """What to do with the old device as the API shows it: GONE (not listed), UNKNOWN
    (the API does not say whether it is connected), ONLINE, or "offline"."""
    if device is None:
        return GONE
    if device.connected is None:
        return UNKNOWN
    return ONLINE if device.connected else "offline"


def unavailable(e: tsapi.APIError) -> bool:
    """The API did not answer usefully (transport, timeout, 429, 5xx): skip, retry later."""
    return e.status is None or e.status == 429 or e.status >= 500


def outcome(*, name: str, ipv4: str | None, want_name: str | None, want_ipv4: str | None,
            problems: list[str], skipped: bool = False) -> str:
    """The one line that says what a recovery kept (pure). `skipped`: no step could
    run (`problems` says why), so nothing was kept, whatever the new node got."""
    kept = (want_name is None or name == want_name) and (want_ipv4 is None or ipv4 == want_ipv4)
    now = f"{name}, {ipv4 or 'no IPv4'}"
    if kept and not skipped:
        return f"identity kept: {now}" + "".join(f"; {p}" for p in problems)
    was = "" if kept else f" (was {want_name or name}, {want_ipv4 or 'no IPv4'})"
    why = "; ".join(problems) or "the control gave another name or address"
    return f"identity not kept: {why}; now {now}{was}"


def describe_delete(result: str, record: Record, before_login: bool) -> str:
    """The step line for delete_when_offline's result."""
    dev = f"{record.machine_name} ({record.node_id})"
    when = " before the new login" if before_login else ""
    return {GONE: f"old device {dev} is not listed: nothing to delete",
            DELETED: f"deleted the old device {dev} once it was offline{when}",
            ONLINE: f"old device still online: not deleted ({dev})",
            UNKNOWN: f"the API does not say whether the old device {dev} is online: not deleted"}[result]


# -- steps through the API -----------------------------------------------------------------


class _Observed(Protocol):
    node_id: str
    dns_name: str
    tailscale_ips: tuple[str, ...]


async def listed(api: tsapi.Client, node_id: str) -> tsapi.Device | None:
    """The device with exactly this node ID, None when the control does not list it."""
    try:
        dev = await api.device(node_id)
    except tsapi.APIError as e:
        if e.not_found:
            return None
        raise
    return dev if node_id in (dev.node_id, dev.id) else None


async def delete_when_offline(api: tsapi.Client, node_id: str, wait: float, *,
                              poll: float = OFFLINE_POLL,
                              clock: Callable[[], float] = time.monotonic) -> str:
    """Delete the device `node_id` once it is offline, looking every `poll` s for at
    most `wait` s. GONE (not listed, or deleted meanwhile), DELETED, ONLINE (still
    online at the end: not deleted) or UNKNOWN (the API does not say: not deleted).
    APIError for any other answer."""
    end = clock() + wait
    while True:
        v = verdict(await listed(api, node_id))
        if v == "offline":
            try:
                await api.delete_device(node_id)
            except tsapi.APIError as e:
                if e.not_found:
                    return GONE
                raise
            return DELETED
        if v != ONLINE or clock() >= end:
            return v
        await asyncio.sleep(min(poll, max(0.0, end - clock())))


async def keep(api: tsapi.Client, record: Record, node: _Observed, *, want_name: str | None,
               wait: float, observe: Callable[[], Awaitable[_Observed]],
               step: Callable[[str], None], settle: float = SETTLE_TIMEOUT) -> str:
    """Once a new node (`node`) runs in place of `record`'s: delete the old device once
    offline (waiting at most `wait` s), rename a `-1` name to `want_name`, set the
    recorded IPv4 back when free; each step done is a `step(line)`. Then wait up to
    `settle` s for `observe()` (LocalAPI) to show the result in the node's netmap.
    Returns the outcome line. Never raises for an API problem (it is the outcome)."""
    problems: list[str] = []
    name = node.dns_name.split(".", 1)[0]
    ipv4 = ipv4_of(node.tailscale_ips)
    want_ipv4 = record.ipv4
    expect_name = expect_ipv4 = None  # what the API set, for the netmap to show
    try:
        result = await delete_when_offline(api, record.node_id, wait)
        if result in (DELETED, ONLINE, UNKNOWN):
            (step if result == DELETED else problems.append)(describe_delete(result, record, False))
        if want_name and name != want_name and not (result in (ONLINE, UNKNOWN)
                                                     and record.machine_name == want_name):
            try:
                await api.rename(node.node_id, want_name)
                step(f"renamed {name} to {want_name}")
                expect_name = want_name
            except tsapi.APIError as e:
                if unavailable(e):
                    raise
                problems.append(f"not renamed to {want_name}: {e}")
        if want_ipv4 and ipv4 != want_ipv4:
            try:
                await api.set_ipv4(node.node_id, want_ipv4)
                step(f"set the address back to {want_ipv4} (was {ipv4 or 'none'})")
                expect_ipv4 = want_ipv4
            except tsapi.APIError as e:
                if unavailable(e):
                    raise
                problems.append(f"address {want_ipv4} not set back: {e}")
    except tsapi.APIError as e:
        problems.append(f"{'API unavailable' if unavailable(e) else 'API refused'}: "
                        f"identity steps skipped ({e})")
    if expect_name or expect_ipv4:
        name, ipv4 = await _settled(observe, expect_name, expect_ipv4, name, ipv4, settle)
    return outcome(name=name, ipv4=ipv4, want_name=want_name, want_ipv4=want_ipv4, problems=problems)


async def _settled(observe: Callable[[], Awaitable[_Observed]], want_name: str | None,
                   want_ipv4: str | None, name: str, ipv4: str | None, settle: float) -> tuple[str, str | None]:
    """(name, ipv4) as the node sees them once they match what was set, or at `settle`."""
    end = time.monotonic() + settle
    while True:
        with contextlib.suppress(Exception):  # LocalAPI not answering: look again
            obs = await observe()
            name, ipv4 = obs.dns_name.split(".", 1)[0] or name, ipv4_of(obs.tailscale_ips) or ipv4
        if ((want_name is None or name == want_name) and (want_ipv4 is None or ipv4 == want_ipv4)) \
                or time.monotonic() >= end:
            return name, ipv4
        await asyncio.sleep(SETTLE_POLL)
