"""``gate=True``: each row is steered by a vector only if that row's prompt passes the vector's condition.

A gated request is bound as one active steering per vector, each carrying its vector's
:class:`~fv_plugin.condition.Condition`. In the forward pass that holds a row's final prompt token, the hook after
decoder layer ``condition.layer`` (below every layer the vector touches) reads that token's hidden state and
decides, per row, ``h · direction >= threshold * ‖h‖``; the decision multiplies the row's steering strength
(1 or 0) at every position and is kept for the row's generated tokens, until the next prompt. The cost is one
dot product and one norm per row and gated vector, once per prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fv_plugin.condition import Condition
from fv_plugin.hooks import Attachment
from fv_plugin.runtime import ActiveSteering
from fv_plugin.vector import FunctionVector

# A request is fv_plugin.request.SteeringRequest (typed Any here: that module imports this one).

__all__ = ["bind_all", "check_gate", "gate_refusal"]


def gate_refusal(what: str) -> str:
    """The refusal of ``gate=True`` for ``what`` (a vector without a condition), with how to get one; every stack
    (Hugging Face, vLLM) says it in these words."""
    return (
        f"gate=True needs a condition on every vector, but {what} has none. Vectors from "
        "fv_plugin.extract_function_vector carry one (ExtractionConfig(condition=True), the default; not with "
        "`fv extract --no-condition`); for another vector use `dataclasses.replace(fv, "
        "condition=fv_plugin.learn_condition(model, tokenizer, task, fv))`, or steer with gate=False."
    )


def check_gate(vectors: Iterable[FunctionVector]) -> None:
    """Refuse ``gate=True`` for a vector without a condition, saying how to get one."""
    for fv in vectors:
        if fv.condition is None:
            raise ValueError(gate_refusal(f"the vector for task {fv.task!r} (method {fv.method!r}, layer {fv.layer})"))


def _per_vector(request: Any) -> list[tuple[FunctionVector, Any]]:
    """One request per distinct vector, with that vector's weight in each row (0: absent from the row)."""
    vectors: dict[int, FunctionVector] = {}
    for group in request.rows:
        for fv, _ in group:
            vectors.setdefault(id(fv), fv)
    split = []
    for key, fv in vectors.items():
        weights = [sum(w for v, w in group if id(v) == key) for group in request.rows]
        rows = tuple(((fv, w),) if w != 0.0 else () for w in weights)
        split.append((fv, dataclasses.replace(request, rows=rows)))
    return split


def bind_all(
    owner: Attachment,
    request: Any,
    bind: Callable[..., ActiveSteering | None],
    *,
    gate: bool,
    window: tuple[int, int] | None = None,
    schedule: Callable[[int], float] | None = None,
    clock: object | None = None,
    answer_end: torch.Tensor | None = None,
) -> tuple[ActiveSteering, ...]:
    """The active steerings of ``request`` (bound by ``bind``): one (or none), or with ``gate`` one per vector,
    each gated.
    ``answer_end``: the ids that end an answer, for ``positions="answer"``."""
    if not isinstance(gate, bool):
        raise TypeError(f"gate must be True or False, got {gate!r}")
    options: dict[str, Any] = {"window": window, "schedule": schedule, "clock": clock}
    found: list[tuple[ActiveSteering | None, Condition | None]]
    if not gate:
        found = [(bind(owner, request, **options), None)]
    else:
        check_gate(fv for group in request.rows for fv, _ in group)
        found = [(bind(owner, part, **options), fv.condition) for fv, part in _per_vector(request)]
    return tuple(
        dataclasses.replace(steering, gate=condition, answer_end=answer_end)
        for steering, condition in found
        if steering is not None
    )
