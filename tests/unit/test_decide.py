"""The whole recovery policy as a table: (state, signal, budget, restarts) -> (action, next state)."""
import pytest

from supervisor.states import Action, Decision, Facts, Signal, State, decide

S, A, G = State, Action, Signal
LIMIT = 5

TABLE = [
    # state         signal            armed  restarts  -> action              next state      event
    (S.STOPPED,    G.BOOT,            True,  0,   A.LAUNCH,           S.STARTING,   "booted"),
    (S.STARTING,   G.RUNNING,         True,  0,   A.NOTHING,          S.RUNNING,    "running"),
    (S.RUNNING,    G.RUNNING,         True,  0,   A.NOTHING,          S.RUNNING,    ""),
    # auth failure: exactly one recovery, then failed
    (S.RUNNING,    G.AUTH_FAILURE,    True,  0,   A.RECOVER,          S.RECOVERING, "recovering"),
    (S.STARTING,   G.AUTH_FAILURE,    True,  0,   A.RECOVER,          S.RECOVERING, "recovering"),
    (S.RECOVERING, G.AUTH_FAILURE,    False, 0,   A.STOP,             S.FAILED,     "recovery_failed"),
    (S.RECOVERING, G.AUTH_FAILURE,    True,  0,   A.STOP,             S.FAILED,     "recovery_failed"),
    (S.STARTING,   G.AUTH_FAILURE,    False, 0,   A.STOP,             S.FAILED,     "failed"),
    (S.RUNNING,    G.AUTH_FAILURE,    False, 0,   A.STOP,             S.FAILED,     "failed"),
    (S.RECOVERING, G.RUNNING,         False, 0,   A.NOTHING,          S.RUNNING,    "recovered"),
    # corrupt state file: same budget as stale state
    (S.STARTING,   G.CORRUPT_STATE,   True,  0,   A.RECOVER,          S.RECOVERING, "recovering"),
    (S.STARTING,   G.CORRUPT_STATE,   False, 0,   A.STOP,             S.FAILED,     "failed"),
    # expired key: re-authenticate in place, same budget
    (S.RUNNING,    G.KEY_EXPIRED,     True,  0,   A.REAUTH,           S.RECOVERING, "reauthenticating"),
    (S.STARTING,   G.KEY_EXPIRED,     True,  0,   A.REAUTH,           S.RECOVERING, "reauthenticating"),  # at a (re)start
    (S.STARTING,   G.KEY_EXPIRED,     False, 0,   A.STOP,             S.FAILED,     "failed"),
    # the expired key's next steps (AuthURL) during the re-login answering them: never failed, never a wipe
    (S.RECOVERING, G.KEY_EXPIRED,     False, 0,   A.NOTHING,          S.RECOVERING, ""),
    (S.RECOVERING, G.KEY_EXPIRED,     True,  0,   A.NOTHING,          S.RECOVERING, ""),
    # crashes: backoff until the start limit
    (S.RUNNING,    G.CRASH,           True,  0,   A.SCHEDULE_RESTART, S.BACKOFF,    "crashed"),
    (S.STARTING,   G.CRASH,           True,  4,   A.SCHEDULE_RESTART, S.BACKOFF,    "crashed"),
    (S.STARTING,   G.CRASH,           True,  5,   A.STOP,             S.FAILED,     "start_limit"),
    (S.RECOVERING, G.CRASH,           False, 0,   A.SCHEDULE_RESTART, S.BACKOFF,    "crashed"),
    (S.BACKOFF,    G.BACKOFF_OVER,    True,  1,   A.LAUNCH,           S.STARTING,   "relaunched"),
    (S.RUNNING,    G.BACKOFF_OVER,    True,  0,   A.NOTHING,          S.RUNNING,    ""),
    # running is a promise: leaving it, and degraded (node up, not as configured)
    (S.STARTING,   G.DEGRADED,        True,  0,   A.NOTHING,          S.DEGRADED,   "degraded"),
    (S.RUNNING,    G.DEGRADED,        True,  0,   A.NOTHING,          S.DEGRADED,   "degraded"),
    (S.DEGRADED,   G.DEGRADED,        True,  0,   A.NOTHING,          S.DEGRADED,   ""),
    (S.DEGRADED,   G.RUNNING,         True,  0,   A.NOTHING,          S.RUNNING,    "running"),
    (S.RECOVERING, G.DEGRADED,        False, 0,   A.NOTHING,          S.DEGRADED,   "degraded"),
    (S.RUNNING,    G.NOT_RUNNING,     True,  0,   A.NOTHING,          S.STARTING,   "stalled"),
    (S.DEGRADED,   G.NOT_RUNNING,     True,  0,   A.NOTHING,          S.STARTING,   "stalled"),
    (S.STARTING,   G.NOT_RUNNING,     True,  0,   A.NOTHING,          S.STARTING,   ""),
    (S.DEGRADED,   G.CRASH,           True,  0,   A.SCHEDULE_RESTART, S.BACKOFF,    "crashed"),
    (S.DEGRADED,   G.AUTH_FAILURE,    True,  0,   A.RECOVER,          S.RECOVERING, "recovering"),
    (S.FAILED,     G.DEGRADED,        False, 0,   A.NOTHING,          S.FAILED,     ""),
    # every transitional state has a deadline; a late one never acts
    (S.STARTING,   G.DEADLINE,        True,  0,   A.SCHEDULE_RESTART, S.BACKOFF,    "timed_out"),
    (S.RECOVERING, G.DEADLINE,        False, 0,   A.SCHEDULE_RESTART, S.BACKOFF,    "timed_out"),
    (S.STARTING,   G.DEADLINE,        True,  5,   A.STOP,             S.FAILED,     "start_limit"),
    (S.RUNNING,    G.DEADLINE,        True,  0,   A.NOTHING,          S.RUNNING,    ""),
    (S.DEGRADED,   G.DEADLINE,        True,  0,   A.NOTHING,          S.DEGRADED,   ""),
    # no key to log in with by the deadline (minting refused, API down): failed, never a loop
    (S.STARTING,   G.NO_LOGIN_KEY,    True,  0,   A.STOP,             S.FAILED,     "failed"),
    (S.RECOVERING, G.NO_LOGIN_KEY,    False, 0,   A.STOP,             S.FAILED,     "failed"),
    (S.RUNNING,    G.NO_LOGIN_KEY,    True,  0,   A.NOTHING,          S.RUNNING,    ""),
    (S.FAILED,     G.NO_LOGIN_KEY,    False, 0,   A.NOTHING,          S.FAILED,     ""),
    # our own bookkeeping failing (full disk) backs off without counting
    (S.STARTING,   G.OS_ERROR,        True,  5,   A.RETRY_LATER,      S.BACKOFF,    "bookkeeping_error"),
    (S.RUNNING,    G.OS_ERROR,        True,  0,   A.RETRY_LATER,      S.BACKOFF,    "bookkeeping_error"),
    # the state belongs to another control: a planned fresh start, budget untouched
    (S.RUNNING,    G.REREGISTER,      False, 0,   A.REREGISTER,       S.STARTING,   "reregistering"),
    (S.STARTING,   G.REREGISTER,      True,  0,   A.REREGISTER,       S.STARTING,   "reregistering"),
    # the operator's recovery works from any state, failed included
    (S.FAILED,     G.FORCE_RECOVER,   False, 0,   A.RECOVER,          S.RECOVERING, "recovering"),
    (S.RUNNING,    G.FORCE_RECOVER,   True,  0,   A.RECOVER,          S.RECOVERING, "recovering"),
    (S.BACKOFF,    G.FORCE_RECOVER,   True,  2,   A.RECOVER,          S.RECOVERING, "recovering"),
    # healthy period re-arms
    (S.RUNNING,    G.HEALTHY,         False, 0,   A.REARM,            S.RUNNING,    "healthy"),
    (S.STARTING,   G.HEALTHY,         False, 0,   A.NOTHING,          S.STARTING,   ""),
    # operator
    (S.FAILED,     G.START,           False, 0,   A.LAUNCH,           S.STARTING,   "started"),
    (S.RUNNING,    G.START,           True,  0,   A.LAUNCH,           S.STARTING,   "started"),
    (S.RUNNING,    G.STOP,            True,  0,   A.STOP,             S.STOPPED,    "stopped"),
    (S.FAILED,     G.STOP,            False, 0,   A.STOP,             S.STOPPED,    "stopped"),
    (S.STOPPED,    G.STOP,            True,  0,   A.NOTHING,          S.STOPPED,    ""),
    # late news from children already stopped never acts (no loops)
    (S.FAILED,     G.AUTH_FAILURE,    False, 0,   A.NOTHING,          S.FAILED,     ""),
    (S.FAILED,     G.CRASH,           False, 0,   A.NOTHING,          S.FAILED,     ""),
    (S.STOPPED,    G.RUNNING,         True,  0,   A.NOTHING,          S.STOPPED,    ""),
    (S.BACKOFF,    G.AUTH_FAILURE,    True,  1,   A.NOTHING,          S.BACKOFF,    ""),
    (S.BACKOFF,    G.CRASH,           True,  1,   A.NOTHING,          S.BACKOFF,    ""),
]


def test_a_restored_state_that_is_rejected_gets_the_one_wipe_then_failed():
    """Repair before wipe: at most one restore and one wipe per incident."""
    restore_rejected = Facts(Signal.AUTH_FAILURE, budget_armed=False, wipe_pending=True)
    assert decide(State.RECOVERING, restore_rejected) == Decision(Action.RECOVER, State.RECOVERING, "recovering")
    corrupt_again = Facts(Signal.CORRUPT_STATE, budget_armed=False, wipe_pending=True)
    assert decide(State.RECOVERING, corrupt_again).action is Action.RECOVER
    wiped_rejected = Facts(Signal.AUTH_FAILURE, budget_armed=False, wipe_pending=False)
    assert decide(State.RECOVERING, wiped_rejected) == Decision(Action.STOP, State.FAILED, "recovery_failed")
    # a restored state whose key expired is logged in again in place, never wiped
    assert decide(State.RECOVERING, Facts(Signal.KEY_EXPIRED, budget_armed=False, wipe_pending=True)
                  ) == Decision(Action.NOTHING, State.RECOVERING, "")


@pytest.mark.parametrize("state,signal,armed,restarts,action,next_state,event", TABLE,
                         ids=[f"{r[0].value}-{r[1].value}-{'armed' if r[2] else 'spent'}-{r[3]}" for r in TABLE])
def test_decide_table(state, signal, armed, restarts, action, next_state, event):
    d = decide(state, Facts(signal, budget_armed=armed, recent_restarts=restarts, start_limit=LIMIT))
    assert (d.action, d.state, d.event) == (action, next_state, event)


def test_every_state_and_signal_has_a_decision():
    for state in State:
        for signal in Signal:
            for armed in (True, False):
                d = decide(state, Facts(signal, budget_armed=armed))
                assert isinstance(d.action, Action) and isinstance(d.state, State)


def test_auth_failures_wipe_at_most_once_per_budget():
    """Walk an incident: however many auth failures arrive, one RECOVER only."""
    state, armed, recovers = State.RUNNING, True, 0
    for _ in range(10):
        d = decide(state, Facts(Signal.AUTH_FAILURE, budget_armed=armed))
        if d.action is Action.RECOVER:
            recovers += 1
            armed = False
        state = d.state
    assert recovers == 1 and state is State.FAILED
