"""Credentials on a real tailnet, proven against the embedded control through
its v2 API (our model of hosted control): the supervisor mints one single-use
key per login with an OAuth client or an API token, hands it to real
tailscaled through a pipe, deletes it afterwards, never mints for a healthy
node, and fails (once, with the reason) when no key can be minted. Readiness
shows a key's kind, its expiry and a spent one-off key before a login needs it."""
from __future__ import annotations

import base64
import binascii
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.harness import Timeout, wait_for
from tests.supervisor_harness import ROOT, SupervisorProc

pytestmark = pytest.mark.real

SCOPES = ["auth_keys", "devices:core"]


def on_control(sup: SupervisorProc, control, bins=None, **settings: Any) -> None:
    sup.settings.update(api_base=control.url, **settings)
    if bins is not None:
        sup.settings.update(tailscale=str(bins.tailscale), tailscaled=str(bins.tailscaled))


def secret_file(tmp_path: Path, name: str, secret: str) -> Path:
    path = tmp_path / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def oauth_client(control, tmp_path: Path, tags: list[str] = ["tag:web"]) -> tuple[dict, Path]:  # noqa: B006
    client = control.admin("create_oauth_client", scopes=SCOPES, tags=tags)
    return client, secret_file(tmp_path, "oauth.secret", client["secret"])


def proxy(sup: SupervisorProc, control, name: str = "app", **keys: Any) -> None:
    sup.write_proxy(name, hostname=name, target="http://127.0.0.1:8080", serve="http", port=80,
                    login_server=control.url, **{k: str(v) if isinstance(v, Path) else v for k, v in keys.items()})


def control_events(control, kind: str, since: float = 0.0) -> list[dict[str, Any]]:
    return [e for e in control.events(since) if e["kind"] == kind]


def notes(sup: SupervisorProc, kind: str, proxy_name: str = "app") -> list[dict[str, Any]]:
    return [e for e in sup.events() if e["proxy"] == proxy_name and e["event"] == kind]


def texts_under(root: Path) -> list[tuple[Path, bytes]]:
    """Every file's bytes under `root`, and for a JSON file of base64 strings
    (tailscaled.state) each decoded value too: a key must not hide in either."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        out.append((path, data))
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict):
            for v in obj.values():
                if isinstance(v, str):
                    try:
                        out.append((path, base64.b64decode(v, validate=True)))
                    except (binascii.Error, ValueError):
                        pass
    return out


def assert_no_secret_on_disk(sup: SupervisorProc, *secrets: str) -> None:
    found = [(p, s) for p, data in texts_under(sup.data_dir)
             for s in (b"tskey-auth-", b"tskey-client-", b"tskey-api-", *(x.encode() for x in secrets))
             if s in data]
    if sup.output is not None:
        out = sup.output.read_bytes()
        found += [(sup.output, s) for s in (b"tskey-auth-", *(x.encode() for x in secrets)) if s in out]
    assert not found, f"secrets on disk: {found}"


# -- minting ---------------------------------------------------------------------------------


def test_an_oauth_client_mints_one_single_use_key_per_login_and_deletes_it(sup, control, tmp_path, any_bins):
    on_control(sup, control, any_bins)
    client, path = oauth_client(control, tmp_path)
    proxy(sup, control, oauth_client_secret_file=path, tags=["tag:web"])
    t0 = time.monotonic()
    sup.start()
    sup.wait_state("app", "running", 40)

    created = control_events(control, "key_created", t0)
    assert len(created) == 1, created
    kid = created[0]["key"]
    assert {k: created[0][k] for k in ("reusable", "ephemeral", "preauthorized", "tags")} == {
        "reusable": False, "ephemeral": False, "preauthorized": True, "tags": ["tag:web"]}
    node = control.node_named("app")
    assert node["tags"] == ["tag:web"]
    assert [e["key"] for e in control_events(control, "register_ok", t0)] == [kid]  # that key, once
    control.wait_event(lambda e: e["kind"] == "key_deleted" and e.get("key") == kid, 20,
                       "the minted key deleted after the login")
    assert kid not in {k["id"] for k in control.admin("list_keys")}
    minted = notes(sup, "auth_key")
    assert len(minted) == 1 and kid in minted[0]["reason"] and "single-use" in minted[0]["reason"]
    assert sup.status()["app"]["credential"] == "oauth client"

    # a restart on healthy state mints nothing
    assert sup.stop() == 0
    t1 = time.monotonic()
    n = len(sup.events())
    sup.start()
    sup.wait_state("app", "running", 40, after=n)
    assert control_events(control, "key_created", t1) == []
    assert [x["id"] for x in control.nodes()] == [node["id"]]
    assert_no_secret_on_disk(sup, client["secret"])


def test_an_ephemeral_oauth_proxy_mints_an_ephemeral_key(sup, control, tmp_path):
    on_control(sup, control)
    _, path = oauth_client(control, tmp_path)
    proxy(sup, control, oauth_client_secret_file=path, tags=["tag:web"], ephemeral=True)
    t0 = time.monotonic()
    sup.start()
    sup.wait_state("app", "running", 40)
    created = control_events(control, "key_created", t0)
    assert [(e["reusable"], e["ephemeral"], e["preauthorized"]) for e in created] == [(False, True, True)]


def test_an_api_token_mints_untagged_keys(sup, control, tmp_path):
    """A token needs no tags: the shipped untagged examples keep working."""
    on_control(sup, control)
    token = control.admin("create_api_token")
    proxy(sup, control, api_token_file=secret_file(tmp_path, "api.token", token["secret"]))
    sup.start()
    sup.wait_state("app", "running", 40)
    assert control.node_named("app")["tags"] == []
    assert sup.status()["app"]["credential"] == "api token"
    assert_no_secret_on_disk(sup, token["secret"])


def test_an_oauth_client_without_tags_is_one_check_line(tmp_path, control):
    client, path = oauth_client(control, tmp_path)
    conf = tmp_path / "conf.d"
    conf.mkdir()
    (conf / "app.toml").write_text(tomli_w.dumps({"target": "http://127.0.0.1:8080",
                                                  "oauth_client_secret_file": str(path)}))
    out = subprocess.run([sys.executable, "-m", "supervisor", "check", "--config-dir", str(conf)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    lines = [line for line in out.stdout.splitlines() + out.stderr.splitlines() if "app.toml" in line]
    assert out.returncode == 1 and len(lines) == 1, (out.stdout, out.stderr)
    assert lines[0].startswith(f"{conf / 'app.toml'}: tags: missing") and client["secret"] not in out.stdout


@pytest.mark.parametrize("fault", ["revoked", "api_503"])
def test_no_key_to_mint_backs_off_then_fails_with_the_reason_once(sup, control, tmp_path, fault):
    """A revoked OAuth client, or the API answering 503: the login retries with
    backoff within the start deadline, then `failed`, saying why, and stays so."""
    on_control(sup, control, start_timeout=4)
    client, path = oauth_client(control, tmp_path)
    if fault == "revoked":
        control.admin("revoke_oauth_client", id=client["id"])
    else:
        control.admin("set_fault", api_status=503)
    proxy(sup, control, oauth_client_secret_file=path, tags=["tag:web"])
    sup.start()
    failed = sup.wait_state("app", "failed", 30)
    reason = failed["reason"]
    assert "no key to log in with" in reason and "cannot mint an auth key" in reason
    assert ("invalid_client" in reason or "401" in reason) if fault == "revoked" else "503" in reason
    assert client["secret"] not in reason
    retries = [e for e in sup.events() if e["proxy"] == "app" and e["event"] == "transient"
               and "cannot mint" in e["reason"] and "retrying in" in e["reason"]]
    assert retries, "the mint was not retried with backoff"
    assert control.nodes() == []
    n = len(sup.events())
    with pytest.raises(Timeout):  # no loop: failed stays failed until an operator acts
        sup.wait_event(lambda e: e["proxy"] == "app" and e["state"] not in (None, "failed"), 6,
                       "any transition after failed", after=n)
    st = sup.status()["app"]
    assert st["state"] == "failed" and "cannot mint an auth key" in st["reason"]


def test_a_client_revoked_while_running_shows_in_readiness_once_a_login_needs_it(sup, control, tmp_path):
    """Readiness is checked at start and every 6 hours: a client revoked in between
    showed no warning while the proxy was `failed` for it. A login that cannot mint
    checks again at once, so the table and status --json say what the failure means."""
    on_control(sup, control, start_timeout=4)
    client, path = oauth_client(control, tmp_path)
    proxy(sup, control, oauth_client_secret_file=path, tags=["tag:web"])
    sup.start()
    sup.wait_state("app", "running", 40)
    assert sup.status()["app"]["credential_warning"] == ""
    control.admin("revoke_oauth_client", id=client["id"])
    n = len(sup.events())
    assert sup.cli("recover", "app", "--data-dir", str(sup.data_dir)).returncode == 0
    sup.wait_state("app", "failed", 30, after=n)
    wait_for(lambda: sup.status()["app"]["credential_warning"].startswith("API credential check failed"),
             10, "the readiness warning for the revoked client")
    assert client["secret"] not in json.dumps(sup.status())


# -- readiness ---------------------------------------------------------------------------------


def keyed_proxy(sup, control, tmp_path, **key_kw) -> dict[str, Any]:
    """A proxy with a plain key and an API token that can read it."""
    key = control.create_key(**key_kw)
    token = control.admin("create_api_token")
    proxy(sup, control, auth_key_file=secret_file(tmp_path, "auth.key", key["secret"]),
          api_token_file=secret_file(tmp_path, "api.token", token["secret"]))
    return key


def test_a_key_expiring_in_3_days_is_a_warning_noted_once_across_restarts(sup, control, tmp_path):
    on_control(sup, control)
    key = keyed_proxy(sup, control, tmp_path, reusable=True, expiry=3 * 86400)
    sup.start()
    sup.wait_state("app", "running", 40)
    st = sup.wait_event(lambda e: e["proxy"] == "app" and e["event"] == "key_expiring", 20, "the expiry note")
    assert key["id"] in st["reason"] and "expires in" in st["reason"]
    status = sup.status()["app"]
    assert status["state"] == "running"  # a warning is not a state
    assert status["credential"] == "reusable key" and status["credential_warning"].startswith("auth key expires in")
    assert status["credential_expires"] is not None

    assert sup.stop() == 0
    sup.start()
    sup.wait_state("app", "running", 40, after=len(sup.events()) - 1)
    fresh = lambda: sup.status()["app"]["credential_warning"].startswith("auth key expires in")  # noqa: E731
    wait_for(fresh, 20, "the warning after a restart")
    assert len(notes(sup, "key_expiring")) == 1


def test_a_used_one_off_key_shows(sup, control, tmp_path):
    on_control(sup, control)
    keyed_proxy(sup, control, tmp_path, reusable=False)
    sup.start()
    sup.wait_state("app", "running", 40)
    st = wait_for(lambda: (s := sup.status()["app"])["credential_warning"] and s, 20, "a readiness warning")
    assert (st["credential"], st["credential_warning"]) == ("one-off key", "one-off key already used")
    assert st["state"] == "running"
