"""``method="auto"``: a task's method, layer and strength, chosen on zero-shot validation prompts
(:func:`~fv_plugin.prompt_sets.validation_prompts`).

The head statistics and the hidden-state means are computed once, in the same passes over the prompts; every
candidate (each method of ``config.methods``, at each number of heads, layer and strength of the config's grids) is
then only a set of zero-shot validation forwards, and those re-run only the last token
(:func:`~fv_plugin.selection.score_candidates`). Scoring runs in two rounds: every candidate on the first
``config.screen_queries`` validation queries, then the ``config.finalists`` best (and each method's best two) on
the rest; the validation queries are a seeded sample of at most ``config.max_validation``, so the cost does not
grow with the task file. ``config.portable`` leaves out the head-level methods.
The choice (:func:`choose`, among the candidates scored on every query): the highest validation accuracy
(``config.smooth_layers`` > 0 averages a single-layer candidate's accuracy with its neighbouring layers', so one
lucky layer does not win); ties go to the head-based methods (the paper's), then to the strength closest to 1,
then to the higher answer probability. The chosen strength is built into the vector (steer it at strength 1).
Every candidate's scores are kept in ``fv.selection``; a vector that does not beat the zero-shot model on
validation gets a warning.
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
from fv_plugin.progress import stage
from fv_plugin.prompt_sets import validation_prompts
from fv_plugin.prompts import Prompt
from fv_plugin.records import Candidate, Selection
from fv_plugin.scoring import score_prompts
from fv_plugin.selection import score_candidates
from fv_plugin.vector import FunctionVector
from fv_plugin.version import __version__

__all__ = ["RULE", "WeakVectorWarning", "auto_vector", "choose", "ranked", "validation_prompts"]

logger = logging.getLogger(__name__)

RULE = (
    "first round: every candidate on a few validation queries, the best on all; then the "
    "highest validation accuracy (single-layer candidates: averaged with smooth_layers neighbouring layers on "
    "each side); ties: head-based methods, then the strength closest to 1, then the higher answer probability"
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


def ranked(candidates: Sequence[Candidate], smooth_layers: int = 0) -> list[int]:
    """Indices of the candidates scored on the most queries, best first by :data:`RULE`; ``smooth_layers``:
    neighbours averaged on each side."""
    most = max((c.n_queries or 0) for c in candidates)
    pool = [i for i, c in enumerate(candidates) if (c.n_queries or 0) == most]
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

    def key(i: int) -> tuple[float, bool, float, float]:
        c = candidates[i]
        return (round(smoothed(c), 9), c.method in HEAD_METHODS, -abs(math.log(c.strength)), c.answer_prob)

    return sorted(pool, key=key, reverse=True)


def choose(candidates: Sequence[Candidate], smooth_layers: int = 0) -> int:
    """The index of the candidate :data:`RULE` picks; ``smooth_layers``: neighbours averaged on each side."""
    return ranked(candidates, smooth_layers)[0]


def _score(inputs: MethodInputs, options: Sequence[_Option], prompts: Sequence[Prompt]) -> list[Candidate]:
    """Every option on the first ``screen_queries`` prompts; the finalists on the rest too."""
    config = inputs.config
    rows = [[(o.vector, o.strength)] for o in options]
    screen, rest = prompts[: config.screen_queries], prompts[config.screen_queries :]
    run: dict[str, Any] = {"arch": inputs.arch, "progress": inputs.progress}
    first = score_candidates(inputs.model, inputs.tokenizer, screen, rows, name="candidates", **run)
    found = [
        Candidate(o.method, o.strength, s.accuracy, s.answer_prob, layer=o.layer, k=o.k, n_queries=len(screen))
        for o, s in zip(options, first, strict=True)
    ]
    if not rest:
        return found
    order = ranked(found, config.smooth_layers)
    kept = order[: config.finalists]
    for method in config.auto_methods:
        kept += [i for i in order if found[i].method == method][:2]
    kept = sorted(set(kept))
    more = score_candidates(inputs.model, inputs.tokenizer, rest, [rows[i] for i in kept], name="finalists", **run)
    n = len(prompts)
    for i, s in zip(kept, more, strict=True):
        c = found[i]
        accuracy = (c.accuracy * len(screen) + s.accuracy * len(rest)) / n
        prob = (c.answer_prob * len(screen) + s.answer_prob * len(rest)) / n
        found[i] = dataclasses.replace(c, accuracy=accuracy, answer_prob=prob, n_queries=n)
    return found


def auto_vector(inputs: MethodInputs) -> FunctionVector:
    """The chosen vector, with every candidate's validation scores in its ``selection``."""
    config = inputs.config
    options = _options(inputs)
    prompts = validation_prompts(inputs.task, config)
    candidates = tuple(_score(inputs, options, prompts))
    with stage("validation baseline", progress=inputs.progress):
        baseline = score_prompts(inputs.model, inputs.tokenizer, prompts, batch_size=config.batch_size).accuracy
    index = choose(candidates, config.smooth_layers)
    selection = Selection(candidates, index, baseline, len(prompts), config.validation, RULE)
    chosen = options[index]
    logger.info("auto: %s (validation accuracy %.2f)", candidates[index].label(), candidates[index].accuracy)
    if not selection.beats_zero_shot:
        warnings.warn(
            f"task {inputs.task.name!r}: the best candidate ({candidates[index].label()}, validation accuracy "
            f"{candidates[index].accuracy:.2f}) does not beat the model without a vector ({baseline:.2f}) on "
            f"{len(prompts)} validation queries; the task may need more pairs, or the model cannot do it",
            WeakVectorWarning,
            stacklevel=3,
        )
    scaled = chosen.strength * chosen.vector if chosen.method != "head_patch" else chosen.vector
    return dataclasses.replace(
        scaled, selection=selection, config=config, library_version=__version__, k=chosen.k or scaled.k
    )
