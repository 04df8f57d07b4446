"""The methods that make a function vector, one builder each: from head statistics or hidden-state means to a vector.

- ``"heads"`` (the paper): the sum over the top-k heads by AIE of each head's mean activation sent through the
  attention output projection (and, for Gemma 2/3 and OLMo 2, through the norm applied to the attention output
  before it joins the residual stream); added after one layer.
- ``"head_patch"`` (the head-level method): the top-k heads' mean activations, written into those heads' own
  slots at the steered positions, the very intervention the AIE measures (``vector`` holds their sum for
  inspection; ``layer`` is the lowest head's layer).
- ``"head_difference"``: the top-k heads' mean activation with demonstrations minus without (the same queries
  zero-shot), added to those heads' own slots, before the rest of their layer runs.
- ``"difference"``: mean last-token hidden state of ICL prompts minus that of zero-shot prompts at the layer.
- ``"layer_mean"``: mean last-token hidden state of ICL prompts at the layer (the task-vector baseline).

Each builder returns a :class:`Built`: the vector at any layer (single-layer methods) or at its heads' own layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fv_plugin.activations import task_state_vectors
from fv_plugin.architectures import ArchSpec, ResolvedArch
from fv_plugin.config import ExtractionConfig
from fv_plugin.heads import head_vector
from fv_plugin.mediation import HeadStatistics, head_statistics
from fv_plugin.tasks import Task

__all__ = ["BUILDERS", "HEAD_METHODS", "Built", "MethodInputs", "check_layers", "vector_metadata"]

HEAD_METHODS: tuple[str, ...] = ("heads", "head_patch", "head_difference")  # made from head statistics


def vector_metadata(resolved: ResolvedArch, model: nn.Module, task: Task, template: str) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "model_type": resolved.model_type,
        "hidden_size": resolved.hidden_size,
        "model_name": str(getattr(config, "_name_or_path", "") or "") or None,
        "task": task.name,
        "prompt_template": template,
    }


def check_layers(resolved: ResolvedArch, layers: Sequence[int]) -> list[int]:
    for at in layers:
        if not 0 <= at < resolved.num_layers:
            raise ValueError(f"layer {at} is out of range: the model has {resolved.num_layers} layers")
    return list(layers)


@dataclass(frozen=True)
class MethodInputs:
    """One extraction: what it runs on and with which settings (``statistics``: head statistics to reuse)."""

    model: nn.Module
    tokenizer: Any
    task: Task
    config: ExtractionConfig
    resolved: ResolvedArch
    arch: ArchSpec | None
    progress: bool | None
    statistics: HeadStatistics | None

    def head_statistics(self) -> HeadStatistics:
        """The given statistics, or those the forms to build need, computed once: zero-shot head means only for
        ``head_difference``, and the hidden-state means of the candidate layers (same passes) for ``difference``;
        with ``config.condition``, each zero-shot prompt's states below the last layer too (the condition's
        positives, kept from the same pass)."""
        if self.statistics is not None:
            return self.statistics
        forms = self.config.auto_methods if self.config.method == "auto" else (self.config.method,)
        states = "difference" in forms or "layer_mean" in forms
        return head_statistics(
            self.model,
            self.tokenizer,
            self.task,
            self.config,
            arch=self.arch,
            progress=self.progress,
            zero_shot="head_difference" in forms,
            layers=candidate_layers(self) if states else (),
            zero_rows=range(self.resolved.num_layers - 1) if self.config.condition else (),
        )

    def needs_head_statistics(self) -> bool:
        """Whether the method (or one ``method="auto"`` chooses among) is made from head statistics."""
        forms = self.config.auto_methods if self.config.method == "auto" else (self.config.method,)
        return any(f in HEAD_METHODS for f in forms)

    def with_config(self, **changes: Any) -> MethodInputs:
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))


@dataclass(frozen=True)
class Built:
    """A method's vector at any layer (``at_layer``), its own layer if it has one, and its metadata fields."""

    at_layer: Callable[[int], torch.Tensor]
    own_layer: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def _head_fields(stats: HeadStatistics, k: int) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    heads = stats.top_heads(k)
    scores = tuple(float(stats.aie[h]) for h in heads)
    return heads, {"heads": tuple(heads), "head_scores": scores, "k": k, "aie": stats.aie}


def _build_heads(job: MethodInputs) -> Built:
    stats = job.head_statistics()
    heads, fields = _head_fields(stats, job.config.k)
    vector = head_vector(job.model, stats.means, heads, arch=job.arch)
    return Built(at_layer=lambda _: vector, fields=fields)


def _build_head_patch(job: MethodInputs) -> Built:
    stats = job.head_statistics()
    heads, fields = _head_fields(stats, job.config.k)
    vector = head_vector(job.model, stats.means, heads, arch=job.arch)
    fields["head_values"] = torch.stack([stats.means[h] for h in heads])
    return Built(at_layer=lambda _: vector, own_layer=min(h[0] for h in heads), fields=fields)


def _build_head_difference(job: MethodInputs) -> Built:
    stats = job.head_statistics()
    if stats.zero_means is None:
        raise ValueError("head_difference needs zero-shot head means: make the statistics with head_statistics()")
    heads, fields = _head_fields(stats, job.config.k)
    vector = head_vector(job.model, stats.means, heads, arch=job.arch)
    vector = vector - head_vector(job.model, stats.zero_means, heads, arch=job.arch)
    fields["head_values"] = torch.stack([stats.means[h] - stats.zero_means[h] for h in heads])
    fields["head_mode"] = "add"
    return Built(at_layer=lambda _: vector, own_layer=min(h[0] for h in heads), fields=fields)


def _build_states(job: MethodInputs, method: Literal["difference", "layer_mean"]) -> Built:
    wanted = [job.config.layer] if job.config.layer is not None else candidate_layers(job)
    stats = job.statistics
    if stats is not None and all(at in stats.states and at in stats.zero_states for at in wanted):
        # recorded in the head statistics' passes
        zero = method == "difference"
        per_layer = {at: stats.states[at] - stats.zero_states[at] if zero else stats.states[at] for at in wanted}
    else:
        per_layer = task_state_vectors(
            job.model,
            job.tokenizer,
            job.task,
            wanted,
            method=method,
            config=job.config,
            arch=job.arch,
            progress=job.progress,
        )
    return Built(at_layer=per_layer.__getitem__)


BUILDERS: dict[str, Callable[[MethodInputs], Built]] = {
    "heads": _build_heads,
    "head_patch": _build_head_patch,
    "head_difference": _build_head_difference,
    "difference": lambda job: _build_states(job, "difference"),
    "layer_mean": lambda job: _build_states(job, "layer_mean"),
}


def candidate_layers(job: MethodInputs) -> list[int]:
    layers = job.config.layers if job.config.layers is not None else range(job.resolved.num_layers)
    return check_layers(job.resolved, layers)
