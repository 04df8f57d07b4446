"""The measurements of ``fv bench side-effects`` (:mod:`fv_plugin.benchmarks.side_effects` runs and renders
them): one vector's own-task accuracy and side effects in each steering mode, against the plain model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fv_plugin.activations import gate_decisions
from fv_plugin.config import EvalConfig
from fv_plugin.evaluation import evaluate
from fv_plugin.prompt_sets import eval_prompts
from fv_plugin.scoring import wilson_interval
from fv_plugin.side_effects import (
    as_chat,
    chat_requests,
    continuation_perplexity,
    continuations,
    degenerate,
)
from fv_plugin.tasks import Task, neutral_texts
from fv_plugin.vector import FunctionVector

__all__ = [
    "MODES",
    "Corpus",
    "ModeRow",
    "Plain",
    "Rate",
    "Settings",
    "condition_passes",
    "measure_plain",
    "measure_vector",
]

# mode -> (gate, positions of the continuation)
MODES: dict[str, tuple[bool, str | None]] = {  # positions None: the vectors' own
    "ungated": (False, None),
    "gated": (True, None),
    "answer": (False, "answer"),
    "gated+answer": (True, "answer"),
}


@dataclass(frozen=True)
class Rate:
    """``hits`` out of ``n``, with its 95% Wilson interval."""

    hits: int
    n: int

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.hits, self.n)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.value:.2f} [{low:.2f}–{high:.2f}]"


def _rate(flags: Sequence[bool]) -> Rate:
    return Rate(sum(bool(f) for f in flags), len(flags))


@dataclass(frozen=True)
class Settings:
    """The size of a run: ``queries`` per task (own task zero-shot and natural, each other task's ICL), at most
    ``other_tasks`` other tasks (``None``: every other built-in task), ``paragraphs`` neutral paragraphs and
    ``chat`` chat prompts (``None``: all shipped), ``new_tokens`` per continuation, ``modes`` to run."""

    queries: int = 20
    other_tasks: int | None = None
    paragraphs: int | None = None
    chat: int | None = None
    new_tokens: int = 24
    n_shots: int = 10
    seed: int = 0
    batch_size: int = 16
    modes: tuple[str, ...] = tuple(MODES)

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown modes {unknown}; choose among {list(MODES)}")
        for name in ("queries", "new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def eval_config(self, steering: str, **changes: Any) -> EvalConfig:
        """The evaluation settings of the steering mode ``steering`` (``changes``: other EvalConfig fields)."""
        gate, positions = MODES[steering]
        options = {"n": self.queries, "n_shots": self.n_shots, "seed": self.seed, "batch_size": self.batch_size}
        return EvalConfig(gate=gate, positions=positions, **{**options, **changes})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Corpus:
    """What the text measures run on: neutral paragraphs (their openings are prompts) and chat prompts."""

    paragraphs: tuple[str, ...]
    chat: tuple[str, ...]
    opening_words: int = 8

    @property
    def openings(self) -> tuple[str, ...]:
        return tuple(" ".join(t.split()[: self.opening_words]) for t in self.paragraphs)

    @classmethod
    def shipped(cls, tokenizer: Any, settings: Settings) -> Corpus:
        chat = chat_requests()[: settings.chat]
        prompts = as_chat(tokenizer, chat) if getattr(tokenizer, "chat_template", None) is not None else chat
        return cls(tuple(neutral_texts()[: settings.paragraphs]), tuple(prompts))


@dataclass(frozen=True)
class Plain:
    """The plain model's figures every vector is compared with."""

    icl: Mapping[str, float]
    neutral: tuple[tuple[int, ...], ...]
    chat: tuple[tuple[int, ...], ...]
    perplexity: float

    @property
    def degenerate(self) -> Rate:
        return _rate([degenerate(run) for run in (*self.neutral, *self.chat)])


@dataclass(frozen=True)
class ModeRow:
    """One vector in one mode (``note`` says why a mode was skipped; the figures are then absent); gated modes
    also give the share of each kind of prompt that passes the condition (:func:`condition_passes`)."""

    vector: str
    mode: str
    note: str = ""
    zero_shot: Rate | None = None
    exact_match: Rate | None = None
    natural: Rate | None = None
    icl_change: float | None = None
    icl_by_task: Mapping[str, float] = field(default_factory=dict)
    neutral_identical: Rate | None = None
    chat_identical: Rate | None = None
    degenerate: Rate | None = None
    perplexity_ratio: float | None = None
    gate_passes: Mapping[str, Rate] = field(default_factory=dict)


def _runs(
    model: Any, tokenizer: Any, prompts: Sequence[str], vectors: Sequence[FunctionVector], **options: Any
) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(r) for r in continuations(model, tokenizer, prompts, vectors, **options))


def measure_plain(
    model: Any, tokenizer: Any, tasks: Sequence[Task], corpus: Corpus, settings: Settings = Settings()
) -> Plain:
    """The plain model on every task's ICL prompts and on the corpus."""
    icl = {
        t.name: evaluate(model, tokenizer, t, settings.eval_config("ungated", mode="icl", generate=False)).accuracy
        for t in tasks
    }
    size = {"new_tokens": settings.new_tokens, "batch_size": settings.batch_size}
    return Plain(
        icl=icl,
        neutral=_runs(model, tokenizer, corpus.openings, (), **size),
        chat=_runs(model, tokenizer, corpus.chat, (), **size),
        perplexity=continuation_perplexity(model, tokenizer, corpus.paragraphs, opening_words=corpus.opening_words),
    )


def _identical(runs: Sequence[Sequence[int]], plain: Sequence[Sequence[int]]) -> Rate:
    return _rate([tuple(a) == tuple(b) for a, b in zip(runs, plain, strict=True)])


def _own_task(
    model: Any, tokenizer: Any, vectors: Sequence[FunctionVector], task: Task, settings: Settings, mode: str
) -> tuple[Rate, Rate, Rate]:
    """First-token accuracy and exact match zero-shot, and natural-template accuracy."""
    zero = evaluate(model, tokenizer, task, settings.eval_config(mode), vectors=vectors)
    natural = evaluate(model, tokenizer, task, settings.eval_config(mode, mode="natural"), vectors=vectors)
    first = _rate([bool(r.first_token_correct) for r in zero.rows])
    return first, _rate([r.exact_match for r in zero.rows]), _rate([r.exact_match for r in natural.rows])


def _plain_row(model: Any, tokenizer: Any, label: str, task: Task, plain: Plain, settings: Settings) -> ModeRow:
    """The plain model on the vector's own task; on everything else it is the reference itself."""
    zero, exact, natural = _own_task(model, tokenizer, [], task, settings, "ungated")
    same = len(plain.neutral), len(plain.chat)
    return ModeRow(
        label,
        "plain",
        zero_shot=zero,
        exact_match=exact,
        natural=natural,
        icl_change=0.0,
        neutral_identical=Rate(same[0], same[0]),
        chat_identical=Rate(same[1], same[1]),
        degenerate=plain.degenerate,
        perplexity_ratio=1.0,
    )


def _with_text(
    model: Any,
    tokenizer: Any,
    fv: FunctionVector,
    own: ModeRow,
    icl: Mapping[str, float],
    corpus: Corpus,
    plain: Plain,
    settings: Settings,
) -> ModeRow:
    """``own`` with the other tasks' ICL change and the figures of the corpus added."""
    gate, positions = MODES[own.mode]
    text = {"new_tokens": settings.new_tokens, "batch_size": settings.batch_size, "gate": gate, "positions": positions}
    neutral = _runs(model, tokenizer, corpus.openings, [fv], **text)
    chat = _runs(model, tokenizer, corpus.chat, [fv], **text)
    where = {"opening_words": corpus.opening_words, "gate": gate, "positions": positions}
    ppl = continuation_perplexity(model, tokenizer, corpus.paragraphs, [fv], **where)  # type: ignore[arg-type]
    return dataclasses.replace(
        own,
        icl_change=sum(icl.values()) / len(icl) if icl else None,
        icl_by_task=dict(icl),
        neutral_identical=_identical(neutral, plain.neutral),
        chat_identical=_identical(chat, plain.chat),
        degenerate=_rate([degenerate(run) for run in (*neutral, *chat)]),
        perplexity_ratio=ppl / plain.perplexity,
    )


def condition_passes(
    model: Any, tokenizer: Any, fv: FunctionVector, task: Task, corpus: Corpus, settings: Settings
) -> dict[str, Rate]:
    """The share of each kind of prompt that passes ``fv``'s condition (``gate_decisions``): the task's zero-shot
    and natural-template test prompts (they should), the neutral openings and chat prompts (they should not)."""
    kinds = {
        "own zero-shot": [p.text for p in eval_prompts(task, settings.eval_config("gated"))],
        "own natural": [p.text for p in eval_prompts(task, settings.eval_config("gated", mode="natural"))],
        "neutral": list(corpus.openings),
        "chat": list(corpus.chat),
    }
    size = settings.batch_size
    return {kind: _rate(gate_decisions(model, tokenizer, texts, fv, batch_size=size)) for kind, texts in kinds.items()}


def measure_vector(
    model: Any,
    tokenizer: Any,
    fv: FunctionVector,
    task: Task,
    others: Sequence[Task],
    corpus: Corpus,
    plain: Plain,
    settings: Settings = Settings(),
    *,
    name: str | None = None,
) -> list[ModeRow]:
    """One :class:`ModeRow` per mode of ``settings`` for ``fv`` (made for ``task``); ``plain`` from
    :func:`measure_plain` on the same ``others`` and ``corpus``."""
    label = name or fv.task or "vector"
    rows = [_plain_row(model, tokenizer, label, task, plain, settings)]
    icl_cache: dict[bool, dict[str, float]] = {}
    for mode in settings.modes:
        gate = MODES[mode][0]
        if gate and fv.condition is None:
            rows.append(ModeRow(label, mode, note="no condition: not gated (learn one with condition=True)"))
            continue
        if gate not in icl_cache:  # first-token ICL is steered at the last prompt token: positions do not matter
            config = settings.eval_config(mode, mode="icl", generate=False)
            icl_cache[gate] = {
                t.name: evaluate(model, tokenizer, t, config, vectors=[fv]).accuracy - plain.icl[t.name] for t in others
            }
        zero, exact, natural = _own_task(model, tokenizer, [fv], task, settings, mode)
        passes = condition_passes(model, tokenizer, fv, task, corpus, settings) if gate else {}
        own = ModeRow(label, mode, zero_shot=zero, exact_match=exact, natural=natural, gate_passes=passes)
        rows.append(_with_text(model, tokenizer, fv, own, icl_cache[gate], corpus, plain, settings))
    return rows
