"""`ts-supervisor control keys|caps|oauth-clients|tokens|tag-owners|nodes ...` against a
running control, as an operator types them."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import tailscale as ts
from supervisor import tsapi
from supervisor.cli import main


def control_cli(control, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object, str]:
    """Exit code, the JSON printed on stdout (None if none), stderr."""
    code = main(["control", "--control-dir", str(control.data_dir), *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_keys_create_with_an_owner(control, capsys) -> None:
    code, key, _ = control_cli(control, capsys, "keys", "create", "--user", "alice@example.com", "--json")
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
    code, key, _ = control_cli(control, capsys, "keys", "create", "--proxy", "--json")
    assert code == 0 and key["proxy"] is True


# -- API credentials, nodes by stable ID, --control-dir anywhere ---------------------------

def real_cli(control, *argv: str) -> subprocess.CompletedProcess[str]:
    """The installed CLI in its own process, as a user runs it against a running control."""
    return subprocess.run([sys.executable, "-m", "supervisor", "control", *argv,
                           "--control-dir", str(control.data_dir)],
                          capture_output=True, text=True, timeout=30, check=False)


def files_under(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file()
                   and not p.is_socket())


def test_oauth_client_made_by_the_cli_mints_a_tagged_key(control) -> None:
    """A standalone control's user makes an OAuth client and its tag owners with the CLI
    alone; the secret is on stdout once and nowhere else; the API takes it."""
    owners = real_cli(control, "tag-owners", "set", "tag:web=tag:proxies")
    assert owners.returncode == 0 and json.loads(owners.stdout) == {"tag:web": ["tag:proxies"]}

    made = real_cli(control, "oauth-clients", "create", "--scopes", "auth_keys,devices:core",
                    "--tags", "tag:proxies")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert made.stdout == secret + "\n" and secret.startswith("tskey-client-")  # `> file` is the secret
    client_id = secret.split("-")[2]
    assert f"OAuth client {client_id} created" in made.stderr and "tskey-" not in made.stderr
    assert made.stderr.count("\n") == 1

    async def mint() -> tsapi.Key:
        api = tsapi.Client(control.url, tsapi.Credential("oauth", secret))
        return await api.create_key(tags=["tag:web"], preauthorized=True, expiry_seconds=300)
    key = asyncio.run(mint())
    assert key.tags == ("tag:web",) and key.key.startswith("tskey-auth-")

    listed = real_cli(control, "oauth-clients", "list")
    assert listed.returncode == 0 and [c["id"] for c in json.loads(listed.stdout)] == [client_id]
    secret_tail = secret.rsplit("-", 1)[1]
    assert secret_tail not in listed.stdout + json.dumps(control.events())
    assert secret_tail not in files_under(control.data_dir)  # state.json keeps a hash

    revoked = real_cli(control, "oauth-clients", "revoke", client_id)
    assert revoked.returncode == 0 and json.loads(revoked.stdout) == {"id": client_id, "revoked": True}
    with pytest.raises(tsapi.APIError) as e:
        asyncio.run(mint())
    assert e.value.status == 401


def test_keys_create_prints_the_secret_alone(control) -> None:
    """As oauth-clients and tokens create: `keys create --reusable > tailnet.key` makes a
    key file that auth_key_file takes (it printed the whole JSON answer, which `check`
    refuses as not shaped like a key); what the key is goes to stderr, without it."""
    made = real_cli(control, "keys", "create", "--reusable", "--tag", "tag:web")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert made.stdout == secret + "\n" and secret.startswith("tskey-auth-")
    key_id = secret.split("-")[2]
    assert made.stderr.count("\n") == 1 and "tskey-" not in made.stderr
    assert f"auth key {key_id} created (reusable, tags tag:web" in made.stderr
    [listed] = control.admin("list_keys")
    assert listed["id"] == key_id and listed["reusable"] is True and listed["tags"] == ["tag:web"]


def test_api_token_made_by_the_cli(control, capsys) -> None:
    code, made, err = control_cli(control, capsys, "tokens", "create", "--expiry", "3600", "--json")
    assert code == 0 and made["secret"].startswith("tskey-api-") and err == ""

    async def devices() -> list[tsapi.Device]:
        return await tsapi.Client(control.url, tsapi.Credential("token", made["secret"])).devices()
    assert asyncio.run(devices()) == []
    code, listed, _ = control_cli(control, capsys, "tokens", "list")
    assert code == 0 and [t["id"] for t in listed] == [made["id"]] and "secret" not in listed[0]


@pytest.mark.parametrize("argv,reason", [
    (["oauth-clients", "create", "--scopes", "auth_keys"], "needs tags"),
    (["oauth-clients", "create", "--scopes", "auth_keys", "--tags", "web"], "bad OAuth client"),
    (["oauth-clients", "revoke", "kNope"], "no OAuth client kNope"),
    (["tag-owners", "set", "tag:web"], "want TAG=OWNER"),
    (["tag-owners", "set", "tag:web=tag:a", "tag:web=tag:b"], "tag:web given twice"),
    (["nodes", "delete", "nNope123CNTRL"], "no node nNope123CNTRL"),
    (["nodes", "expire", "42"], "no node 42"),
])
def test_bad_credential_or_node_command_is_one_error_line(control, capsys, argv, reason) -> None:
    code, out, err = control_cli(control, capsys, *argv)
    assert code == 1 and out is None and err.count("\n") == 1 and reason in err, err


@pytest.mark.parametrize("place", ["before", "after-what", "after-verb"])
def test_control_dir_is_taken_before_or_after_the_subcommand(control, capsys, place) -> None:
    where = ["--control-dir", str(control.data_dir)]
    argv = {"before": [*where, "keys", "list"], "after-what": ["keys", *where, "list"],
            "after-verb": ["keys", "list", *where]}[place]
    control.create_key()
    assert main(["control", *argv]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


@pytest.mark.real
def test_node_listed_and_deleted_by_its_stable_id(node_factory, control, capsys) -> None:
    """The stable ID `tailscale status` shows (Self.ID) addresses the node in the CLI; the
    node logs in with a key an OAuth client made by the CLI minted."""
    real_cli(control, "tag-owners", "set", "tag:web=tag:proxies")
    secret = real_cli(control, "oauth-clients", "create", "--scope", "auth_keys",
                      "--tag", "tag:proxies").stdout.strip()

    async def mint() -> tsapi.Key:
        api = tsapi.Client(control.url, tsapi.Credential("oauth", secret))
        return await api.create_key(tags=["tag:web"], preauthorized=True, expiry_seconds=300)
    node = node_factory("web")
    node.up(asyncio.run(mint()).key, "web")
    stable = node.wait_state(ts.BackendState.RUNNING).node_id
    assert stable.endswith("CNTRL")

    code, listed, _ = control_cli(control, capsys, "nodes", "list")
    assert code == 0 and [(n["node_id"], n["hostname"], n["tags"]) for n in listed] == \
        [(stable, "web", ["tag:web"])]
    code, deleted, err = control_cli(control, capsys, "nodes", "delete", stable)
    assert code == 0 and deleted["node_id"] == stable, err
    assert control.nodes() == []
