"""Progress bars that read well in a terminal and in a log file.

On a terminal, a normal tqdm bar. When the stream is not a terminal (a log file, a pipe, CI), a bar
redraws itself with carriage returns: thousands of them per run, megabytes of one "line" that no
viewer shows well. There the bar instead prints a whole line at most every `interval` seconds
(`VLLAMA_PROGRESS_INTERVAL`, default 30), plus its final state.

Every long loop in the package takes its bar from `progress_bar`, so this is the one place that
decides how progress looks.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable

from tqdm.auto import tqdm

DEFAULT_INTERVAL_S = 30.0


def _interval() -> float:
    raw = os.environ.get("VLLAMA_PROGRESS_INTERVAL", "")
    try:
        return float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        raise ValueError(f"VLLAMA_PROGRESS_INTERVAL={raw!r}: expected a number of seconds") from None


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:   # a closed stream
        return False


class _LinePerUpdate:
    """A file-like front for a non-terminal stream: tqdm's '\\r'-prefixed redraw becomes one
    newline-terminated line; the blank redraws tqdm uses to clear a bar are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")
        return len(s)

    def flush(self):
        flush = getattr(self.stream, "flush", None)
        if flush:
            flush()

    def isatty(self) -> bool:
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, file=None, leave: bool = True,
                 initial: int = 0, **kwargs: Any) -> tqdm:
    """A tqdm bar; on a non-terminal `file` (default stderr) a line every `interval` seconds."""
    stream = sys.stderr if file is None else file
    if not is_terminal(stream):
        # miniters=0 with mininterval: tqdm decides by elapsed time alone, whatever the rate.
        kwargs.update(file=_LinePerUpdate(stream), mininterval=_interval(), miniters=0,
                      dynamic_ncols=False, ncols=100)
        # A cleared (leave=False) bar leaves nothing in a log: keep its last line there.
        leave = True
    else:
        kwargs.update(file=stream)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave,
                initial=initial, **kwargs)


def write(line: str, file=None) -> None:
    """A log line that does not tear a terminal bar (tqdm.write) and is a plain line elsewhere."""
    stream = sys.stdout if file is None else file
    if is_terminal(stream):
        tqdm.write(line, file=stream)
    else:
        stream.write(line + "\n")
        flush = getattr(stream, "flush", None)
        if flush:
            flush()
