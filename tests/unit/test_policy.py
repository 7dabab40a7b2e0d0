"""What tailscaled's output means: only rejections are auth failures; outages never are."""
import pytest

from supervisor import policy
from supervisor.policy import Budget
from supervisor.states import Signal
from supervisor.tailscale import BackendState, BusEvent, NodeStatus

LOGGED_OUT = "You are logged out. The last login error was: "


@pytest.mark.parametrize("notify,signal", [
    ({"ErrMessage": "invalid key: API key does not exist"}, Signal.AUTH_FAILURE),
    ({"ErrMessage": "invalid key: API key k123 not valid"}, Signal.AUTH_FAILURE),
    ({"Health": {"Warnings": {"login-state": {"Text": LOGGED_OUT + "invalid key: API key does not exist"}}}},
     Signal.AUTH_FAILURE),
    ({"Health": {"Warnings": {"login-state": {"Text": LOGGED_OUT + "register request: http 401: invalid key: API key does not exist"}}}},
     Signal.AUTH_FAILURE),
    ({"Health": {"Warnings": {"login-state": {"Text": LOGGED_OUT + "register request: http 403: forbidden"}}}},
     Signal.AUTH_FAILURE),
    ({"Health": {"Warnings": {"state-store-health": {"Text": "State store failed to initialize, Tailscale will not work until this is resolved. See https://tailscale.com/s/state-store-init-error. Error: failed to unmarshal \"/x/tailscaled.state\": unexpected end of JSON input"}}}},
     Signal.CORRUPT_STATE),
    ({"State": 2, "BrowseToURL": "http://127.0.0.1:1/a/8cb07d3ebb3724f3"}, Signal.AUTH_FAILURE),
])
def test_bus_rejections(notify, signal):
    verdicts = policy.from_bus(BusEvent.parse(notify))
    assert [v.signal for v in verdicts] == [signal]
    assert verdicts[0].reason


@pytest.mark.parametrize("text", [
    LOGGED_OUT + "fetch control key: Get \"http://127.0.0.1:9/key?v=133\": dial tcp 127.0.0.1:9: connect: connection refused",
    LOGGED_OUT + "register request: http 500: internal error",
    LOGGED_OUT + "register request: http 502: bad gateway",
])
def test_outage_is_transient_never_auth(text):
    verdicts = policy.from_bus(BusEvent.parse({"Health": {"Warnings": {"login-state": {"Text": text}}}}))
    assert [v.signal for v in verdicts] == [None]


def test_quiet_notify_means_nothing():
    assert policy.from_bus(BusEvent.parse({"State": 6})) == []
    assert policy.from_bus(BusEvent.parse({"Health": {"Warnings": {}}})) == []


@pytest.mark.parametrize("line,signal", [
    ("2026/11/25 03:42:04 Received error: PollNetMap: initial fetch failed 404: node not found", Signal.AUTH_FAILURE),
    ("2026/11/25 03:42:04 Received error: PollNetMap: initial fetch failed 500: boom", None),
    ("2026/11/25 03:42:04 control: fetch control key: dial tcp 127.0.0.1:1: connect: connection refused", None),
])
def test_stderr_lines(line, signal):
    v = policy.from_stderr(line)
    assert v is not None and v.signal is signal


# tailscaled restarted on a state whose node key expired (facts §4d): these exact lines,
# in this order, from 1.78.1 and 1.96.4 alike (direct.go doLogin)
_EXPIRED_AT_START = [
    "2026/12/01 03:06:44 control: RegisterReq: got response; nodeKeyExpired=true, machineAuthorized=true; authURL=false",
    "2026/12/01 03:06:44 control: server reports new node key [xsINh] has expired",
    "2026/12/01 03:06:44 control: doLogin(regen=true, hasUrl=false)",
    "2026/12/01 03:06:44 control: RegisterReq: got response; nodeKeyExpired=false, machineAuthorized=false; authURL=true",
    "2026/12/01 03:06:44 control: AuthURL is http://127.0.0.1:33995/a/eb3873b7bff20b76",
]
# a really stale state (facts §4c): the control does not know the key, no "has expired"
_STALE_AT_START = [
    "2026/12/01 03:06:44 control: RegisterReq: got response; nodeKeyExpired=false, machineAuthorized=false; authURL=true",
    "2026/12/01 03:06:44 control: AuthURL is http://127.0.0.1:8/a/8cb07d3ebb3724f3",
]


@pytest.mark.parametrize("lines,signals,auth_url_logged", [
    (_EXPIRED_AT_START, [Signal.KEY_EXPIRED], True),
    (_STALE_AT_START, [], True),
])
def test_a_restart_on_expired_or_stale_state_says_which_before_the_auth_url(lines, signals, auth_url_logged):
    verdicts = [v for v in map(policy.from_stderr, lines) if v is not None]
    assert [v.signal for v in verdicts] == signals
    assert all("[xsINh] has expired" in v.reason and "\n" not in v.reason for v in verdicts)
    assert policy.logs_auth_url(lines[-1]) is auth_url_logged
    assert not any(policy.logs_auth_url(l) for l in lines[:-1])


@pytest.mark.parametrize("key_expired,signal", [
    (False, Signal.AUTH_FAILURE),  # node unknown to control: stale state, the one wipe
    (True, Signal.KEY_EXPIRED),    # the expired key's next step: log in again in place
])
def test_an_auth_url_means_stale_state_unless_the_key_expired_first(key_expired, signal):
    notify = BusEvent.parse({"State": 2, "BrowseToURL": "http://127.0.0.1:1/a/8cb07d3ebb3724f3"})
    assert [v.signal for v in policy.from_bus(notify, key_expired=key_expired)] == [signal]
    v = policy.from_needs_login(_status(auth_url="http://x/a/1"), key_expired=key_expired)
    assert v.signal is signal
    assert ("stale state" in v.reason) is (not key_expired)


def test_ordinary_stderr_is_ignored():
    assert policy.from_stderr("2026/11/25 03:42:04 magicsock: disco: node [abc] now using 127.0.0.1:41641") is None


def test_exit_with_unreadable_state_is_corrupt_state_1_78():
    tail = ["2026/11/25 03:42:17 link state: ...", "2026/11/25 03:42:17 getLocalBackend error: store.New: unexpected end of JSON input"]
    v = policy.from_exit(1, tail)
    assert v.signal is Signal.CORRUPT_STATE and v.reason.startswith("state file unreadable: ")


def test_other_exit_is_a_crash_with_its_last_line():
    v = policy.from_exit(1, ["2026/11/25 03:42:17 some fatal thing happened"])
    assert v.signal is Signal.CRASH and "some fatal thing happened" in v.reason and "status 1" in v.reason


def _status(**kw):
    return NodeStatus(backend_state=BackendState.NEEDS_LOGIN, **kw)


def test_needs_login_reasons():
    assert policy.from_needs_login(_status(auth_url="http://x/a/1")).signal is Signal.AUTH_FAILURE
    assert policy.from_needs_login(_status(expired=True, key_expiry="2020-01-01T00:00:00Z")).signal is Signal.KEY_EXPIRED
    assert policy.from_needs_login(_status()) is None  # fresh or logged out: log in with the key


def test_backoff_doubles_and_caps():
    assert [policy.backoff_delay(n, 1, 30) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_budget_survives_restart_and_rearms_on_config_change(tmp_path):
    path = tmp_path / "recovery.json"
    b = Budget(path, "fp1")
    assert b.armed
    b.spend("node deleted")
    assert not Budget(path, "fp1").armed          # a supervisor restart never wipes twice
    b2 = Budget(path, "fp1")
    b2.mark_failed("invalid key")
    assert Budget(path, "fp1").failed_reason == "invalid key"
    fresh = Budget(path, "fp2")                   # config changed
    assert fresh.armed and not fresh.failed_reason


def test_budget_rearm(tmp_path):
    b = Budget(tmp_path / "r.json", "fp")
    b.spend("x")
    b.rearm()
    assert Budget(tmp_path / "r.json", "fp").armed


def test_corrupt_budget_file_means_armed(tmp_path):
    (tmp_path / "r.json").write_text("{garbage")
    assert Budget(tmp_path / "r.json", "fp").armed


# -- reasons are whole ------------------------------------------------------------


@pytest.mark.parametrize("line,reason", [
    ("fatal: something unexpected happened", "fatal: something unexpected happened"),
    ("2026/11/25 03:42:04 fatal: something unexpected happened", "fatal: something unexpected happened"),
    ("2026/11/25 03:42:04.123456 safesocket.Listen: bind: invalid argument",
     "safesocket.Listen: bind: invalid argument"),
    ("  spaced   out\twords ", "spaced out words"),
])
def test_a_reason_keeps_tailscaleds_words(line, reason):
    assert policy.whole(line) == reason
    assert policy.from_exit(1, [line]).reason == f"tailscaled exited with status 1: {reason}"


def test_a_long_reason_is_cut_in_the_middle_so_the_cause_survives():
    line = "safesocket.Listen: listen unix " + "/very/long/path" * 40 + "/tailscaled.sock: bind: invalid argument"
    r = policy.whole(line, limit=120)
    assert len(r) <= 120 and r.startswith("safesocket.Listen") and r.endswith("bind: invalid argument")
    assert " … " in r


@pytest.mark.parametrize("line", [
    "2026/11/30 22:54:03 getLocalBackend error: store.New: open /x/tailscaled.state: unexpected EOF",
    "State store failed to initialize, Tailscale will not work until this is resolved.",
    "failed to load profile prefs for a@b (abc): parsing saved prefs: invalid character 'n'",
    "backend error: cannot log in when state store is unhealthy",
    "failed to unseal state file: failed to unseal encryption key with TPM: bad",
])
def test_every_report_of_unreadable_state_is_corrupt_state(line):
    assert policy.from_stderr(line).signal is Signal.CORRUPT_STATE
    assert policy.from_exit(1, ["x", line]).signal is Signal.CORRUPT_STATE


def test_the_harmless_tpm_line_at_every_start_is_not_corrupt_state():
    line = "2026/11/30 22:54:03 TPM: error opening: open /dev/tpmrm0: no such file or directory"
    assert policy.from_stderr(line) is None


@pytest.mark.parametrize("content,verdict", [
    (None, None),
    (b"", "state file is empty"),
    (b"\n  \n", "state file is empty"),
    (b"{not json", "state file is not JSON"),
    (b"[1, 2]", "state file has no machine key"),
    (b"{}", None),  # 1.96.4 at start before any login (a proxy that never got a key): fresh
    (b"{ }\n", None),
    (b'{"_profiles": "e30="}', "state file has no machine key"),
    (b'{"_current-profile": "cHJvZmlsZS0x"}', "state file has no machine key"),
    (b'{"_machinekey": "bWtleQ==", "_current-profile": "cHJvZmlsZS0x"}', None),
    (b'{"key": {}, "nonce": "AA==", "data": "AA=="}', None),  # TPM-sealed: tailscaled checks it
])
def test_the_state_file_is_checked_before_a_launch(tmp_path, content, verdict):
    if content is not None:
        (tmp_path / "tailscaled.state").write_bytes(content)
    v = policy.check_state_file(tmp_path)
    if verdict is None:
        assert v is None
    else:
        assert v.signal is Signal.CORRUPT_STATE and verdict in v.reason


def test_a_signal_death_says_which_signal_and_no_unrelated_last_line():
    v = policy.from_exit(-9, ["2026/11/30 22:54:03 netmap: suggested exit node: ()"])
    assert v.signal is Signal.CRASH and v.reason == "tailscaled was killed by SIGKILL"


def _logged_in_on(url: str | None) -> bytes:
    import base64
    import json
    prefs = {} if url is None else {"ControlURL": url}
    return json.dumps({"_machinekey": "bWtleQ==", "_current-profile": base64.b64encode(b"p").decode(),
                       "p": base64.b64encode(json.dumps(prefs).encode()).decode()}).encode()


@pytest.mark.parametrize("content,configured,verdict", [
    (None, "http://127.0.0.1:2", None),                                       # fresh: nothing to check
    (_logged_in_on("http://127.0.0.1:1"), "http://127.0.0.1:1", None),
    (_logged_in_on("http://127.0.0.1:1/"), "http://127.0.0.1:1", None),       # as tailscale compares them
    (_logged_in_on("https://login.tailscale.com"), None, None),               # a hosted synonym
    (_logged_in_on(""), "http://127.0.0.1:2", None),                          # unset: the login decides
    (_logged_in_on(None), "http://127.0.0.1:2", None),
    (b"{not json", "http://127.0.0.1:2", None),                               # check_state_file's part
    (_logged_in_on("http://127.0.0.1:1"), "http://127.0.0.1:2",
     "config changed: login_server (logged in on http://127.0.0.1:1, configured for http://127.0.0.1:2)"),
    (_logged_in_on("http://127.0.0.1:1"), None,
     "config changed: login_server (logged in on http://127.0.0.1:1, configured for "
     "https://controlplane.tailscale.com)"),
])
def test_a_state_on_another_control_is_re_registered_before_tailscaled_can_dial_it(
        tmp_path, content, configured, verdict):
    if content is not None:
        (tmp_path / "tailscaled.state").write_bytes(content)
    v = policy.check_control(tmp_path, configured)
    if verdict is None:
        assert v is None
    else:
        assert v.signal is Signal.REREGISTER and v.reason == verdict


# -- a `failed` reason from an exhausted budget says so, in one line --------------------------

GONE = "node deleted on the control (map poll: 404 node not found)"


@pytest.mark.parametrize("record,now,during,text", [
    (policy.BudgetRecord(armed=False, spent_at=1000.0, restored=True), 1040.0, False,
     f"{GONE}; the one recovery was used 40 s ago (restored state) and returns only after 10 min "
     "running — `ts-supervisor restart web` gives it back and tries again"),
    (policy.BudgetRecord(armed=False, spent_at=1000.0, wiped=True), 1000.0 + 3 * 3600 + 5, False,
     f"{GONE}; the one recovery was used 3 h ago (wiped state) and returns only after 10 min "
     "running — `ts-supervisor restart web` gives it back and tries again"),
    (policy.BudgetRecord(armed=False, spent_at=1000.0), 1125.0, False,
     f"{GONE}; the one recovery was used 2 min ago (logged in again) and returns only after 10 min "
     "running — `ts-supervisor restart web` gives it back and tries again"),
    (policy.BudgetRecord(armed=False), 1125.0, False,  # a record from before spent_at: no age
     f"{GONE}; the one recovery was used (logged in again) and returns only after 10 min "
     "running — `ts-supervisor restart web` gives it back and tries again"),
    (policy.BudgetRecord(armed=False, spent_at=1000.0, restored=True, wiped=True), 1010.0, True,
     f"{GONE}; the one recovery (restored state, then wiped it) did not help — "
     "`ts-supervisor restart web` gives it back and tries again"),
])
def test_exhausted_reason(record, now, during, text):
    assert policy.exhausted_reason(GONE, record, "web", now, 600.0, during) == text


@pytest.mark.parametrize("seconds,text", [(0, "0 s"), (59, "59 s"), (60, "1 min"), (599, "9 min"),
                                          (3600, "1 h"), (86400 * 2 + 5, "2 d"), (-3, "0 s")])
def test_ago(seconds, text):
    assert policy._ago(seconds) == text
