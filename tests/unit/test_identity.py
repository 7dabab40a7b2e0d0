"""identity.py: the pure decisions of a recovery that keeps the node's name and
IP (table-tested), and its API steps against a narrow fake devices API."""
from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor import identity as idm
from supervisor import tsapi

REC = idm.Record("nOLD1CNTRL", "web.tailnet.test.", ("100.64.0.3", "fd7a:115c:a1e0::3"), "web",
                 "http://127.0.0.1:9911")


def dev(connected: bool | None, node_id: str = "nOLD1CNTRL", name: str = "web.tailnet.test") -> tsapi.Device:
    return tsapi.Device("7", node_id, name, "web", ("100.64.0.3",), (), connected, None)


# -- the record -----------------------------------------------------------------------------

@pytest.mark.parametrize("raw,want", [
    (REC.to_json().encode(), REC),
    # a record of the version before this one: no control named
    (b'{"node_id": "nA", "dns_name": "a.t.", "tailscale_ips": ["100.64.0.1"], "hostname": "a"}',
     idm.Record("nA", "a.t.", ("100.64.0.1",), "a", None, False)),
    (json.dumps({**json.loads(REC.to_json()), "embedded": True}).encode(),
     idm.Record(*[getattr(REC, f) for f in ("node_id", "dns_name", "tailscale_ips", "hostname",
                                            "control_url")], True)),
    (b"", None), (b"{", None), (b"[]", None), (b'{"node_id": ""}', None),
    (b'{"node_id": "nA", "dns_name": 3}', None),
    (b'{"node_id": "nA", "dns_name": "a.", "tailscale_ips": [1]}', None),
    (b'{"node_id": "nA", "dns_name": "a.", "embedded": "yes"}', None),
    (b"[" * 100000, None),
], ids=["round-trip", "older-record", "embedded", "empty", "cut", "list", "no-id", "bad-dns",
        "bad-ips", "bad-embedded", "deep"])
def test_parse_record(raw, want):
    assert idm.parse_record(raw) == want


def test_record_properties():
    assert (REC.machine_name, REC.ipv4) == ("web", "100.64.0.3")
    assert idm.Record("n", "", (), "").ipv4 is None


def test_write_record_writes_only_a_change_and_privately(tmp_path: Path):
    path = tmp_path / idm.RECORD_NAME
    assert idm.write_record(path, REC) is True
    assert idm.write_record(path, REC) is False
    assert idm.read_record(path) == REC and path.stat().st_mode & 0o777 == 0o600
    assert idm.read_record(tmp_path / "absent.json") is None


def _state(**values: str) -> bytes:
    return json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in values.items()}).encode()


@pytest.mark.parametrize("raw,want", [
    (None, True),                                          # no file: a fresh state dir
    (b"{}", True),                                         # what both releases write before a login
    (_state(_machinekey="privkey:ab"), True),              # a machine key, never a profile
    (_state(**{"_machinekey": "privkey:ab", "_current-profile": "profile-1a2b", "profile-1a2b": "{}"}), False),
    (b'{"key": "x", "nonce": "y", "data": "z"}', False),    # TPM-sealed: cannot tell, never delete
    (b"", False), (b"not json", False), (b"[]", False),
], ids=["none", "empty-object", "machinekey-only", "logged-in", "tpm", "zero", "garbage", "list"])
def test_never_logged_in(raw, want):
    assert idm.never_logged_in(raw) is want


def test_state_never_logged_in_reads_the_state_dir(tmp_path: Path):
    assert idm.state_never_logged_in(tmp_path)
    (tmp_path / "tailscaled.state").write_bytes(_state(**{"_current-profile": "p", "p": "{}"}))
    assert not idm.state_never_logged_in(tmp_path)


# -- decisions --------------------------------------------------------------------------------

EMB = idm.Record("n", "web.t.", (), "web", "http://127.0.0.1:1", True)
OLDREC = idm.Record("n", "web.t.", (), "web", None, False)


@pytest.mark.parametrize("rec,url,embedded,want", [
    (REC, "http://127.0.0.1:9911", False, True),
    (REC, "http://127.0.0.1:9912", False, False),           # a moved control
    (EMB, "http://127.0.0.1:2", True, True),                # the embedded control moved ports: the same
    (EMB, "http://127.0.0.1:1", False, False),              # embedded -> a URL written out
    (REC, "http://127.0.0.1:9911", True, False),            # a URL -> embedded
    (OLDREC, "http://127.0.0.1:9911", False, False),        # the record does not say: never the same
])
def test_same_control(rec, url, embedded, want):
    assert idm.same_control(rec, url, embedded) is want


@pytest.mark.parametrize("rec,url,embedded,api_problem,want", [
    (REC, "http://127.0.0.1:9911", False, None, None),
    (REC, "http://127.0.0.1:9911", False, "no API credential; the name may carry -1",
     "no API credential; the name may carry -1"),
    (REC, "https://controlplane.tailscale.com", False, None,
     "the control moved (the old node is on http://127.0.0.1:9911): nothing deleted or changed there"),
    (REC, "https://controlplane.tailscale.com", False, "no API credential; the name may carry -1",
     "the control moved (the old node is on http://127.0.0.1:9911): nothing deleted or changed there"),
    (EMB, "http://x:1", False, None,
     "the control moved (the old node is on the embedded control): nothing deleted or changed there"),
    (OLDREC, "http://127.0.0.1:9911", False, None,
     "the record does not say which control the old node is on: nothing deleted"),
])
def test_skip_reason(rec, url, embedded, api_problem, want):
    assert idm.skip_reason(rec, control_url=url, embedded=embedded, api_problem=api_problem) == want


@pytest.mark.parametrize("rec,hostname,want", [
    (REC, "web", "web"),
    (idm.Record("n", "web-1.t.", (), "web"), "web", "web-1"),  # it was web-1 already: that is who it is
    (REC, "www", None),                                         # the operator renamed the proxy's host
    (idm.Record("n", "", (), "web"), "web", None),
])
def test_target_name(rec, hostname, want):
    assert idm.target_name(rec, hostname) == want


@pytest.mark.parametrize("now,deadline,want", [
    (100.0, 160.0, 30.0), (100.0, 120.0, 10.0), (100.0, 100.5, 0.25),
    (100.0, 99.0, 0.0), (100.0, None, 30.0),
])
def test_offline_wait_leaves_the_login_half_the_deadline(now, deadline, want):
    assert idm.offline_wait(now, deadline) == want


@pytest.mark.parametrize("device,want", [
    (None, idm.GONE), (dev(None), idm.UNKNOWN), (dev(True), idm.ONLINE), (dev(False), "offline"),
])
def test_verdict(device, want):
    assert idm.verdict(device) == want


@pytest.mark.parametrize("status,want", [(None, True), (503, True), (500, True), (429, True),
                                         (400, False), (403, False), (404, False)])
def test_unavailable(status, want):
    assert idm.unavailable(tsapi.APIError("x", status)) is want


@pytest.mark.parametrize("kw,want", [
    (dict(name="web", ipv4="100.64.0.3", want_name="web", want_ipv4="100.64.0.3", problems=[]),
     "identity kept: web, 100.64.0.3"),
    (dict(name="web", ipv4="100.64.0.3", want_name=None, want_ipv4="100.64.0.3", problems=[]),
     "identity kept: web, 100.64.0.3"),
    (dict(name="web-1", ipv4="100.64.0.7", want_name="web", want_ipv4="100.64.0.3",
          problems=["no API credential; the name may carry -1"]),
     "identity not kept: no API credential; the name may carry -1; now web-1, 100.64.0.7 "
     "(was web, 100.64.0.3)"),
    (dict(name="web", ipv4="100.64.0.7", want_name="web", want_ipv4="100.64.0.3",
          problems=["address 100.64.0.3 not set back: taken"]),
     "identity not kept: address 100.64.0.3 not set back: taken; now web, 100.64.0.7 (was web, 100.64.0.3)"),
    (dict(name="web", ipv4="100.64.0.3", want_name="web", want_ipv4="100.64.0.3",
          problems=["the API does not say whether the old device web (n) is online: not deleted"]),
     "identity kept: web, 100.64.0.3; the API does not say whether the old device web (n) is online: "
     "not deleted"),
    (dict(name="web", ipv4=None, want_name="web", want_ipv4="100.64.0.3", problems=[]),
     "identity not kept: the control gave another name or address; now web, no IPv4 (was web, 100.64.0.3)"),
    (dict(name="web", ipv4="100.64.0.3", want_name="web", want_ipv4="100.64.0.3", skipped=True,
          problems=["the control moved (the old node is on http://a): nothing deleted or changed there"]),
     "identity not kept: the control moved (the old node is on http://a): nothing deleted or changed there; "
     "now web, 100.64.0.3"),
], ids=["kept", "renamed-host", "no-api", "ip-taken", "kept-with-note", "no-reason", "skipped-same-by-chance"])
def test_outcome(kw, want):
    assert idm.outcome(**kw) == want


@pytest.mark.parametrize("result,before,want", [
    (idm.GONE, True, "old device web (nOLD1CNTRL) is not listed: nothing to delete"),
    (idm.DELETED, True, "deleted the old device web (nOLD1CNTRL) once it was offline before the new login"),
    (idm.DELETED, False, "deleted the old device web (nOLD1CNTRL) once it was offline"),
    (idm.ONLINE, True, "old device still online: not deleted (web (nOLD1CNTRL))"),
    (idm.UNKNOWN, False, "the API does not say whether the old device web (nOLD1CNTRL) is online: not deleted"),
])
def test_describe_delete(result, before, want):
    assert idm.describe_delete(result, REC, before) == want


# -- the steps, against a narrow fake ---------------------------------------------------------

class FakeDevicesAPI:
    """The four device calls identity.py makes, over a dict; `online_for` looks at the
    old device stay online; `fail` maps a call name to the APIError it raises."""

    def __init__(self, devices: dict[str, tsapi.Device], online_for: int = 0,
                 fail: dict[str, tsapi.APIError] | None = None, taken_ips: tuple[str, ...] = ()) -> None:
        self.devices = devices
        self.online_for = online_for
        self.fail = fail or {}
        self.taken = set(taken_ips)
        self.calls: list[tuple[str, ...]] = []

    def _maybe_fail(self, call: str) -> None:
        if call in self.fail:
            raise self.fail[call]

    async def device(self, node_id: str) -> tsapi.Device:
        self.calls.append(("device", node_id))
        self._maybe_fail("device")
        if node_id not in self.devices:
            raise tsapi.APIError("404 device not found", 404)
        d = self.devices[node_id]
        if d.connected and self.online_for <= 0:
            d = self.devices[node_id] = tsapi.Device(d.id, d.node_id, d.name, d.hostname, d.addresses,
                                                     d.tags, False, None)
        self.online_for -= 1
        return d

    async def delete_device(self, node_id: str) -> None:
        self.calls.append(("delete", node_id))
        self._maybe_fail("delete")
        self.devices.pop(node_id)

    async def rename(self, node_id: str, name: str) -> None:
        self.calls.append(("rename", node_id, name))
        self._maybe_fail("rename")
        if any(d.machine_name == name for k, d in self.devices.items() if k != node_id):
            raise tsapi.APIError(f'400 Name "{name}" is already taken', 400)

    async def set_ipv4(self, node_id: str, ipv4: str) -> None:
        self.calls.append(("ip", node_id, ipv4))
        self._maybe_fail("ip")
        if ipv4 in self.taken:
            raise tsapi.APIError("400 address already in use", 400)


@dataclass
class Obs:
    node_id: str
    dns_name: str
    tailscale_ips: tuple[str, ...]


def run(coro):
    return asyncio.run(coro)


def test_delete_when_offline_waits_for_the_old_device_then_deletes_exactly_it():
    api = FakeDevicesAPI({"nOLD1CNTRL": dev(True), "nOTHER": dev(False, "nOTHER")}, online_for=2)
    assert run(idm.delete_when_offline(api, "nOLD1CNTRL", 5, poll=0.01)) == idm.DELETED
    assert [c for c in api.calls if c[0] == "delete"] == [("delete", "nOLD1CNTRL")]
    assert "nOTHER" in api.devices


@pytest.mark.parametrize("devices,want", [({}, idm.GONE), ({"nOLD1CNTRL": dev(None)}, idm.UNKNOWN),
                                          ({"nOLD1CNTRL": dev(True)}, idm.ONLINE)])
def test_delete_when_offline_never_deletes_what_is_gone_unknown_or_online(devices, want):
    api = FakeDevicesAPI(devices, online_for=10**6)
    assert run(idm.delete_when_offline(api, "nOLD1CNTRL", 0.05, poll=0.01)) == want
    assert not [c for c in api.calls if c[0] == "delete"]


def test_delete_when_offline_raises_for_an_api_that_does_not_answer():
    api = FakeDevicesAPI({}, fail={"device": tsapi.APIError("503", 503)})
    with pytest.raises(tsapi.APIError):
        run(idm.delete_when_offline(api, "nOLD1CNTRL", 1))


def _keep(api, node: Obs, seen: Obs | None = None, want_name: str | None = "web", settle: float = 1.0):
    steps: list[str] = []

    async def observe() -> Obs:
        return seen or node
    line = run(idm.keep(api, REC, node, want_name=want_name, wait=0.05, observe=observe,
                        step=steps.append, settle=settle))
    return line, steps


NEW = Obs("nNEW2CNTRL", "web-1.tailnet.test.", ("100.64.0.7",))


def test_keep_deletes_renames_and_sets_the_address_back():
    api = FakeDevicesAPI({"nOLD1CNTRL": dev(False), "nNEW2CNTRL": dev(True, "nNEW2CNTRL", "web-1.tailnet.test")})
    line, steps = _keep(api, NEW, Obs("nNEW2CNTRL", "web.tailnet.test.", ("100.64.0.3",)))
    assert line == "identity kept: web, 100.64.0.3"
    assert steps == ["deleted the old device web (nOLD1CNTRL) once it was offline",
                     "renamed web-1 to web", "set the address back to 100.64.0.3 (was 100.64.0.7)"]
    assert [c[0] for c in api.calls if c[0] != "device"] == ["delete", "rename", "ip"]


def test_keep_leaves_an_online_old_device_and_its_name_alone():
    api = FakeDevicesAPI({"nOLD1CNTRL": dev(True)}, online_for=10**6)
    line, steps = _keep(api, NEW, settle=0.05)
    assert not [c for c in api.calls if c[0] in ("delete", "rename")]
    assert line.startswith("identity not kept: old device still online: not deleted (web (nOLD1CNTRL)); now ")


def test_keep_notes_a_taken_address_and_keeps_the_name():
    api = FakeDevicesAPI({}, taken_ips=("100.64.0.3",))
    node = Obs("nNEW2CNTRL", "web.tailnet.test.", ("100.64.0.7",))
    line, steps = _keep(api, node)
    assert line == ("identity not kept: address 100.64.0.3 not set back: 400 address already in use; "
                    "now web, 100.64.0.7 (was web, 100.64.0.3)")
    assert steps == []


@pytest.mark.parametrize("fail,want", [
    ({"device": tsapi.APIError("tailscale API GET /x: 503 down", 503)},
     "identity not kept: API unavailable: identity steps skipped (tailscale API GET /x: 503 down); "
     "now web-1, 100.64.0.7 (was web, 100.64.0.3)"),
    ({"rename": tsapi.APIError("tailscale API POST /x: no answer within 10 s", None)},
     "identity not kept: API unavailable: identity steps skipped (tailscale API POST /x: no answer within "
     "10 s); now web-1, 100.64.0.7 (was web, 100.64.0.3)"),
    ({"device": tsapi.APIError("tailscale API GET /x: 403 forbidden", 403)},
     "identity not kept: API refused: identity steps skipped (tailscale API GET /x: 403 forbidden); "
     "now web-1, 100.64.0.7 (was web, 100.64.0.3)"),
])
def test_keep_an_api_that_fails_skips_the_steps_and_says_so(fail, want):
    api = FakeDevicesAPI({}, fail=fail)
    line, _ = _keep(api, NEW)
    assert line == want
    assert not [c for c in api.calls if c[0] == "ip"]


def test_keep_gives_up_waiting_for_the_netmap_at_settle_and_says_what_the_node_sees():
    api = FakeDevicesAPI({})
    line, steps = _keep(api, NEW, settle=0.05)  # the node never shows the change
    assert steps == ["renamed web-1 to web", "set the address back to 100.64.0.3 (was 100.64.0.7)"]
    assert line.startswith("identity not kept: the control gave another name or address; now web-1")


def test_keep_without_a_name_to_keep_only_sets_the_address():
    api = FakeDevicesAPI({})
    line, steps = _keep(api, NEW, Obs("nNEW2CNTRL", "web-1.tailnet.test.", ("100.64.0.3",)), want_name=None)
    assert line == "identity kept: web-1, 100.64.0.3"
    assert not [c for c in api.calls if c[0] == "rename"]
