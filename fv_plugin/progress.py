"""Progress of long steps: one named tqdm bar per stage, and a record of each stage's time and work.

Every step of an extraction that can take more than a couple of seconds runs inside :func:`stage`, which shows
a bar with the stage's name (on a terminal or in a notebook; never on a pipe) and, while :func:`recording` is
open, appends a :class:`StageRecord` with the stage's seconds and the forward work a counter saw during it.

Bars are on by default. ``progress=False`` on a call turns them off, and so does the environment variable
``FV_PROGRESS=0`` for every call that leaves ``progress`` unset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

__all__ = ["PROGRESS_ENV", "StageLog", "StageRecord", "progress_enabled", "recording", "stage"]

PROGRESS_ENV = "FV_PROGRESS"

logger = logging.getLogger(__name__)


def progress_enabled(progress: bool | None = None) -> bool:
    """``progress`` if given, else the environment: bars are on unless ``FV_PROGRESS`` is ``0``/``false``/``no``."""
    if progress is not None:
        return bool(progress)
    return os.environ.get(PROGRESS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class StageRecord:
    """One stage: its name, wall-clock and CPU seconds, and the work the log's counter saw (``tokens``: token
    passes through the decoder stack, a token run through ``m`` of ``L`` layers counting ``m / L``;
    ``logit_rows``: rows the unembedding ran for)."""

    name: str
    seconds: float
    tokens: float = 0.0
    logit_rows: int = 0
    cpu_seconds: float = 0.0  # CPU time of this process (all threads): steadier than seconds on a shared machine


@dataclass
class StageLog:
    """The stages run while :func:`recording` was open; ``counter`` returns ``(tokens, logit_rows)`` so far."""

    counter: Callable[[], tuple[float, int]] | None = None
    stages: list[StageRecord] = field(default_factory=list)

    def count(self) -> tuple[float, int]:
        return self.counter() if self.counter is not None else (0.0, 0)

    def totals(self) -> StageRecord:
        return StageRecord(
            "total",
            sum(s.seconds for s in self.stages),
            sum(s.tokens for s in self.stages),
            sum(s.logit_rows for s in self.stages),
            sum(s.cpu_seconds for s in self.stages),
        )


_LOG: ContextVar[StageLog | None] = ContextVar("fv_plugin_stage_log", default=None)


@contextlib.contextmanager
def recording(counter: Callable[[], tuple[float, int]] | None = None) -> Iterator[StageLog]:
    """Record every :func:`stage` run in this context until the block exits."""
    log = StageLog(counter)
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)


@contextlib.contextmanager
def stage(name: str, total: int | None = None, *, unit: str = "it", progress: bool | None = None) -> Iterator[Any]:
    """A named stage: yields a tqdm bar (``bar.update(n)``), shown when ``progress`` (see :func:`progress_enabled`)
    allows and the output is a terminal or notebook; the stage is recorded when a :func:`recording` is open."""
    log = _LOG.get()
    before = log.count() if log is not None else (0.0, 0)
    start, cpu = time.perf_counter(), time.process_time()
    # disable=None: tqdm itself hides the bar when the output is not a terminal (a pipe, a log file, CI)
    bar = tqdm(total=total, desc=name, unit=unit, disable=None if progress_enabled(progress) else True, leave=False)
    try:
        yield bar
    finally:
        bar.close()
        seconds = time.perf_counter() - start
        logger.info("%s: %.1f s", name, seconds)
        if log is not None:
            after = log.count()
            work = (after[0] - before[0], after[1] - before[1])
            log.stages.append(StageRecord(name, seconds, *work, cpu_seconds=time.process_time() - cpu))
