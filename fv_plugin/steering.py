"""Public steering entry points: :func:`steer`, :class:`FunctionVectorProcessor` and :class:`SteeredModel`.

All three steer through :func:`~fv_plugin.request.steering_context`: it validates the input against the model
first (so a bad request leaves the model untouched), then makes an :class:`~fv_plugin.runtime.ActiveSteering`
active for the current call only.
Vectors apply to every input row, or, with ``rows=[[...], [...], ...]``, each input row gets its own: one
``generate`` call can serve several users' requests.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor

from fv_plugin.answer_span import answer_ends_for
from fv_plugin.architectures import ArchSpec
from fv_plugin.gating import check_gate
from fv_plugin.hooks import attach, get_attachment
from fv_plugin.merge import Normalize
from fv_plugin.positions import Positions
from fv_plugin.request import (
    check_options,
    check_rows,
    check_strength,
    check_vector,
    model_arch,
    split_vectors,
    steering_context,
)
from fv_plugin.runtime import current_call
from fv_plugin.vector import FunctionVector

__all__ = ["FunctionVectorProcessor", "Rows", "SteeredModel", "UnusedSteeringWarning", "steer"]

Rows = Sequence[Sequence[FunctionVector | tuple[FunctionVector, float]]]


class UnusedSteeringWarning(UserWarning):
    """A ``steer`` block ended without any forward pass of its model in its context: nothing was steered."""


def _warn_unused(model: nn.Module) -> None:
    warnings.warn(
        f"fv_plugin.steer(...) on {type(model).__name__} ended without any forward pass of that model in its "
        "context, so nothing was steered. A generate() run in another thread (e.g. streaming with "
        "TextIteratorStreamer and Thread(target=model.generate)) does not see the block. Steer inside the thread "
        "instead: SteeredModel(model).generate(..., steering=[fv]); or model.generate(..., "
        "logits_processor=[FunctionVectorProcessor(fv)]) on an attached model; or start the thread in a copy of "
        "this context: Thread(target=contextvars.copy_context().run, args=(model.generate,), kwargs=...).",
        UnusedSteeringWarning,
        stacklevel=4,  # the with-statement that ended the block
    )


@contextlib.contextmanager
def steer(
    model: nn.Module,
    *vectors: FunctionVector | tuple[FunctionVector, float],
    rows: Rows | None = None,
    strength: float | torch.Tensor = 1.0,
    positions: Positions | None = None,
    normalize: Normalize = "absolute",
    arch: ArchSpec | None = None,
    gate: bool = False,
    tokenizer: Any = None,
) -> Iterator[nn.Module]:
    """Steer every forward pass of ``model`` made in this context (thread, asyncio task) inside the block.

    ``generate``, pipelines and plain calls are all steered. Other threads using the same model are not; a
    block that ends without any forward pass of ``model`` warns (:class:`UnusedSteeringWarning`).

    Args:
        model: a transformers causal LM (or its base model).
        *vectors: :class:`FunctionVector` objects or ``(vector, weight)`` pairs for every input row; a negative
            weight subtracts.
        rows: instead of ``vectors``: one list of vectors (or pairs) per input row, ``[]`` for an unsteered row,
            e.g. ``rows=[[fv_a], [], [(fv_b, -1.0), fv_c]]`` (repeated for ``num_beams`` /
            ``num_return_sequences`` like the input rows).
        strength: a float or a tensor ``[batch]`` with one value per input row, e.g. ``tensor([0., 1.])`` for an
            unsteered and a steered row in one batch. It multiplies each added vector (``heads``, ``difference``,
            ``layer_mean``, ``head_difference``); for a ``head_patch`` vector it interpolates the heads toward
            their stored means (0 = off, 1 = replaced); a vector made by ``method="auto"`` already carries the
            strength auto chose (``fv.builtin_strength``, shown by ``print(fv)``), and this one multiplies it.
        positions: ``"generated"`` (final prompt token and every generated token, the paper's setting),
            ``"last_prompt"`` (final prompt token only), ``"all"`` (every real token) or ``"answer"`` (final
            prompt token and each generated token until the row's answer ends: its first generated newline or
            end-of-sequence token, which is not steered, nor anything after it; needs ``tokenizer``). ``None``
            (default): each vector's own (``fv.positions``), also when they differ.
        normalize: ``"absolute"`` adds ``strength * vector``; ``"relative"`` rescales the vector to
            ``strength`` times the norm of the hidden state it is added to.
        arch: where the decoder layers are, for models fv_plugin does not know.
        gate: steer a row by a vector only if that row's prompt passes the vector's condition (``fv.condition``,
            learned at extraction), decided at the prompt's last token and kept for its generated tokens; each
            vector gates on its own (:mod:`fv_plugin.gating`). Every vector needs a condition.
        tokenizer: the model's tokenizer; needed by ``positions="answer"`` (which tokens end an answer).

    Example:
        >>> with fv_plugin.steer(model, fv, strength=2.0):  # doctest: +SKIP
        ...     out = model.generate(**inputs, max_new_tokens=10)
    """
    context = steering_context(
        model,
        vectors,
        rows=rows,
        strength=strength,
        positions=positions,
        normalize=normalize,
        arch=arch,
        gate=gate,
        answer_end=answer_ends_for(positions, tokenizer, model),
    )
    with context as steering:
        yield model
    if steering is not None and steering.usage.forwards == 0:
        _warn_unused(model)


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


class FunctionVectorProcessor(LogitsProcessor):
    """A ``LogitsProcessor`` that steers the one ``generate`` call it is passed to.

    The model must have been :func:`~fv_plugin.attach`-ed. Scores pass through unchanged: the processor is the
    call's clock, counting generation steps so that ``window`` and ``schedule`` know where they are.

    Args:
        *vectors, rows: :class:`FunctionVector` objects or ``(vector, weight)`` pairs for every row, or one list
            per input row (as in :func:`steer`).
        strength, positions, normalize: as in :func:`steer`.
        window: ``(start, stop)``: steer only the forward passes of steps ``start <= step < stop``; step 0 is
            the prompt pass (which produces the first new token), step ``s`` feeds generated token ``s``.
            ``stop=None`` means no end.
        schedule: ``step -> multiplier`` applied on top of ``strength`` (e.g. a decay).
        gate, tokenizer: as in :func:`steer`.

    Example:
        >>> proc = FunctionVectorProcessor(fv, strength=4.0, window=(0, 3))  # doctest: +SKIP
        >>> attach(model).generate(**inputs, logits_processor=[proc])  # doctest: +SKIP
    """

    def __init__(
        self,
        *vectors: FunctionVector | tuple[FunctionVector, float],
        rows: Rows | None = None,
        strength: float | torch.Tensor = 1.0,
        positions: Positions | None = None,
        normalize: Normalize = "absolute",
        window: tuple[int, int | None] | None = None,
        schedule: Callable[[int], float] | None = None,
        gate: bool = False,
        tokenizer: Any = None,
    ) -> None:
        check_options(positions, normalize)
        self.answer_end = answer_ends_for(positions, tokenizer, None)
        self.vectors = tuple(vectors)
        split_vectors(self.vectors)
        self.rows = tuple(tuple(row) for row in rows) if rows is not None else None
        if rows is not None:
            check_rows(rows)
        self.strength = check_strength(strength)
        self.positions = positions
        self.normalize = normalize
        self.window = _check_window(window)
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> multiplier, got {type(schedule).__name__}")
        self.schedule = schedule
        if not isinstance(gate, bool):
            raise TypeError(f"gate must be True or False, got {gate!r}")
        self.gate = gate

    def _fv_plugin_context(self, model: nn.Module) -> contextlib.AbstractContextManager[object]:
        """This processor's steering of the ``generate`` call now starting on ``model`` (called by its hooks)."""
        call = current_call()
        if call is None:
            raise RuntimeError("FunctionVectorProcessor can only be bound inside a generate() call")
        if get_attachment(model) is None:
            raise RuntimeError("FunctionVectorProcessor needs an attached model: call fv_plugin.attach(model)")
        call.clocks[id(self)] = 0  # the clock runs even when the request adds nothing
        return steering_context(
            model,
            self.vectors,
            rows=self.rows,
            strength=self.strength,
            positions=self.positions,
            normalize=self.normalize,
            window=self.window,
            schedule=self.schedule,
            clock=self,
            gate=self.gate,
            answer_end=self.answer_end,
        )

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
    Each call steers in its own context, so a ``SteeredModel`` can generate from several threads at once
    (streaming included: run ``steered.generate(..., streamer=...)`` in the thread).

    Args:
        model: a transformers causal LM.
        steering: default vectors for calls that pass none.
        strength, positions, normalize, arch, gate: defaults, as in :func:`steer`.
        tokenizer: the model's tokenizer, for ``positions="answer"``.

    Example:
        >>> steered = SteeredModel(model)  # doctest: +SKIP
        >>> steered.generate(**inputs, steering=[fv, (other, -0.5)], max_new_tokens=8)  # doctest: +SKIP
        >>> steered.generate(**batch_of_3, rows=[[fv], [], [other]], max_new_tokens=8)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        steering: Sequence[FunctionVector | tuple[FunctionVector, float]] | None = None,
        *,
        strength: float | torch.Tensor = 1.0,
        positions: Positions | None = None,
        normalize: Normalize = "absolute",
        arch: ArchSpec | None = None,
        gate: bool = False,
        tokenizer: Any = None,
    ) -> None:
        if isinstance(model, SteeredModel):
            model = model.__dict__["wrapped_model"]
        check_options(positions, normalize)
        check_strength(strength)
        answer_ends_for(positions, tokenizer, model)  # refuses "answer" without a tokenizer now
        defaults = tuple(steering or ())
        resolved = model_arch(model, arch)
        for fv, _ in split_vectors(defaults):
            check_vector(fv, resolved)
        if gate is True:
            check_gate(fv for fv, _ in split_vectors(defaults))
        self.__dict__["wrapped_model"] = attach(model, arch=arch)
        self.__dict__["default_steering"] = defaults
        self.__dict__["_steer_options"] = {
            "strength": strength,
            "positions": positions,
            "normalize": normalize,
            "gate": gate,
            "tokenizer": tokenizer,
        }

    def _context(
        self, steering: Sequence[Any] | None, rows: Rows | None, overrides: dict[str, Any]
    ) -> contextlib.AbstractContextManager[Any]:
        vectors = () if rows is not None else tuple(steering) if steering is not None else self.default_steering
        options = {**self._steer_options, **{k: v for k, v in overrides.items() if v is not None}}
        return steer(self.wrapped_model, *vectors, rows=rows, **options)

    def generate(
        self,
        *args: Any,
        steering: Sequence[FunctionVector | tuple[FunctionVector, float]] | None = None,
        rows: Rows | None = None,
        strength: float | torch.Tensor | None = None,
        positions: Positions | None = None,
        normalize: Normalize | None = None,
        gate: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """``model.generate`` steered by ``steering`` (or the wrapper's default vectors), or per input row."""
        overrides = {"strength": strength, "positions": positions, "normalize": normalize, "gate": gate}
        with self._context(steering, rows, overrides):
            return self.wrapped_model.generate(*args, **kwargs)

    def __call__(
        self, *args: Any, steering: Sequence[Any] | None = None, rows: Rows | None = None, **kwargs: Any
    ) -> Any:
        """A steered forward pass (``positions`` of the default options apply)."""
        with self._context(steering, rows, {}):
            return self.wrapped_model(*args, **kwargs)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The wrapped model's class, as transparent proxies report it: ``isinstance(steered, PreTrainedModel)``
        holds and transformers' pipelines accept the wrapper. ``type(steered)`` is still :class:`SteeredModel`."""
        return type(self.__dict__["wrapped_model"])

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
