"""Scoring: what a correct answer is, next-token probabilities of prompts under steering, their accuracy, and
sweeps of one setting.

A correct answer is defined here, once, and every score, sweep, report and choice uses it: a prompt accepts its
pair's main answer and its alternatives (:attr:`~fv_plugin.Pair.answers`);

- next token (:func:`correct_first_token`): the most likely next token is the first token of an accepted answer;
- greedy continuation of a template prompt (:func:`starts_with_answer`): it starts with a whole accepted answer
  (:func:`answer_settled`: when more tokens can no longer change that);
- continuation of natural text (:func:`contains_answer`): an accepted answer appears in it as a whole word.

The answer probability (:func:`answer_probs`) is the probability of the main answer's first token.
Extraction's choices score validation prompts and evaluation scores the test split, all through
:func:`next_token_probs` (vectors added at each prompt's final token) and :func:`sweep` (one
:class:`~fv_plugin.records.Sweep`, one "best" rule).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fv_plugin.devices import input_device
from fv_plugin.merge import Normalize
from fv_plugin.positions import Positions
from fv_plugin.prompts import EncodedPrompts, Prompt, encode_prompts
from fv_plugin.records import Sweep
from fv_plugin.steering import steer
from fv_plugin.vector import FunctionVector

__all__ = [
    "PromptScores",
    "VectorArg",
    "answer_probs",
    "answer_settled",
    "contains_answer",
    "correct_first_token",
    "first_token_correct",
    "first_token_hits",
    "kl_divergence",
    "last_logits_only",
    "next_token_probs",
    "score_prompts",
    "starts_with_answer",
    "sweep",
    "wilson_interval",
    "zero_shot_scores",
]

VectorArg = FunctionVector | tuple[FunctionVector, float]


def correct_first_token(token: int, answer_tokens: Sequence[Sequence[int]]) -> bool:
    """The definition of a correct next token: ``token`` is the first token of one of the accepted answers
    (``answer_tokens``: the tokens of the main answer and of each alternative, as in
    :attr:`~fv_plugin.prompts.EncodedPrompts.answer_tokens`)."""
    return any(answer and answer[0] == token for answer in answer_tokens)


def first_token_hits(probs: torch.Tensor, enc: EncodedPrompts) -> list[bool]:
    """Per prompt of ``enc``: is the most likely next token (``probs``: ``[batch, vocab]``) correct?"""
    top = probs.argmax(-1).tolist()
    return [correct_first_token(t, answers) for t, answers in zip(top, enc.answer_tokens, strict=True)]


def answer_probs(probs: torch.Tensor, enc: EncodedPrompts) -> torch.Tensor:
    """Per prompt of ``enc``: the probability of the main answer's first token, ``[batch]``."""
    return probs[torch.arange(len(probs)), enc.answer_ids.to(probs.device)]


def starts_with_answer(continuation: str, answers: Sequence[str]) -> bool:
    """The continuation starts with a whole accepted answer (then ends, or goes on after a non-word character)."""
    text = continuation.strip()
    return any(re.match(re.escape(a.strip()) + r"(?!\w)", text) for a in answers if a.strip())


def answer_settled(continuation: str, answers: Sequence[str]) -> bool:
    """Whether more text after ``continuation`` can no longer change :func:`starts_with_answer`'s verdict: an
    accepted answer is already followed by a non-word character, or no accepted answer can still begin it (a
    greedy answer can stop there). Undecided while the text is empty or ends in an incomplete character."""
    text = continuation.lstrip()
    if not text or text.endswith("\ufffd"):
        return False
    won = still_open = False
    for answer in (a.strip() for a in answers if a.strip()):
        if text.startswith(answer) and len(text) > len(answer):
            won = won or not re.match(r"\w", text[len(answer)])
        elif answer.startswith(text):
            still_open = True
    return won or not still_open


def contains_answer(continuation: str, answers: Sequence[str]) -> bool:
    """An accepted answer appears in the continuation as a whole word (case-insensitive)."""
    text = continuation.lower()
    return any(re.search(r"(?<!\w)" + re.escape(a.strip().lower()) + r"(?!\w)", text) for a in answers)


def last_logits_only(model: nn.Module) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` when the model supports it: the unembedding then runs for the last position only."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def next_token_probs(
    model: nn.Module,
    enc: EncodedPrompts,
    vectors: Sequence[VectorArg] = (),
    *,
    strength: float = 1.0,
    normalize: Normalize = "absolute",
    gate: bool = False,
    positions: Positions | None = "last_prompt",
) -> torch.Tensor:
    """Next-token distribution after each (left-padded) prompt, steered at its final token: ``[batch, vocab]``.

    Float32 on the CPU. With no vectors (or strength 0) it is the plain model's. ``gate``: steer only the prompts
    that pass each vector's condition (``steer(..., gate=True)``). ``positions``: ``"all"`` steers every prompt
    token; ``None``: each vector's own (``fv.positions``).
    """
    device = input_device(model)
    with steer(model, *vectors, strength=strength, positions=positions, normalize=normalize, gate=gate):
        logits = model(
            input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device), **last_logits_only(model)
        ).logits
    return logits[:, -1].float().softmax(-1).cpu()


def kl_divergence(steered: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(steered || unsteered) per row, in nats."""
    eps = torch.finfo(torch.float32).tiny
    return (steered * (steered.clamp_min(eps).log() - base.clamp_min(eps).log())).sum(-1)


@dataclass(frozen=True)
class PromptScores:
    """First-token top-1 ``accuracy`` (:func:`correct_first_token`), mean answer probability (:func:`answer_probs`),
    and mean KL from the plain model (if measured)."""

    accuracy: float
    answer_prob: float
    kl: float | None = None


class _Batches:
    """Prompts encoded once in batches, with the plain model's distributions kept for KL."""

    def __init__(self, model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], batch_size: int) -> None:
        if not prompts:
            raise ValueError("no prompts to score")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.n = model, len(prompts)
        self.encoded = [encode_prompts(tokenizer, prompts[i : i + batch_size]) for i in range(0, self.n, batch_size)]
        self._base: list[torch.Tensor] | None = None

    @property
    def base(self) -> list[torch.Tensor]:
        if self._base is None:
            self._base = [next_token_probs(self.model, enc) for enc in self.encoded]
        return self._base

    def score(self, vectors: Sequence[VectorArg], strength: float, normalize: Normalize, kl: bool) -> PromptScores:
        correct, prob, divergence = 0, 0.0, 0.0
        plain: list[torch.Tensor] = []
        for i, enc in enumerate(self.encoded):
            probs = next_token_probs(self.model, enc, vectors, strength=strength, normalize=normalize)
            if not vectors:
                plain.append(probs)
            correct += sum(first_token_hits(probs, enc))
            prob += float(answer_probs(probs, enc).sum())
            if kl:
                divergence += float(kl_divergence(probs, self.base[i]).sum())
        if plain and self._base is None:
            self._base = plain
        return PromptScores(correct / self.n, prob / self.n, divergence / self.n if kl else None)


def score_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    vectors: Sequence[VectorArg] = (),
    *,
    strength: float = 1.0,
    normalize: Normalize = "absolute",
    batch_size: int = 16,
    kl: bool = False,
) -> PromptScores:
    """Accuracy and answer probability on ``prompts`` steered at their final token (and KL, if ``kl``)."""
    return _Batches(model, tokenizer, prompts, batch_size).score(vectors, strength, normalize, kl and bool(vectors))


def first_token_correct(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], *, batch_size: int = 16
) -> list[bool]:
    """Per prompt: is the plain model's most likely next token the first token of an accepted answer?"""
    correct: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        enc = encode_prompts(tokenizer, prompts[start : start + batch_size])
        correct += first_token_hits(next_token_probs(model, enc), enc)
    return correct


def wilson_interval(successes: int, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for ``z=1.96``); ``(0, 1)`` when ``n == 0``.

    It stays inside [0, 1] and behaves at 0 and 1 successes, where the normal approximation does not: with the
    20-40 queries of a test split, an accuracy of 0.5 has an interval about 0.3 to 0.4 wide.
    """
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def zero_shot_scores(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    vectors: Sequence[VectorArg] = (),
    *,
    strength: float = 1.0,
    normalize: Normalize = "absolute",
    batch_size: int = 16,
) -> tuple[float, float]:
    """First-token top-1 accuracy and mean answer probability on ``prompts``, steered at the last prompt token."""
    scores = score_prompts(
        model, tokenizer, prompts, vectors, strength=strength, normalize=normalize, batch_size=batch_size
    )
    return scores.accuracy, scores.answer_prob


def sweep(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    parameter: str,
    values: Sequence[float],
    make: Callable[[float], tuple[Sequence[VectorArg], float]],
    *,
    task: str | None = None,
    split: str = "test",
    batch_size: int = 16,
    progress: bool = False,
) -> Sweep:
    """Score ``prompts`` with the vectors ``make(value) -> (vectors, strength)`` for each value of ``parameter``.

    The plain model is scored once, for the baseline accuracy and the KL divergences.
    """
    if not values:
        raise ValueError(f"no {parameter} values to sweep")
    batches = _Batches(model, tokenizer, prompts, batch_size)
    baseline = batches.score((), 0.0, "absolute", kl=False).accuracy
    rows = []
    for value in tqdm(values, desc=f"{parameter} sweep", disable=not progress):
        vectors, strength = make(value)
        rows.append(batches.score(vectors, strength, "absolute", kl=bool(vectors)))
    return Sweep(
        task=task,
        parameter=parameter,
        values=tuple(float(v) for v in values),
        accuracy=tuple(r.accuracy for r in rows),
        answer_prob=tuple(r.answer_prob for r in rows),
        kl=tuple(r.kl if r.kl is not None else 0.0 for r in rows),
        baseline_accuracy=baseline,
        split=split,
    )
