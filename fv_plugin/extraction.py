"""Extracting a function vector: head statistics or hidden-state means -> a vector -> the layer it works at.

Every form (:mod:`fv_plugin.forms`) is returned as a :class:`~fv_plugin.FunctionVector` whose ``method`` says
which. A single-layer form's layer is chosen by a zero-shot sweep on the task's validation split unless given;
``method="auto"`` chooses the form, the layer and the strength on validation prompts (:mod:`fv_plugin.auto`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from fv_plugin.activations import task_state_vectors
from fv_plugin.architectures import ArchSpec, resolve_architecture
from fv_plugin.auto import auto_vector
from fv_plugin.condition_fit import with_condition
from fv_plugin.config import METHODS, ExtractionConfig, Method, with_overrides
from fv_plugin.forms import BUILDERS, Built, FormInputs, candidate_layers, check_layers, vector_metadata
from fv_plugin.mediation import HeadStatistics
from fv_plugin.prompts import make_prompts
from fv_plugin.records import Sweep
from fv_plugin.scoring import sweep
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
    """The hidden-state forms at every layer in ``layers`` (default: all) from one pass over the prompts.

    Uses the same prompts as :func:`extract_function_vector` with the same settings, so entry ``L`` equals
    ``extract_function_vector(..., method=method, layer=L)``'s vector. Handy for layer sweeps.
    """
    settings = with_overrides(config or ExtractionConfig(), overrides, what="layer_vectors()")
    resolved = resolve_architecture(model, arch)
    wanted = check_layers(resolved, layers if layers is not None else range(resolved.num_layers))
    per_layer = task_state_vectors(model, tokenizer, task, wanted, method=method, config=settings, arch=arch)
    meta = vector_metadata(resolved, model, task, settings.template)
    return {at: FunctionVector(vector=v, layer=at, method=method, **meta) for at, v in per_layer.items()}


def _layer_sweep(job: FormInputs, built: Built, meta: dict[str, Any]) -> Sweep:
    """Zero-shot validation accuracy with the vector after each candidate layer (at the config's strength)."""
    config = job.config
    valid = make_prompts(job.task, n_shots=0, split="valid", template=config.template, seed=config.seed)

    def make(at: float) -> tuple[list[FunctionVector], float]:
        return [FunctionVector(vector=built.at_layer(int(at)), layer=int(at), **meta)], config.strength

    layers = [float(at) for at in candidate_layers(job)]
    options = {"task": job.task.name, "split": "valid", "batch_size": config.batch_size, "progress": job.progress}
    return sweep(job.model, job.tokenizer, valid, "layer", layers, make, **options)  # type: ignore[arg-type]


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
    progress: bool = False,
    **overrides: Any,
) -> FunctionVector:
    """Extract a function vector for ``task`` from ``model``.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        task: the task (see :func:`~fv_plugin.load_task`).
        config: the settings (:class:`~fv_plugin.ExtractionConfig`); any of its fields may also be given as a
            keyword (``method="heads", k=20``) and overrides it. ``method="auto"`` (the default) chooses the
            form, the layer and the strength on zero-shot validation queries (:mod:`fv_plugin.auto`; every
            candidate's scores are kept in ``fv.selection``); an explicit form with ``layer=None`` chooses the
            layer by a zero-shot sweep on the validation split over ``layers`` (default: every layer).
        statistics: head statistics of the same task and settings (:func:`~fv_plugin.head_statistics`) to reuse
            across forms instead of recomputing them.
        arch: where the decoder layers are, for models fv_plugin does not know.
        progress: show progress bars.

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
    job = FormInputs(model, tokenizer, task, settings, resolved, arch, progress, statistics)
    if settings.method == "auto" and settings.layer is not None:  # single-layer forms tried at that layer only
        job = job.with_config(layers=(settings.layer,))
    fv = auto_vector(job) if settings.method == "auto" else _one_form(job)
    return with_condition(model, tokenizer, task, fv, settings, arch=arch, progress=progress)


def _one_form(job: FormInputs) -> FunctionVector:
    """The vector of the configured form, at the configured layer or at the one its validation sweep chooses."""
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
