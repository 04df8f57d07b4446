"""``method="auto"``: a task's method, layer and strength, chosen on zero-shot validation prompts
(:func:`~fv_plugin.prompt_sets.validation_prompts`), on the answer a user reads and on what else changes.

The head statistics and the hidden-state means are computed once, in the same passes over the prompts; every
candidate (each method of ``config.methods``, at each number of heads, layer and strength of the config's grids) is
then only a set of zero-shot validation forwards. Scoring runs in two rounds:

1. every candidate on the first ``config.screen_queries`` validation queries by first-token accuracy, re-running
   only the last token (:func:`~fv_plugin.selection.score_candidates`);
2. the ``config.finalists`` best (and each method's best two) on every validation query by the exact match of the
   greedy answer, decoding only the answer's few tokens on the cached prompt
   (:func:`~fv_plugin.selection.score_answers`; the model without a vector too), and by their side effect:
   the KL divergence of a few neutral paragraphs' next-token distributions at the positions the vector is steered
   at (:func:`~fv_plugin.selection.neutral_kl`). Each finalist is scored once per position mode of
   ``config.auto_positions``: steered at the last prompt token and every generated token (``"generated"``, the
   paper's setting) and at the last prompt token only (``"last_prompt"``); each (finalist, positions) pair is a
   candidate, and the chosen pair's positions go with the vector (``fv.positions``).

The validation queries are a seeded sample of at most ``config.max_validation``, so the cost does not grow with
the task file. ``config.portable`` leaves out the head-level methods. The choice (:func:`choose`, :data:`RULE`):
among the finalists that beat the model without a vector by exact match and stay within
``config.side_effect_budget``, the one with the least side effect of those whose exact match is within
``config.accuracy_tolerance`` of the most accurate (by default one standard error of its exact match: the
one-standard-error rule); with no tolerance, the most accurate, ties going to the first-token accuracy
(``config.smooth_layers`` > 0 averages a single-layer candidate's with its neighbouring layers'), then to the
smallest change (strength x norm), the fewest heads. When no finalist beats the model without a vector, the least
harmful one is returned with a :class:`WeakVectorWarning`. The chosen strength is built into the vector (steer it
at strength 1). Every candidate's scores are kept in ``fv.selection``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fv_plugin.methods import BUILDERS, HEAD_METHODS, Built, MethodInputs, candidate_layers, vector_metadata
from fv_plugin.prompt_sets import validation_prompts
from fv_plugin.prompts import Prompt
from fv_plugin.records import Candidate, Selection
from fv_plugin.scoring import VectorArg
from fv_plugin.selection import AnswerScores, neutral_kl, score_answers, score_candidates
from fv_plugin.vector import FunctionVector
from fv_plugin.version import __version__

__all__ = [
    "RULE",
    "WeakVectorWarning",
    "auto_vector",
    "choice",
    "choose",
    "ranked",
    "tolerance_for",
    "validation_prompts",
]

logger = logging.getLogger(__name__)

RULE = (
    "first round: every candidate on a few validation queries by first token; the finalists on all, at each of "
    "auto_positions, by exact match of the greedy answer and by side effect (KL on neutral text); among the "
    "finalists that beat the model without a vector and stay within the side-effect budget (none within: the least "
    "side effect), the least side effect of those within the accuracy tolerance of the highest exact match "
    "(tolerance 0: the highest exact match; ties: first-token accuracy (single-layer candidates: averaged with "
    "smooth_layers neighbouring layers on each side), then the smallest change (strength x norm), the fewest heads, "
    "the higher answer probability); if none beats the model without a vector: the least harmful (highest exact "
    "match, then least side effect)"
)


class WeakVectorWarning(UserWarning):
    """The vector ``method="auto"`` chose does not beat the zero-shot model on the validation prompts."""


@dataclass(frozen=True)
class _Option:
    """A candidate before scoring: its description and its (unscaled) vector."""

    method: str
    layer: int | None
    k: int | None
    strength: float
    vector: FunctionVector


def _options(inputs: MethodInputs) -> list[_Option]:
    config, options = inputs.config, []
    heads = inputs.head_statistics() if any(f in HEAD_METHODS for f in config.auto_methods) else None
    inputs = dataclasses.replace(inputs, statistics=heads)
    meta = vector_metadata(inputs.resolved, inputs.model, inputs.task, config.template)
    total_heads = heads.aie.numel() if heads is not None else 0
    for method in config.auto_methods:
        ks: Sequence[int | None] = [None]
        if method in HEAD_METHODS:
            ks = [min(config.k, total_heads)] if method == "heads" else sorted({min(k, total_heads) for k in config.ks})
        for k in ks:
            built = BUILDERS[method](inputs.with_config(method=method, k=k or config.k, layer=None))
            strengths = config.strengths if method == "difference" else config.head_strengths
            if method == "head_patch":
                strengths = (1.0,)
            layers = [built.own_layer] if built.own_layer is not None else candidate_layers(inputs)
            if method == "heads" and len(layers) > 2:  # the paper's method tries every other layer: it is costly
                layers = layers[::2]
            for layer in layers:
                fv = _vector(built, method, layer, meta)
                at = None if built.own_layer is not None else layer
                options += [_Option(method, at, k, s, fv) for s in strengths]
    return options


def _vector(built: Built, method: str, layer: int | None, meta: dict[str, Any]) -> FunctionVector:
    assert layer is not None
    return FunctionVector(vector=built.at_layer(layer), layer=layer, method=method, **meta, **built.fields)


def _change(option: _Option) -> float:
    """How much the option adds: its strength times its vector's norm (``head_patch``: strength 1)."""
    return float(option.strength) * option.vector.norm()


def ranked(candidates: Sequence[Candidate], smooth_layers: int = 0) -> list[int]:
    """Indices of the candidates scored on the most queries (the finalists, once exact match is scored), best first
    by :data:`RULE` (before the side-effect budget); ``smooth_layers``: neighbours averaged on each side."""
    most = max((c.n_queries or 0) for c in candidates)
    pool = [i for i, c in enumerate(candidates) if (c.n_queries or 0) == most]
    pool = [i for i in pool if candidates[i].exact_match is not None] or pool  # the finalists, when scored
    groups: dict[tuple[str, int | None, float], dict[int, float]] = {}
    for i in pool:
        c = candidates[i]
        if c.layer is not None:
            groups.setdefault((c.method, c.k, c.strength), {})[c.layer] = c.accuracy

    def smoothed(c: Candidate) -> float:
        if c.layer is None:
            return c.accuracy
        curve = groups[(c.method, c.k, c.strength)]
        near = [curve[at] for at in range(c.layer - smooth_layers, c.layer + smooth_layers + 1) if at in curve]
        return sum(near) / len(near)

    def key(i: int) -> tuple[float, float, float, int, float]:
        c = candidates[i]
        exact = round(c.exact_match, 9) if c.exact_match is not None else -1.0
        change = c.change if c.change is not None else math.inf
        return (-exact, -round(smoothed(c), 9), change, c.k or 0, -c.answer_prob)

    return sorted(pool, key=key)


def _exact(c: Candidate) -> float:
    return c.exact_match if c.exact_match is not None else c.accuracy


def tolerance_for(candidates: Sequence[Candidate], order: Sequence[int], tolerance: float | str) -> float:
    """The validation exact match the choice may give up for a smaller side effect: a number as given, or
    ``"se"``: one standard error of the most accurate finalist's exact match, ``sqrt(p (1 - p) / n)`` on its ``n``
    validation queries (the one-standard-error rule: 0 when it answers all or none)."""
    if not isinstance(tolerance, str):
        return float(tolerance)
    if tolerance != "se":
        raise ValueError(f"accuracy_tolerance must be a number >= 0 or 'se', got {tolerance!r}")
    if not order:
        return 0.0
    best = candidates[order[0]]
    p, n = _exact(best), max(best.n_queries or 1, 1)
    return math.sqrt(p * (1.0 - p) / n)


def choose(
    candidates: Sequence[Candidate],
    smooth_layers: int = 0,
    *,
    budget: float | None = None,
    baseline: float | None = None,
    tolerance: float | str = 0.0,
) -> int:
    """The index of the candidate :data:`RULE` picks; ``smooth_layers``: neighbours averaged on each side;
    ``budget``: the most side effect allowed; ``baseline``: the model's exact match without a vector (a candidate
    must beat it; if none does, the least harmful is returned: the highest exact match, then the least side
    effect); ``tolerance``: the exact match given up for a smaller side effect (a number, or ``"se"``: one standard
    error of the best, see :func:`tolerance_for`): of the candidates within it of the most accurate, the one with
    the least side effect (0: the most accurate, ties by :func:`ranked`)."""
    return choice(candidates, smooth_layers, budget=budget, baseline=baseline, tolerance=tolerance)[0]


def choice(
    candidates: Sequence[Candidate],
    smooth_layers: int = 0,
    *,
    budget: float | None = None,
    baseline: float | None = None,
    tolerance: float | str = 0.0,
) -> tuple[int, float]:
    """:func:`choose`'s index and the exact match it allowed to give up (0 when no tolerance applied)."""
    order = ranked(candidates, smooth_layers)
    side = {i: candidates[i].side_effect or 0.0 for i in order}
    beating = [i for i in order if baseline is None or _exact(candidates[i]) > baseline]
    if not beating:
        return min(order, key=lambda i: (-round(_exact(candidates[i]), 9), side[i], order.index(i))), 0.0
    within = [i for i in beating if budget is None or side[i] <= budget]
    if not within:
        return min(beating, key=lambda i: (side[i], order.index(i))), 0.0
    allowed = tolerance_for(candidates, within, tolerance)
    if allowed < 0:
        raise ValueError(f"accuracy_tolerance must be >= 0, got {tolerance!r}")
    if allowed == 0:
        return within[0], 0.0
    floor = _exact(candidates[within[0]]) - allowed - 1e-9
    near = [i for i in within if _exact(candidates[i]) >= floor]
    return min(near, key=lambda i: (round(side[i], 9), order.index(i))), allowed


def _screen(inputs: MethodInputs, options: Sequence[_Option], prompts: Sequence[Prompt]) -> list[Candidate]:
    """Every option on the first ``screen_queries`` prompts, by first token."""
    rows = [[(o.vector, o.strength)] for o in options]
    run: dict[str, Any] = {"arch": inputs.arch, "progress": inputs.progress, "name": "candidates"}
    found = score_candidates(inputs.model, inputs.tokenizer, prompts, rows, **run)
    return [
        Candidate(o.method, o.strength, s.accuracy, s.answer_prob, layer=o.layer, k=o.k, n_queries=len(prompts))
        for o, s in zip(options, found, strict=True)
    ]


def _score(
    inputs: MethodInputs, options: Sequence[_Option], prompts: Sequence[Prompt]
) -> tuple[list[Candidate], list[int], AnswerScores]:
    """Every option on the first ``screen_queries`` prompts (first token); the finalists on every prompt (first
    token and exact match of the greedy answer) and on neutral text (side effect), once per position mode of
    ``config.auto_positions``. Also the model without a vector on every prompt. Returns the candidates (the
    finalists at a second position mode appended as candidates of their own), each one's option, and the model
    without a vector."""
    config = inputs.config
    found = _screen(inputs, options, prompts[: config.screen_queries])
    found = [dataclasses.replace(c, change=_change(o)) for c, o in zip(found, options, strict=True)]
    order = ranked(found, config.smooth_layers)
    kept = order[: config.finalists]
    for method in config.auto_methods:
        kept += [i for i in order if found[i].method == method][:2]
    kept = sorted(set(kept))
    rows: list[list[VectorArg]] = [[(options[i].vector, options[i].strength)] for i in kept]
    run: dict[str, Any] = {"arch": inputs.arch, "progress": inputs.progress}
    sources = list(range(len(found)))
    positions = config.auto_positions
    answers = score_answers(
        inputs.model, inputs.tokenizer, prompts, [[], *rows], name="finalists", positions=positions, **run
    )
    sides = neutral_kl(inputs.model, inputs.tokenizer, rows, positions=positions, **run)
    for n, where in enumerate(positions):
        scores = answers[n * (len(rows) + 1) + 1 : (n + 1) * (len(rows) + 1)]  # without the model alone
        side = sides[n * len(rows) : (n + 1) * len(rows)]
        for i, a, kl in zip(kept, scores, side, strict=True):
            c = dataclasses.replace(  # every scored field is set: found[i] serves for each position set
                found[i],
                accuracy=a.accuracy,
                answer_prob=a.answer_prob,
                exact_match=a.exact_match,
                side_effect=kl,
                n_queries=len(prompts),
                positions=where,
            )
            if n == 0:
                found[i] = c
            else:
                found.append(c)
                sources.append(i)
    return found, sources, answers[0]


def _weak(task: str, selection: Selection) -> str:
    c = selection.best
    return (
        f"task {task!r}: the best candidate ({c.label()}: exact match {_exact(c):.2f}, first token {c.accuracy:.2f}) "
        f"does not beat the model without a vector (exact match {selection.baseline_exact_match or 0.0:.2f}, first "
        f"token {selection.baseline_accuracy:.2f}) on {selection.n_queries} validation queries; returning the least "
        f"harmful candidate (side effect {c.side_effect or 0.0:.3f} nats). The task may need more pairs, or the "
        "model does it as well without a vector"
    )


def auto_vector(inputs: MethodInputs) -> FunctionVector:
    """The chosen vector, with every candidate's validation scores in its ``selection``."""
    config = inputs.config
    options = _options(inputs)
    prompts = validation_prompts(inputs.task, config)
    found, sources, baseline = _score(inputs, options, prompts)
    candidates = tuple(found)
    budget, tolerance = config.side_effect_budget, config.accuracy_tolerance
    index, given_up = choice(
        candidates, config.smooth_layers, budget=budget, baseline=baseline.exact_match, tolerance=tolerance
    )
    selection = Selection(
        candidates,
        index,
        baseline.accuracy,
        len(prompts),
        config.validation,
        RULE,
        baseline.exact_match,
        budget,
        accuracy_tolerance=given_up,
    )
    chosen = options[sources[index]]
    logger.info("auto: %s (validation exact match %.2f)", candidates[index].label(), _exact(candidates[index]))
    if not selection.beats_zero_shot:
        warnings.warn(_weak(inputs.task.name, selection), WeakVectorWarning, stacklevel=3)
    scaled = chosen.strength * chosen.vector if chosen.method != "head_patch" else chosen.vector
    return dataclasses.replace(
        scaled,
        selection=selection,
        config=config,
        library_version=__version__,
        k=chosen.k or scaled.k,
        positions=candidates[index].positions or "generated",
    )
