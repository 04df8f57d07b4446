"""A vector's condition: which prompts are queries of its task, decided from one hidden state.

A :class:`Condition` is a plain value: a decoder ``layer``, a ``direction`` ``[hidden]`` and a ``threshold``.
With ``h`` the output of decoder layer ``layer`` at a prompt's last token (float32), the prompt passes when

    ``h · direction >= threshold * ‖h‖₂``

(the cosine of ``h`` with ``direction`` times ``‖direction‖``, compared with ``threshold``). The layer is always
below every layer the vector touches (``layer < min(fv.layers)``, and below the heads' layers for head-level
forms), so the decision is taken in the same forward pass before the vector adds anything. Any other stack (a
vLLM worker) evaluates the same rule on the same hidden state. It is learned by
:func:`fv_plugin.condition_fit.learn_condition` and stored in the vector file as ``fv.condition``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Condition", "RateEstimate"]


@dataclass(frozen=True)
class RateEstimate:
    """A measured rate: ``errors`` out of ``n`` prompts, with its 95% Wilson ``interval``."""

    errors: int
    n: int
    interval: tuple[float, float]

    @property
    def rate(self) -> float:
        return self.errors / self.n if self.n else 0.0

    def __str__(self) -> str:
        return f"{self.rate:.3f} [{self.interval[0]:.3f}, {self.interval[1]:.3f}] ({self.errors}/{self.n})"

    def to_dict(self) -> dict[str, Any]:
        return {"errors": self.errors, "n": self.n, "interval": list(self.interval)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RateEstimate:
        low, high = data["interval"]
        return cls(errors=int(data["errors"]), n=int(data["n"]), interval=(float(low), float(high)))


@dataclass(frozen=True, eq=False)
class Condition:
    """Which prompts a vector steers (see the module docstring for the exact rule).

    Attributes:
        layer: the decoder layer whose output is read at the prompt's last token.
        direction: ``[hidden]`` float32.
        threshold: a prompt passes when ``h · direction >= threshold * ‖h‖``.
        false_positive: share of validation negatives that pass (neutral text, chat, other tasks' prompts).
        false_negative: share of validation positives (the task's held-out queries) that do not pass.
        false_positive_by_kind: the false positives per kind of negative prompt.
        n_train: prompts the direction was fitted on (positives, negatives).
        rule: how it was chosen, in words.
    """

    layer: int
    direction: torch.Tensor
    threshold: float
    false_positive: RateEstimate | None = None
    false_negative: RateEstimate | None = None
    false_positive_by_kind: Mapping[str, RateEstimate] = field(default_factory=dict)
    n_train: tuple[int, int] = (0, 0)
    rule: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"Condition.layer must be a non-negative int, got {self.layer!r}")
        d = self.direction
        if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.numel() == 0 or not d.is_floating_point():
            raise ValueError("Condition.direction must be a floating-point tensor of shape [hidden]")
        if d.device.type != "meta" and not bool(torch.isfinite(d).all()):
            raise ValueError("Condition.direction contains NaN or inf values")
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool):
            raise TypeError(f"Condition.threshold must be a number, got {type(self.threshold).__name__}")
        object.__setattr__(self, "direction", d.detach().float())
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "false_positive_by_kind", dict(self.false_positive_by_kind))

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """``h · direction / ‖h‖`` for hidden states ``[..., hidden]`` (float32, on ``hidden``'s device)."""
        h = hidden.float()
        d = self.direction.to(h.device)
        return (h @ d) / h.norm(dim=-1).clamp_min(1e-12)

    def passes(self, hidden: torch.Tensor) -> torch.Tensor:
        """Boolean ``[...]``: which hidden states ``[..., hidden]`` pass."""
        h = hidden.float()
        return (h @ self.direction.to(h.device)) >= self.threshold * h.norm(dim=-1)

    def to(self, device: torch.device | str) -> Condition:
        import dataclasses

        return dataclasses.replace(self, direction=self.direction.to(device))

    def describe(self) -> str:
        """One paragraph for people: layer, rates and intervals."""
        lines = [f"condition at layer {self.layer} (threshold {self.threshold:.4f}; {self.rule})"]
        if self.false_negative is not None:
            lines.append(f"  false negatives (task's held-out queries not steered): {self.false_negative}")
        if self.false_positive is not None:
            lines.append(f"  false positives (other prompts steered): {self.false_positive}")
        lines += [f"    {kind}: {rate}" for kind, rate in sorted(self.false_positive_by_kind.items())]
        return "\n".join(lines)

    def metadata(self) -> dict[str, Any]:
        """Everything but the direction, JSON-ready (the direction is stored as a tensor)."""
        return {
            "layer": self.layer,
            "threshold": self.threshold,
            "false_positive": self.false_positive.to_dict() if self.false_positive else None,
            "false_negative": self.false_negative.to_dict() if self.false_negative else None,
            "false_positive_by_kind": {k: v.to_dict() for k, v in self.false_positive_by_kind.items()},
            "n_train": list(self.n_train),
            "rule": self.rule,
        }

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any], direction: torch.Tensor) -> Condition:
        def rate(value: Any) -> RateEstimate | None:
            return RateEstimate.from_dict(value) if value else None

        kinds = {str(k): RateEstimate.from_dict(v) for k, v in (data.get("false_positive_by_kind") or {}).items()}
        positives, negatives = data.get("n_train") or (0, 0)
        return cls(
            layer=int(data["layer"]),
            direction=direction,
            threshold=float(data["threshold"]),
            false_positive=rate(data.get("false_positive")),
            false_negative=rate(data.get("false_negative")),
            false_positive_by_kind=kinds,
            n_train=(int(positives), int(negatives)),
            rule=str(data.get("rule", "")),
        )
