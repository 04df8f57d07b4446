"""Running experiments: every measurement of a set of tasks on one model (``fv eval``) or two (``fv compare``).

This module computes; :mod:`fv_plugin.report` writes what it computed (JSON, PNG, Markdown).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from fv_plugin.analysis import TokenScore, similarity_matrix, top_tokens
from fv_plugin.architectures import resolve_architecture
from fv_plugin.compare import ModelComparison, compare_models
from fv_plugin.config import DEFAULT_KS, DEFAULT_STRENGTHS, MODES, PROTOCOLS, EvalConfig, ExtractionConfig
from fv_plugin.evaluation import EvalResult, evaluate, icl_correct_inputs, sweep_k, sweep_layers, sweep_strength
from fv_plugin.extraction import extract_function_vector, layer_vectors
from fv_plugin.mediation import HeadStatistics, head_statistics
from fv_plugin.records import Sweep
from fv_plugin.side_effects import Specificity, TextEffects, specificity, text_effects
from fv_plugin.tasks import Task
from fv_plugin.vector import FunctionVector

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_STRENGTHS",
    "EvalReport",
    "ExperimentConfig",
    "TaskReport",
    "compare_tasks",
    "evaluate_tasks",
]


@dataclass(frozen=True)
class ExperimentConfig:
    """What :func:`evaluate_tasks` measures.

    Attributes:
        extraction: how vectors missing from ``vectors`` are extracted (its ``n_shots``, ``seed`` and
            ``template`` also make the evaluation prompts).
        modes: prompt modes scored with and without the vector.
        n: test prompts per mode (default: all); n_natural: test queries in natural mode (each with every
            natural template).
        strengths, ks: the strength and number-of-heads sweeps on the test split (``ks`` needs ``heads``).
        heads: run the paper's head analysis (the AIE map, the k sweep and the head-based vector).
        layer_sweep_test: sweep layers on the test split, every ``layer_step``-th layer.
        protocols: ``"all"`` (every test query) and/or ``"icl_correct"`` (the paper's: only the queries the model
            answers correctly with clean ICL), each reported with 95% intervals.
        side_effects: measure each vector on neutral text at the sweep's strengths (KL, perplexity,
            degeneration; :func:`~fv_plugin.side_effects.text_effects`).
        specificity: apply every task's vector to every task's zero-shot and ICL prompts.
    """

    extraction: ExtractionConfig = ExtractionConfig()
    modes: tuple[str, ...] = MODES
    n: int | None = None
    n_natural: int | None = 12
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    ks: tuple[int, ...] = DEFAULT_KS
    heads: bool = True
    layer_sweep_test: bool = True
    layer_step: int = 1
    protocols: tuple[str, ...] = PROTOCOLS
    side_effects: bool = True
    specificity: bool = True

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES] + [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise ValueError(f"unknown modes or protocols {bad}; choose from {MODES} and {PROTOCOLS}")
        if self.layer_step < 1:
            raise ValueError(f"layer_step must be >= 1, got {self.layer_step}")

    def eval_config(self, mode: str = "zero_shot") -> EvalConfig:
        """The evaluation settings of ``mode`` (prompts made like the extraction's)."""
        ex = self.extraction
        n = self.n_natural if mode == "natural" else self.n
        return EvalConfig(mode=mode, n=n, n_shots=ex.n_shots, seed=ex.seed, template=ex.template)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TaskReport:
    """Everything measured for one task.

    ``results`` maps a mode to its unsteered and steered :class:`EvalResult` on every test query;
    ``icl_correct`` holds the queries the model answers correctly with clean ICL (the paper's protocol scores
    only those: :meth:`results_for`). ``heads_vector`` is the paper's head-based vector (with the AIE matrix)
    when the head analysis ran; ``text`` the vector's effects on neutral text.
    """

    task: str
    vector: FunctionVector
    results: dict[str, tuple[EvalResult, EvalResult]]
    strength: Sweep | None = None
    layers: Sweep | None = None
    k: Sweep | None = None
    heads_vector: FunctionVector | None = None
    tokens: tuple[TokenScore, ...] = ()
    head_tokens: tuple[TokenScore, ...] = ()
    seconds: float = 0.0
    icl_correct: frozenset[str] | None = None
    text: TextEffects | None = None

    def results_for(self, protocol: str) -> dict[str, tuple[EvalResult, EvalResult]]:
        """``results`` under ``protocol`` (``"all"`` or ``"icl_correct"``)."""
        if protocol == "all":
            return self.results
        if self.icl_correct is None:
            raise ValueError(f"the {protocol!r} protocol was not measured for {self.task!r}")
        keep = self.icl_correct
        return {mode: (b.restricted(keep), s.restricted(keep)) for mode, (b, s) in self.results.items()}


@dataclass(frozen=True)
class EvalReport:
    """One model's :class:`TaskReport` per task, the cosine similarity of the tasks' vectors and, when measured,
    every vector on every task (``specificity``)."""

    model: str
    tasks: tuple[TaskReport, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    specificity: Specificity | None = None

    @property
    def similarity(self) -> torch.Tensor:
        return similarity_matrix([t.vector for t in self.tasks])


def _results(
    model: nn.Module, tokenizer: Any, task: Task, fv: FunctionVector, config: ExperimentConfig
) -> dict[str, tuple[EvalResult, EvalResult]]:
    results = {}
    for mode in config.modes:
        settings = config.eval_config(mode)
        results[mode] = (
            evaluate(model, tokenizer, task, settings),
            evaluate(model, tokenizer, task, settings, vectors=[fv]),
        )
    return results


def _test_layer_sweep(
    model: nn.Module, tokenizer: Any, task: Task, fv: FunctionVector, config: ExperimentConfig
) -> Sweep | None:
    if not config.layer_sweep_test or fv.is_head_patch or fv.layer_vectors is not None:
        return None
    if fv.method in ("difference", "layer_mean"):  # re-made at each layer
        form = cast(Literal["difference", "layer_mean"], fv.method)
        per_layer = layer_vectors(model, tokenizer, task, config.extraction, method=form)
        at = sorted(per_layer)[:: config.layer_step]
        return sweep_layers(model, tokenizer, task, per_layer.__getitem__, at, n=config.n)
    layers = range(0, resolve_architecture(model).num_layers, config.layer_step)
    return sweep_layers(model, tokenizer, task, fv, layers, n=config.n)  # the same vector at every layer


@dataclass(frozen=True)
class _HeadAnalysis:
    vector: FunctionVector
    k: Sweep | None
    tokens: tuple[TokenScore, ...]


def _head_analysis(
    model: nn.Module, tokenizer: Any, task: Task, layer: int, config: ExperimentConfig
) -> _HeadAnalysis | None:
    if not config.heads:
        return None
    settings = dataclasses.replace(config.extraction, method="heads", layer=layer)
    stats: HeadStatistics = head_statistics(model, tokenizer, task, settings)
    heads_fv = extract_function_vector(model, tokenizer, task, settings, statistics=stats)
    usable = [k for k in config.ks if k <= stats.aie.numel()]
    k_sweep = sweep_k(model, tokenizer, task, stats, usable, layer=layer, n=config.n) if usable else None
    return _HeadAnalysis(heads_fv, k_sweep, tuple(top_tokens(model, tokenizer, heads_fv, 10)))


def _task_report(
    model: nn.Module, tokenizer: Any, task: Task, fv: FunctionVector | None, config: ExperimentConfig
) -> TaskReport:
    start = time.perf_counter()
    if fv is None:
        fv = extract_function_vector(model, tokenizer, task, config.extraction)
    strength = None
    if config.strengths:
        strength = sweep_strength(model, tokenizer, task, fv, config.strengths, n=config.n)
    heads = _head_analysis(model, tokenizer, task, fv.layer, config)
    icl_correct = None
    if "icl_correct" in config.protocols:
        icl_correct = frozenset(icl_correct_inputs(model, tokenizer, task, config.eval_config("icl")))
    text = None
    if config.side_effects:
        strengths = tuple(s for s in config.strengths if s > 0) or (1.0,)
        text = text_effects(model, tokenizer, [fv], strengths)
    return TaskReport(
        task=task.name,
        vector=fv,
        results=_results(model, tokenizer, task, fv, config),
        strength=strength,
        layers=_test_layer_sweep(model, tokenizer, task, fv, config),
        k=heads.k if heads else None,
        heads_vector=heads.vector if heads else None,
        tokens=tuple(top_tokens(model, tokenizer, fv, 10)),
        head_tokens=heads.tokens if heads else (),
        seconds=time.perf_counter() - start,
        icl_correct=icl_correct,
        text=text,
    )


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[Task],
    config: ExperimentConfig = ExperimentConfig(),
    *,
    model_name: str,
    vectors: Mapping[str, FunctionVector] | None = None,
    progress: bool = False,
    on_task: Callable[[EvalReport], None] | None = None,
) -> EvalReport:
    """Extract (or take from ``vectors``) each task's vector and measure it in every way this package knows.

    Args:
        config: what to measure (:class:`ExperimentConfig`).
        model_name: the name the report gives the model.
        vectors: vectors per task name; a task without one gets one extracted with ``config.extraction``.
        on_task: called with the report so far after each task (e.g. to write partial results).
    """
    reports: list[TaskReport] = []
    settings = config.to_dict()
    for task in tqdm(tasks, desc="tasks", disable=not progress):
        reports.append(_task_report(model, tokenizer, task, (vectors or {}).get(task.name), config))
        if on_task is not None:
            on_task(EvalReport(model=model_name, tasks=tuple(reports), settings=settings))
    spec = None
    if config.specificity and len(tasks) > 1:
        chosen = {t.task: t.vector for t in reports}
        spec = specificity(model, tokenizer, tasks, chosen, modes=("zero_shot", "icl"), config=config.eval_config())
    report = EvalReport(model=model_name, tasks=tuple(reports), settings=settings, specificity=spec)
    if on_task is not None and spec is not None:
        on_task(report)
    return report


def _fill_vectors(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[Task],
    given: dict[str, FunctionVector],
    heads: dict[str, FunctionVector] | None,
    config: ExtractionConfig,
) -> None:
    """Extract each task's default vector (and, with ``heads``, its head-based vector) where none was given."""
    for task in tasks:
        if task.name not in given:
            given[task.name] = extract_function_vector(model, tokenizer, task, config)
        if heads is not None and task.name not in heads:
            layer = given[task.name].layer
            heads[task.name] = extract_function_vector(model, tokenizer, task, config, method="heads", layer=layer)


def compare_tasks(
    side_a: tuple[nn.Module, Any, str],
    side_b: tuple[nn.Module, Any, str],
    tasks: Sequence[Task],
    *,
    vectors: tuple[dict[str, FunctionVector], dict[str, FunctionVector]] | None = None,
    head_vectors: tuple[dict[str, FunctionVector], dict[str, FunctionVector]] | None = None,
    extraction: ExtractionConfig = ExtractionConfig(method="difference"),
    ridge: float = 1e-3,
    n: int | None = None,
) -> tuple[ModelComparison, dict[str, FunctionVector], dict[str, FunctionVector]]:
    """``fv compare``: fill in the vectors not given (per side ``(model, tokenizer, name)``) and compare.

    A linear map carries one layer's residual stream, so the vectors must be made by single-layer methods
    (``extraction`` makes ``difference`` vectors by default).

    ``head_vectors=None`` skips the head-based vectors. Returns the comparison and each side's vectors.
    """
    given = (dict(vectors[0]), dict(vectors[1])) if vectors else ({}, {})
    heads = (dict(head_vectors[0]), dict(head_vectors[1])) if head_vectors is not None else (None, None)
    for (model, tokenizer, _), mine, head_set in zip((side_a, side_b), given, heads, strict=True):
        _fill_vectors(model, tokenizer, tasks, mine, head_set, extraction)
    comparison = compare_models(
        side_a[0],
        side_a[1],
        side_b[0],
        side_b[1],
        tasks,
        given[0],
        given[1],
        head_vectors_a=heads[0] or None,
        head_vectors_b=heads[1] or None,
        names=(side_a[2], side_b[2]),
        ridge=ridge,
        n=n,
    )
    return comparison, given[0], given[1]
