"""Progress reporting: a tqdm bar with ETA on a terminal, plain log lines (every 10 %, with ETA) when stderr is a
file or a pipe, and nothing with ``--quiet`` (which only ever prints less than the default)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def say(message: str, quiet: bool = False) -> None:
    """A status line on stderr before a silent wait (loading a model), so that nothing looks hung."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


class Progress:
    def __init__(self, total: int, desc: str, quiet: bool = False, unit: str = "video") -> None:
        self.quiet, self.total, self.desc, self.done = quiet, total, desc, 0
        self._start = time.monotonic()
        self._next_log = 0.1
        self._lines = not quiet and not sys.stderr.isatty()  # a log file gets lines, not a redrawn bar
        self._bar = None if quiet or self._lines else tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                                                            file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and self.total and self.done / self.total >= self._next_log:
            elapsed = time.monotonic() - self._start
            eta = elapsed / self.done * (self.total - self.done)
            print(f"{self.desc}: {self.done}/{self.total} ({elapsed:.0f}s elapsed, ETA {eta:.0f}s)",
                  file=sys.stderr, flush=True)
            while self._next_log <= self.done / self.total:
                self._next_log += 0.1

    @classmethod
    def over(cls, items: list, desc: str, quiet: bool = False, unit: str = "video"):
        """Iterate ``items`` with a bar (log lines when ``quiet``; nothing for a single item)."""
        if len(items) < 2:
            yield from items
            return
        with cls(len(items), desc, quiet, unit) as bar:
            for item in items:
                yield item
                bar.update()

    def set_postfix(self, **values: str) -> None:
        """Extra fields after the bar (e.g. loss, clips/s); nothing in --quiet mode."""
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
