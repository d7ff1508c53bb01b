"""Progress of the stages that take time: generation shards, calibration units, feature extraction.

One object, three audiences:

- a person at a terminal gets a tqdm bar with rate and ETA (stderr is a TTY);
- a SLURM log (not a TTY) gets a plain line every ``VARQ_PROGRESS_INTERVAL`` seconds (default 30) and one when
  the stage ends, so a multi-hour job shows where it is without a carriage-return mess;
- listeners registered with `listening` (the W&B tracker) receive every update as a `ProgressEvent`, so the
  calibration loss of each unit and each stage's wall time reach the dashboard while the run is still going.

Listeners live in a context variable, not a module global: they are scoped to the ``with listening(...)`` block of
the code that registered them (one sweep point), and a failing listener is logged and never stops the stage.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
INTERVAL_ENV = "VARQ_PROGRESS_INTERVAL"
MODE_ENV = "VARQ_PROGRESS"  # bar | lines | off; unset: bar on a TTY, lines otherwise
DEFAULT_INTERVAL_S = 30.0


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # generate, calibrate, features, ...
    run: str | None  # the run directory's name when the stage knows it (the FP16 reference vs the run itself)
    done: int
    total: int | None
    elapsed_s: float
    values: Mapping[str, Any] = field(default_factory=dict)  # what this update reports (e.g. a unit's loss)
    finished: bool = False
    failed: bool = False  # the stage ended with an exception (finished is then True as well)


Listener = Callable[[ProgressEvent], None]
_LISTENERS: ContextVar[tuple[Listener, ...]] = ContextVar("varq_progress_listeners", default=())


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every progress event inside the block to ``listener`` (nested blocks add up)."""
    token = _LISTENERS.set(_LISTENERS.get() + (listener,))
    try:
        yield
    finally:
        _LISTENERS.reset(token)


def _notify(event: ProgressEvent) -> None:
    for listener in _LISTENERS.get():
        try:
            listener(event)
        except Exception as err:  # a dashboard problem must never stop a generation or calibration
            log.warning("progress listener %r failed: %s", listener, err)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _mode(stream: IO[str]) -> str:
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode in ("bar", "lines", "off"):
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def _interval_s() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    try:
        return float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", INTERVAL_ENV, raw, DEFAULT_INTERVAL_S)
        return DEFAULT_INTERVAL_S


class Progress:
    """``with Progress("generate", total=64, unit="batch") as p: ... p.update(1, loss=0.3)``.

    ``update(0, **values)`` reports values without advancing (a calibration unit inside a stage). The stream
    defaults to stderr, read when the object is made; ``clock`` is injectable for tests.
    """

    def __init__(self, stage: str, total: int | None = None, *, run: str | None = None, unit: str = "it",
                 stream: IO[str] | None = None, mode: str | None = None, interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.run, self.unit = stage, total, run, unit
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode or _mode(self.stream)
        self.interval_s = _interval_s() if interval_s is None else interval_s
        self.clock = clock
        self.done = 0
        self.values: dict[str, Any] = {}
        self._start = clock()
        self._last_line = self._start
        # the rate behind the ETA is measured since the previous line: a resumed stage skips finished shards at
        # once, and a mean over the whole stage would promise far too little remaining time
        self._window = (self._start, 0)
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=self.label, unit=unit, file=self.stream, dynamic_ncols=True,
                             leave=True, mininterval=0.5)

    @property
    def label(self) -> str:
        return f"{self.stage} {self.run}" if self.run else self.stage

    @property
    def elapsed_s(self) -> float:
        return self.clock() - self._start

    def eta_s(self) -> float | None:
        """Remaining seconds at the rate since the previous line; None while unknown (no total, no progress)."""
        since, done_then = self._window
        if self.total is None or self.done <= done_then:
            return None
        return (self.clock() - since) / (self.done - done_then) * max(self.total - self.done, 0)

    def line(self, finished: bool = False, failed: bool = False) -> str:
        """The plain progress line: ``generate run: 12/64 batch (19%), 35s, ETA 2m31s, loss=0.31``."""
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{self.label}: {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if finished:
            parts.append(f"{'stopped after' if failed else 'done in'} {format_duration(self.elapsed_s)}")
        else:
            eta = self.eta_s()
            parts.append(format_duration(self.elapsed_s) + ("" if eta is None else f", ETA {format_duration(eta)}"))
        parts += [f"{k}={_format_value(v)}" for k, v in self.values.items()]
        return ", ".join(parts)

    def _emit_line(self, text: str) -> None:
        if log.isEnabledFor(logging.INFO) and log.hasHandlers():
            log.info(text)  # Hydra's job logging: console and the job's .log file
        else:
            print(text, file=self.stream, flush=True)

    def update(self, n: int = 1, **values: Any) -> None:
        self.done += n
        if values:
            self.values = dict(values)
        if self._bar is not None:
            if values:
                self._bar.set_postfix({k: _format_value(v) for k, v in values.items()}, refresh=False)
            self._bar.update(n)
        elif self.mode == "lines" and self.clock() - self._last_line >= self.interval_s:
            self._emit_line(self.line())
            self._last_line = self.clock()
            self._window = (self._last_line, self.done)
        _notify(ProgressEvent(self.stage, self.run, self.done, self.total, self.elapsed_s, dict(values)))

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines":
            self._emit_line(self.line(finished=True, failed=failed))
        _notify(ProgressEvent(self.stage, self.run, self.done, self.total, self.elapsed_s, {}, finished=True,
                              failed=failed))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)


def track(items: Iterable[T], stage: str, *, total: int | None = None, run: str | None = None,
          unit: str = "it", **kwargs: Any) -> Iterator[T]:
    """Iterate ``items`` with a `Progress` that advances by one per item and closes when the loop ends."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(stage, total=total, run=run, unit=unit, **kwargs) as progress:
        for item in items:
            yield item
            progress.update(1)

