"""What counts as good tailscaled.state, the kept copy, and the restore order."""
from __future__ import annotations

import base64
import json
import os

import pytest

from supervisor import statefile

GOOD = json.dumps({"_machinekey": base64.b64encode(b"mkey:abc").decode(),
                   "_current-profile": base64.b64encode(b"profile-1").decode(),
                   "profile-1": base64.b64encode(b'{"ControlURL": "x"}').decode()}).encode()


def test_good_state_needs_a_machine_key_and_the_current_profile():
    assert statefile.is_good_state(GOOD)
    data = json.loads(GOOD)
    for broken in ({k: v for k, v in data.items() if k != "_machinekey"},
                   {k: v for k, v in data.items() if k != "profile-1"},
                   {**data, "_current-profile": "!!notbase64"},
                   {"key": {}, "nonce": "AA==", "data": "AA=="}):
        assert not statefile.is_good_state(json.dumps(broken).encode())
    for raw in (b"", b"{", b"[1]", b"null", b"[" * 10000):
        assert not statefile.is_good_state(raw)


def test_only_the_newest_good_state_is_kept_0600(tmp_path):
    sd, copy = tmp_path / "state", tmp_path / "tailscaled.state.good"
    sd.mkdir()
    (sd / "tailscaled.state").write_bytes(b"")
    assert not statefile.keep_copy(sd, copy) and not copy.exists()
    (sd / "tailscaled.state").write_bytes(GOOD)
    assert statefile.keep_copy(sd, copy) and copy.read_bytes() == GOOD
    assert os.stat(copy).st_mode & 0o777 == 0o600
    assert not statefile.keep_copy(sd, copy)  # unchanged: nothing written
    newer = GOOD.replace(b"}", b', "x": "eA=="}')
    (sd / "tailscaled.state").write_bytes(newer)
    assert statefile.keep_copy(sd, copy) and copy.read_bytes() == newer


def test_restore_prefers_an_intact_tmp_then_the_copy_then_nothing(tmp_path):
    sd, copy = tmp_path / "state", tmp_path / "tailscaled.state.good"
    sd.mkdir()
    (sd / "tailscaled.state").write_bytes(b"")
    assert statefile.restore(sd, copy) is None
    copy.write_bytes(GOOD.replace(b"}", b', "from": "Y29weQ=="}'))
    (sd / "tailscaled.state.tmp1").write_bytes(b"{half")
    (sd / "tailscaled.state.tmp2").write_bytes(GOOD)
    assert "tmp2" in statefile.restore(sd, copy)
    assert (sd / "tailscaled.state").read_bytes() == GOOD
    for t in sd.glob("tailscaled.state.tmp*"):
        t.unlink()
    (sd / "tailscaled.state").write_bytes(b"")
    assert "copy" in statefile.restore(sd, copy)
    assert b"from" in (sd / "tailscaled.state").read_bytes()


def _state(prefs: bytes | None, **extra: str) -> bytes:
    data = {"_machinekey": base64.b64encode(b"mkey:abc").decode(),
            "_current-profile": base64.b64encode(b"profile-1").decode(), **extra}
    if prefs is not None:
        data["profile-1"] = base64.b64encode(prefs).decode()
    return json.dumps(data).encode()


@pytest.mark.parametrize("raw,url", [
    (GOOD, "x"),
    (_state(b'{"ControlURL": "http://127.0.0.1:41641"}'), "http://127.0.0.1:41641"),
    (_state(b'{"ControlURL": ""}'), ""),
    (_state(b'{"WantRunning": true}'), None),       # unset: no claim either way
    (_state(b'{"ControlURL": 5}'), None),
    (_state(b"[1]"), None),
    (_state(b"{not json"), None),
    (_state(b"[" * 10000), None),
    (_state(None), None),                           # no current profile's prefs
    (_state(None, **{"profile-1": "!!notbase64"}), None),
    (b'{"key": {}, "nonce": "AA==", "data": "AA=="}', None),  # TPM-sealed
    (b"", None),
])
def test_the_control_a_state_is_logged_in_on(raw: bytes, url: str | None):
    assert statefile.control_url(raw) == url


def test_a_tmp_older_than_the_kept_copy_is_not_restored_and_none_is_left_behind(tmp_path):
    """A `.tmp` left by an interrupted write weeks ago (its state superseded since, say
    by a node-key rotation) must not win over the newer kept copy; and a restored
    `.tmp` must not stay to be restored again in a later incident."""
    sd, copy = tmp_path / "state", tmp_path / "tailscaled.state.good"
    sd.mkdir()
    old = GOOD.replace(b"}", b', "old": "b2xk"}')
    (sd / "tailscaled.state.tmp7").write_bytes(old)
    os.utime(sd / "tailscaled.state.tmp7", (1_000_000, 1_000_000))
    copy.write_bytes(GOOD)
    (sd / "tailscaled.state").write_bytes(b"")
    assert "copy" in statefile.restore(sd, copy)
    assert (sd / "tailscaled.state").read_bytes() == GOOD
    assert not list(sd.glob("tailscaled.state.tmp*"))  # the stale leftover is gone too

    (sd / "tailscaled.state.tmp8").write_bytes(old)  # a newer interrupted write: it wins
    (sd / "tailscaled.state.tmp9").write_bytes(b'{"key": {}, "nonce": "AA==", "data": "AA=="}')  # TPM
    os.utime(copy, (1_000_000, 1_000_000))
    (sd / "tailscaled.state").write_bytes(b"")
    assert "tmp8" in statefile.restore(sd, copy)
    assert (sd / "tailscaled.state").read_bytes() == old
    assert [t.name for t in sd.glob("tailscaled.state.tmp*")] == ["tailscaled.state.tmp9"]
    (sd / "tailscaled.state").write_bytes(b"")
    assert "copy" in statefile.restore(sd, copy)  # the restored .tmp is not restored again
