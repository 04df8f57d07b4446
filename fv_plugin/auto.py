"""``method="auto"``: a task's method, layer and strength, chosen on zero-shot validation prompts
(:func:`~fv_plugin.prompt_sets.validation_prompts`).

The head statistics and the hidden-state means are computed once; every candidate (each method of
``config.methods``, at each number of heads, layer and strength of the config's grids) is then only a set of
zero-shot validation forwards, and those re-run only the last token (:func:`~fv_plugin.selection.score_candidates`).
The choice (:func:`choose`): the highest validation accuracy (``config.smooth_layers`` > 0 averages a
single-layer candidate's accuracy with its neighbouring layers', so one lucky layer does not win); ties go to
the head-based methods (the paper's), then to the strength closest to 1, then to the higher answer probability.
The chosen strength is built into the vector (steer it at strength 1). Every candidate's scores are kept in
``fv.selection``; a vector that does not beat the zero-shot model on validation gets a warning.
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
from fv_plugin.records import Candidate, Selection
from fv_plugin.scoring import score_prompts
from fv_plugin.selection import score_candidates
from fv_plugin.vector import FunctionVector
from fv_plugin.version import __version__

__all__ = ["RULE", "WeakVectorWarning", "auto_vector", "choose", "validation_prompts"]

logger = logging.getLogger(__name__)

RULE = (
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
    heads = inputs.head_statistics() if any(f in HEAD_METHODS for f in config.methods) else None
    inputs = dataclasses.replace(inputs, statistics=heads)
    meta = vector_metadata(inputs.resolved, inputs.model, inputs.task, config.template)
    total_heads = heads.aie.numel() if heads is not None else 0
    for method in config.methods:
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


def choose(candidates: Sequence[Candidate], smooth_layers: int = 0) -> int:
    """The index of the candidate :data:`RULE` picks; ``smooth_layers``: neighbours averaged on each side."""
    groups: dict[tuple[str, int | None, float], dict[int, float]] = {}
    for c in candidates:
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

    return max(range(len(candidates)), key=key)


def auto_vector(inputs: MethodInputs) -> FunctionVector:
    """The chosen vector, with every candidate's validation scores in its ``selection``."""
    config = inputs.config
    options = _options(inputs)
    prompts = validation_prompts(inputs.task, config)
    scores = score_candidates(
        inputs.model, inputs.tokenizer, prompts, [[(o.vector, o.strength)] for o in options], arch=inputs.arch
    )
    candidates = tuple(
        Candidate(o.method, o.strength, s.accuracy, s.answer_prob, layer=o.layer, k=o.k)
        for o, s in zip(options, scores, strict=True)
    )
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
