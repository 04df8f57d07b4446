"""``positions="answer"`` inside vLLM's workers: which of a step's tokens still belong to their request's answer.

A request steered with ``positions="answer"`` is steered at its last prompt token and at each generated token until
its answer ends: the first generated token that is a newline or an end of sequence (the ids the server sends with
the request, :func:`fv_plugin.answer_span.answer_end_ids` of the served tokenizer), and every token after it, are
not steered, as ``fv_plugin.steer(..., positions="answer")`` does on Hugging Face.

The tracker reads the step's input token ids (only when an answer-mode request runs generated tokens in it) and
keeps, per request, how far it has seen the request's tokens and where its first generated end token sits. A
position below the tokens a step starts at has been computed and kept by vLLM, so an end token found there is
final; an end found at or after the step's first position is looked for again in the step (after a preemption, or
draft tokens that were rejected). Pure numpy: nothing here imports vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fv_plugin.vllm.runners import StepBatch
from fv_plugin.vllm.tables import RequestPlan

__all__ = ["AnswerTracker", "Seen"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seen:
    """What one request's tokens have shown so far: positions below ``upto`` were read; ``end`` is the position of
    the first generated end token among them (``None``: none)."""

    upto: int
    end: int | None


class AnswerTracker:
    """Per-step masks of the tokens that answer-mode requests steer (see the module docstring)."""

    def __init__(self) -> None:
        self.seen: dict[str, Seen] = {}

    def masks(self, batch: StepBatch, plans: Sequence[RequestPlan | None]) -> dict[int, np.ndarray]:
        """For each answer-mode request of the step (by batch index), which of its tokens are steered (bool)."""
        found: dict[int, np.ndarray] = {}
        tokens: np.ndarray | None = None
        for i, (req_id, plan) in enumerate(zip(batch.req_ids, plans, strict=True)):
            if plan is None or plan.positions != "answer":
                continue
            lo, hi = int(batch.starts[i]), int(batch.starts[i + 1])
            first, prompt = int(batch.computed[i]), int(batch.prompt_lengths[i])
            positions = np.arange(first, first + hi - lo)
            end = self._end_before(req_id, first, prompt)
            generated = positions >= prompt
            if end is None and generated.any():
                if tokens is None:
                    tokens = self._tokens(batch)
                if tokens is None:  # unreadable: treat the answer as ended rather than steer past its end
                    end = max(first, prompt)
                else:
                    ending = generated & np.isin(tokens[lo:hi], plan.answer_ends)
                    if ending.any():
                        end = first + int(np.argmax(ending))
            self.seen[req_id] = Seen(upto=first + hi - lo, end=end)
            mask = positions >= prompt - 1
            found[i] = mask if end is None else mask & (positions < end)
        if len(self.seen) > 2 * len(batch.requests) + 64:  # forget finished requests
            self.seen = {key: seen for key, seen in self.seen.items() if key in batch.requests}
        return found

    def _end_before(self, req_id: str, first: int, prompt: int) -> int | None:
        """The position of the request's first generated end token below ``first`` (``None``: there is none)."""
        if first <= prompt:  # no generated token before this step
            return None
        seen = self.seen.get(req_id)
        if seen is None or seen.upto < first:
            logger.error(
                "fv_plugin: answer-mode request %s continues at position %d, but its tokens were seen up to %s; "
                "it is no longer steered",
                req_id,
                first,
                None if seen is None else seen.upto,
            )
            return prompt
        return seen.end if seen.end is not None and seen.end < first else None

    @staticmethod
    def _tokens(batch: StepBatch) -> np.ndarray | None:
        if batch.token_ids is None:
            logger.error(
                "fv_plugin: positions='answer' needs the step's token ids, and this step runs embeddings; "
                "its answer-mode requests are no longer steered"
            )
            return None
        return batch.token_ids()
