"""Public steering entry points: :func:`steer`, :class:`FunctionVectorProcessor` and :class:`SteeredModel`.

All three validate their input against the model first (so a bad request leaves the model untouched), then
make an :class:`~fv_plugin.runtime.ActiveSteering` active for the current call only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import nn
from transformers import LogitsProcessor

from fv_plugin.architectures import ArchSpec, ResolvedArch, resolve_architecture
from fv_plugin.hooks import Attachment, attach, attached, get_attachment
from fv_plugin.positions import POSITION_MODES, Positions
from fv_plugin.runtime import ActiveSteering, HeadPatch, SteeringEntry, activate, current_call
from fv_plugin.vector import FunctionVector

__all__ = [
    "NORMALIZE_MODES",
    "FunctionVectorProcessor",
    "Normalize",
    "SteeredModel",
    "VectorLike",
    "check_number",
    "check_options",
    "check_strength",
    "check_vector",
    "split_vectors",
    "steer",
]

Normalize = Literal["absolute", "relative"]
VectorLike: TypeAlias = "FunctionVector | tuple[FunctionVector, float]"
Strength: TypeAlias = "float | torch.Tensor"
NORMALIZE_MODES: tuple[str, ...] = ("absolute", "relative")


def check_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return float(value)


def check_strength(strength: object) -> float | torch.Tensor:
    if isinstance(strength, torch.Tensor):
        if strength.dim() == 0:
            return check_number(float(strength), "strength")
        if strength.dim() != 1 or strength.numel() == 0:
            raise ValueError(f"a strength tensor must have shape [batch], got {tuple(strength.shape)}")
        if not bool(torch.isfinite(strength).all()):
            raise ValueError("strength contains NaN or inf values")
        return strength.detach().float()
    return check_number(strength, "strength")


def check_options(positions: str, normalize: str) -> None:
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")


def split_vectors(vectors: Sequence[object]) -> list[tuple[FunctionVector, float]]:
    pairs: list[tuple[FunctionVector, float]] = []
    for item in vectors:
        if isinstance(item, FunctionVector):
            pairs.append((item, 1.0))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], FunctionVector):
            pairs.append((item[0], check_number(item[1], "a vector's strength")))
        else:
            raise TypeError(
                f"vectors must be FunctionVector objects or (FunctionVector, strength) pairs, got {type(item).__name__}"
            )
    return pairs


def check_vector(fv: FunctionVector, arch: ResolvedArch) -> None:
    if fv.size != arch.hidden_size:
        raise ValueError(
            f"function vector has size {fv.size} but the model's hidden size is {arch.hidden_size}; "
            "was it made on another model?"
        )
    if fv.hidden_size is not None and fv.hidden_size != arch.hidden_size:
        raise ValueError(f"function vector was saved for hidden size {fv.hidden_size}, model has {arch.hidden_size}")
    if fv.model_type is not None and fv.model_type != arch.model_type:
        raise ValueError(
            f"function vector was made on a {fv.model_type!r} model but this model is {arch.model_type!r}; "
            "map it across models first or rebuild it with metadata model_type=None to force it"
        )
    if not 0 <= fv.layer < arch.num_layers:
        raise ValueError(f"function vector layer {fv.layer} is out of range: the model has {arch.num_layers} layers")
    if fv.vector.device.type == "meta" or not bool(torch.isfinite(fv.vector).all()):
        raise ValueError("function vector contains NaN, inf or meta values")
    if fv.head_values is not None and fv.heads is not None:
        heads = arch.num_heads
        for layer, head in fv.heads:
            if not 0 <= layer < arch.num_layers or heads is None or not 0 <= head < heads:
                raise ValueError(f"head ({layer}, {head}) of the function vector does not exist in this model")


def _resolve(model: nn.Module, arch: ArchSpec | None) -> ResolvedArch:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a transformers model (torch.nn.Module), got {type(model).__name__}")
    owner = get_attachment(model)
    return owner.arch if owner is not None else resolve_architecture(model, arch)


@dataclass(frozen=True)
class _Request:
    """A steering request validated against one model, not yet bound to its hooks."""

    pairs: tuple[tuple[FunctionVector, float], ...]
    strength: float | torch.Tensor
    positions: str
    normalize: str


def _validate(
    model: nn.Module,
    vectors: Sequence[object],
    *,
    strength: object,
    positions: str,
    normalize: str,
    arch: ArchSpec | None,
) -> _Request:
    """Check everything against ``model`` before touching it."""
    check_options(positions, normalize)
    checked_strength = check_strength(strength)
    pairs = split_vectors(vectors)
    resolved = _resolve(model, arch)
    for fv, _ in pairs:
        check_vector(fv, resolved)
        if fv.is_head_patch and normalize == "relative":
            raise ValueError("normalize='relative' applies to added vectors, not to head-level (head_patch) vectors")
    return _Request(tuple(pairs), checked_strength, positions, normalize)


def _bind(
    owner: Attachment,
    request: _Request,
    *,
    window: tuple[int, int] | None = None,
    schedule: Callable[[int], float] | None = None,
    clock: object | None = None,
) -> ActiveSteering | None:
    """Build the active steering for an attached model (``None`` when it would add nothing)."""
    pairs, checked_strength = request.pairs, request.strength
    positions, normalize = request.positions, request.normalize
    if not pairs or (isinstance(checked_strength, float) and checked_strength == 0.0):
        return None
    by_layer: dict[int, list[SteeringEntry]] = {}
    patches: dict[int, list[HeadPatch]] = {}
    for fv, weight in pairs:
        if weight == 0.0:
            continue
        if fv.head_values is not None and fv.heads is not None:
            if not owner.head_hooks:
                raise ValueError(
                    "this model's attention output projections were not found; head-level steering "
                    "needs ArchSpec(attn=..., out_proj=...)"
                )
            for (layer, head), value in zip(fv.heads, fv.head_values, strict=True):
                patches.setdefault(layer, []).append(HeadPatch(head=head, value=value, weight=weight))
        else:
            by_layer.setdefault(fv.layer, []).append(SteeringEntry(vector=fv.vector, layer=fv.layer, weight=weight))
    if not by_layer and not patches:
        return None
    return ActiveSteering(
        owner=owner,
        by_layer={layer: tuple(entries) for layer, entries in by_layer.items()},
        head_patches={layer: tuple(items) for layer, items in patches.items()},
        strength=checked_strength,
        positions=positions,
        normalize=normalize,
        window=window,
        schedule=schedule,
        clock=clock,
    )


@contextlib.contextmanager
def steer(
    model: nn.Module,
    *vectors: FunctionVector | tuple[FunctionVector, float],
    strength: float | torch.Tensor = 1.0,
    positions: Positions = "generated",
    normalize: Normalize = "absolute",
    arch: ArchSpec | None = None,
) -> Iterator[nn.Module]:
    """Steer every forward pass of ``model`` made by this thread inside the block.

    ``generate``, pipelines and plain calls are all steered. Other threads using the same model are not.

    Args:
        model: a transformers causal LM (or its base model).
        *vectors: :class:`FunctionVector` objects or ``(vector, weight)`` pairs; a negative weight subtracts.
        strength: multiplies every vector; a float or a tensor ``[batch]`` with one value per input row
            (repeated for ``num_beams`` / ``num_return_sequences``), e.g. ``tensor([0., 1.])`` for an
            unsteered and a steered row in one batch.
        positions: ``"generated"`` (final prompt token and every generated token, the paper's setting),
            ``"last_prompt"`` (final prompt token only) or ``"all"`` (every real token).
        normalize: ``"absolute"`` adds ``strength * vector``; ``"relative"`` rescales the vector to
            ``strength`` times the norm of the hidden state it is added to.
        arch: where the decoder layers are, for models fv_plugin does not know.

    Example:
        >>> with fv_plugin.steer(model, fv, strength=2.0):  # doctest: +SKIP
        ...     out = model.generate(**inputs, max_new_tokens=10)
    """
    request = _validate(model, vectors, strength=strength, positions=positions, normalize=normalize, arch=arch)
    with attached(model, arch=arch) as owner:
        steering = _bind(owner, request)
        with activate((steering,) if steering is not None else ()):
            yield model


class FunctionVectorProcessor(LogitsProcessor):
    """A ``LogitsProcessor`` that steers the one ``generate`` call it is passed to.

    The model must have been :func:`~fv_plugin.attach`-ed. Scores pass through unchanged: the processor is the
    call's clock, counting generation steps so that ``window`` and ``schedule`` know where they are.

    Args:
        *vectors: :class:`FunctionVector` objects or ``(vector, weight)`` pairs.
        strength, positions, normalize: as in :func:`steer`.
        window: ``(start, stop)``: steer only the forward passes of steps ``start <= step < stop``; step 0 is
            the prompt pass (which produces the first new token), step ``s`` feeds generated token ``s``.
            ``stop=None`` means no end.
        schedule: ``step -> multiplier`` applied on top of ``strength`` (e.g. a decay).

    Example:
        >>> proc = FunctionVectorProcessor(fv, strength=4.0, window=(0, 3))  # doctest: +SKIP
        >>> attach(model).generate(**inputs, logits_processor=[proc])  # doctest: +SKIP
    """

    def __init__(
        self,
        *vectors: FunctionVector | tuple[FunctionVector, float],
        strength: float | torch.Tensor = 1.0,
        positions: Positions = "generated",
        normalize: Normalize = "absolute",
        window: tuple[int, int | None] | None = None,
        schedule: Callable[[int], float] | None = None,
    ) -> None:
        check_options(positions, normalize)
        self.vectors = tuple(vectors)
        split_vectors(self.vectors)
        self.strength = check_strength(strength)
        self.positions = positions
        self.normalize = normalize
        self.window = self._check_window(window)
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> multiplier, got {type(schedule).__name__}")
        self.schedule = schedule

    @staticmethod
    def _check_window(window: tuple[int, int | None] | None) -> tuple[int, int] | None:
        if window is None:
            return None
        if not isinstance(window, tuple) or len(window) != 2:
            raise TypeError(f"window must be a (start, stop) tuple, got {window!r}")
        start, stop = window
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"window start must be an int >= 0, got {start!r}")
        if stop is None:
            return (start, 2**62)
        if isinstance(stop, bool) or not isinstance(stop, int) or stop <= start:
            raise ValueError(f"window stop must be an int > start (or None), got {stop!r}")
        return (start, stop)

    def _fv_plugin_bind(self, model: nn.Module) -> ActiveSteering:
        call = current_call()
        if call is None:
            raise RuntimeError("FunctionVectorProcessor can only be bound inside a generate() call")
        owner = get_attachment(model)
        if owner is None:
            raise RuntimeError("FunctionVectorProcessor needs an attached model: call fv_plugin.attach(model)")
        request = _validate(
            model,
            self.vectors,
            strength=self.strength,
            positions=self.positions,
            normalize=self.normalize,
            arch=None,
        )
        call.clocks[id(self)] = 0
        steering = _bind(owner, request, window=self.window, schedule=self.schedule, clock=self)
        if steering is None:  # nothing to add (no vectors or zero strength) but keep the clock running
            return ActiveSteering(owner=owner, by_layer={}, strength=0.0, positions="all", normalize="absolute")
        return steering

    @property
    def step(self) -> int | None:
        """Steps counted so far in the calling thread's current ``generate`` call (``None`` outside one)."""
        call = current_call()
        return None if call is None else call.clocks.get(id(self))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        call = current_call()
        if call is None or id(self) not in call.clocks:
            raise RuntimeError(
                "FunctionVectorProcessor was called by a generate() on a model that is not attached, so nothing "
                "was steered. Call `model = fv_plugin.attach(model)` once before generating."
            )
        call.clocks[id(self)] += 1
        return scores


class SteeredModel:
    """Wrap a model so that ``generate(..., steering=[...])`` steers; every other attribute reaches the model.

    The wrapped model is ``.wrapped_model`` (``.model`` reaches the wrapped model's own ``model`` attribute).

    Args:
        model: a transformers causal LM.
        steering: default vectors for calls that pass none.
        strength, positions, normalize, arch: defaults, as in :func:`steer`.

    Example:
        >>> steered = SteeredModel(model)  # doctest: +SKIP
        >>> steered.generate(**inputs, steering=[fv, (other, -0.5)], max_new_tokens=8)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        steering: Sequence[FunctionVector | tuple[FunctionVector, float]] | None = None,
        *,
        strength: float | torch.Tensor = 1.0,
        positions: Positions = "generated",
        normalize: Normalize = "absolute",
        arch: ArchSpec | None = None,
    ) -> None:
        if isinstance(model, SteeredModel):
            model = model.__dict__["wrapped_model"]
        check_options(positions, normalize)
        check_strength(strength)
        defaults = tuple(steering or ())
        resolved = _resolve(model, arch)
        for fv, _ in split_vectors(defaults):
            check_vector(fv, resolved)
        self.__dict__["wrapped_model"] = attach(model, arch=arch)
        self.__dict__["default_steering"] = defaults
        self.__dict__["_steer_options"] = {"strength": strength, "positions": positions, "normalize": normalize}

    def _context(
        self, steering: Sequence[Any] | None, overrides: dict[str, Any]
    ) -> contextlib.AbstractContextManager[Any]:
        vectors = tuple(steering) if steering is not None else self.default_steering
        options = {**self._steer_options, **{k: v for k, v in overrides.items() if v is not None}}
        return steer(self.wrapped_model, *vectors, **options)

    def generate(
        self,
        *args: Any,
        steering: Sequence[FunctionVector | tuple[FunctionVector, float]] | None = None,
        strength: float | torch.Tensor | None = None,
        positions: Positions | None = None,
        normalize: Normalize | None = None,
        **kwargs: Any,
    ) -> Any:
        """``model.generate`` steered by ``steering`` (or the wrapper's default vectors)."""
        with self._context(steering, {"strength": strength, "positions": positions, "normalize": normalize}):
            return self.wrapped_model.generate(*args, **kwargs)

    def __call__(self, *args: Any, steering: Sequence[Any] | None = None, **kwargs: Any) -> Any:
        """A steered forward pass (``positions`` of the default options apply)."""
        with self._context(steering, {}):
            return self.wrapped_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        model = self.__dict__.get("wrapped_model")
        if model is None:  # during unpickling / before __init__: no recursion
            raise AttributeError(name)
        return getattr(model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self.wrapped_model, name, value)

    def __repr__(self) -> str:
        return f"SteeredModel({type(self.wrapped_model).__name__}, {len(self.default_steering)} default vector(s))"
