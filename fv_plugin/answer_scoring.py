"""Scoring many candidate vectors on the answer a user reads: greedy decoding, cheaply.

:func:`score_answers` gives, per candidate (a list of vectors, as :func:`~fv_plugin.steer` takes them), on
zero-shot prompts: the first-token accuracy and answer probability, and the exact match of the greedy answer
(:func:`~fv_plugin.scoring.starts_with_answer`, alternatives accepted), with the vectors added where
:func:`~fv_plugin.steer` adds them by default (``positions="generated"``: the final prompt token and every
generated token). Per prompt, the prefix before the final token runs once, unsteered (no candidate touches it);
its KV cache is copied into one batch row per candidate, and only the answer's tokens run: at most the longest
accepted answer's token count plus one (the budget :func:`~fv_plugin.evaluate` gives), and a row stops as soon
as its verdict is settled (:func:`~fv_plugin.scoring.answer_settled`: the answer is followed by a newline or
another non-word character, or the text can no longer become an accepted answer) or it ends the sequence.
The result equals ``steer`` + ``generate`` per prompt and candidate (the tests check it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fv_plugin.answer_span import end_of_sequence_ids
from fv_plugin.architectures import ArchSpec
from fv_plugin.devices import input_device
from fv_plugin.mediation import cache_kwarg
from fv_plugin.progress import stage
from fv_plugin.prompts import Prompt, encode_prompts
from fv_plugin.request import steering_context
from fv_plugin.scoring import VectorArg, answer_settled, correct_first_token, last_logits_only, starts_with_answer

__all__ = ["AnswerScores", "score_answers"]


@dataclass(frozen=True)
class AnswerScores:
    """One candidate on a set of prompts: first-token ``accuracy``, mean ``answer_prob`` of the main answer's first
    token, and ``exact_match`` of the greedy answer."""

    accuracy: float
    answer_prob: float
    exact_match: float


@dataclass
class _Prompt:
    """One prompt's prefix cache, final token, answers, and how many tokens its answers may take."""

    prompt: Prompt
    last: torch.Tensor  # [1, 1]
    cache: Any
    accepted: tuple[tuple[int, ...], ...]
    budget: int


def _prepare(model: nn.Module, tokenizer: Any, prompt: Prompt) -> _Prompt:
    enc = encode_prompts(tokenizer, [prompt])
    ids = enc.input_ids.to(input_device(model))
    cache = None
    if ids.shape[1] > 1:
        out = model(input_ids=ids[:, :-1], use_cache=True, **last_logits_only(model))
        cache = getattr(out, "cache", None) or out.past_key_values
    accepted = enc.answer_tokens[0]
    return _Prompt(prompt, ids[:, -1:], cache, accepted, max(len(a) for a in accepted) + 1)


def _step(model: nn.Module, tokens: torch.Tensor, cache: Any, rows: Sequence[Sequence[VectorArg]], arch: Any) -> Any:
    """One forward of ``tokens`` ``[rows, 1]`` on ``cache``, each row steered by its candidate at every new token."""
    kwargs = {cache_kwarg(model): cache} if cache is not None else {}
    with steering_context(model, rows=rows, positions="generated", arch=arch):
        return model(input_ids=tokens, use_cache=True, **kwargs)


def _decode(
    model: nn.Module, tokenizer: Any, job: _Prompt, rows: Sequence[Sequence[VectorArg]], arch: Any, ends: set[int]
) -> tuple[list[bool], list[float], list[bool]]:
    """Greedy answers of ``rows`` candidates to one prompt: (first token correct, answer probability, exact match)."""
    n = len(rows)
    cache = copy.deepcopy(job.cache) if job.cache is not None else None
    if cache is not None and n > 1:
        cache.batch_repeat_interleave(n)
    tokens, alive = job.last.expand(n, 1), list(range(n))
    generated: list[list[int]] = [[] for _ in range(n)]
    first: list[bool] = []
    probs: list[float] = []
    for step in range(job.budget):
        out = _step(model, tokens, cache, [rows[i] for i in alive], arch)
        logits = out.logits[:, -1].float()
        chosen = logits.argmax(-1).tolist()
        if step == 0:
            first = [correct_first_token(t, job.accepted) for t in chosen]
            probs = logits.softmax(-1)[:, job.accepted[0][0]].tolist()
        keep = []
        for j, row in enumerate(alive):
            generated[row].append(chosen[j])
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            if chosen[j] not in ends and not answer_settled(text, job.prompt.answers):
                keep.append(j)
        if not keep:
            break
        cache = getattr(out, "cache", None) or out.past_key_values
        if len(keep) < len(alive):
            cache.batch_select_indices(torch.tensor(keep, device=tokens.device))
        alive = [alive[j] for j in keep]
        tokens = torch.tensor([[chosen[j]] for j in keep], device=tokens.device)
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    return first, probs, [starts_with_answer(t, job.prompt.answers) for t in texts]


@torch.no_grad()
def score_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    candidates: Sequence[Sequence[VectorArg]],
    *,
    rows_per_batch: int = 64,
    arch: ArchSpec | None = None,
    name: str = "answers",
    progress: bool | None = None,
) -> list[AnswerScores]:
    """First-token accuracy, answer probability and exact match of the greedy answer of every candidate on
    ``prompts`` (see the module). An empty candidate (``[]``) is the model without a vector.

    Args:
        candidates: each one a list of :class:`~fv_plugin.FunctionVector` or ``(vector, weight)`` pairs.
        rows_per_batch: candidates decoded together (one batch row each).
        name, progress: the progress bar's name, and whether to show it (see :func:`fv_plugin.progress.stage`).
    """
    if not prompts or not candidates:
        raise ValueError("score_answers needs prompts and candidates")
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    ends = set(end_of_sequence_ids(tokenizer, model))
    batches = [range(i, min(i + rows_per_batch, len(candidates))) for i in range(0, len(candidates), rows_per_batch)]
    totals = torch.zeros(3, len(candidates), dtype=torch.float64)
    with stage(f"{name} ({len(candidates)} x {len(prompts)} queries)", len(prompts), progress=progress) as bar:
        for prompt in prompts:
            job = _prepare(model, tokenizer, prompt)
            for chunk in batches:
                found = _decode(model, tokenizer, job, [candidates[i] for i in chunk], arch, ends)
                totals[:, chunk.start : chunk.stop] += torch.tensor(found, dtype=torch.float64)
            bar.update(1)
    mean = (totals / len(prompts)).tolist()
    return [AnswerScores(a, p, e) for a, p, e in zip(*mean, strict=True)]
