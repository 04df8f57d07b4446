"""One ``generate`` for many users: a batcher that gathers waiting requests and streams each one its own rows.

Gradio's own batching (``batch=True``) refuses generator functions, and the page streams, so the demo batches by
itself. Every Steer request becomes a :class:`~demo.generation.Job` (its rows: plain, steered, with
demonstrations) handed to one :class:`Batcher`. Its worker thread takes the jobs that arrive close together
(up to a number of jobs and a budget of prompt tokens) and runs one greedy ``generate`` over all their rows
(:func:`demo.generation.generate_batch`: per-row vectors, one steering processor per positions mode); a streamer
hands each job its own rows' tokens as they are generated, and a pass-through logits processor the first step's
probabilities. Each request reads its snapshots from its :class:`Ticket`; requests with different prompt lengths
and numbers of new tokens share a batch (a job ends when its own rows do).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor
from transformers.generation.streamers import BaseStreamer

import fv_plugin
from demo.generation import Job, generate_batch

logger = logging.getLogger("fv_demo")


@dataclass(frozen=True)
class Update:
    """A snapshot of one job: each row's generated tokens so far (without the end-of-sequence token), the first
    step's next-token distribution ``[rows, vocab]`` once known, whether every row has finished, and how many jobs
    share its ``generate``."""

    tokens: tuple[tuple[int, ...], ...]
    probs: torch.Tensor | None
    done: bool
    shared: int = 1


@dataclass(frozen=True)
class BatchLimits:
    """How the worker forms a batch: at most ``max_jobs`` requests and ``max_cells`` prompt tokens (rows times the
    longest prompt; a larger request runs alone). After a request arrives it waits for others until none has come
    for ``quiet_s``, and at most ``window_s`` in all: a burst of users is gathered, a lone user waits ``quiet_s``."""

    max_jobs: int = 8
    max_cells: int = 4096
    window_s: float = 0.5
    quiet_s: float = 0.15


@dataclass(frozen=True)
class BatchStat:
    """One batch the worker ran: how many jobs and rows, the padded prompt width and the seconds it took."""

    jobs: int
    rows: int
    width: int
    seconds: float


class Slot:
    """The worker's side of one job in a running batch: collects its rows' tokens and publishes snapshots."""

    def __init__(
        self, job: Job, start: int, channel: queue.SimpleQueue[Any], stop_ids: frozenset[int], shared: int
    ) -> None:
        self.job, self.start, self.channel, self.stop_ids, self.shared = job, start, channel, stop_ids, shared
        self.tokens: list[list[int]] = [[] for _ in job.rows]
        self.finished = [False] * len(job.rows)
        self.probs: torch.Tensor | None = None
        self.closed = False
        self.published = False

    def set_probs(self, probs: torch.Tensor) -> None:
        self.probs = probs[self.start : self.start + len(self.job.rows)].clone()

    def advance(self, step: Sequence[int]) -> None:
        """Take this step's token of each of the job's rows (``step`` holds one token per batch row)."""
        if self.closed:
            return
        for i, token in enumerate(step[self.start : self.start + len(self.job.rows)]):
            if self.finished[i]:
                continue
            if token in self.stop_ids:
                self.finished[i] = True
                continue
            self.tokens[i].append(int(token))
            self.finished[i] = len(self.tokens[i]) >= self.job.max_new_tokens
        self.publish()

    def publish(self) -> None:
        done = all(self.finished)
        self.channel.put(Update(tuple(tuple(t) for t in self.tokens), self.probs, done, self.shared))
        self.published = True
        self.closed = done

    def finish(self) -> None:
        if not self.closed:
            self.finished = [True] * len(self.finished)
            self.publish()

    def fail(self, error: BaseException) -> None:
        if not self.closed:
            self.channel.put(error)
            self.closed = True


class BatchStreamer(BaseStreamer):
    """A ``transformers`` streamer for a whole batch: each step's tokens ``[batch]`` go to the jobs' slots."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = slots
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt ids [batch, seq]
            self.prompt_seen = True
            return
        step = value.reshape(-1).tolist()
        for slot in self.slots:
            slot.advance(step)

    def end(self) -> None:
        for slot in self.slots:
            slot.finish()


class FirstStepProbs(LogitsProcessor):
    """Passes scores through; at the first step it hands each slot its rows' next-token distribution."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = slots
        self.seen = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.seen:
            self.seen = True
            probs = torch.softmax(scores.float(), dim=-1)
            for slot in self.slots:
                slot.set_probs(probs)
        return scores


class Ticket:
    """A request's view of its job: iterate for every :class:`Update` snapshot, or :meth:`follow` the latest."""

    def __init__(self, channel: queue.SimpleQueue[Any], timeout_s: float) -> None:
        self._channel = channel
        self._timeout_s = timeout_s

    def __iter__(self) -> Iterator[Update]:
        return self.follow(skip_stale=False)

    def follow(self, *, skip_stale: bool = True) -> Iterator[Update]:
        """Snapshots until the job is done; with ``skip_stale``, only the newest of those already waiting (a
        slow reader skips intermediate ones). Raises the job's error, or ``TimeoutError`` after a silence."""
        while True:
            update = self._next(skip_stale)
            yield update
            if update.done:
                return

    def _next(self, skip_stale: bool) -> Update:
        try:
            item = self._channel.get(timeout=self._timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no result after {self._timeout_s:.0f} s") from None
        while skip_stale and isinstance(item, Update) and not item.done:
            try:
                item = self._channel.get_nowait()
            except queue.Empty:
                break
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass(frozen=True)
class Pending:
    job: Job
    channel: queue.SimpleQueue[Any]


class Batcher:
    """Serves :class:`Job` s from any number of threads with one worker thread that batches them.

    Args:
        model: the model (steering is per row and per call, so nothing is left on it).
        pad_id: the id used for left padding.
        stop_ids: end-of-sequence ids: a row ends at the first one (it is not part of its tokens).
        limits: batch size, padded-token budget and gathering window.
        timeout_s: how long a request waits for its next snapshot before giving up.
        tokenizer: the model's tokenizer, which says where an answer ends (jobs with ``positions="answer"``).
    """

    def __init__(
        self,
        model: Any,
        *,
        pad_id: int,
        stop_ids: frozenset[int] = frozenset(),
        limits: BatchLimits = BatchLimits(),
        timeout_s: float = 600.0,
        tokenizer: Any = None,
    ) -> None:
        self.model = fv_plugin.attach(model)  # the steering processors need it; attaching twice is a no-op
        self.pad_id, self.stop_ids, self.limits, self.tokenizer = pad_id, stop_ids, limits, tokenizer
        self.timeout_s = timeout_s
        self.stats: deque[BatchStat] = deque(maxlen=1000)
        self._pending: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None

    def submit(self, job: Job) -> Ticket:
        """Queue ``job``; its snapshots arrive through the returned :class:`Ticket`."""
        channel: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="fv-demo-batcher", daemon=True)
                self._worker.start()
            self._pending.append(Pending(job, channel))
            self._cond.notify_all()
        return Ticket(channel, self.timeout_s)

    def close(self) -> None:
        """Stop the worker after the batch it is running (waiting jobs are failed)."""
        with self._cond:
            self._closed = True
            waiting, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for pending in waiting:
            pending.channel.put(RuntimeError("the demo is shutting down"))

    def _loop(self) -> None:
        while batch := self._take():
            self._run(batch)

    def _take(self) -> list[Pending]:
        """Wait for a job, then for more while they keep coming; return the jobs that fit one batch, oldest first."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            deadline = time.monotonic() + self.limits.window_s
            waiting, quiet_until = len(self._pending), time.monotonic() + self.limits.quiet_s
            while len(self._pending) < self.limits.max_jobs and not self._closed:
                remaining = min(deadline, quiet_until) - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
                if len(self._pending) > waiting:  # someone came: wait a little longer for the next one
                    waiting, quiet_until = len(self._pending), time.monotonic() + self.limits.quiet_s
            batch: list[Pending] = []
            while self._pending and len(batch) < self.limits.max_jobs and self._fits(batch, self._pending[0]):
                batch.append(self._pending.popleft())
            return batch

    def _fits(self, batch: list[Pending], candidate: Pending) -> bool:
        jobs = [p.job for p in (*batch, candidate)]
        cells = sum(len(job.rows) for job in jobs) * max(job.width for job in jobs)
        return not batch or cells <= self.limits.max_cells

    def _run(self, batch: list[Pending]) -> None:
        start = time.perf_counter()
        slots = self._slots(batch)
        try:
            jobs = [p.job for p in batch]
            watch = [FirstStepProbs(slots)]
            generate_batch(
                self.model,
                jobs,
                pad_id=self.pad_id,
                streamer=BatchStreamer(slots),
                watch=watch,
                tokenizer=self.tokenizer,
            )
        except Exception as exc:  # one request's failure must not take the others down
            if len(batch) > 1 and not any(slot.published for slot in slots):
                logger.warning("a batch of %d failed (%s); running its requests one by one", len(batch), exc)
                for pending in batch:
                    self._run([pending])
                return
            logger.exception("a batch of %d failed", len(batch))
            for slot in slots:
                slot.fail(exc)
            return
        rows, width = sum(len(s.job.rows) for s in slots), max(p.job.width for p in batch)
        stat = BatchStat(len(batch), rows, width, time.perf_counter() - start)
        self.stats.append(stat)
        logger.info("batch: %d requests, %d rows, width %d, %.2f s", stat.jobs, stat.rows, stat.width, stat.seconds)

    def _slots(self, batch: list[Pending]) -> list[Slot]:
        slots, start = [], 0
        for pending in batch:
            slots.append(Slot(pending.job, start, pending.channel, self.stop_ids, len(batch)))
            start += len(pending.job.rows)
        return slots
