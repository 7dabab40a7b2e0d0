"""`ts-supervisor control keys|caps ...` against a running control, as an operator types them."""
from __future__ import annotations

import json

import pytest

from supervisor.cli import main


def control_cli(control, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object, str]:
    """Exit code, the JSON printed on stdout (None if none), stderr."""
    code = main(["control", "--control-dir", str(control.data_dir), *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_keys_create_with_an_owner(control, capsys) -> None:
    code, key, _ = control_cli(control, capsys, "keys", "create", "--user", "alice@example.com")
    assert code == 0 and key["user"] == "alice@example.com" and key["secret"].startswith("tskey-auth-")
    code, _, err = control_cli(control, capsys, "keys", "create", "--user", "alice@example.com",
                               "--tag", "tag:web")
    assert code == 1 and err.count("\n") == 1 and "tags or a user, not both" in err
    assert [k["user"] for k in control.admin("list_keys")] == ["alice@example.com"]


def test_caps_set_and_list(control, capsys) -> None:
    code, out, _ = control_cli(control, capsys, "caps", "set", "--https", "--funnel",
                               "--funnel-ports", "443,8443,10000-10010")
    want = {"https": True, "funnel": True, "funnel_ports": "443,8443,10000-10010"}
    assert code == 0 and out["caps"] == want
    code, out, _ = control_cli(control, capsys, "caps", "list")
    assert code == 0 and out == {"default": want, "nodes": {}}
    code, out, _ = control_cli(control, capsys, "caps", "set")  # nothing given: all withdrawn
    assert code == 0 and out["caps"] == {"https": False, "funnel": False, "funnel_ports": ""}


@pytest.mark.parametrize("argv,reason", [
    (["--node", "99", "--https"], "no node 99"),
    (["--funnel-ports", "0"], "funnel_ports: want a port 1..65535"),
    (["--funnel-ports", "80-70"], "funnel_ports"),
    (["--inherit"], "only a node can return to the tailnet default"),
    (["--node", "1", "--inherit", "--https"], "--inherit takes no capabilities"),
])
def test_bad_caps_set_is_one_error_line(control, capsys, argv: list[str], reason: str) -> None:
    code, out, err = control_cli(control, capsys, "caps", "set", *argv)
    assert code == 1 and out is None and err.count("\n") == 1 and reason in err, err
    assert control.admin("list_caps")["default"] == {"https": False, "funnel": False, "funnel_ports": ""}


def test_peers_show_and_set_and_a_proxy_key(control, capsys) -> None:
    code, out, _ = control_cli(control, capsys, "peers")
    assert code == 0 and out == {"peers": "clients"}
    code, out, _ = control_cli(control, capsys, "peers", "all")
    assert code == 0 and out == {"peers": "all", "pushed": []}  # no node online to tell
    assert control.admin("peers") == {"peers": "all"}
    with pytest.raises(SystemExit):  # argparse: one usage line naming the choices
        control_cli(control, capsys, "peers", "none")
    assert "invalid choice: 'none'" in capsys.readouterr().err
    code, key, _ = control_cli(control, capsys, "keys", "create", "--proxy")
    assert code == 0 and key["proxy"] is True
