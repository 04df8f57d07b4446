"""``gate=True`` in a vLLM request: how :func:`~fv_plugin.vllm.steering` sends each vector's condition, and how the
server reads it back. Nothing here imports vLLM.

A gated request steers with each vector only if the request's prompt passes that vector's
:class:`~fv_plugin.condition.Condition` (the rule of :mod:`fv_plugin.condition`, decided at the prompt's last token
and kept for every generated token), as ``fv_plugin.steer(..., gate=True)`` does on Hugging Face. In the request
arguments:

- ``fv_gate``: ``true`` (or 1);
- ``fv_conditions``: base64 of each distinct condition's ``[hidden]`` float32 direction, with
  ``fv_condition_layers`` and ``fv_condition_thresholds`` (one per condition);
- ``fv_vector_conditions``: the index (into ``fv_conditions``) of each ``fv_vectors`` entry's condition, and
  ``fv_head_conditions`` the same for each ``fv_head_values`` entry;
- a vector named by the server (``fv_names``) carries the condition stored in its file.

Two vectors with equal conditions take the same decision on every prompt, so the server gates them as one.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fv_plugin.condition import Condition
from fv_plugin.gating import check_gate, gate_refusal
from fv_plugin.vector import FunctionVector

__all__ = [
    "GATE_ALL_REFUSAL",
    "GATE_KEYS",
    "GateCondition",
    "check_vllm_positions",
    "encode_gate",
    "group_by_condition",
    "parse_conditions",
    "require_condition",
]

GATE_KEYS: tuple[str, ...] = (
    "fv_gate",
    "fv_conditions",
    "fv_condition_layers",
    "fv_condition_thresholds",
    "fv_vector_conditions",
    "fv_head_conditions",
)
GATE_ALL_REFUSAL = (
    "gate=True with positions='all' cannot be served exactly on vLLM (whether given or a vector's own): the gate "
    "decides at the prompt's last token, "
    "and vLLM may run the earlier prompt tokens in earlier steps (chunked prefill, the prefix cache), before the "
    "decision exists; use positions='generated' or 'last_prompt' with gate=True"
)


@dataclass(frozen=True)
class GateCondition:
    """A condition as the server hands it to its workers: ``h · direction >= threshold * ‖h‖`` with ``h`` the
    output of decoder layer ``layer`` at the prompt's last token (``direction``: little-endian float32 bytes)."""

    layer: int
    threshold: float
    direction: bytes

    @classmethod
    def of(cls, condition: Condition) -> GateCondition:
        data = condition.direction.detach().to("cpu", torch.float32).numpy().astype("<f4").tobytes()
        return cls(layer=condition.layer, threshold=condition.threshold, direction=data)

    def direction_array(self) -> np.ndarray:
        return np.frombuffer(self.direction, dtype="<f4").astype(np.float32)

    def to_args(self) -> list[Any]:
        return [self.layer, self.threshold, self.direction]

    @classmethod
    def from_args(cls, value: Sequence[Any]) -> GateCondition:
        layer, threshold, direction = value
        return cls(int(layer), float(threshold), bytes(direction))


def check_vllm_positions(gate: bool, positions: str) -> None:
    """Refuse what the vLLM worker cannot do exactly: a gate with ``positions="all"`` (:data:`GATE_ALL_REFUSAL`)."""
    if not isinstance(gate, bool):
        raise TypeError(f"gate must be True or False, got {gate!r}")
    if gate and positions == "all":
        raise ValueError(GATE_ALL_REFUSAL)


def encode_gate(residual: Sequence[FunctionVector], heads: Sequence[FunctionVector]) -> dict[str, Any]:
    """The gate's request arguments; ``residual``: the vector of each ``fv_vectors`` entry, ``heads``: of each
    ``fv_head_values`` entry.

    Raises:
        ValueError: a vector without a condition (the words ``fv_plugin.steer(..., gate=True)`` uses).
    """
    check_gate([*residual, *heads])
    found: dict[GateCondition, int] = {}
    for fv in [*residual, *heads]:
        found.setdefault(GateCondition.of(fv.condition), len(found))  # type: ignore[arg-type]
    conditions = list(found)
    return {
        "fv_gate": True,
        "fv_conditions": [base64.b64encode(c.direction).decode("ascii") for c in conditions],
        "fv_condition_layers": [c.layer for c in conditions],
        "fv_condition_thresholds": [c.threshold for c in conditions],
        "fv_vector_conditions": [found[GateCondition.of(fv.condition)] for fv in residual],  # type: ignore[arg-type]
        "fv_head_conditions": [found[GateCondition.of(fv.condition)] for fv in heads],  # type: ignore[arg-type]
    }


def _is_on(value: object) -> bool:
    if value is None or value is False or value == 0:
        return False
    if value is True or value == 1:
        return True
    raise TypeError(f"fv_gate must be true or false, got {value!r}")


def _entries(args: Mapping[str, Any], key: str, count: int, kind: type | tuple[type, ...]) -> list[Any]:
    value = args.get(key)
    if value is None and count == 0:
        return []
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{key} must be a list with one value per condition in fv_conditions ({count})")
    if any(isinstance(item, bool) or not isinstance(item, kind) for item in value):
        raise TypeError(f"{key} must hold {getattr(kind, '__name__', 'number')} values, got {value!r}")
    return list(value)


def _conditions(
    args: Mapping[str, Any], decode: Callable[[str, str], torch.Tensor], check_number: Callable[[object, str], float]
) -> list[Condition]:
    texts = args.get("fv_conditions") or []
    if not isinstance(texts, (list, tuple)) or not all(isinstance(text, str) for text in texts):
        raise TypeError("fv_conditions must be a list of base64 strings")
    layers = _entries(args, "fv_condition_layers", len(texts), int)
    thresholds = _entries(args, "fv_condition_thresholds", len(texts), (int, float))
    return [
        Condition(
            layer=layer,
            direction=decode(text, f"fv_conditions[{i}]"),
            threshold=check_number(threshold, f"fv_condition_thresholds[{i}]"),
        )
        for i, (text, layer, threshold) in enumerate(zip(texts, layers, thresholds, strict=True))
    ]


def _picks(args: Mapping[str, Any], key: str, count: int, conditions: Sequence[Condition]) -> list[Condition | None]:
    value = args.get(key)
    if value is None:
        return [None] * count
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{key} must be a list with one condition index per vector entry ({count})")
    picks: list[Condition | None] = []
    for i, index in enumerate(value):
        if isinstance(index, bool) or not isinstance(index, int) or not -1 <= index < len(conditions):
            raise ValueError(f"{key}[{i}] must be an index into fv_conditions (or -1 for none), got {index!r}")
        picks.append(None if index == -1 else conditions[index])
    return picks


def parse_conditions(
    args: Mapping[str, Any],
    residual_count: int,
    head_count: int,
    decode: Callable[[str, str], torch.Tensor],
    check_number: Callable[[object, str], float],
) -> tuple[list[Condition | None], list[Condition | None]] | None:
    """The condition of each ``fv_vectors`` and each ``fv_head_values`` entry, or ``None`` without ``fv_gate``
    (``decode``/``check_number``: the request module's checks, so every argument is refused with the same words).
    """
    if not _is_on(args.get("fv_gate")):
        extra = [key for key in GATE_KEYS[1:] if args.get(key)]
        if extra:
            raise ValueError(f"{', '.join(extra)} given without fv_gate=true")
        return None
    conditions = _conditions(args, decode, check_number)
    residual = _picks(args, "fv_vector_conditions", residual_count, conditions)
    return residual, _picks(args, "fv_head_conditions", head_count, conditions)


def require_condition(condition: Condition | None, what: str) -> Condition:
    """``condition``, or the gate's refusal naming ``what``."""
    if condition is None:
        raise ValueError(gate_refusal(what))
    return condition


def group_by_condition(
    conditions: Sequence[Condition | None],
) -> tuple[tuple[GateCondition, ...], list[int]]:
    """The distinct conditions of a gated request's vectors, and each vector's index among them (-1: ungated)."""
    found: dict[GateCondition, int] = {}
    indices = []
    for condition in conditions:
        if condition is None:
            indices.append(-1)
            continue
        indices.append(found.setdefault(GateCondition.of(condition), len(found)))
    return tuple(found), indices
