"""Measurement records that travel with vectors and reports: a :class:`Sweep` of one setting, and the
:class:`Selection` of a vector among :class:`Candidate` s.

Values only: :mod:`fv_plugin.scoring` measures them, :class:`~fv_plugin.FunctionVector` stores the sweep that
chose its layer, and reports render them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Candidate", "Selection", "Sweep"]


@dataclass(frozen=True)
class Sweep:
    """Next-token scores of one task as one setting (``parameter``) takes several ``values``.

    Attributes:
        task: the task's name.
        parameter: what varies: ``"layer"``, ``"strength"``, ``"k"``...
        values: the settings tried.
        accuracy: first-token top-1 accuracy at each value.
        answer_prob: mean probability of the answer's first token at each value.
        kl: mean KL divergence (nats) from the unsteered to the steered next-token distribution at each value
            (empty when not measured).
        baseline_accuracy: accuracy without any vector on the same prompts (``None`` when not measured).
        split: the split the prompts came from (``"valid"`` or ``"valid+train"`` for choices, ``"test"`` for
            reports).
    """

    task: str | None
    parameter: str
    values: tuple[float, ...]
    accuracy: tuple[float, ...]
    answer_prob: tuple[float, ...]
    kl: tuple[float, ...] = ()
    baseline_accuracy: float | None = None
    split: str = "test"

    def __post_init__(self) -> None:
        n = len(self.values)
        if n == 0:
            raise ValueError("a sweep needs at least one value")
        if len(self.accuracy) != n or len(self.answer_prob) != n or len(self.kl) not in (0, n):
            raise ValueError(f"a sweep needs one accuracy, answer probability (and KL) per value; {n} values")

    @property
    def best(self) -> float:
        """The value with the highest accuracy; ties go to the higher answer probability, then the first value."""
        order = range(len(self.values))
        index = max(order, key=lambda i: (self.accuracy[i], self.answer_prob[i], -i))
        return self.values[index]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sweep:
        """Inverse of :meth:`to_dict` (also reads the older ``{"layers", "accuracy", "probability"}`` form)."""
        if "layers" in data:  # written by fv_plugin 0.1 inside FunctionVector.extra
            return cls(
                task=None,
                parameter="layer",
                values=tuple(float(v) for v in data["layers"]),
                accuracy=tuple(float(v) for v in data["accuracy"]),
                answer_prob=tuple(float(v) for v in data["probability"]),
                split="valid",
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown sweep fields {unknown}; expected some of {sorted(fields)}")
        baseline = data.get("baseline_accuracy")
        return cls(
            task=data.get("task"),
            parameter=str(data["parameter"]),
            values=tuple(float(v) for v in data["values"]),
            accuracy=tuple(float(v) for v in data["accuracy"]),
            answer_prob=tuple(float(v) for v in data["answer_prob"]),
            kl=tuple(float(v) for v in data.get("kl", ())),
            baseline_accuracy=float(baseline) if baseline is not None else None,
            split=str(data.get("split", "test")),
        )


@dataclass(frozen=True)
class Candidate:
    """One candidate vector scored on validation prompts: its ``method``, heads ``k`` and ``layer`` where they apply,
    its ``strength``, and its scores there (on ``n_queries`` of the validation queries: a candidate dropped after
    the first round was scored on fewer; ``None``: on all).

    Attributes:
        accuracy: first-token accuracy (:func:`~fv_plugin.scoring.correct_first_token`).
        answer_prob: mean probability of the main answer's first token.
        exact_match: share of greedy answers that are an accepted answer
            (:func:`~fv_plugin.scoring.starts_with_answer`); ``None`` where not scored (dropped after the first round).
        side_effect: mean KL divergence (nats) of neutral text's next-token distributions from the plain model's,
            at the positions the vector is steered at (:func:`~fv_plugin.selection.neutral_kl`); ``None`` where
            not scored.
        change: how much the candidate adds: its strength times the norm of its vector (``head_patch``: of the
            heads' values it writes, sent through the output projection); ties go to the smaller.
        positions: where it was steered when scored (``"generated"``, or ``"last_prompt"``: the last prompt token
            only); ``None``: ``"generated"`` (the first round, and records written before finalists had both).
    """

    method: str
    strength: float
    accuracy: float
    answer_prob: float
    layer: int | None = None
    k: int | None = None
    n_queries: int | None = None
    exact_match: float | None = None
    side_effect: float | None = None
    change: float | None = None
    positions: str | None = None

    @property
    def form(self) -> str:
        """Deprecated name of :attr:`method` (read only; removed in the next release)."""
        warnings.warn("Candidate.form is deprecated; use Candidate.method", DeprecationWarning, stacklevel=2)
        return self.method

    def label(self) -> str:
        parts = [self.method]
        if self.k is not None:
            parts.append(f"k={self.k}")
        if self.layer is not None:
            parts.append(f"L{self.layer}")
        parts.append(f"s={self.strength:g}")
        if self.positions in ("last_prompt", "all"):
            parts.append("last prompt token" if self.positions == "last_prompt" else "every token")
        return " ".join(parts)


@dataclass(frozen=True)
class Selection:
    """How ``method="auto"`` chose a task's vector: every candidate's validation scores and the one chosen.

    Attributes:
        candidates: every candidate scored.
        chosen: index of the chosen one in ``candidates``.
        baseline_accuracy: zero-shot validation accuracy without a vector.
        n_queries: validation queries each candidate was scored on.
        queries: where they came from (``"valid"``, or ``"valid+train"``: train queries asked zero-shot too).
        rule: how the choice was made, in words.
        baseline_exact_match: exact match of the model's greedy answers without a vector (``None``: not scored,
            a file written before exact match was).
        side_effect_budget: the most side effect (``Candidate.side_effect``) the choice allowed (``None``: any).
        accuracy_tolerance: the validation exact match the choice allowed to give up for a smaller side effect
            (``None``: a file written before the choice had one, when it was 0).
    """

    candidates: tuple[Candidate, ...]
    chosen: int
    baseline_accuracy: float
    n_queries: int
    queries: str
    rule: str
    baseline_exact_match: float | None = None
    side_effect_budget: float | None = None
    accuracy_tolerance: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.chosen < len(self.candidates):
            raise ValueError(f"chosen={self.chosen} is not an index into {len(self.candidates)} candidates")

    @property
    def best(self) -> Candidate:
        return self.candidates[self.chosen]

    def best_of(self, methods: tuple[str, ...]) -> Candidate | None:
        """The most accurate candidate of the given methods; ``None`` if none was scored. Finalists (scored by the
        exact match of the whole answer, on every validation query) come first, by exact match, then first-token
        accuracy and answer probability; without finalists of those methods, the best by first-token accuracy."""
        found = [c for c in self.candidates if c.method in methods]
        finalists = [c for c in found if c.exact_match is not None]
        if finalists:
            return max(finalists, key=lambda c: (c.exact_match or 0.0, c.accuracy, c.answer_prob))
        return max(found, key=lambda c: (c.accuracy, c.answer_prob)) if found else None

    @property
    def beats_zero_shot(self) -> bool:
        """The chosen candidate beats the model without a vector: by exact match where both were scored, else by
        first-token accuracy."""
        best = self.best
        if best.exact_match is not None and self.baseline_exact_match is not None:
            return best.exact_match > self.baseline_exact_match
        return best.accuracy > self.baseline_accuracy

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        """Inverse of :meth:`to_dict` (also reads candidates recorded with ``"form"``, the former ``"method"``)."""
        renamed = (
            {("method" if key == "form" else key): value for key, value in c.items()} for c in data["candidates"]
        )
        candidates = tuple(Candidate(**c) for c in renamed)
        return cls(
            candidates=candidates,
            chosen=int(data["chosen"]),
            baseline_accuracy=float(data["baseline_accuracy"]),
            n_queries=int(data["n_queries"]),
            queries=str(data["queries"]),
            rule=str(data["rule"]),
            baseline_exact_match=_optional(data.get("baseline_exact_match")),
            side_effect_budget=_optional(data.get("side_effect_budget")),
            accuracy_tolerance=_optional(data.get("accuracy_tolerance")),
        )


def _optional(value: Any) -> float | None:
    return float(value) if value is not None else None
