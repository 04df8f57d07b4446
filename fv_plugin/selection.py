"""Choosing among many candidate vectors on validation prompts, cheaply.

:func:`score_candidates` scores every candidate (a list of vectors, as :func:`~fv_plugin.steer` takes them)
on zero-shot prompts steered at their final token, by the first token. Each prompt's prefix runs once; its last
token is re-run (:class:`~fv_plugin.mediation.LastTokenReplay`) from the lowest layer any candidate of a batch
touches, one batch row per candidate, with the library's own steering hooks doing the steering. The result equals
:func:`~fv_plugin.score_prompts` per candidate (the tests check it), at a fraction of the cost.

:func:`score_answers` scores candidates on the answer a user reads: the exact match of the greedy answer
(:func:`~fv_plugin.scoring.starts_with_answer`, alternatives accepted), with the vectors added where
:func:`~fv_plugin.steer` adds them by default (``positions="generated"``: the final prompt token and every
generated token). Per prompt, the prefix before the final token runs once, unsteered (no candidate touches it);
its KV cache is copied into one batch row per candidate, and only the answer's tokens run: at most the longest
accepted answer's token count plus one (the budget :func:`~fv_plugin.evaluate` gives), and a row stops as soon as
its verdict is settled (:func:`~fv_plugin.scoring.answer_settled`: the answer is followed by a newline or another
non-word character, or the text can no longer become an accepted answer) or it ends the sequence. The result
equals ``steer`` + ``generate`` per prompt and candidate (the tests check it).

:func:`neutral_kl` scores candidates on what else they change: the KL divergence from the plain model's
next-token distributions on a few neutral paragraphs, at the positions :func:`~fv_plugin.steer` steers by default.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fv_plugin.answer_span import end_of_sequence_ids
from fv_plugin.architectures import ArchSpec, resolve_architecture
from fv_plugin.devices import input_device
from fv_plugin.mediation import LastTokenReplay, cache_kwarg
from fv_plugin.progress import stage
from fv_plugin.prompts import Prompt, encode_prompts
from fv_plugin.request import steering_context
from fv_plugin.scoring import (
    PromptScores,
    VectorArg,
    answer_settled,
    correct_first_token,
    kl_divergence,
    last_logits_only,
    starts_with_answer,
)
from fv_plugin.tasks import neutral_texts

__all__ = ["AnswerScores", "neutral_kl", "score_answers", "score_candidates"]


def _lowest_layer(vectors: Sequence[VectorArg]) -> int:
    layers = []
    for item in vectors:
        fv = item[0] if isinstance(item, tuple) else item
        layers += [h[0] for h in fv.heads or ()] if fv.is_head_patch else list(fv.layers)
    return min(layers) if layers else 0


class _Rows:
    """Steers ``rows`` of one forward, each with its own candidate's vectors, at the last token."""

    def __init__(self, model: nn.Module, candidates: Sequence[Sequence[VectorArg]], arch: ArchSpec | None) -> None:
        self.model, self.candidates, self.arch = model, candidates, arch

    def probs(self, prompt: Prompt, tokenizer: Any, replay: LastTokenReplay | None) -> torch.Tensor:
        """``[candidates, vocab]`` next-token probabilities of ``prompt`` under each candidate."""
        rows = len(self.candidates)
        at = (rows, replay.length - 1) if replay is not None else None
        context = steering_context(self.model, rows=self.candidates, positions="last_prompt", arch=self.arch, replay=at)
        with torch.no_grad(), context:
            if replay is not None:
                start = min(_lowest_layer(c) for c in self.candidates)
                logits = replay.logits(start, rows)
            else:
                enc = encode_prompts(tokenizer, [prompt] * rows)
                device = input_device(self.model)
                out = self.model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device))
                logits = out.logits[:, -1]
        return logits.float().softmax(-1).cpu()


def score_candidates(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    candidates: Sequence[Sequence[VectorArg]],
    *,
    rows_per_batch: int = 64,
    arch: ArchSpec | None = None,
    name: str = "candidates",
    progress: bool | None = None,
) -> list[PromptScores]:
    """First-token accuracy and mean answer probability of every candidate on ``prompts`` (steered at the final
    prompt token, as :func:`~fv_plugin.score_prompts`).

    Args:
        candidates: each one a list of :class:`~fv_plugin.FunctionVector` or ``(vector, weight)`` pairs; the
            weight carries the candidate's strength.
        rows_per_batch: candidates re-run together (one batch row each).
        name, progress: the progress bar's name, and whether to show it (see :func:`fv_plugin.progress.stage`).
    """
    if not prompts or not candidates:
        raise ValueError("score_candidates needs prompts and candidates")
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    resolved = resolve_architecture(model, arch)
    order = sorted(range(len(candidates)), key=lambda i: _lowest_layer(candidates[i]))
    batches = [order[i : i + rows_per_batch] for i in range(0, len(order), rows_per_batch)]
    rows = [_Rows(model, [candidates[i] for i in chunk], arch) for chunk in batches]
    correct, prob = torch.zeros(len(candidates)), torch.zeros(len(candidates))
    label = f"{name} ({len(candidates)} x {len(prompts)} queries)"
    with stage(label, len(prompts), unit="query", progress=progress) as bar:
        for prompt in prompts:
            enc = encode_prompts(tokenizer, [prompt])
            ids = enc.input_ids.to(input_device(model))
            answer, accepted = int(enc.answer_ids[0]), enc.answer_tokens[0]
            with torch.no_grad():
                replay = LastTokenReplay(model, resolved, ids, cache_kwarg(model)) if ids.shape[1] > 1 else None
            usable = replay if replay is not None and replay.usable else None
            for chunk, batch in zip(batches, rows, strict=True):
                probs = batch.probs(prompt, tokenizer, usable)
                top = probs.argmax(-1)
                for row, index in enumerate(chunk):
                    correct[index] += float(correct_first_token(int(top[row]), accepted))
                    prob[index] += float(probs[row, answer])
            bar.update(1)
    n = len(prompts)
    return [PromptScores(float(c) / n, float(p) / n) for c, p in zip(correct, prob, strict=True)]


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


def _neutral_ids(tokenizer: Any, texts: Sequence[str], width: int) -> torch.Tensor:
    rows = [tokenizer(t)["input_ids"][:width] for t in texts]
    short = [t[:40] for t, row in zip(texts, rows, strict=True) if len(row) < width]
    if short:
        raise ValueError(f"neutral texts need at least {width} tokens each; too short: {short}")
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def neutral_kl(
    model: nn.Module,
    tokenizer: Any,
    candidates: Sequence[Sequence[VectorArg]],
    *,
    texts: Sequence[str] | None = None,
    prompt_tokens: int = 12,
    steered_tokens: int = 4,
    rows_per_batch: int = 16,
    arch: ArchSpec | None = None,
    progress: bool | None = None,
) -> list[float]:
    """Per candidate: the mean KL divergence (nats) from the plain model's next-token distribution to the steered
    one, over neutral paragraphs, at the positions :func:`~fv_plugin.steer` steers by default.

    Each paragraph's first ``prompt_tokens`` tokens are a prompt and its next ``steered_tokens`` tokens stand in
    for generated ones: the candidate is added at the prompt's last token and at each of them, and the KL is
    averaged over those ``steered_tokens + 1`` positions and the paragraphs. The paragraphs' common prefix runs
    once, unsteered; each batch of candidates then runs only the steered tokens, one batch row per paragraph and
    candidate. An empty candidate scores 0.

    Args:
        texts: paragraphs of at least ``prompt_tokens + steered_tokens`` tokens (default: the first four shipped
            neutral paragraphs, :func:`~fv_plugin.tasks.neutral_texts`).
    """
    if not candidates or prompt_tokens < 2 or steered_tokens < 0:
        raise ValueError("neutral_kl needs candidates, prompt_tokens >= 2 and steered_tokens >= 0")
    paragraphs = list(texts) if texts is not None else neutral_texts()[:4]
    ids = _neutral_ids(tokenizer, paragraphs, prompt_tokens + steered_tokens).to(input_device(model))
    found: list[float] = []
    with stage(
        f"side effects ({len(candidates)} x {len(paragraphs)} texts)", len(candidates), progress=progress
    ) as bar:
        prefix_out = model(input_ids=ids[:, : prompt_tokens - 1], use_cache=True, **last_logits_only(model))
        prefix = getattr(prefix_out, "cache", None) or prefix_out.past_key_values
        chunk, n, key = ids[:, prompt_tokens - 1 :], ids.shape[0], cache_kwarg(model)
        plain = model(input_ids=chunk, use_cache=True, **{key: copy.deepcopy(prefix)}).logits.float().softmax(-1)
        for start in range(0, len(candidates), rows_per_batch):
            group = candidates[start : start + rows_per_batch]
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(group))  # row t * len(group) + c: paragraph t, candidate c
            rows = [group[c] for _ in range(n) for c in range(len(group))]
            with steering_context(model, rows=rows, positions="generated", arch=arch):
                out = model(input_ids=chunk.repeat_interleave(len(group), dim=0), use_cache=True, **{key: cache})
            steered = out.logits.float().softmax(-1).view(n, len(group), *plain.shape[1:])
            found += kl_divergence(steered, plain[:, None]).mean(dim=(0, 2)).clamp_min(0.0).tolist()
            bar.update(len(group))
    return found
