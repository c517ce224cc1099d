"""Progress of a long loop on stderr: a live tqdm bar on a terminal, plain periodic lines in a log.

Redirected to a file, tqdm writes every refresh (a 200-step run leaves megabytes of bars); there a line
such as ``train: step 50/200 (25%), loss=3.512, 12.0 s`` is printed at most every ``every_s`` seconds,
plus the first and the last.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Progress:
    """Report `done` out of `total` steps; `update` also takes display-only values (loss=..., lr=...)."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "progress",
        unit: str = "step",
        enabled: bool = True,
        every_s: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.enabled = enabled
        is_terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = (
            tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)
            if enabled and is_terminal
            else None
        )
        self.start, self.last_line = time.monotonic(), None
        self.done = initial

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, n: int = 1, **values: str) -> None:
        """Record ``n`` more finished steps."""
        self.update(self.done + n, **values)

    def update(self, done: int, **values: str) -> None:
        """Record that `done` steps are finished; `values` are shown beside the count."""
        self.done = done
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        due = self.last_line is None or now - self.last_line >= self.every_s or done == self.total
        if self.enabled and due:
            self.last_line = now
            shown = "".join(f", {key}={value}" for key, value in values.items())
            percent = f" ({100 * done / self.total:.0f}%)" if self.total else ""
            print(
                f"{self.desc}: {self.unit} {done}/{self.total}{percent}{shown}, {now - self.start:.1f} s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        """Finish the bar (no-op for plain lines)."""
        if self.bar is not None:
            self.bar.close()


def iterate(
    items: Iterable[T],
    total: int | None = None,
    desc: str = "progress",
    unit: str = "step",
    enabled: bool = True,
) -> Iterator[T]:
    """``items`` with their progress reported as :class:`Progress` does (a bar on a terminal, lines in a log)."""
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    with Progress(total, desc=desc, unit=unit, enabled=enabled) as progress:
        for item in items:
            yield item
            progress.advance()
