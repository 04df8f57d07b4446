"""Extracting a function vector: head statistics or hidden-state means -> a vector -> the layer it works at.

Forms, all returned as a :class:`~fv_plugin.FunctionVector` (``method`` says which), each made by one builder:

- ``"heads"`` (the paper): the sum over the top-k heads by AIE of each head's mean activation sent through the
  attention output projection (and, for Gemma 2/3 and OLMo 2, through the norm applied to the attention output
  before it joins the residual stream).
- ``"head_patch"`` (the head-level form): the top-k heads' mean activations, written into those heads' own
  slots at the steered positions, the very intervention the AIE measures (``vector`` holds their sum for
  inspection; ``layer`` is the lowest head's layer; no layer sweep).
- ``"head_difference"``: the top-k heads' mean activation with demonstrations minus without (the same queries
  zero-shot), added to those heads' own slots, before the rest of their layer runs (no layer sweep).
- ``"difference"``: mean last-token hidden state of ICL prompts minus that of zero-shot prompts at the layer.
- ``"layer_mean"``: mean last-token hidden state of ICL prompts at the layer (the task-vector baseline).

The layer is chosen by a zero-shot sweep on the task's validation split unless given.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fv_plugin.activations import task_state_vectors
from fv_plugin.architectures import ArchSpec, ResolvedArch, resolve_architecture
from fv_plugin.config import METHODS, ExtractionConfig, Method, with_overrides
from fv_plugin.heads import head_vector
from fv_plugin.mediation import HeadStatistics, head_statistics
from fv_plugin.prompts import make_prompts
from fv_plugin.records import Sweep
from fv_plugin.scoring import sweep
from fv_plugin.tasks import Task
from fv_plugin.vector import FunctionVector
from fv_plugin.version import __version__

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "Method",
    "default_method",
    "extract_function_vector",
    "layer_vectors",
]

logger = logging.getLogger(__name__)

# The form ``method="auto"`` picks, per ``config.model_type``, from ``fv bench quality`` on the embedded models
# (first-token zero-shot accuracy on the 12 built-in tasks' test splits; README, "Which form by default"). On
# both, the ICL-minus-zero-shot difference beat the paper's head-based vector by a wide margin, so it is also
# the default for families not measured yet.
DEFAULT_METHODS: dict[str, Method] = {"llama": "difference", "gemma3_text": "difference"}
FALLBACK_METHOD: Method = "difference"


def default_method(model_type: str) -> Method:
    """The form ``method="auto"`` uses for a model family."""
    return DEFAULT_METHODS.get(model_type, FALLBACK_METHOD)


def _metadata(resolved: ResolvedArch, model: nn.Module, task: Task, template: str) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "model_type": resolved.model_type,
        "hidden_size": resolved.hidden_size,
        "model_name": str(getattr(config, "_name_or_path", "") or "") or None,
        "task": task.name,
        "prompt_template": template,
    }


def _check_layers(resolved: ResolvedArch, layers: Sequence[int]) -> list[int]:
    for at in layers:
        if not 0 <= at < resolved.num_layers:
            raise ValueError(f"layer {at} is out of range: the model has {resolved.num_layers} layers")
    return list(layers)


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
    wanted = _check_layers(resolved, layers if layers is not None else range(resolved.num_layers))
    per_layer = task_state_vectors(model, tokenizer, task, wanted, method=method, config=settings, arch=arch)
    meta = _metadata(resolved, model, task, settings.template)
    return {at: FunctionVector(vector=v, layer=at, method=method, **meta) for at, v in per_layer.items()}


@dataclass(frozen=True)
class _Job:
    """One extraction: what it runs on and with which settings."""

    model: nn.Module
    tokenizer: Any
    task: Task
    config: ExtractionConfig
    resolved: ResolvedArch
    arch: ArchSpec | None
    progress: bool
    statistics: HeadStatistics | None

    def head_statistics(self) -> HeadStatistics:
        if self.statistics is not None:
            return self.statistics
        return head_statistics(
            self.model, self.tokenizer, self.task, self.config, arch=self.arch, progress=self.progress
        )


@dataclass(frozen=True)
class _Built:
    """A form's vector at any layer (``at_layer``), its own layer if it has one, and its metadata fields."""

    at_layer: Callable[[int], torch.Tensor]
    own_layer: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def _head_fields(stats: HeadStatistics, k: int) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    heads = stats.top_heads(k)
    scores = tuple(float(stats.aie[h]) for h in heads)
    return heads, {"heads": tuple(heads), "head_scores": scores, "k": k, "aie": stats.aie}


def _build_heads(job: _Job) -> _Built:
    stats = job.head_statistics()
    heads, fields = _head_fields(stats, job.config.k)
    vector = head_vector(job.model, stats.means, heads, arch=job.arch)
    return _Built(at_layer=lambda _: vector, fields=fields)


def _build_head_patch(job: _Job) -> _Built:
    stats = job.head_statistics()
    heads, fields = _head_fields(stats, job.config.k)
    vector = head_vector(job.model, stats.means, heads, arch=job.arch)
    fields["head_values"] = torch.stack([stats.means[h] for h in heads])
    return _Built(at_layer=lambda _: vector, own_layer=min(h[0] for h in heads), fields=fields)


def _build_head_difference(job: _Job) -> _Built:
    stats = job.head_statistics()
    if stats.zero_means is None:
        raise ValueError("head_difference needs zero-shot head means: make the statistics with head_statistics()")
    heads, fields = _head_fields(stats, job.config.k)
    vector = head_vector(job.model, stats.means, heads, arch=job.arch)
    vector = vector - head_vector(job.model, stats.zero_means, heads, arch=job.arch)
    fields["head_values"] = torch.stack([stats.means[h] - stats.zero_means[h] for h in heads])
    fields["head_mode"] = "add"
    return _Built(at_layer=lambda _: vector, own_layer=min(h[0] for h in heads), fields=fields)


def _build_states(job: _Job, method: Literal["difference", "layer_mean"]) -> _Built:
    wanted = [job.config.layer] if job.config.layer is not None else _candidate_layers(job)
    per_layer = task_state_vectors(
        job.model, job.tokenizer, job.task, wanted, method=method, config=job.config, arch=job.arch
    )
    return _Built(at_layer=per_layer.__getitem__)


BUILDERS: dict[str, Callable[[_Job], _Built]] = {
    "heads": _build_heads,
    "head_patch": _build_head_patch,
    "head_difference": _build_head_difference,
    "difference": lambda job: _build_states(job, "difference"),
    "layer_mean": lambda job: _build_states(job, "layer_mean"),
}


def _candidate_layers(job: _Job) -> list[int]:
    layers = job.config.layers if job.config.layers is not None else range(job.resolved.num_layers)
    return _check_layers(job.resolved, layers)


def _layer_sweep(job: _Job, built: _Built, meta: dict[str, Any]) -> Sweep:
    """Zero-shot validation accuracy with the vector after each candidate layer (at the config's strength)."""
    config = job.config
    valid = make_prompts(job.task, n_shots=0, split="valid", template=config.template, seed=config.seed)

    def make(at: float) -> tuple[list[FunctionVector], float]:
        return [FunctionVector(vector=built.at_layer(int(at)), layer=int(at), **meta)], config.strength

    layers = [float(at) for at in _candidate_layers(job)]
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
            keyword (``method="heads", k=20``) and overrides it. ``method="auto"`` (the default) uses the form
            measured best for the model's family (:data:`DEFAULT_METHODS`); ``layer=None`` chooses the layer by
            a zero-shot sweep on the validation split over ``layers`` (default: every layer).
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
    if settings.method == "auto":
        settings = dataclasses.replace(settings, method=default_method(resolved.model_type))
    _check_layers(resolved, [settings.layer] if settings.layer is not None else [])
    _check_statistics(statistics, task, settings)
    job = _Job(model, tokenizer, task, settings, resolved, arch, progress, statistics)
    built = BUILDERS[settings.method](job)
    meta = _metadata(resolved, model, task, settings.template)
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
