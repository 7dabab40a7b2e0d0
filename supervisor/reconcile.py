"""Desired (the proxy's config) against observed (tailscaled's LocalAPI): the
pure comparison that decides whether a proxy is really `running`.

Level-triggered, after Tailscale's Kubernetes operator: the runner observes
on every IPN bus change and on a timer, calls `reconcile()`, and acts on the
differences it names. `running` is a promise: it holds only while
`reconcile()` returns no difference.

Nothing here does I/O; every function is table-tested.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from supervisor.tailscale import (CAP_FUNNEL, CAP_HTTPS, TCP_MODES, WEB_MODES, BackendState, Observed,
                                  Service, funnel_ports, port_in)

# ipn.DefaultControlURL, and the names tailscale treats as the same control
# (ipn/prefs.go: IsLoginServerSynonym).
HOSTED_CONTROL = "https://controlplane.tailscale.com"
_HOSTED_SYNONYMS = {"https://controlplane.tailscale.com", "https://login.tailscale.com"}



def normalize_control_url(url: str | None) -> str:
    """As tailscale compares them: no trailing slash, and the hosted
    control's synonyms are one URL. None or "" means the hosted control."""
    u = (url or "").strip().rstrip("/")
    if not u or u.lower() in _HOSTED_SYNONYMS:
        return HOSTED_CONTROL
    return u


def _norm_target(mode: str, target: str) -> str:
    """The form `tailscale serve` stores: TCPForward is bare HOST:PORT; a
    proxy target keeps its scheme, without a trailing slash."""
    t = target.strip()
    if mode in TCP_MODES:
        return t.removeprefix("tcp://").rstrip("/")
    return t.rstrip("/") if not t.startswith("unix:") else t


def desired_service(mode: str, port: int, target: str, path: str = "/", funnel: bool = False) -> Service:
    if mode in TCP_MODES:
        path = ""
    elif not path.startswith("/"):
        path = "/" + path
    return Service(port, path if mode in WEB_MODES else "", mode, _norm_target(mode, target), funnel)


@dataclass(frozen=True)
class Desired:
    """What the config asks of one node."""

    control_url: str               # normalized
    hostname: str
    tags: tuple[str, ...] = ()     # empty: the config does not care which tags the key gave
    services: frozenset[Service] = frozenset()


class Kind(Enum):
    """Each way observed can differ from desired, and who fixes it."""

    NOT_RUNNING = "not_running"    # BackendState is not Running: the login flow's business
    CONTROL = "control"            # logged in on another control: planned re-registration
    HOSTNAME = "hostname"          # `tailscale set --hostname`
    TAGS = "tags"                  # not changeable in place: shown (the API client may fix it)
    SERVE = "serve"                # apply the serve config, then verify


@dataclass(frozen=True)
class Difference:
    kind: Kind
    reason: str


def reconcile(want: Desired, seen: Observed) -> list[Difference]:
    """Every way `seen` falls short of `want`, most fundamental first. Empty
    means the proxy is serving as configured: it may be called `running`."""
    diffs: list[Difference] = []
    if seen.backend_state is not BackendState.RUNNING:
        why = f"tailscaled is {seen.backend_state.label if seen.backend_state is not None else 'not answering'}"
        if seen.logged_out:
            why += " (logged out)"
        return [Difference(Kind.NOT_RUNNING, why)]
    if seen.control_url and normalize_control_url(seen.control_url) != want.control_url:
        diffs.append(Difference(Kind.CONTROL, f"logged in on {seen.control_url}, "
                                              f"configured for {want.control_url}"))
        return diffs  # nothing else about a node on the wrong control matters
    if seen.hostname != want.hostname:
        diffs.append(Difference(Kind.HOSTNAME, f"hostname is {seen.hostname!r}, configured {want.hostname!r}"))
    if want.tags and sorted(seen.tags) != sorted(want.tags):
        diffs.append(Difference(Kind.TAGS, f"tags are {', '.join(sorted(seen.tags)) or 'none'}, "
                                           f"configured {', '.join(sorted(want.tags))} (tags change only "
                                           f"with a new login; restart the proxy, or fix the key's tags)"))
    if seen.services != want.services:
        missing = sorted(want.services - seen.services)
        extra = sorted(seen.services - want.services)
        parts = ([f"missing {', '.join(s.describe() for s in missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(s.describe() for s in extra)}"] if extra else [])
        diffs.append(Difference(Kind.SERVE, "serve config differs: " + "; ".join(parts)))
    return diffs


def serve_preflight(want: Desired, seen: Observed) -> dict[Service, str]:
    """Services that cannot be served on this node whatever we retry, each
    with its reason, checked as tailscale itself checks them: HTTPS needs the
    `https` capability and cert domains; Funnel needs HTTPS, the `funnel`
    node attribute, and the port in the funnel-ports capability
    (ipn.NodeCanFunnel, ipn.CheckFunnelPort; the words are tailscale's)."""
    refused: dict[Service, str] = {}
    https = CAP_HTTPS in seen.capabilities and bool(seen.cert_domains)
    for s in want.services:
        if s.mode in ("https", "tls-terminated-tcp") and not https:
            refused[s] = "HTTPS certificates are not enabled on this tailnet"
        elif s.funnel:
            if not https:
                refused[s] = "Funnel not available; HTTPS must be enabled"
            elif CAP_FUNNEL not in seen.capabilities:
                refused[s] = 'Funnel not available; "funnel" node attribute not set'
            else:
                allowed = funnel_ports(seen.capabilities)
                if not port_in(allowed, s.port):
                    refused[s] = (f"port {s.port} is not allowed for funnel"
                                  + (f"; allowed ports are: {allowed}" if allowed else ""))
    return refused
