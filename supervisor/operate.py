"""Operator commands on a running supervisor and its conf.d: start, stop,
restart, logs, events, add, remove.

start/stop/restart go through the 0600 control socket; logs and events read
the data dir's files (0700, so the same people); add and remove edit conf.d
atomically and ask a running supervisor to reload.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w

from supervisor import config as cfgmod
from supervisor import ipc
from supervisor.events import redact, redact_json

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
NAME_RE = cfgmod._NAME_RE  # the rule for proxy file names: a NAME is conf.d/NAME.toml


def _err(msg: str) -> None:
    print(f"ts-supervisor: error: {msg}", file=sys.stderr)


def proxy_name(text: str) -> str:
    """argparse `type=` for every NAME a user types: 1-63 letters, digits, '-'
    or '_', first a letter or digit, so it can never leave conf.d or the data
    dir. A bad one ends the command with one line and exit status 2."""
    if NAME_RE.fullmatch(text):
        return text
    shown = repr(text) if len(text) <= 40 else repr(text[:40]) + "..."
    _err(f"NAME: {shown} is not a proxy name (1-63 letters, digits, '-' or '_', "
         f"starting with a letter or digit)")
    raise SystemExit(EXIT_USAGE)


def _count(text: str) -> int:
    """argparse `type=` for -n: a whole number of lines, 0 or more."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of lines (0 or more)")
    return n


def _call(data_dir: Path, cmd: str, **args: Any) -> tuple[int, dict[str, Any]]:
    try:
        answer = ipc.call(data_dir, cmd, **args)
    except ipc.NotRunning as e:
        _err(str(e))
        return EXIT_NOT_RUNNING, {}
    except PermissionError:
        _err(f"permission denied on {data_dir / ipc.SOCKET_NAME} (run as the supervisor's user)")
        return EXIT_ERROR, {}
    except ipc.IPCError as e:
        _err(str(e))
        return EXIT_ERROR, {}
    if not answer.get("ok"):
        _err(answer.get("error", "the supervisor refused"))
        return EXIT_ERROR, answer
    return EXIT_OK, answer


def cmd_control(args: argparse.Namespace) -> int:
    rc, answer = _call(args.data_dir, args.command, name=args.name)
    if rc == EXIT_OK:
        print(answer.get("message", "ok"))
    return rc


def _follow(path: Path, lines: int, follow: bool) -> Iterator[str]:
    """The last `lines` lines, then (with follow) new ones as they come, across rotation."""
    try:
        f = open(path, errors="replace")
    except FileNotFoundError:
        if not follow:
            raise
        f = None
    if f is not None:
        yield from f.read().splitlines()[-lines:] if lines else []
    while follow:
        if f is None or _rotated(f, path):
            try:
                f = open(path, errors="replace")
            except FileNotFoundError:
                f = None
        chunk = f.read() if f else ""
        if chunk:
            yield from chunk.splitlines()
        else:
            time.sleep(0.2)  # a tail -f poll; nothing else runs in this process


def _rotated(f: Any, path: Path) -> bool:
    try:
        return os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def _print_lines(path: Path, lines: int, follow: bool, show: Callable[[str], str | None],
                 missing: str) -> int:
    """Print the tail of a file (and, with follow, what is appended). Ctrl-C, or
    a reader that goes away (`| head`), ends it quietly with status 0."""
    try:
        for line in _follow(path, lines, follow):
            text = show(line)
            if text is not None:
                print(text, flush=True)
    except FileNotFoundError:
        _err(missing)
        return EXIT_ERROR
    except BrokenPipeError:
        # stdout now points at /dev/null, so the flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:  # unreadable: one line, no traceback
        _err(f"{path}: {e.strerror or e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _no_proxy_dir(data_dir: Path, name: str) -> str | None:
    """Why `logs`/`events NAME` cannot read proxy NAME in `data_dir`, or None. A data
    dir the caller may not enter (0700, another user's) is said so, not a traceback."""
    try:
        if (data_dir / "proxies" / name).is_dir():
            return None
    except PermissionError:
        return (f"permission denied on {data_dir / 'proxies' / name} "
                "(run as the supervisor's user, or root)")
    return f"no proxy named {name!r} in {data_dir}"


def cmd_logs(args: argparse.Namespace) -> int:
    from supervisor.cli import register_secrets
    path = args.data_dir / "proxies" / args.name / "tailscaled.log"
    if problem := _no_proxy_dir(args.data_dir, args.name):
        _err(problem)
        return EXIT_ERROR
    register_secrets(args)
    return _print_lines(path, args.lines, args.follow, redact, f"{path}: no log yet")


def _event_line(raw: str) -> str:
    try:
        e = redact_json(json.loads(raw))
        when = datetime.fromisoformat(e["time"]).strftime("%Y-%m-%d %H:%M:%S")
        state = f", now {e['state']}" if e.get("state") and e["state"] != e["event"] else ""
        reason = f": {e['reason']}" if e.get("reason") else ""
        return f"{when} {e['proxy']}: {e['event']}{state}{reason}"
    except (ValueError, KeyError, TypeError):
        return redact(raw)


def _json_line(raw: str) -> str:
    """One events.jsonl line as is, but with every secret redacted."""
    try:
        return json.dumps(redact_json(json.loads(raw)))
    except ValueError:
        return redact(raw)


def cmd_events(args: argparse.Namespace) -> int:
    def show(line: str) -> str | None:
        if args.name and f'"proxy": "{args.name}"' not in line:
            return None
        return _json_line(line) if args.json else _event_line(line)
    from supervisor.cli import register_secrets
    path = args.data_dir / "events.jsonl"
    if args.name and (problem := _no_proxy_dir(args.data_dir, args.name)):
        _err(problem)  # as logs says it
        return EXIT_ERROR
    register_secrets(args)
    return _print_lines(path, args.lines, args.follow, show,
                        f"{path}: no events yet (has the supervisor run with this data dir?)")


def _reload_if_running(data_dir: Path) -> None:
    try:
        ipc.call(data_dir, "reload", timeout=5)
        print("the running supervisor reloads conf.d")
    except ipc.NotRunning:
        pass
    except OSError as e:  # an IPCError, a permission error
        _err(f"could not ask the running supervisor to reload ({e}); "
             "it sees the change at its next look at the config dir")


def service_flag(text: str) -> dict[str, Any]:
    """argparse `type=` for `--service PORT=MODE:TARGET[:PATH]`, e.g.
    80=http:http://127.0.0.1:8096, 80=http:http://127.0.0.1:9000:/api,
    22=tcp:tcp://127.0.0.1:22, 80=http:unix:/run/app.sock:/app. MODE ends at
    the first ':'; a trailing ':/...' after the target is the PATH (a
    target's own ':' never starts with '/', except right after unix:).
    Returns a [[serve]] table; parse_proxy judges its values."""
    port, eq, rest = text.partition("=")
    mode, colon, target = rest.partition(":")
    if not (eq and colon and port.isascii() and port.isdigit() and len(port) <= 5 and mode and target):
        raise argparse.ArgumentTypeError(
            f"{cfgmod.show(text)} is not PORT=MODE:TARGET[:PATH] (e.g. 80=http:http://127.0.0.1:8096 "
            "or 80=http:http://127.0.0.1:9000:/api or 22=tcp:tcp://127.0.0.1:22)")
    table: dict[str, Any] = {"port": int(port), "mode": mode, "target": target}
    head, sep, mount = target.rpartition(":")
    if sep and mount.startswith("/") and ":" in head:
        table["target"], table["path"] = head, mount
    return table


def _toml(raw: dict[str, Any]) -> str:
    """`raw` as TOML, services as [[serve]] tables as the README writes them
    (tomli_w would inline short ones)."""
    tables = raw["serve"] if isinstance(raw.get("serve"), list) else []
    top = {k: v for k, v in raw.items() if not (k == "serve" and tables)}
    return tomli_w.dumps(top) + "".join(f"\n[[serve]]\n{tomli_w.dumps(t)}" for t in tables)


def _readable_like(file: Path, conf_dir: Path) -> None:
    """Give a new proxy file the config dir's group and mode 0640, 0644 when the dir
    lets others in (o+rx): whoever may list conf.d may read it, whatever the umask of
    whoever ran `add` (root's `sudo` under umask 077 made it 0600, and the service user
    could not read it). Never group- or world-writable (trust.py). A group we may not
    give (not root, not a member) stays ours. Raises OSError."""
    st = os.stat(conf_dir)
    if os.stat(file).st_gid != st.st_gid:
        try:
            os.chown(file, -1, st.st_gid)
        except PermissionError:
            pass
    os.chmod(file, 0o640 | (0o004 if st.st_mode & 0o005 == 0o005 else 0))


def cmd_add(args: argparse.Namespace) -> int:
    """Validate a proxy made from the flags, write conf.d/NAME.toml atomically,
    and ask a running supervisor to reload. One service (--target, with
    --serve/--port) or several (--service, repeated; [[serve]] tables, with
    --funnel PORT marking a port's services). Any bad flag, a taken file or
    hostname, or an unwritable config dir: one line each on stderr, exit 1
    (exit 2 for flags that do not go together). The file is readable by whoever
    may list conf.d (`_readable_like`): run as root, the service user reads it."""
    path = args.config_dir / f"{args.name}.toml"
    if bool(args.target) == bool(args.service):
        _err("give --target URL (one service) or --service PORT=MODE:TARGET[:PATH] (repeatable), "
             "exactly one of them")
        return EXIT_USAGE
    if args.service and (args.serve or args.port is not None):
        _err("--serve and --port go with --target; with --service, "
             "write them in each PORT=MODE:TARGET[:PATH]")
        return EXIT_USAGE
    if args.funnel and not args.service:
        _err("--funnel PORT goes with --service (write the https service on that port)")
        return EXIT_USAGE
    try:
        if path.exists():
            _err(f"{path} already exists (remove it first, or edit it)")
            return EXIT_ERROR
    except OSError as e:  # a config dir we may not look into
        _err(f"{path}: {e.strerror or e}")
        return EXIT_ERROR
    raw: dict[str, Any] = {"hostname": (args.hostname or args.name.replace("_", "-")).lower()}
    if args.service:
        raw["serve"] = [dict(t, funnel=True) if t["port"] in args.funnel else t for t in args.service]
        unused = sorted(set(args.funnel) - {t["port"] for t in args.service})
        if unused:
            _err(f"--funnel {unused[0]}: no --service on port {unused[0]}")
            return EXIT_USAGE
    else:
        raw["target"] = args.target
        if args.serve:
            raw["serve"] = args.serve
        if args.port is not None:
            raw["port"] = args.port
    for key, value in (("login_server", args.login_server), ("auth_key_file", args.auth_key_file),
                       ("auth_key_env", args.auth_key_env),
                       ("oauth_client_secret_file", args.oauth_client_secret_file),
                       ("oauth_client_secret_env", args.oauth_client_secret_env),
                       ("api_token_file", args.api_token_file), ("api_token_env", args.api_token_env)):
        if value:
            raw[key] = value
    if args.ephemeral:
        raw["ephemeral"] = True
    if args.tag:
        raw["tags"] = args.tag
    from supervisor.cli import _settings, tailscale_version
    try:
        version = tailscale_version(_settings(args))
    except cfgmod.SettingsError:
        version = None
    cfg, errors = cfgmod.parse_proxy(path, raw, version)
    if cfg is not None and args.config_dir.is_dir():
        existing, _ = cfgmod.load_dir(args.config_dir)
        clash = next((c for c in existing if c.hostname == cfg.hostname), None)
        if clash:
            errors.append(cfgmod.ConfigError(path, "hostname", f"{cfg.hostname!r} is already used "
                                             f"by {clash.path.name}"))
    if errors:
        for e in errors:
            print(str(e), file=sys.stderr)
        return EXIT_ERROR
    if "target" in raw:  # the file says what it serves, defaults included
        raw = {"hostname": raw["hostname"], "target": raw["target"], "serve": cfg.serve,
               "port": cfg.port, **raw}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        old = os.umask(0o022)  # a conf.d made here is 0755 (it holds no secret), whatever the umask
        try:
            args.config_dir.mkdir(parents=True, exist_ok=True)
        finally:
            os.umask(old)
        tmp.write_text(_toml(raw))
        _readable_like(tmp, args.config_dir)
        os.link(tmp, path)  # whole, and never over a file someone wrote meanwhile
        tmp.unlink()
    except FileExistsError:
        _err(f"{path} already exists (remove it first, or edit it)")
        tmp.unlink(missing_ok=True)
        return EXIT_ERROR
    except (OSError, UnicodeError) as e:  # unwritable or full; a non-UTF-8 argument
        _err(f"{path}: cannot write: {getattr(e, 'strerror', None) or e}")
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return EXIT_ERROR
    print(f"wrote {path}")
    _reload_if_running(args.data_dir)
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    path = args.config_dir / f"{args.name}.toml"
    try:
        path.unlink()
    except FileNotFoundError:
        _err(f"{path}: no such proxy file")
        return EXIT_ERROR
    except OSError as e:
        _err(f"{path}: {e.strerror or e}")
        return EXIT_ERROR
    print(f"removed {path}")
    _reload_if_running(args.data_dir)
    return EXIT_OK


def add_parsers(sub: Any, common: Any) -> None:
    for name, text in (("start", "start a stopped or failed proxy (re-arms its recovery)"),
                       ("stop", "stop a proxy's children; it stays stopped until started"),
                       ("restart", "relaunch a proxy's children (re-arms its recovery)"),
                       ("recover", "force a stale-state recovery: wipe its state, log in again")):
        sp = sub.add_parser(name, help=text)
        common(sp, data=True)
        sp.add_argument("name", type=proxy_name)
        sp.set_defaults(func=cmd_control)

    lg = sub.add_parser("logs", help="a proxy's tailscaled and serve output")
    common(lg, data=True)
    lg.add_argument("name", type=proxy_name)
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=_count, default=50)
    lg.set_defaults(func=cmd_logs)

    ev = sub.add_parser("events", help="the event history (every transition)")
    common(ev, data=True)
    ev.add_argument("name", nargs="?", type=proxy_name, help="only this proxy")
    ev.add_argument("-f", "--follow", action="store_true")
    ev.add_argument("-n", "--lines", type=_count, default=50)
    ev.add_argument("--json", action="store_true", help="the raw JSON lines")
    ev.set_defaults(func=cmd_events)

    add = sub.add_parser("add", help="validate, then write conf.d/NAME.toml")
    common(add, config=True, data=True)
    add.add_argument("name", type=proxy_name)
    add.add_argument("--target", help="one service: http://127.0.0.1:PORT or tcp://127.0.0.1:PORT")
    add.add_argument("--hostname")
    add.add_argument("--serve", choices=cfgmod.SERVE_MODES, help="with --target: the mode")
    add.add_argument("--port", type=int, help="with --target: tailnet-side port (default 80 for http)")
    add.add_argument("--service", type=service_flag, action="append", default=[],
                     metavar="PORT=MODE:TARGET[:PATH]",
                     help="several services, repeatable: e.g. 80=http:http://127.0.0.1:8096, "
                          "80=http:http://127.0.0.1:9000:/api, 22=tcp:tcp://127.0.0.1:22")
    add.add_argument("--funnel", type=int, action="append", default=[], metavar="PORT",
                     help="with --service: Funnel the https services on PORT (443, 8443 or 10000)")
    add.add_argument("--login-server", help='a URL, or "embedded" (default: Tailscale\'s hosted control)')
    add.add_argument("--auth-key-file")
    add.add_argument("--auth-key-env")
    add.add_argument("--oauth-client-secret-file", metavar="FILE",
                     help="an OAuth client (scopes auth_keys, devices:core) that mints a key per "
                          "login; needs --tag")
    add.add_argument("--oauth-client-secret-env", metavar="VAR")
    add.add_argument("--api-token-file", metavar="FILE", help="an API access token (tskey-api-...)")
    add.add_argument("--api-token-env", metavar="VAR")
    add.add_argument("--ephemeral", action="store_true")
    add.add_argument("--tag", action="append", default=[])
    add.set_defaults(func=cmd_add)

    rm = sub.add_parser("remove", help="delete conf.d/NAME.toml; a running supervisor stops it")
    common(rm, config=True, data=True)
    rm.add_argument("name", type=proxy_name)
    rm.set_defaults(func=cmd_remove)
