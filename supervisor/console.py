"""The console: a live rich table of every proxy, or one line per event.

`render()` is a pure function of frozen snapshots (rich's Live examples) and
of the operator's UI state (selection, view position, open panel, footer
message, pending confirmation), so it is tested on a capturing Console and
costs the same whoever calls it. The live view draws only the rows that fit
the terminal (200 proxies stay readable, and a frame lays out only those
rows); the selection scrolls it. It redraws when an event arrives or a key
is pressed; a slow tick only refreshes uptime and key-expiry figures. CPU
and memory (PSS) come sampled in the snapshots (supervisor.memory), never
read when drawing.

Keys are read without threads: the TTY goes to cbreak mode for the life of
the view (restored in a `finally`), the event loop calls us when stdin is
readable, `KeyParser` turns bytes into keys and `on_key()` (pure) turns a key
into a new `UIState` and at most one command for the fleet.
"""
from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import io
import json
import os
import sys
import time
import weakref
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group
from rich.live import Live
from rich.measure import Measurement
from rich.padding import Padding
from rich.panel import Panel
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from supervisor.events import Event, redact
from supervisor.proxy import ProxySnapshot

STATE_STYLE = {
    "degraded": "yellow",
    "running": "bold green", "starting": "cyan", "recovering": "bold yellow",
    "backoff": "magenta", "failed": "bold red", "stopped": "dim",
}
TICK = 2.0  # seconds; only for the uptime and key-expiry columns
KEY_WARN = 7 * 86400  # node keys closer than this to expiry are shown as a warning
PANEL_LINES = 200  # at most this many log or event lines are ever read for the panel


def human_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


@functools.lru_cache(maxsize=1024)
def parse_key_expiry(value: str | None) -> float | None:
    """tailscaled's Self.KeyExpiry (RFC 3339) as a wall-clock time; None when
    expiry is disabled (absent, empty, or Go's zero time) or unreadable."""
    if not value or value.startswith("0001-01-01"):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _key_expiry(value: str | None, now: float) -> tuple[str, str]:
    """key_expiry_cell's (text, style)."""
    at = parse_key_expiry(value)
    if at is None:
        return "", ""
    left = at - now
    if left <= 0:
        return "expired", "bold red"
    if left < KEY_WARN:
        return human_duration(left), "bold yellow"
    return f"{int(left // 86400)}d", ""


def key_expiry_cell(value: str | None, now: float) -> Text:
    """The countdown to node-key expiry: days when far, a warning under 7 days,
    nothing when expiry is disabled."""
    text, style = _key_expiry(value, now)
    return Text(text, style=style) if style else Text(text)


def key_cell(s: ProxySnapshot, now: float) -> Text:
    """The key column: the node-key countdown, and under it (dim) the login
    credential's kind ("reusable key", "oauth client", ...)."""
    cell = key_expiry_cell(s.key_expiry, now)
    if s.credential:
        cell.append(("\n" if cell.plain else "") + s.credential, style="dim")
    return cell


# -- the operator's side: UI state, keys, and what a key does -------------------------


@dataclass(frozen=True)
class UIState:
    """Everything the view shows besides the fleet: frozen, replaced on each key."""

    selected: str | None = None  # a proxy name (not an index: a reload may insert rows)
    panel: str | None = None     # "log" | "events": shown under the table for panel_proxy
    panel_proxy: str | None = None
    message: str = ""            # the last action's result, in the footer
    confirm: str | None = None   # a proxy awaiting y/N before a forced recovery
    top: int = 0                 # the view position: the first row drawn (the last frame's Window.first)
    page: int = 0                # rows the last frame showed: what PgUp/PgDn move by (0: 10)


KEYMAP = {"k": "up", "j": "down", "r": "restart", "s": "stop", "S": "start", "t": "start",
          "l": "log", "e": "events", "R": "recover", "q": "quit", "n": "next",
          "\r": "enter", "\n": "enter", " ": "space"}
ESCAPES = {"[A": "up", "[B": "down", "[C": "right", "[D": "left", "OA": "up", "OB": "down",
           "OC": "right", "OD": "left", "[H": "home", "[F": "end", "OH": "home", "OF": "end",
           "[1~": "home", "[4~": "end", "[5~": "pageup", "[6~": "pagedown"}
FOOTER_KEYS = (("↑↓/jk", "select"), ("r", "restart"), ("s", "stop"), ("S", "start"), ("l", "log"),
               ("e", "events"), ("R", "recover"), ("q", "quit"))


class KeyParser:
    """Bytes from a cbreak TTY -> keys: action names ("up", "restart", "quit", ...)
    for bound keys and escape sequences, the character itself for anything else
    ("y", "n", ...), "esc" for a lone Escape, "unknown" for unbound sequences.

    A CSI or SS3 sequence split across reads is kept until it completes; a lone
    ESC at the end of a read is Escape (terminals send a sequence in one write)."""

    def __init__(self) -> None:
        self._buf = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes | str) -> list[str]:
        text = data if isinstance(data, str) else self._decoder.decode(data)
        buf, keys, i = self._buf + text, [], 0
        while i < len(buf):
            ch = buf[i]
            if ch != "\x1b":
                keys.append(KEYMAP.get(ch, ch if ch.isprintable() else "unknown"))
                i += 1
                continue
            if i + 1 == len(buf):
                keys.append("esc")
                i += 1
                continue
            intro = buf[i + 1]
            if intro == "[":  # CSI: parameters and intermediates, then one final byte
                j = i + 2
                while j < len(buf) and not ("\x40" <= buf[j] <= "\x7e"):
                    j += 1
                if j == len(buf):
                    break  # incomplete: wait for the rest
                keys.append(ESCAPES.get(buf[i + 1:j + 1], "unknown"))
                i = j + 1
            elif intro == "O":  # SS3: one final byte
                if i + 2 == len(buf):
                    break
                keys.append(ESCAPES.get(buf[i + 1:i + 3], "unknown"))
                i += 3
            elif intro == "\x1b":
                keys.append("esc")
                i += 1
            else:  # Alt+key: never an action
                keys.append("unknown")
                i += 2
        self._buf = buf[i:]
        return keys


Command = tuple[str, str]  # (verb, proxy name): restart | stop | start | recover | quit


def on_key(ui: UIState, key: str, names: Sequence[str],
           attention: Collection[str] = ()) -> tuple[UIState, Command | None]:
    """What one key does, as a pure function: the new UI state and at most one
    command for the fleet. `names` are the rows in order, `attention` those
    needing attention (needs_attention): `next` selects the next of them after
    the selection, wrapping. An open panel or a pending confirmation takes the
    next key whatever it is, so closing a panel can never restart or quit."""
    if ui.confirm is not None:
        name = ui.confirm
        ui = replace(ui, confirm=None)
        if key == "y":
            return replace(ui, message=f"stale-state recovery requested for {name}"), ("recover", name)
        return replace(ui, message=f"recovery of {name} cancelled"), None
    if ui.panel is not None:
        return replace(ui, panel=None, panel_proxy=None), None
    selected = ui.selected if ui.selected in names else (names[0] if names else None)
    ui = replace(ui, selected=selected)
    if key in ("up", "down", "home", "end", "pageup", "pagedown"):
        if not names:
            return ui, None
        i = names.index(selected)
        page = ui.page or 10
        i = {"up": i - 1, "down": i + 1, "home": 0, "end": len(names) - 1,
             "pageup": i - page, "pagedown": i + page}[key]
        return replace(ui, selected=names[max(0, min(len(names) - 1, i))]), None
    if key == "next":
        if not names:
            return ui, None
        i = names.index(selected)
        after = [n for n in names[i + 1:] + names[:i + 1] if n in attention]
        return (replace(ui, selected=after[0]) if after
                else replace(ui, message="no proxy needs attention")), None
    if key == "quit":
        return replace(ui, message="stopping every proxy…"), ("quit", "")
    if selected is None:
        return ui, None
    if key in ("restart", "stop", "start"):
        return replace(ui, message=f"{key} requested for {selected}"), (key, selected)
    if key in ("log", "events"):
        return replace(ui, panel=key, panel_proxy=selected), None
    if key == "recover":
        return replace(ui, confirm=selected), None
    return ui, None


# -- rendering -----------------------------------------------------------------------------


WIDE = 130  # below this (or if they do not fit), facts share cells; below MEDIUM, pid and CPU/PSS give way
MEDIUM = 96
TARGET_WIDE, TARGET_NARROW = 28, 21  # the target column's most columns in each layout
NAME_WIDE = 30  # the name column's most columns in the wide layout
ERROR_MIN = 24  # the wide layout is used only if the last error gets at least this much
WIDE_HEADERS = ("proxy / DNS name", "state", "tailnet IP", "target", "pid", "cpu pss", "up", "rst/rec", "key")


def footer(ui: UIState) -> Group:
    keys = Text()
    for i, (k, what) in enumerate(FOOTER_KEYS):
        keys.append("  " if i else "")
        keys.append(k, style="bold")
        keys.append(f" {what}")
    if ui.confirm is not None:
        line = Text(f"Force a stale-state recovery of {ui.confirm}? It wipes its state and "
                    f"logs in again. y/N", style="bold yellow")
    elif ui.panel is not None:
        line = Text("any key closes the panel", style="dim")
    else:
        line = Text(redact(ui.message))
    return Group(keys, line)


UPSTREAM_STYLE = "yellow"  # a failing upstream probe: seen, not a proxy state


def target_cell(s: ProxySnapshot, room: int) -> Text:
    """The target as the table shows it, with a dim ✓ when the last upstream
    probe was ok and there is room for it in `room` columns."""
    target = s.target.replace("http://", "").replace("tcp://", "tcp ")
    cell = Text(target)
    if s.upstream == "ok" and len(target) + 2 <= room:
        cell.append(" ✓", style="dim")
    return cell


def upstream_problem(s: ProxySnapshot) -> Text | None:
    """'upstream: REASON' in yellow when the last probe failed; None when it
    was ok or has not run yet."""
    if s.upstream is None or s.upstream == "ok":
        return None
    return Text(f"upstream: {redact(s.upstream)}", style=UPSTREAM_STYLE)


def credential_problem(s: ProxySnapshot) -> Text | None:
    """The credential's warning ("auth key expires in 3 days", "one-off key
    already used") in yellow; None without one. Seen, never acted on."""
    if not s.credential_warning:
        return None
    return Text(redact(s.credential_warning), style=UPSTREAM_STYLE)


def _wide_fits(rows: Sequence[tuple], width: int) -> bool:
    """Whether the wide layout's fixed columns, each at its widest cell,
    leave the last error at least ERROR_MIN columns of `width`. Counts what
    the table draws: one space of padding each side of a cell (none at the
    outer edges), a one-space divider between columns and one at each edge."""
    caps = (NAME_WIDE, None, None, TARGET_WIDE, None, None, None, None, None)
    needed = 0
    for i, (header, cap) in enumerate(zip(WIDE_HEADERS, caps)):
        w = max([cell_len(header)] + [_lines_width(row[i]) for row in rows])
        needed += (min(w, cap) if cap else w) + 2
    columns = len(WIDE_HEADERS) + 1
    return needed - 1 + ERROR_MIN + 1 + (columns - 1) + 2 <= width


@functools.lru_cache(maxsize=8192)
def _lines_width(cell: str) -> int:
    """The widest line of a plain cell, in terminal columns."""
    return max(cell_len(line) for line in cell.split("\n"))


def needs_attention(s: ProxySnapshot) -> bool:
    """A row a NAS owner must look at: a proxy neither `running` nor stopped on
    purpose, or one whose upstream probe fails."""
    return s.state not in ("running", "stopped") or (s.upstream is not None and s.upstream != "ok")


def attention_first(snaps: Sequence[ProxySnapshot]) -> list[ProxySnapshot]:
    """The rows needing attention first, each group in its given (name) order:
    for a view that cannot scroll, so trouble is never below the screen."""
    return sorted(snaps, key=lambda s: not needs_attention(s))


def resource_cell(s: ProxySnapshot) -> str:
    """CPU (% of one core over the last sample period) and PSS of the proxy's
    children at the last sample (supervisor.memory), "-" before one; RSS
    only where the kernel would not give PSS."""
    m = s.memory
    if m is None or not m.children:
        return "-"
    cpu = f"{m.cpu:.1f}% " if m.cpu is not None else ""
    return cpu + human_bytes(m.pss if m.pss is not None else m.rss)


def _plain_row(s: ProxySnapshot, now: float) -> tuple[str, ...]:
    """The wide layout's fixed cells as plain text (what column widths are made of)."""
    name, state, ip4, target, pid, res, counts = _static_cells(s)
    key, _ = _key_expiry(s.key_expiry, now)
    if s.credential:  # as key_cell draws it
        key += ("\n" if key else "") + s.credential
    return (name, state, ip4, target, pid, res,
            human_duration(now - s.running_since) if s.running_since else "-", counts, key)


@functools.lru_cache(maxsize=4096)
def _static_cells(s: ProxySnapshot) -> tuple[str, ...]:
    """_plain_row's cells that do not change with the clock (a snapshot is frozen)."""
    ip4 = next((ip for ip in s.tailscale_ips if ":" not in ip), s.tailscale_ips[0] if s.tailscale_ips else "")
    label = s.dns_name or (s.hostname if s.hostname != s.name else "")
    return (s.name + (f"\n{label}" if label else ""), s.state, ip4 or "-",
            target_cell(s, TARGET_WIDE).plain, str(s.pid) if s.pid else "-", resource_cell(s),
            f"{s.restarts}/{s.recoveries}")


def _min_lines(s: ProxySnapshot, row: tuple[str, ...], wide: bool) -> int:
    """The fewest lines the row can take (its cells' own line breaks; the error
    may wrap to more): what choosing candidate rows before drawing them needs."""
    extras = (s.upstream is not None and s.upstream != "ok") + bool(s.credential_warning)  # the problems' lines
    why = bool(s.reason if s.reason and s.state not in ("running", "stopped") else s.last_error)
    cells = max(row[0].count("\n"), row[8].count("\n")) + 1
    return max(cells, extras + 1 if wide else 1 + why + extras, 1 if wide else 2)


def _table(wide: bool, medium: bool) -> Table:
    t = Table(title="ts-supervisor", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
              padding=(0, 1), expand=False)
    t.add_column(WIDE_HEADERS[0], no_wrap=True, max_width=NAME_WIDE if wide else 26 if medium else 22)
    if wide:
        for col in ("state", "tailnet IP"):
            t.add_column(col, no_wrap=True)
        t.add_column("target", no_wrap=True, overflow="ellipsis", max_width=TARGET_WIDE)
        for col in WIDE_HEADERS[4:]:
            t.add_column(col, justify="right", no_wrap=True)
        t.add_column("last error", overflow="fold", min_width=ERROR_MIN, ratio=1)
    else:  # 80 columns: the error goes under the state, counts under uptime
        t.add_column("state / error", overflow="fold", ratio=1)
        t.add_column("tailnet IP / target", no_wrap=True, max_width=TARGET_NARROW)
        if medium:
            t.add_column("pid / cpu pss", justify="right", no_wrap=True)
        t.add_column("up r/r", justify="right", no_wrap=True)
        t.add_column("key", justify="right", no_wrap=True)
    return t


def _add_row(t: Table, s: ProxySnapshot, row: tuple[str, ...], now: float, wide: bool, medium: bool,
             style: Style | str | None) -> None:
    t.add_row(*_row_cells(s, row, now, wide, medium), style=style)


def _row_cells(s: ProxySnapshot, row: tuple[str, ...], now: float, wide: bool, medium: bool) -> list:
    """One row's cells (Text or str), in the columns of _table(wide, medium)."""
    _, _, ip4, _, pid, res, up, counts, _ = row
    name = Text(s.name, style="bold")
    label = s.dns_name or (s.hostname if s.hostname != s.name else "")
    if label:
        name.append(f"\n{label}", style="dim")
    target = target_cell(s, TARGET_WIDE if wide else TARGET_NARROW)
    problem = upstream_problem(s)  # under the last error: a reason, never a state
    warning = credential_problem(s)  # likewise
    state = Text(s.state, style=STATE_STYLE.get(s.state, ""))
    error_style = "red" if s.state == "failed" else "dim"
    # while not running, why not (the reason) says more than the last error
    why = s.reason if s.reason and s.state not in ("running", "stopped") else s.last_error
    key = key_cell(s, now)
    if wide:
        error = Text(redact(why), style=error_style)
        for extra in (problem, warning):
            if extra:
                error.append("\n" if error.plain else "").append_text(extra)
        return [name, state, ip4, target, pid, res, up, counts, key, error]
    else:
        if why:
            state.append(f"\n{redact(why)}", style=error_style)
        for extra in (problem, warning):
            if extra:
                state.append("\n").append_text(extra)
        target.stylize("dim")
        cells = [name, state, Text(ip4).append("\n").append_text(target)]
        if medium:
            cells.append(f"{s.pid or '-'}\n{res}")
        return [*cells, f"{up}\n{counts}", key]


@dataclass(frozen=True)
class Window:
    """Which rows a frame shows: rows[first:first + shown] of `total`."""

    first: int
    shown: int
    total: int


HEAD_GUESS = 3  # title, header and rule: the fewest lines the table takes above its rows


def window(heights: Sequence[int], room: int, top: int, selected: int | None) -> tuple[int, int]:
    """The rows [first, end) to show in `room` lines, given each row's height
    in lines (pure). From `top` down; the selected row is always shown (when
    it is above `top` the window starts at it, when below, it ends at it);
    at the end of the list the window is pulled up to fill the room, so
    scrolling clamps at both ends. At least one row, even if it does not fit."""
    n = len(heights)
    if n == 0:
        return 0, 0
    top = max(0, min(top, n - 1))
    if selected is not None and selected < top:
        top = selected
    end, used = top, 0
    while end < n and (end == top or used + heights[end] <= room):
        used += heights[end]
        end += 1
    if selected is not None and selected >= end:  # below the window: it becomes the last row shown
        first, used = selected, heights[selected]
        while first > 0 and used + heights[first - 1] <= room:
            first -= 1
            used += heights[first]
        return first, selected + 1
    first = top
    if end == n:  # scrolled to the end: no empty room below the last row
        while first > 0 and used + heights[first - 1] <= room:
            first -= 1
            used += heights[first]
    return first, end


class _Lines:
    """Lines already rendered (lists of Segments), printed as they are."""

    def __init__(self, lines: Sequence[Sequence[Segment]]) -> None:
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        for line in self.lines:
            yield from line
            yield Segment.line()


def rows_line(win: Window, attention: Sequence[int]) -> Text:
    """'rows 41–60 of 200', and how many rows needing attention are off screen
    above and below (with the key that jumps to them)."""
    line = Text(f"rows {win.first + 1}–{win.first + win.shown} of {win.total}", style="dim")
    above = sum(1 for i in attention if i < win.first)
    below = sum(1 for i in attention if i >= win.first + win.shown)
    if above or below:
        where = " and ".join(x for x in (f"{above} above" if above else "", f"{below} below" if below else "") if x)
        line.append(f"  ·  need attention: {where}", style="bold yellow")
        line.append("  (n: next)", style="dim")
    return line


def _lay_out(console: Console, options: ConsoleOptions, snaps: Sequence[ProxySnapshot],
             rows: Sequence[tuple[str, ...]], c0: int, c1: int, now: float, wide: bool, medium: bool,
             selected: int | None) -> tuple[list, dict[int, list], list]:
    """Rows c0..c1-1 laid out as one table: (head lines, {row: its lines}, trailer lines)."""
    head: list = []
    per_row: dict[int, list] = {}
    trailer: list = []
    t = _table(wide, medium)
    for i in range(c0, c1):  # each line knows its row (a style meta, never printed)
        style = Style(reverse=True) if i == selected else None
        _add_row(t, snaps[i], rows[i], now, wide, medium, style + Style(meta={"row": i}) if style
                 else Style(meta={"row": i}))
    for line in console.render_lines(t, options, pad=False):
        tags = {seg.style.meta["row"] for seg in line if seg.style is not None and "row" in seg.style.meta}
        if tags:
            per_row.setdefault(min(tags), []).append(line)
        elif per_row:
            trailer.append(line)
        else:
            head.append(line)
    return head, per_row, trailer


class _FixedTable(Table):
    """A Table drawn at given column widths (padding included, as rich's
    _calculate_column_widths gives them), so one row of a bigger table can be
    drawn alone exactly as it is drawn there, without measuring any cell."""

    def __init__(self, widths: Sequence[int], **kw) -> None:
        super().__init__(**kw)
        self._fixed_widths = list(widths)

    def _calculate_column_widths(self, console: Console, options: ConsoleOptions) -> list[int]:
        return list(self._fixed_widths)


def _fixed_table(widths: Sequence[int], wide: bool, medium: bool, header: bool) -> Table:
    t = _table(wide, medium)
    f = _FixedTable(widths, title=t.title if header else None, title_justify=t.title_justify, box=t.box,
                    pad_edge=t.pad_edge, padding=t.padding, expand=t.expand, show_header=header)
    f.columns = t.columns
    return f


class _MeasuredTable(Table):
    """A Table whose cells' measurements are kept in `measured` between
    frames, keyed by (column, cell key, available width): rich's
    Table._measure_column with a cache, so a changed cell is the only one
    measured again."""

    def __init__(self, measured: dict, keys: Sequence[tuple], **kw) -> None:
        super().__init__(**kw)
        self._measured = measured
        self._keys = keys

    def _measure_column(self, console: Console, options: ConsoleOptions, column) -> Measurement:
        max_width = options.max_width
        if max_width < 1 or column.width is not None:
            return super()._measure_column(console, options, column)
        padding_width = self._get_padding_width(column._index)
        j = column._index
        keys = ([("header", column.header)] if self.show_header else []) + [k[j] for k in self._keys]
        min_widths, max_widths = [], []
        for cell, key in zip(self._get_cells(console, j, column), keys):
            mkey = (j, key, max_width, padding_width)
            m = self._measured.get(mkey)
            if m is None:
                if len(self._measured) >= _RowCache.LIMIT:
                    self._measured.clear()
                m = self._measured[mkey] = Measurement.get(console, options, cell.renderable)
            min_widths.append(m.minimum)
            max_widths.append(m.maximum)
        measurement = Measurement(max(min_widths) if min_widths else 1,
                                  max(max_widths) if max_widths else max_width).with_maximum(max_width)
        return measurement.clamp(None if column.min_width is None else column.min_width + padding_width,
                                 None if column.max_width is None else column.max_width + padding_width)


def _cell_key(cell) -> tuple:
    """A cell's content as a hashable value: all that drawing it depends on."""
    if isinstance(cell, Text):
        return (cell.plain, tuple(cell.spans), cell.style, cell.justify, cell.overflow, cell.no_wrap, cell.end)
    return (cell,)


class _RowCache:
    """One console's laid-out pieces between frames. Every key is made of
    frozen values (snapshots, cells' text and spans, widths, the layout), so a
    hit gives exactly what drawing again would; bounded by clearing."""

    LIMIT = 8192

    def __init__(self) -> None:
        self.cells: dict = {}   # (snapshot, plain row, layout) -> (cells, their keys)
        self.widths: dict = {}  # (layout, candidates' cell keys) -> column widths
        self.measured: dict = {}  # (column, cell key, width, padding) -> the cell's Measurement
        self.heads: dict = {}   # (layout, widths) -> (head lines, trailer lines)
        self.drawn: dict = {}   # (layout, column, width, cell key, selected) -> the cell's lines
        self.rows: dict = {}    # (layout, widths, cell keys, selected, last) -> the row's lines

    def put(self, d: dict, key, value):
        if len(d) >= self.LIMIT:
            d.clear()
        d[key] = value
        return value


_CACHES: "weakref.WeakKeyDictionary[Console, _RowCache]" = weakref.WeakKeyDictionary()


def _lay_out_cached(console: Console, options: ConsoleOptions, snaps: Sequence[ProxySnapshot],
                    rows: Sequence[tuple[str, ...]], c0: int, c1: int, now: float, wide: bool, medium: bool,
                    selected: int | None) -> tuple[list, dict[int, list], list]:
    """_lay_out's lines, drawn cell by cell as rich's Table draws a row (each
    cell padded, rendered at its column's width, aligned to the top, then
    joined by the box's dividers), at the widths the candidates give
    together. Cells are kept on `console` for the next frame: a tick that
    changes only the uptime column draws only those cells again. A row's cells
    are a function of (snapshot, plain cells, layout): `now` reaches them only
    through the plain uptime and key cells."""
    cache = _CACHES.get(console)
    if cache is None:
        cache = _CACHES[console] = _RowCache()
    layout = (wide, medium, options.max_width, options.ascii_only, options.encoding)
    cand = []
    for i in range(c0, c1):
        ckey = (snaps[i], rows[i], layout)
        got = cache.cells.get(ckey)
        if got is None:
            cells = _row_cells(snaps[i], rows[i], now, wide, medium)
            got = cache.put(cache.cells, ckey, (cells, tuple(_cell_key(c) for c in cells)))
        cand.append(got)
    t = _table(wide, medium)
    wkey = (layout, tuple(k for _, k in cand))
    widths = cache.widths.get(wkey)
    if widths is None:
        m = _MeasuredTable(cache.measured, wkey[1], title=t.title, title_justify=t.title_justify, box=t.box,
                           pad_edge=t.pad_edge, padding=t.padding, expand=t.expand)
        m.columns = t.columns
        for cells, _ in cand:
            m.add_row(*cells)
        t = m
        widths = cache.put(cache.widths, wkey, tuple(t._calculate_column_widths(
            console, options.update_width(options.max_width - t._extra_width))))
    hkey = (layout, widths)
    ends = cache.heads.get(hkey)
    if ends is None:
        lines = console.render_lines(_fixed_table(widths, wide, medium, header=True), options, pad=False)
        ends = cache.put(cache.heads, hkey, (lines[:-1], lines[-1:]) if lines else ([], []))
    # what Table._render does for a row (rich/table.py): box pieces, padding, styles
    get_style = console.get_style
    border = get_style(t.style or "") + get_style(t.border_style or "")
    bx = t.box.substitute(options, safe=t.safe_box if t.safe_box is not None else console.safe_box) if t.box else None
    last_col = len(t.columns) - 1
    _, pad_right, _, pad_left = t.padding
    col_style = [get_style(col.style or "") for col in t.columns]
    per_row: dict[int, list] = {}
    for i, (cells, keys) in zip(range(c0, c1), cand):
        is_sel = i == selected
        rkey = (layout, widths, keys, is_sel, i == c1 - 1)
        out = cache.rows.get(rkey)
        if out is not None:
            per_row[i] = out
            continue
        row_style = Style.null() + get_style(Style(reverse=True)) if is_sel else Style.null()
        drawn = []
        for j, (col, w, cell, key) in enumerate(zip(t.columns, widths, cells, keys)):
            dkey = (layout, j, w, key, is_sel)
            lines = cache.drawn.get(dkey)
            if lines is None:
                pad = (0, 0 if j == last_col and not t.pad_edge else pad_right,
                       0, 0 if j == 0 and not t.pad_edge else pad_left)
                opts = options.update(width=w, justify=col.justify, no_wrap=col.no_wrap, overflow=col.overflow,
                                      height=None, highlight=col.highlight)
                lines = cache.put(cache.drawn, dkey, console.render_lines(
                    Padding(cell, pad), opts, style=col_style[j] + row_style))
            drawn.append(lines)
        h = max(len(lines) for lines in drawn)
        shaped = [Segment.set_shape(Segment.align_top(lines, w, h, col_style[j] + row_style), w, h)
                  for j, (lines, w) in enumerate(zip(drawn, widths))]
        if bx:
            seg = (bx.foot_left, bx.foot_right, bx.foot_vertical) if i == c1 - 1 else \
                (bx.mid_left, bx.mid_right, bx.mid_vertical)
            left, right = Segment(seg[0], border), Segment(seg[1], border)
            divider = Segment(seg[2], border if seg[2].strip() else row_style.background_style + border)
            edge = t.show_edge
            out = []
            for n in range(h):
                line = [left] if edge else []
                for j, cell in enumerate(shaped):
                    if j:
                        line.append(divider)
                    line.extend(cell[n])
                if edge:
                    line.append(right)
                out.append(line)
        else:
            out = [[seg for cell in shaped for seg in cell[n]] for n in range(h)]
        per_row[i] = cache.put(cache.rows, rkey, out)
    return ends[0], per_row, ends[1]


def render(snaps: Sequence[ProxySnapshot], now: float | None = None, errors: Sequence[str] = (),
           width: int = 200, ui: UIState | None = None, panel_lines: Sequence[str] = (),
           height: int | None = None, console: Console | None = None) -> Group:
    """The table (plus config errors under it) for a moment in time; with `ui`
    (the interactive console) also the selection, the log/event panel with
    `panel_lines`, and the footer of keys; with `height`, only the rows that fit
    (see view()).

    Borderless, with related facts sharing a cell, so an 80-column SSH session
    still shows every proxy's state, address, target, last error and a failing
    upstream. From WIDE columns, every fact has its own column when they all
    fit beside a readable last error; otherwise the medium layout is used."""
    return view(snaps, now, errors, width, ui, panel_lines, height, console)[0]


def view(snaps: Sequence[ProxySnapshot], now: float | None = None, errors: Sequence[str] = (),
         width: int = 200, ui: UIState | None = None, panel_lines: Sequence[str] = (),
         height: int | None = None, console: Console | None = None, *,
         cache: bool = True) -> tuple[Group, Window]:
    """render() and the Window it shows. Without `height` every row is drawn
    (`status`). With it, the whole frame fits `height` lines: only the rows
    that fit are drawn, from `ui.top` (the view position) and always with the
    selected row, with a 'rows 41–60 of 200' line under them when some are
    hidden. Only those rows are laid out, once, so a frame costs the same at
    200 proxies as at 20: the candidate rows are rendered on `console` (a
    private one at `width` if None) and their lines kept up to the room.
    Pure: the same snapshots, view position and size give the same frame.
    With `cache`, a row's lines are kept between frames on the same `console`
    (keyed by its snapshot, its cells' text and the column widths:
    _lay_out_cached); without, the candidates are laid out as one table
    (_lay_out). Both give the same lines (tests/unit/test_console.py)."""
    now = time.time() if now is None else now
    rows = [_plain_row(s, now) for s in snaps]  # every row: the layout does not change as one scrolls
    wide = width >= WIDE and _wide_fits(rows, width)
    medium = not wide and width >= MEDIUM
    names = [s.name for s in snaps]
    selected = None
    if ui is not None and snaps:
        selected = names.index(ui.selected) if ui.selected in names else 0
    tail: list = [Text(f"config error: {redact(e)}", style="red") for e in errors]
    if ui is not None:
        if ui.panel is not None:
            title = f"{'log' if ui.panel == 'log' else 'events'}: {ui.panel_proxy}"
            body = [Text(redact(line), no_wrap=True, overflow="ellipsis") for line in panel_lines]
            tail.append(Panel(Group(*body) if body else Text("(nothing yet)", style="dim"),
                              title=title, title_align="left", box=box.SQUARE, padding=(0, 1)))
        tail.append(footer(ui))

    n = len(snaps)
    if height is None or n == 0:
        t = _table(wide, medium)
        for i, (s, row) in enumerate(zip(snaps, rows)):
            _add_row(t, s, row, now, wide, medium, Style(reverse=True) if i == selected else None)
        return Group(t, *tail), Window(0, n, n)

    if console is None:
        console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    options = console.options.update(width=width, height=None)
    attention = [i for i, s in enumerate(snaps) if needs_attention(s)]
    room = height - 1 - (len(console.render_lines(Group(*tail), options, pad=False)) if tail else 0)
    top = ui.top if ui is not None else 0
    # 1. candidates from each row's fewest lines: a superset of the rows that fit
    lows = [_min_lines(s, row, wide) for s, row in zip(snaps, rows)]
    c0, c1 = window(lows, room - HEAD_GUESS, top, selected)
    # 2. lay out the candidates: each row's lines, the head (title, header, rule) and the trailer
    if cache:
        head, per_row, trailer = _lay_out_cached(console, options, snaps, rows, c0, c1, now, wide, medium,
                                                 selected)
    else:
        head, per_row, trailer = _lay_out(console, options, snaps, rows, c0, c1, now, wide, medium, selected)
    heights = [len(per_row.get(i, ())) or 1 for i in range(c0, c1)]
    f0, f1 = window(heights, room - len(head), top - c0, None if selected is None else selected - c0)
    first, end = c0 + f0, c0 + f1
    shown = [line for i in range(first, end) for line in per_row.get(i, ())]
    if len(head) + len(shown) + len(trailer) <= room:
        shown += trailer
    elif len(head) + len(shown) > room:  # one row taller than the screen: its top, never the footer cut
        shown = shown[:max(0, room - len(head) - 1)] + [[Segment(" …", Style(dim=True))]]
    win = Window(first, end - first, n)
    parts: list = [_Lines(head + shown)]
    if win.shown < n:
        parts.append(rows_line(win, attention))
    return Group(*parts, *tail), win


# -- what the panel shows -----------------------------------------------------------------


def tail_lines(path: Path, n: int, chunk: int = 64 << 10) -> list[str]:
    """The last n lines of a file (reads only its end), redacted; [] if absent."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chunk))
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    lines = data.splitlines()
    if size > chunk and lines:
        lines = lines[1:]  # the first one is probably cut
    return [redact(line) for line in lines[-n:]] if n > 0 else []


def event_line(ev: Event) -> str:
    when = datetime.fromtimestamp(ev.wall).strftime("%H:%M:%S")
    what = ev.kind if ev.state in (None, ev.kind) else f"{ev.kind}, now {ev.state}"
    return f"{when} {what}" + (f": {redact(ev.reason)}" if ev.reason else "")


def events_from_file(path: Path, proxy: str, n: int) -> list[str]:
    """A proxy's recent events from events.jsonl (when the in-memory log has none)."""
    out = []
    for raw in tail_lines(path, 4000, chunk=1 << 20):
        try:
            e = json.loads(raw)
        except ValueError:
            continue
        if e.get("proxy") != proxy:
            continue
        when = datetime.fromisoformat(e["time"]).strftime("%H:%M:%S") if e.get("time") else "?"
        state = f", now {e['state']}" if e.get("state") and e["state"] != e.get("event") else ""
        reason = f": {e['reason']}" if e.get("reason") else ""
        out.append(f"{when} {e.get('event')}{state}{reason}")
    return out[-n:]


# -- the live view -------------------------------------------------------------------------


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[bool]:
    """The TTY in cbreak mode (keys arrive one by one, unechoed; ^C still
    signals) until exit, whatever happens; yields False if fd is no TTY."""
    import termios
    import tty
    try:
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError):
        yield False
        return
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


def panel_room(height: int) -> int:
    """Lines a log or events panel shows on a `height`-line screen: up to half
    of it (its border included), at least 3; the table gets the rest."""
    return max(3, height // 2 - 2)


class LiveTable:
    """Redraws on events (woken by the fleet's event listener) and on keys,
    ticks slowly otherwise. With `interactive`, stdin's keys operate the fleet."""

    def __init__(self, fleet, console: Console, interactive: bool = True,
                 stdin: int | None = None):
        self.fleet = fleet
        self.console = console
        self.interactive = interactive
        self.stdin = sys.stdin.fileno() if stdin is None and interactive else stdin
        self.ui = UIState()
        self.parser = KeyParser()
        self._dirty = asyncio.Event()
        self._panel_lines: list[str] = []
        self._tasks: set[asyncio.Task] = set()

    def on_event(self, ev: Event) -> None:
        self._dirty.set()

    # -- keys ------------------------------------------------------------------------

    def _on_readable(self) -> None:
        assert self.stdin is not None
        try:
            data = os.read(self.stdin, 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # stdin closed: the view goes on, without keys
            asyncio.get_running_loop().remove_reader(self.stdin)
            return
        for key in self.parser.feed(data):
            self.press(key)

    def press(self, key: str) -> None:
        snaps = self.fleet.snapshots()
        self.ui, cmd = on_key(self.ui, key, [s.name for s in snaps],
                              {s.name for s in snaps if needs_attention(s)})
        if cmd is not None:
            self._spawn(self._execute(*cmd, shown=self.ui.message))
        self._dirty.set()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, verb: str, name: str, shown: str) -> None:
        """The same requests as `ts-supervisor start|stop|restart|recover NAME`.
        A refusal or a no-op ("already running") replaces the footer's message,
        unless a newer key has replaced it already."""
        if verb == "quit":
            self.fleet.request_stop()
            return
        try:
            answer = self.fleet.control_proxy(verb, name)
        except Exception as e:  # never let an operator key take the view down
            answer = {"ok": False, "error": f"{verb} {name}: {e}"}
        if answer.get("ok") and str(answer.get("message", "")).endswith("requested"):
            return
        if self.ui.message == shown:
            text = answer.get("message") if answer.get("ok") else f"error: {answer.get('error')}"
            self.ui = replace(self.ui, message=str(text))
            self._dirty.set()

    # -- frames ----------------------------------------------------------------------

    async def _load_panel(self) -> None:
        """Fetch what the open panel shows (file reads off the loop)."""
        ui = self.ui
        if ui.panel is None or ui.panel_proxy is None:
            self._panel_lines = []
        elif ui.panel == "log":
            path = self.fleet.data_dir / "proxies" / ui.panel_proxy / "tailscaled.log"
            self._panel_lines = await asyncio.to_thread(tail_lines, path, PANEL_LINES)
        else:
            log = self.fleet.events
            recent = [event_line(e) for e in (log.recent if log else []) if e.proxy == ui.panel_proxy]
            if not recent:
                recent = await asyncio.to_thread(events_from_file, self.fleet.data_dir / "events.jsonl",
                                                 ui.panel_proxy, PANEL_LINES)
            self._panel_lines = recent[-PANEL_LINES:]

    def frame(self) -> Group:
        """The frame for the terminal's size: the rows that fit, from the view
        position, following the selection (which then becomes the position);
        without keys (no scrolling), rows needing attention first."""
        snaps = self.fleet.snapshots()
        errors = [str(e) for e in self.fleet.config_errors]
        width, height = self.console.width, self.console.height
        if not self.interactive:
            return render(attention_first(snaps), errors=errors, width=width, height=height,
                          console=self.console)
        lines: Sequence[str] = ()
        if self.ui.panel is not None:  # the latest lines, in up to half the screen
            lines = self._panel_lines[-panel_room(height):]
        group, win = view(snaps, errors=errors, width=width, ui=self.ui, panel_lines=lines, height=height,
                          console=self.console)
        self.ui = replace(self.ui, top=win.first, page=max(1, win.shown))
        return group

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.ExitStack() as stack:
            keys = (self.interactive and self.stdin is not None
                    and stack.enter_context(cbreak(self.stdin)))
            if keys:
                loop.add_reader(self.stdin, self._on_readable)
                stack.callback(loop.remove_reader, self.stdin)
            with Live(self.frame(), console=self.console, auto_refresh=False, transient=False) as live:
                while True:
                    # not wait_for: on 3.11 it loses a cancel that races with the wait's end
                    # (an event at the moment `run` stops us), and the view never exits
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(TICK):
                            await self._dirty.wait()
                    self._dirty.clear()
                    await self._load_panel()
                    live.update(self.frame(), refresh=True)
