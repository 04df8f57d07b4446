"""Weighted function vectors merged into what is added after each layer: one rule for every runtime.

Hugging Face steering (:mod:`fv_plugin.request`), the vLLM plugin (:mod:`fv_plugin.vllm.requests`) and llama.cpp
export (:mod:`fv_plugin.export`) all take vectors with signed weights and add, after each layer, the weighted sum
of the vectors' parts at that layer. :func:`merge` computes that sum, once, for all of them:

- ``normalize="absolute"``: ``delta[layer] = sum(weight * part)``;
- ``normalize="relative"``: ``delta[layer] = sum(weight * part / |part|)``, and the runtime multiplies it by the
  norm of the hidden state it is added to (per token), so a weight is a fraction of that norm.

The runtime then multiplies ``delta`` by the strength (and positions, window, schedule) of the call. Sums are
float64 on the CPU; a vector with weight 0 adds nothing and names no layer.

This module imports nothing else of the package: vectors are read through :class:`Additive`, which
:class:`~fv_plugin.FunctionVector` satisfies, so that modules the vector class itself calls (``export``) can
merge without importing it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, get_args, runtime_checkable

import torch

__all__ = ["NORMALIZE_MODES", "Additive", "Merged", "Normalize", "check_normalize", "check_number", "merge", "unit"]

Normalize = Literal["absolute", "relative"]
NORMALIZE_MODES: tuple[Normalize, ...] = get_args(Normalize)


@runtime_checkable
class Additive(Protocol):
    """What a merge reads of a vector: its parts per layer, and whether it is a head-level vector instead."""

    @property
    def is_head_patch(self) -> bool: ...

    def parts(self) -> dict[int, torch.Tensor]: ...


def check_number(value: object, what: str) -> float:
    """``value`` as a finite float; ``what`` names it in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return float(value)


def check_normalize(value: object) -> Normalize:
    """``value`` if it is one of :data:`NORMALIZE_MODES`."""
    for mode in NORMALIZE_MODES:
        if value == mode:
            return mode
    raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {value!r}")


@dataclass(frozen=True)
class Merged:
    """What a weighted list of vectors adds after each layer, before the call's strength.

    Attributes:
        deltas: ``{layer: [hidden] float64 CPU tensor}``, layers in increasing order, only the layers some vector
            with a non-zero weight reaches.
        relative: whether the runtime multiplies each delta by the norm of the hidden state it is added to
            (``normalize="relative"``).
    """

    deltas: Mapping[int, torch.Tensor]
    relative: bool

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.deltas)


def unit(part: torch.Tensor) -> torch.Tensor:
    """``part`` divided by its norm, in float64 on the CPU (a zero part stays zero): the relative direction."""
    values = part.detach().to("cpu", torch.float64)
    return values / values.norm().clamp_min(1e-12)


def merge(pairs: Iterable[tuple[Additive, float]], normalize: Normalize = "absolute") -> Merged:
    """Sum ``weight * part`` (``weight * part / |part|`` for ``"relative"``) per layer over ``(vector, weight)``.

    Raises:
        ValueError: a head-level vector (it writes head activations; it is not added to the residual stream), or
            an unknown ``normalize``.

    Example:
        >>> import torch
        >>> from fv_plugin import FunctionVector
        >>> a = FunctionVector.from_layers({1: torch.ones(2), 3: torch.ones(2)})
        >>> b = FunctionVector(vector=torch.ones(2), layer=3)
        >>> {layer: delta.tolist() for layer, delta in merge([(a, 2.0), (b, -0.5)]).deltas.items()}
        {1: [2.0, 2.0], 3: [1.5, 1.5]}
    """
    relative = check_normalize(normalize) == "relative"
    sums: dict[int, torch.Tensor] = {}
    for vector, weight in pairs:
        if vector.is_head_patch:
            raise ValueError(
                "head-level function vectors write attention-head activations and are not merged into an added "
                "vector; merge dataclasses.replace(fv, head_values=None) to add their summed output instead"
            )
        if weight == 0.0:
            continue
        for layer, part in vector.parts().items():
            direction = unit(part) if relative else part.detach().to("cpu", torch.float64)
            sums[layer] = sums[layer] + weight * direction if layer in sums else weight * direction
    return Merged(deltas={layer: sums[layer] for layer in sorted(sums)}, relative=relative)
