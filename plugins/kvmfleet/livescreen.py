"""The curses screen of ``kvmfleet stat``'s live view: draws :class:`kvmfleet.liveview.LiveModel`, reads keys.

Kept thin: what the rows are is the model's; this module lays them out, maps keys to the model's actions and
prompts for a line of text. The terminal is restored on any exit (``curses.wrapper``); a terminal too small
for a line cuts it, never fails (every write guards ``curses.error``).
"""

from __future__ import annotations

import curses
import logging
import os
import time
from typing import Callable, Optional

from .collector import Sample
from .liveview import LiveModel, Row, VMRow
from .textsafe import one_line

KEYS = "q quit  f filter  c clear  g VM  l VMs  v vCPUs  i idle  o sort  r reset  s interval  h help"
HELP = [
    "kvmfleet stat: the live view (like kvm_stat)",
    "",
    "  q       quit",
    "  f       filter the counters by a regular expression (an invalid one keeps the filter there was)",
    "  c       clear the filter",
    "  g / p   show one VM: its name or its pid (empty: back to the host)",
    "  Esc     back to the host",
    "  l       the VMs, by exit rate (o: by exits)",
    "  v / x   drill down: each counter per vCPU of the VM shown (per VM on the host)",
    "  i       show or hide idle counters (rate 0)",
    "  o       sort by total or by current rate",
    "  r       reset: totals count from now",
    "  s       set the interval between samples (seconds)",
    "  h / ?   this help (any key goes back)",
    "",
    "Rate/s: per second over the last interval. %Rate: share of the summed event rate of the view (a counter),",
    "of its tracepoint's rate (an exit reason), of the counter's rate (a VM or vCPU row under it).",
    "Histograms are not shown (kvmfleet stat --json has their buckets).",
]
ESC = 27
ENTER_KEYS = (10, 13, curses.KEY_ENTER)
BACKSPACE_KEYS = (8, 127, curses.KEY_BACKSPACE)

Prompt = Callable[[str], Optional[str]]


def _put(win: curses.window, y: int, text: str, attr: int = 0) -> None:
    """Write one line, cut to the window; a terminal too small for it is no error."""
    height, width = win.getmaxyx()
    if y >= height or width < 2:
        return
    try:
        win.addnstr(y, 0, text, width - 1, attr)
    except curses.error:
        pass


def _rate(rate: float | None) -> str:
    if rate is None:
        return ""
    return f"{rate:.0f}" if rate >= 10 or rate == 0 else f"{rate:.1f}"


def _percent(percent: float | None) -> str:
    return "" if percent is None else f"{percent:.1f}"


def _name_width(width: int) -> int:
    return max(20, min(50, width - 36))


def row_line(row: Row, width: int) -> str:
    nw = _name_width(width)
    name = f"  {row.name}" if row.child else row.name
    return f"{name:<{nw}} {row.total:>14} {_rate(row.rate):>10} {_percent(row.percent):>7}"


def vm_line(row: VMRow, width: int) -> str:
    nw = max(16, _name_width(width) - 14)
    return (f"{row.name:<{nw}} {row.pid:>8} {row.vcpus:>5} {row.exits:>14} {_rate(row.rate):>10} "
            f"{_percent(row.percent):>7}")


def draw(win: curses.window, model: LiveModel, show_help: bool = False) -> None:
    height, width = win.getmaxyx()
    win.erase()
    lines = model.header()
    for y, line in enumerate(lines):
        _put(win, y, line, curses.A_BOLD if y == 0 else 0)
    y = len(lines)
    _put(win, y, model.message)
    y += 1
    if show_help:
        for text in HELP:
            _put(win, y, text)
            y += 1
    elif model.vm_list:
        nw = max(16, _name_width(width) - 14)
        _put(win, y, f"{'VM':<{nw}} {'pid':>8} {'vCPUs':>5} {'exits':>14} {'exits/s':>10} {'%':>7}", curses.A_REVERSE)
        for vm_row in model.vm_rows()[: max(0, height - y - 2)]:
            y += 1
            _put(win, y, vm_line(vm_row, width))
    else:
        nw = _name_width(width)
        _put(win, y, f"{'Counter':<{nw}} {'Total':>14} {'Rate/s':>10} {'%Rate':>7}", curses.A_REVERSE)
        for row in model.rows()[: max(0, height - y - 2)]:
            y += 1
            _put(win, y, row_line(row, width))
    _put(win, height - 1, KEYS, curses.A_REVERSE)
    win.noutrefresh()
    curses.doupdate()


def prompt_line(win: curses.window, y: int, question: str) -> str | None:
    """Read a line of text typed after ``question`` on line ``y``: Enter gives it, Esc gives None."""
    text = ""
    win.timeout(-1)
    try:
        curses.curs_set(1)
    except curses.error:
        pass
    try:
        while True:
            try:
                win.move(y, 0)
                win.clrtoeol()
            except curses.error:
                pass  # a terminal smaller than the header: the prompt is typed blind
            _put(win, y, question + text)
            win.refresh()
            key = win.get_wch()
            if key in ENTER_KEYS or key in ("\n", "\r"):
                return text
            if key == ESC or key == "\x1b":
                return None
            if key in BACKSPACE_KEYS or key in ("\x7f", "\b"):
                text = text[:-1]
            elif isinstance(key, str) and key.isprintable():
                text += key
    finally:
        try:
            curses.curs_set(0)
        except curses.error:
            pass


def handle_key(model: LiveModel, key: int, prompt: Prompt) -> bool:
    """Apply ``key`` to the model (``prompt`` asks for a line of text, None when cancelled); False: quit."""
    char = chr(key) if 0 <= key < 256 else ""
    if char == "q":
        return False
    if char == "f":
        text = prompt("filter (regex): ")
        if text is not None:
            model.set_filter(text)
    elif char == "c":
        model.clear_filter()
    elif char in ("g", "p"):
        text = prompt("VM name or pid (empty: the host): ")
        if text is not None:
            model.pick(text)
    elif key == ESC:
        model.host()
    elif char in ("v", "x"):
        model.toggle_drill()
    elif char == "i":
        model.toggle_idle()
    elif char == "o":
        model.toggle_sort()
    elif char == "l":
        model.toggle_vm_list()
    elif char == "r":
        model.reset()
    elif char == "s":
        text = prompt(f"interval in seconds (now {model.interval:g}): ")
        if text is not None:
            model.set_interval(text)
    return True


def _run(win: curses.window, model: LiveModel, sample: Callable[[], Sample]) -> int:
    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal without cursor control
    win.keypad(True)
    show_help = False
    next_at = 0.0
    while True:
        now = time.monotonic()
        if now >= next_at:
            model.update(sample())
            next_at = now + model.interval
        draw(win, model, show_help)
        win.timeout(max(0, int((next_at - time.monotonic()) * 1000)))
        key = win.getch()
        if key == -1 or key == curses.KEY_RESIZE:
            continue  # time for a sample, or redraw at the new size
        if show_help:
            show_help = False
            continue
        if key in (ord("h"), ord("?")):
            show_help = True
            continue
        interval = model.interval

        def ask(question: str) -> str | None:
            return prompt_line(win, len(model.header()), question)

        if not handle_key(model, key, ask):
            return 0
        if model.interval != interval:
            next_at = time.monotonic() + model.interval


def terminal_problem() -> str | None:
    """Why curses cannot drive this terminal (TERM unset or unknown to terminfo), None when it can."""
    try:
        curses.setupterm()
    except curses.error as err:
        return f"{err} (TERM={os.environ.get('TERM', '')!r})"
    return None


class _LogToView(logging.Handler):
    """While the view runs, a log line written to stderr would scribble over the screen: it goes to the view's
    message line instead, and to the handlers it was meant for once the terminal is back."""

    def __init__(self, model: LiveModel) -> None:
        super().__init__()
        self.model = model
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.model.message = one_line(record.getMessage())


def run(model: LiveModel, sample: Callable[[], Sample]) -> int:
    """Run the live view until q (status 0) or Ctrl-C (0 too); ``sample`` takes the next sample."""
    os.environ.setdefault("ESCDELAY", "25")  # Esc answers at once, not after curses' default second
    root = logging.getLogger()
    meant_for, to_view = root.handlers[:], _LogToView(model)
    root.handlers = [to_view]
    try:
        return curses.wrapper(_run, model, sample)
    except KeyboardInterrupt:
        return 0
    finally:
        root.handlers = meant_for
        for record in to_view.records[-100:]:  # the last ones: a view left running for days logs a lot
            for handler in meant_for:
                if record.levelno >= handler.level:
                    handler.handle(record)
