"""Extracting a function vector: head statistics or hidden-state means -> a vector -> the layer it works at.

Every method (:mod:`fv_plugin.methods`) returns as a :class:`~fv_plugin.FunctionVector` whose ``method`` says
which. A single-layer method's layer is chosen by a sweep on the validation prompts unless given; ``method="auto"``
chooses the method, the layer and the strength on the same prompts (:mod:`fv_plugin.auto`), with the same scorer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from fv_plugin.activations import task_state_vectors
from fv_plugin.architectures import ArchSpec, resolve_architecture
from fv_plugin.auto import auto_vector
from fv_plugin.condition_fit import with_condition
from fv_plugin.config import METHODS, ExtractionConfig, Method, with_overrides
from fv_plugin.mediation import HeadStatistics
from fv_plugin.methods import BUILDERS, Built, MethodInputs, candidate_layers, check_layers, vector_metadata
from fv_plugin.progress import progress_enabled, stage
from fv_plugin.prompt_sets import validation_prompts
from fv_plugin.prompts import prompt_tokenizer
from fv_plugin.records import Sweep
from fv_plugin.scoring import VectorArg
from fv_plugin.selection import score_candidates
from fv_plugin.tasks import Task
from fv_plugin.vector import FunctionVector
from fv_plugin.version import __version__

__all__ = ["METHODS", "Method", "extract_function_vector", "layer_vectors"]

logger = logging.getLogger(__name__)


def layer_vectors(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    config: ExtractionConfig | None = None,
    *,
    method: Literal["difference", "layer_mean"] = "difference",
    layers: Sequence[int] | None = None,
    arch: ArchSpec | None = None,
    **overrides: Any,
) -> dict[int, FunctionVector]:
    """The hidden-state methods' vectors at every layer in ``layers`` (default: all) from one pass over the prompts.

    Uses the same prompts as :func:`extract_function_vector` with the same settings, so entry ``L`` equals
    ``extract_function_vector(..., method=method, layer=L)``'s vector. Handy for layer sweeps.
    """
    settings = with_overrides(config or ExtractionConfig(), overrides, what="layer_vectors()")
    resolved = resolve_architecture(model, arch)
    wanted = check_layers(resolved, layers if layers is not None else range(resolved.num_layers))
    per_layer = task_state_vectors(model, tokenizer, task, wanted, method=method, config=settings, arch=arch)
    meta = vector_metadata(resolved, model, task, settings.template)
    return {at: FunctionVector(vector=v, layer=at, method=method, **meta) for at, v in per_layer.items()}


def _layer_sweep(job: MethodInputs, built: Built, meta: dict[str, Any]) -> Sweep:
    """Accuracy on the validation prompts every choice reads (:func:`~fv_plugin.prompt_sets.validation_prompts`)
    with the vector after each candidate layer at the config's strength, scored as ``method="auto"`` scores its
    candidates (each prompt's prefix run once; the first row: no vector, the baseline)."""
    config = job.config
    prompts = validation_prompts(job.task, config)
    layers = candidate_layers(job)
    rows: list[list[VectorArg]] = [[]]
    rows += [[(FunctionVector(vector=built.at_layer(at), layer=at, **meta), config.strength)] for at in layers]
    run: dict[str, Any] = {"arch": job.arch, "progress": job.progress, "name": "layer sweep"}
    scores = score_candidates(job.model, job.tokenizer, prompts, rows, **run)
    return Sweep(
        task=job.task.name,
        parameter="layer",
        values=tuple(float(at) for at in layers),
        accuracy=tuple(s.accuracy for s in scores[1:]),
        answer_prob=tuple(s.answer_prob for s in scores[1:]),
        baseline_accuracy=scores[0].accuracy,
        split=config.validation,
    )


def _check_statistics(statistics: HeadStatistics | None, task: Task, config: ExtractionConfig) -> None:
    if statistics is not None and (statistics.task != task.name or not statistics.matches(config)):
        raise ValueError(
            f"the head statistics were made for task {statistics.task!r} with {statistics.config}; they do not "
            f"match task {task.name!r} with {config}: recompute them with head_statistics(...)"
        )


def extract_function_vector(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    config: ExtractionConfig | None = None,
    *,
    statistics: HeadStatistics | None = None,
    arch: ArchSpec | None = None,
    progress: bool | None = None,
    **overrides: Any,
) -> FunctionVector:
    """Extract a function vector for ``task`` from ``model``.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        task: the task (see :func:`~fv_plugin.load_task`).
        config: the settings (:class:`~fv_plugin.ExtractionConfig`); any of its fields may also be given as a
            keyword (``method="heads", k=20``) and overrides it. ``method="auto"`` (the default) chooses the
            method, the layer and the strength on zero-shot validation queries (:mod:`fv_plugin.auto`; every
            candidate's scores are kept in ``fv.selection``); an explicit method with ``layer=None`` chooses the
            layer by a sweep on the validation prompts (``config.validation``) over ``layers`` (default: every layer).
        statistics: head statistics of the same task and settings (:func:`~fv_plugin.head_statistics`) to reuse
            across methods instead of recomputing them.
        arch: where the decoder layers are, for models fv_plugin does not know.
        progress: a bar per stage (default on, unless ``FV_PROGRESS=0``; only on a terminal or notebook).

    Returns:
        A :class:`FunctionVector` whose fields record the heads, their AIE, the AIE matrix, the layer sweep and
        the settings.

    Example:
        >>> fv = extract_function_vector(model, tok, load_task("antonym"))  # doctest: +SKIP
        >>> paper = extract_function_vector(model, tok, load_task("antonym"), method="heads", k=10)  # doctest: +SKIP
    """
    settings = with_overrides(config or ExtractionConfig(), overrides, what="extract_function_vector()")
    resolved = resolve_architecture(model, arch)
    check_layers(resolved, [settings.layer] if settings.layer is not None else [])
    _check_statistics(statistics, task, settings)
    prompts_tokenizer = prompt_tokenizer(tokenizer, prepend_bos=settings.prepend_bos)  # every prompt's tokens
    job = MethodInputs(model, prompts_tokenizer, task, settings, resolved, arch, progress, statistics)
    if settings.method == "auto" and settings.layer is not None:  # single-layer methods tried at that layer only
        job = job.with_config(layers=(settings.layer,))
    if settings.condition and statistics is None and job.needs_head_statistics():
        # computed here, as the method would, to keep the zero-shot prompts' states for the condition
        job = dataclasses.replace(job, statistics=job.head_statistics())
    fv = auto_vector(job) if settings.method == "auto" else _one_method(job)
    if not settings.condition:
        return fv
    recorded = job.statistics.zero_recorded if job.statistics is not None else None
    with stage("condition"):  # recorded like every stage (fv bench extract); its passes show their own bar
        show = progress_enabled(progress)
        return with_condition(model, prompts_tokenizer, task, fv, settings, arch=arch, progress=show, recorded=recorded)


def _one_method(job: MethodInputs) -> FunctionVector:
    """The vector of the configured method, at the configured layer or at the one its validation sweep chooses."""
    settings = job.config
    built = BUILDERS[settings.method](job)
    meta = vector_metadata(job.resolved, job.model, job.task, settings.template)
    layer, layer_sweep = built.own_layer if built.own_layer is not None else settings.layer, None
    if layer is None:
        layer_sweep = _layer_sweep(job, built, meta)
        layer = int(layer_sweep.best)
        logger.info("layer %d chosen (validation accuracy %.2f)", layer, max(layer_sweep.accuracy))
    return FunctionVector(
        vector=built.at_layer(layer),
        layer=layer,
        method=settings.method,
        library_version=__version__,
        layer_sweep=layer_sweep,
        config=settings,
        **meta,
        **built.fields,
    )
