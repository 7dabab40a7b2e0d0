"""Desired vs observed, as a table: every observed field, and what each
difference is called. Beside test_decide.py, and tested the same way."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from supervisor import reconcile as rc
from supervisor import tailscale as ts
from supervisor.reconcile import Desired, Kind
from supervisor.tailscale import BackendState, Observed, Service

WEB = rc.desired_service("http", 80, "http://127.0.0.1:8096")
SSH = rc.desired_service("tcp", 22, "tcp://127.0.0.1:22")
CONTROL = "http://127.0.0.1:4000"

WANT = Desired(control_url=CONTROL, hostname="jellyfin", tags=(), services=frozenset({WEB}))
GOOD = Observed(backend_state=BackendState.RUNNING, control_url=CONTROL + "/", want_running=True,
                hostname="jellyfin", node_id="n1", tailscale_ips=("100.64.0.3",),
                dns_name="jellyfin.tailnet.test", tags=(), key_expiry="2027-01-01T00:00:00Z",
                online=True, services=frozenset({WEB}))


def seen(**kw) -> Observed:
    return dataclasses.replace(GOOD, **kw)


def want(**kw) -> Desired:
    return dataclasses.replace(WANT, **kw)


# (name, desired, observed) -> the kinds of difference, in order
TABLE = [
    ("as configured", WANT, GOOD, []),
    # backend_state: only Running can be serving
    ("NeedsLogin", WANT, seen(backend_state=BackendState.NEEDS_LOGIN), [Kind.NOT_RUNNING]),
    ("Starting", WANT, seen(backend_state=BackendState.STARTING), [Kind.NOT_RUNNING]),
    ("Stopped", WANT, seen(backend_state=BackendState.STOPPED, want_running=False), [Kind.NOT_RUNNING]),
    ("NoState", WANT, seen(backend_state=BackendState.NO_STATE), [Kind.NOT_RUNNING]),
    ("unknown state", WANT, seen(backend_state=None), [Kind.NOT_RUNNING]),
    ("logged out", WANT, seen(backend_state=BackendState.NEEDS_LOGIN, logged_out=True), [Kind.NOT_RUNNING]),
    # control_url: normalized, and only a different control counts
    ("control, trailing slash", WANT, seen(control_url=CONTROL + "/"), []),
    ("control elsewhere", WANT, seen(control_url="http://127.0.0.1:5000"), [Kind.CONTROL]),
    ("control unknown", WANT, seen(control_url=""), []),
    ("hosted synonyms", want(control_url=rc.HOSTED_CONTROL), seen(control_url="https://login.tailscale.com/"), []),
    ("hosted vs headscale", want(control_url=rc.HOSTED_CONTROL), seen(control_url="https://hs.example.com"),
     [Kind.CONTROL]),
    ("wrong control hides the rest", WANT, seen(control_url="http://x:1", hostname="other",
                                                services=frozenset()), [Kind.CONTROL]),
    # hostname (prefs)
    ("hostname changed", WANT, seen(hostname="jellyfin-old"), [Kind.HOSTNAME]),
    ("hostname empty", WANT, seen(hostname=""), [Kind.HOSTNAME]),
    # tags: only when the config names some
    ("tags not configured", WANT, seen(tags=("tag:media",)), []),
    ("tags as configured", want(tags=("tag:a", "tag:b")), seen(tags=("tag:b", "tag:a")), []),
    ("tags missing", want(tags=("tag:media",)), seen(tags=()), [Kind.TAGS]),
    ("tags other", want(tags=("tag:media",)), seen(tags=("tag:web",)), [Kind.TAGS]),
    # serve config
    ("serve empty", WANT, seen(services=frozenset()), [Kind.SERVE]),
    ("serve other target", WANT, seen(services=frozenset({rc.desired_service("http", 80, "http://127.0.0.1:9")})),
     [Kind.SERVE]),
    ("serve extra", WANT, seen(services=frozenset({WEB, SSH})), [Kind.SERVE]),
    ("serve two as configured", want(services=frozenset({WEB, SSH})), seen(services=frozenset({WEB, SSH})), []),
    ("serve funnel differs", WANT, seen(services=frozenset({dataclasses.replace(WEB, funnel=True)})),
     [Kind.SERVE]),
    # several at once, most fundamental first
    ("hostname, tags and serve", want(tags=("tag:x",)), seen(hostname="h", services=frozenset()),
     [Kind.HOSTNAME, Kind.TAGS, Kind.SERVE]),
    # fields that never make a difference by themselves
    ("offline (control outage)", WANT, seen(online=False), []),
    ("key expiry near", WANT, seen(key_expiry="2026-12-01T00:00:00Z"), []),
    ("other node id", WANT, seen(node_id="n2"), []),
    ("other IPs", WANT, seen(tailscale_ips=("100.64.0.9",)), []),
    ("cert domains and https", WANT, seen(cert_domains=("x.ts.net",), capabilities=frozenset({"https"})), []),
    ("other DNS name (control decides it)", WANT, seen(dns_name="jellyfin-1.tailnet.test"), []),
]


@pytest.mark.parametrize("name,desired,observed,kinds", TABLE, ids=[r[0] for r in TABLE])
def test_reconcile_table(name, desired, observed, kinds):
    diffs = rc.reconcile(desired, observed)
    assert [d.kind for d in diffs] == kinds
    for d in diffs:
        assert d.reason and "\n" not in d.reason


def test_every_observed_field_is_in_the_table():
    """Each field of Observed is varied by at least one row (or is bookkeeping)."""
    varied = {f.name for _, _, o, _ in TABLE for f in dataclasses.fields(Observed)
              if getattr(o, f.name) != getattr(GOOD, f.name)}
    assert {f.name for f in dataclasses.fields(Observed)} - varied <= {"at", "expired", "auth_url"}


def test_reasons_name_the_difference():
    [d] = rc.reconcile(WANT, seen(services=frozenset()))
    assert d.reason == "serve config differs: missing http :80 -> http://127.0.0.1:8096"
    [d] = rc.reconcile(WANT, seen(hostname="old"))
    assert d.reason == "hostname is 'old', configured 'jellyfin'"
    [d] = rc.reconcile(WANT, seen(backend_state=BackendState.NEEDS_LOGIN))
    assert d.reason == "tailscaled is NeedsLogin"


@pytest.mark.parametrize("url,norm", [
    (None, rc.HOSTED_CONTROL), ("", rc.HOSTED_CONTROL),
    ("https://controlplane.tailscale.com/", rc.HOSTED_CONTROL),
    ("https://login.tailscale.com", rc.HOSTED_CONTROL),
    ("https://LOGIN.tailscale.com/", rc.HOSTED_CONTROL),
    ("https://hs.example.com/", "https://hs.example.com"),
    ("http://127.0.0.1:4000", "http://127.0.0.1:4000"),
])
def test_control_urls_normalize_as_tailscale_compares_them(url, norm):
    assert rc.normalize_control_url(url) == norm


def test_https_preflight_needs_the_capability_and_cert_domains():
    https = rc.desired_service("https", 443, "http://127.0.0.1:8096")
    w = want(services=frozenset({WEB, https}))
    refused = rc.serve_preflight(w, seen(cert_domains=()))
    assert refused == {https: "HTTPS certificates are not enabled on this tailnet"}
    assert rc.serve_preflight(w, seen(cert_domains=("x.ts.net",))) == refused
    assert rc.serve_preflight(w, seen(cert_domains=("x.ts.net",), capabilities=frozenset({"https"}))) == {}


FUNNEL = rc.desired_service("https", 443, "http://127.0.0.1:8096", funnel=True)
PORTS = "https://tailscale.com/cap/funnel-ports?ports=443,8443,10000"


@pytest.mark.parametrize("caps,domains,service,reason", [
    ({"https", "funnel", PORTS}, ("x.ts.net",), FUNNEL, None),
    (set(), (), FUNNEL, "HTTPS certificates are not enabled on this tailnet"),
    ({"https"}, (), FUNNEL, "HTTPS certificates are not enabled on this tailnet"),
    ({"https", PORTS}, ("x.ts.net",), FUNNEL, 'Funnel not available; "funnel" node attribute not set'),
    ({"https", "funnel"}, ("x.ts.net",), FUNNEL, "port 443 is not allowed for funnel"),
    ({"https", "funnel", "https://tailscale.com/cap/funnel-ports?ports=8443"}, ("x.ts.net",), FUNNEL,
     "port 443 is not allowed for funnel; allowed ports are: 8443"),
    ({"https", "funnel", "https://tailscale.com/cap/funnel-ports?ports=400-500"}, ("x.ts.net",), FUNNEL, None),
])
def test_funnel_preflight_as_tailscale_checks_it(caps, domains, service, reason):
    w = want(services=frozenset({WEB, service}))
    refused = rc.serve_preflight(w, seen(capabilities=frozenset(caps), cert_domains=domains))
    assert refused == ({} if reason is None else {service: reason})


# -- the serve config as tailscaled reports it (both releases write this shape) --

REAL_SERVE_CONFIG = {
    "TCP": {"22": {"TCPForward": "127.0.0.1:22"}, "80": {"HTTP": True}, "8080": {"HTTP": True}},
    "Web": {"node0.tailnet.test:80": {"Handlers": {"/": {"Proxy": "http://127.0.0.1:8096"},
                                                    "/api": {"Proxy": "http://127.0.0.1:9000"}}},
            "node0.tailnet.test:8080": {"Handlers": {"/": {"Proxy": "https+insecure://127.0.0.1:5001"}}}},
}


def test_observed_serve_config_equals_what_the_config_asks_for():
    desired = {rc.desired_service("tcp", 22, "tcp://127.0.0.1:22"),
               rc.desired_service("http", 80, "http://127.0.0.1:8096"),
               rc.desired_service("http", 80, "http://127.0.0.1:9000/", path="/api"),
               rc.desired_service("http", 8080, "https+insecure://127.0.0.1:5001")}
    assert ts.serve_services(REAL_SERVE_CONFIG) == frozenset(desired)


def test_foreground_and_funnel_and_tls_terminated():
    cfg = {"Foreground": {"s1": {"TCP": {"443": {"HTTPS": True}},
                                 "Web": {"h.ts.net:443": {"Handlers": {"/": {"Proxy": "http://127.0.0.1:1"}}}},
                                 "AllowFunnel": {"h.ts.net:443": True}}},
           "TCP": {"5432": {"TCPForward": "127.0.0.1:5432", "TerminateTLS": "h.ts.net"}}}
    assert ts.serve_services(cfg) == {Service(443, "/", "https", "http://127.0.0.1:1", True),
                                      Service(5432, "", "tls-terminated-tcp", "127.0.0.1:5432")}


def test_serve_commands_apply_what_is_observed_back():
    bins = ts.Binaries(tailscale=Path("/ts"), tailscaled=Path("/tsd"))
    sock = Path("/s.sock")
    api = rc.desired_service("http", 80, "http://127.0.0.1:9000", path="/api")
    assert ts.serve_apply_command(bins, sock, api)[3:] == ["--bg", "--yes", "--http=80", "--set-path=/api",
                                                           "http://127.0.0.1:9000"]
    assert ts.serve_apply_command(bins, sock, SSH)[-2:] == ["--tcp=22", "tcp://127.0.0.1:22"]
