"""Progress display for long loops: a tqdm bar when stderr is a terminal, nothing otherwise.

A run whose stderr is redirected to a log file gets no progress output at all (no carriage-return updates), at most
one summary line at the end; a run in a terminal gets a bar that redraws in place. tqdm is imported only when a bar is
drawn, and a missing tqdm means no bar, never an error.

    for f in progress(files, desc="extract", unit="file"):
        ...
    bar = progress_bar(total_steps, initial=step, desc="train")   # a no-op object off a terminal
    bar.update(1); bar.set_postfix(loss="0.1234"); bar.close()

Lines printed while a bar is drawn go through :func:`write`, which prints them above the bar instead of through it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["is_terminal", "progress", "progress_bar", "write"]


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: the current ``sys.stderr``) is an interactive terminal; False for files, pipes,
    closed streams and objects without ``isatty``."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _length(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def _summarised(iterable: Iterable, total: int | None, desc: str, unit: str, stream: TextIO) -> Iterator:
    """Yield from ``iterable``, then print one line ``<desc>: <n>[/<total>] <unit> in <s> s`` to ``stream``."""
    n, t0 = 0, time.perf_counter()
    for item in iterable:
        yield item
        n += 1
    count = f"{n}/{total}" if total is not None and total != n else str(n)
    head = f"{desc}: " if desc else ""
    print(f"{head}{count} {unit} in {time.perf_counter() - t0:.1f} s", file=stream, flush=True)


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", unit: str = "it",
             summary: bool = False, file: TextIO | None = None) -> Iterable:
    """``iterable`` with a progress bar on ``file`` (default: the current ``sys.stderr``) when that is a terminal and
    tqdm is installed; otherwise ``iterable`` itself (with ``summary=True``: wrapped so that one line
    ``<desc>: <n> <unit> in <s> s`` is printed once it is exhausted). ``total`` defaults to ``len(iterable)`` where
    that exists."""
    stream = sys.stderr if file is None else file
    if total is None:
        total = _length(iterable)
    if total is not None and total < 0:
        raise ValueError(f"progress: total must be >= 0, got {total}")
    tqdm = _tqdm() if is_terminal(stream) else None
    if tqdm is None:
        return _summarised(iterable, total, desc, unit, stream) if summary else iterable
    return tqdm(iterable, total=total, desc=desc or None, unit=unit, file=stream, dynamic_ncols=True)


class _NoBar:
    """The bar's interface, doing nothing: what :func:`progress_bar` returns off a terminal."""

    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int | None, *, initial: int = 0, desc: str = "", unit: str = "it",
                 file: TextIO | None = None):
    """A bar to drive by hand (``update(n)``, ``set_postfix(...)``, ``set_description``, ``close()``, usable as a
    context manager), e.g. a training loop resumed at step ``initial`` of ``total``. It draws on ``file`` (default: the
    current ``sys.stderr``) when that is a terminal and tqdm is installed; otherwise every method is a no-op."""
    if total is not None and total < 0:
        raise ValueError(f"progress_bar: total must be >= 0, got {total}")
    if initial < 0:
        raise ValueError(f"progress_bar: initial must be >= 0, got {initial}")
    stream = sys.stderr if file is None else file
    tqdm = _tqdm() if is_terminal(stream) else None
    if tqdm is None:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc or None, unit=unit, file=stream, dynamic_ncols=True)


def write(line: str, file: TextIO | None = None) -> None:
    """Print ``line`` to ``file`` (default: the current ``sys.stderr``); while a bar is drawn, above the bar (tqdm's
    ``write``) so that the bar is redrawn below it rather than split by it."""
    stream = sys.stderr if file is None else file
    tqdm = sys.modules.get("tqdm") and _tqdm()  # a bar exists only if tqdm was imported
    if tqdm is not None and getattr(tqdm, "_instances", None):
        tqdm.write(line, file=stream)
    else:
        print(line, file=stream, flush=True)
