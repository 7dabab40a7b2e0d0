"""Root trusts only root: sshd's StrictModes, adapted to a NAS.

What the supervisor acts on with its own privileges is trusted only if nobody
but root and the service user (the uid running the supervisor) can change it:
the settings file, the config dir and its proxy files, the key and credential
files they name (every `*_file` key), and the tailscale binaries. Otherwise a
local user who can write one of them can make root execute their program,
send a key file's contents to their own login server, or replace a key.

The rule is OpenSSH's (openssh-portable misc.c `safe_path()`, used by sshd's
StrictModes): the file, and every directory on the way to it from `/`, is
owned by root or the service user and is not group- or world-writable.
Adapted here:

- Symlinks are followed one component at a time, as the kernel does; every
  directory passed through, including those a link leads through, must be
  trusted (a trusted link in a directory others can write could be swapped).
- A directory that others may write but that has the sticky bit (`/tmp`) may
  be passed through, never be the end: others can add names to it but not
  rename or remove ours, and the next component is judged by its own owner.
- `trust_acl_paths` (settings): on file systems whose ACLs make owner and mode
  bits meaningless (Synology shows 0777 everywhere), the paths at or below a
  listed directory are not judged by them. Each path accepted only this way
  is reported once (`Policy.waived`), so the waiver is never silent.

`login_server` is a value in a proxy file: whoever can write the config dir
can point it anywhere, so the config dir's check covers it.

Who may *read* a secret is judged too, as ssh judges a private key file
("UNPROTECTED PRIVATE KEY FILE"), but it warns where ssh refuses: a key or
credential file, or a settings file naming webhooks, that others may read
(mode o+r, or g+r for a group other than root's, the service user's or
SERVICE_GROUP) is one warning line per file (`Policy.exposed`), never an
error. Refusing would turn a disclosure that has already happened into an
outage of a proxy that runs (a NAS's backup restore or a `cp` resets modes),
and a reader cannot make root do anything. Paths under `trust_acl_paths` are
not judged by their modes for reading either.
"""
from __future__ import annotations

import errno
import grp
import os
import stat
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

MAX_LINKS = 40  # symlinks followed in one path (Linux's ELOOP limit)
SERVICE_GROUP = "ts-supervisor"  # the unit's group (scripts/service/ts-supervisor.sysusers)
# what each secret-holding key holds, for the warning line
SECRET_KINDS = {"auth_key_file": "auth key", "oauth_client_secret_file": "OAuth client secret",
                "api_token_file": "API access token"}


def reader_gids() -> tuple[int, ...]:
    """The groups trusted to read secrets: root's (0), this process's, and
    SERVICE_GROUP's if that group exists (root runs `check`, the service user `run`)."""
    gids = {0, os.getegid()}
    try:
        gids.add(grp.getgrnam(SERVICE_GROUP).gr_gid)
    except KeyError:
        pass
    return tuple(sorted(gids))


def exposure(mode: int, gid: int, trusted_gids: tuple[int, ...]) -> str | None:
    """Who besides root and the service user may read a file of this `mode`
    (st_mode or permission bits) and group `gid`, as "readable by others
    (mode 0644)" / "readable by group 100 (mode 0640)"; None: no one."""
    mode = stat.S_IMODE(mode)
    if mode & 0o004:
        return f"readable by others (mode {mode:04o})"
    if mode & 0o040 and gid not in trusted_gids:
        try:
            name = f"group {grp.getgrgid(gid).gr_name}"
        except KeyError:
            name = f"group {gid}"
        return f"readable by {name} (mode {mode:04o})"
    return None


class Untrusted(Exception):
    """A path root must not act on. str() is one line: "PATH: not trusted: REASON"."""


@dataclass
class Policy:
    """Who may write what the supervisor trusts, and the waivers for ACL file systems.

    `uid`: the service user, trusted like root (default: this process's euid).
    `acl_paths`: absolute directories whose contents are not judged by owner
    and mode bits. `waived`: one line per path accepted only because of
    `acl_paths`, each path once per Policy; callers drain it (take_waived).
    """

    uid: int = field(default_factory=os.geteuid)
    acl_paths: tuple[Path, ...] = ()
    waived: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set, repr=False)  # paths already waived
    gids: tuple[int, ...] = field(default_factory=reader_gids)  # groups that may read secrets
    exposed: list[str] = field(default_factory=list)  # one warning line per readable secret file
    _seen_exposed: set[str] = field(default_factory=set, repr=False)

    def note_exposed(self, path: str | os.PathLike[str], where: str, what: str) -> None:
        """If others may read the secret file `path` (exposure()), add one line
        to `exposed`: "WHERE: PATH is readable by others (mode 0644), so any
        local user can read the WHAT (chmod 0640 PATH; chown ...)". Each path
        once per Policy; nothing for a path under `acl_paths` or one that
        cannot be stat'ed (the loader reports that). Never raises."""
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
        except (OSError, ValueError):
            return
        why = exposure(st.st_mode, st.st_gid, self.gids)
        if why is None or self._acl_entry(real) is not None or real in self._seen_exposed:
            return
        self._seen_exposed.add(real)
        self.exposed.append(
            f"{where}: {path} is {why}, so "
            f"{'any local user' if 'others' in why else 'that group'} can read the {what} "
            f"(chmod 0640 {path}; chown root:{SERVICE_GROUP} {path}, or 0600 owned by the service "
            "user; on an ACL share list it in trust_acl_paths)")

    def take_exposed(self) -> list[str]:
        """The readable-secret warning lines added since the last call."""
        lines, self.exposed = self.exposed, []
        return lines

    def problem(self, path: str | os.PathLike[str]) -> str | None:
        """Why root must not trust `path` (a file or directory), as "not trusted:
        REASON" naming the component at fault; None if it may. Never raises."""
        try:
            return _problem(self, os.fspath(path))
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            return f"not trusted: cannot check it: {e.strerror or e}{where}"
        except ValueError as e:  # a NUL in the path
            return f"not trusted: cannot check it: {e}"

    def check(self, path: str | os.PathLike[str], what: str = "") -> None:
        """Raise Untrusted("[WHAT ]PATH: not trusted: REASON") unless `path` may be trusted."""
        why = self.problem(path)
        if why is not None:
            raise Untrusted(f"{what + ' ' if what else ''}{path}: {why}")

    def key_problems(self, obj: Any) -> list[tuple[str, str]]:
        """(key, reason) for each `*_file` path of a settings or proxy dataclass
        that root must not trust: key and credential files, whatever their name.
        Those root may trust but others may read get a warning line in `exposed`."""
        out = []
        where = getattr(obj, "path", None)
        for key, path in secret_files(obj):
            why = self.problem(path)
            if why is not None:
                out.append((key, f"{path}: {why}"))
            else:
                self.note_exposed(path, f"{where}: {key}" if where else key,
                                  SECRET_KINDS.get(key, key.removesuffix("_file").replace("_", " ")))
        return out

    def take_waived(self) -> list[str]:
        """The waiver lines added since the last call."""
        lines, self.waived = self.waived, []
        return lines

    def _acl_entry(self, real: str) -> str | None:
        for entry in self.acl_paths:
            e = os.fspath(entry).rstrip("/") or "/"
            if real == e or real.startswith(e if e == "/" else e + "/"):
                return e
        return None


def secret_files(obj: Any) -> list[tuple[str, Path]]:
    """(key, path) for every field named `*_file` that holds a path: the key
    and credential files a proxy config or the settings name."""
    if not is_dataclass(obj):
        return []
    return [(f.name, v) for f in fields(obj)
            if f.name.endswith("_file") and isinstance(v := getattr(obj, f.name), Path)]


def _fault(st: os.stat_result, uid: int, kind: str) -> str | None:
    """What is wrong with one component (None: nothing), from its lstat. `kind`:
    "dir" (passed through), "link" (a symlink followed) or "end" (the path itself)."""
    if st.st_uid not in (0, uid):
        return f"owned by uid {st.st_uid} (only root and uid {uid} are trusted)"
    mode = stat.S_IMODE(st.st_mode)
    if kind == "link" or not mode & 0o022:
        return None  # a symlink's own mode is always 0777 and never consulted
    if kind == "dir" and mode & stat.S_ISVTX:
        return None  # sticky: others cannot rename or remove what we pass through
    who = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if mode & bit)
    return f"writable by {who} (mode {mode:04o})"


def _components(path: str) -> list[tuple[str, os.stat_result, str]]:
    """What the kernel passes through to reach `path`, resolving symlinks one
    component at a time: (path, lstat, kind) for each directory ("dir"),
    symlink ("link") and, last, the resolved path itself ("end"). Raises OSError."""
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    todo = [c for c in path.split("/") if c]
    todo.reverse()  # a stack: the next component is last
    current, st, links = "/", os.lstat("/"), 0
    out: list[tuple[str, os.stat_result, str]] = []
    while todo:
        name = todo.pop()
        if name == ".":
            continue
        if name == "..":  # `current` is resolved, so this is the kernel's ..
            current = os.path.dirname(current)
            st = os.lstat(current)
            continue
        out.append((current, st, "dir"))
        nxt = os.path.join(current, name)
        st = os.lstat(nxt)
        if stat.S_ISLNK(st.st_mode):
            out.append((nxt, st, "link"))
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = os.readlink(nxt)
            todo.extend(reversed([c for c in target.split("/") if c]))
            if target.startswith("/"):
                current, st = "/", os.lstat("/")
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, f"{nxt} is not a directory")
        current = nxt
    out.append((current, st, "end"))
    return out


def _problem(policy: Policy, path: str) -> str | None:
    seen: set[tuple[str, str]] = set()
    for real, st, kind in _components(path):
        if (real, kind) in seen:
            continue
        seen.add((real, kind))
        fault = _fault(st, policy.uid, kind)
        if fault is None:
            continue
        entry = policy._acl_entry(real)
        if entry is not None:
            if real not in policy._seen:
                policy._seen.add(real)
                policy.waived.append(f"{real}: {fault}; accepted: under trust_acl_paths entry "
                                     f"{entry} (its ACLs decide who may write it)")
            continue
        subject = {"end": "it is", "dir": f"directory {real} is", "link": f"symlink {real} is"}[kind]
        return (f"not trusted: {subject} {fault}; root trusts only what root and the service "
                "user can write (chmod go-w / chown it, or see trust_acl_paths)")
    return None


def parse_acl_paths(value: Any, where: str) -> tuple[tuple[Path, ...], list[str]]:
    """The `trust_acl_paths` setting: a list of absolute directory paths.
    Returns (paths, problems), each problem one line starting with `where`."""
    key = f"{where}: trust_acl_paths"
    if not isinstance(value, list):
        return (), [f"{key}: must be a list of absolute paths such as [\"/volume1/ts-supervisor\"], "
                    f"got {type(value).__name__}"]
    paths, problems = [], []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.startswith("/") or "\0" in item \
                or not item.isprintable():
            problems.append(f"{key}[{i}]: must be an absolute path string")
            continue
        try:
            real = os.path.realpath(item)  # a NAS's /volume1 may be reached through a link
        except (OSError, ValueError):
            real = item
        paths.append(Path(real))
    return tuple(paths), problems


def binary_problems(policy: Policy, executed: tuple[Path, ...], named: tuple[object, ...]) -> list[str]:
    """One line ("binary PATH: not trusted: ...") per tailscale binary root must
    not execute: each executed (resolved) path, and each name it was found by
    (a settings path, TS_SUPERVISOR_TAILSCALE[D]) that leads to it, since a
    link in a directory others can write could be pointed elsewhere."""
    paths: list[Path] = []
    for exe in executed:
        paths.append(exe)
        for name in named:
            try:
                if name and Path(str(name)).resolve() == exe and Path(str(name)) != exe:
                    paths.append(Path(str(name)))
            except (OSError, RuntimeError, ValueError):
                continue
    return [f"binary {p}: {why}" for p in dict.fromkeys(paths) if (why := policy.problem(p)) is not None]
