"""What is being steered right now, per thread: the state our hooks read.

Steering belongs to a call, not to a model: the active steerings and the state of the current call live in
:mod:`contextvars`, so threads (and asyncio tasks) sharing one model never see each other's vectors. The hook
bodies here are registered by :mod:`fv_plugin.hooks`; when nothing is active they return at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from fv_plugin.positions import ForwardInfo, PromptInfo, forward_info, generation_steps, position_mask

__all__ = [
    "ActiveSteering",
    "CallState",
    "HeadPatch",
    "SteeringEntry",
    "activate",
    "generate_call",
    "hook_scope",
]


@dataclass(frozen=True, eq=False)
class SteeringEntry:
    """One vector to add after one layer, with its own weight (sign included)."""

    vector: torch.Tensor  # [hidden]
    layer: int
    weight: float
    _copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The vector on the activation's device and dtype (copied once, then reused)."""
        key = (device, dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = self.vector.to(device=device, dtype=dtype)
            self._copies[key] = copy
        return copy


@dataclass(frozen=True, eq=False)
class HeadPatch:
    """Write ``value`` into head ``head``'s slot of a layer's output-projection input (weighted)."""

    head: int
    value: torch.Tensor  # [head_dim]
    weight: float


@dataclass(frozen=True, eq=False)
class ActiveSteering:
    """A validated steering request bound to one attached model."""

    owner: object  # the Attachment of the model it steers
    by_layer: Mapping[int, tuple[SteeringEntry, ...]]
    strength: float | torch.Tensor  # scalar, or one value per batch row
    positions: str
    normalize: str
    window: tuple[int, int] | None = None
    schedule: Callable[[int], float] | None = None
    clock: object | None = None  # the logits processor counting this call's steps
    head_patches: Mapping[int, tuple[HeadPatch, ...]] = field(default_factory=dict)

    def row_strength(self, batch: int, device: torch.device) -> torch.Tensor:
        """Strength per row, shape ``[batch]`` (per-row strengths repeated for beams / return sequences)."""
        if not isinstance(self.strength, torch.Tensor):
            return torch.full((batch,), float(self.strength), device=device)
        rows = self.strength.to(device=device, dtype=torch.float32)
        if rows.numel() == batch:
            return rows
        if rows.numel() > 0 and batch % rows.numel() == 0:
            return rows.repeat_interleave(batch // rows.numel())
        raise ValueError(
            f"strength has {rows.numel()} values but the batch has {batch} rows; give one strength per input row"
        )

    def step_factor(self, call: CallState, info: ForwardInfo, device: torch.device) -> torch.Tensor | None:
        """Multiplier per new token from ``window``/``schedule``, shape ``[length]``; ``None`` when both unset."""
        if self.window is None and self.schedule is None:
            return None
        assert call.prompt is not None  # set by the base-model pre-hook before any layer runs
        clock = call.clocks.get(id(self.clock)) if self.clock is not None else None
        steps = generation_steps(info, call.prompt, clock, device).tolist()
        factors = []
        for step in steps:
            value = 1.0
            if self.window is not None and not (self.window[0] <= step < self.window[1]):
                value = 0.0
            if self.schedule is not None and value != 0.0:
                value *= float(self.schedule(int(step)))
            factors.append(value)
        return torch.tensor(factors, device=device, dtype=torch.float32)


@dataclass(eq=False)
class CallState:
    """The current call: one ``generate`` (``in_generate``), or the plain forwards inside one ``steer``."""

    in_generate: bool
    prompt: PromptInfo | None = None
    forward: ForwardInfo | None = None
    clocks: dict[int, int] = field(default_factory=dict)
    masks: dict[tuple[str, torch.device], torch.Tensor] = field(default_factory=dict)

    def mask(self, mode: str, device: torch.device) -> torch.Tensor:
        key = (mode, device)
        cached = self.masks.get(key)
        if cached is None:
            assert self.forward is not None and self.prompt is not None
            cached = position_mask(mode, self.forward, self.prompt, device)
            self.masks[key] = cached
        return cached


_ACTIVE: ContextVar[tuple[ActiveSteering, ...]] = ContextVar("fv_plugin_active", default=())
_CALL: ContextVar[CallState | None] = ContextVar("fv_plugin_call", default=None)


# Read and patch hooks (fv_plugin.hooks.scoped_hooks) act only inside the scopes open in the current context.
_SCOPES: ContextVar[frozenset[int]] = ContextVar("fv_plugin_hook_scopes", default=frozenset())


@contextlib.contextmanager
def hook_scope() -> Iterator[Callable[[], bool]]:
    """Enter a scope of the current context; yields a check that is true only in forwards run inside it."""
    key = object()
    token = _SCOPES.set(_SCOPES.get() | {id(key)})
    try:
        yield lambda: id(key) in _SCOPES.get()
    finally:
        _SCOPES.reset(token)


def active_steerings() -> tuple[ActiveSteering, ...]:
    return _ACTIVE.get()


def current_call() -> CallState | None:
    return _CALL.get()


@contextlib.contextmanager
def activate(steerings: tuple[ActiveSteering, ...]) -> Iterator[None]:
    """Make ``steerings`` active in the current context until the block exits (even on error)."""
    call_token = _CALL.set(CallState(in_generate=False)) if _CALL.get() is None else None
    token = _ACTIVE.set(_ACTIVE.get() + steerings)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        if call_token is not None:
            _CALL.reset(call_token)


@contextlib.contextmanager
def generate_call() -> Iterator[CallState]:
    """Mark one ``generate`` call: its first forward is the prompt, later ones continue it."""
    state = CallState(in_generate=True)
    token = _CALL.set(state)
    try:
        yield state
    finally:
        _CALL.reset(token)


# ------------------------------------------------------------------------------------------- hook bodies
def on_base_forward(owner: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Before the decoder stack runs: record the forward's positions (only while something is steering)."""
    active = _ACTIVE.get()
    if not active or not any(s.owner is owner for s in active):
        return
    call = _CALL.get()
    if call is None:  # activate() always sets one; be safe if a forward escapes it
        return
    info = forward_info(args, kwargs)
    if info.past == 0 and (call.prompt is None or not call.in_generate):
        call.prompt = PromptInfo.from_forward(info)
    elif call.prompt is None:  # continuing a cache we never saw: everything cached counts as the prompt
        last = torch.full((info.batch,), info.past - 1, dtype=torch.long)
        call.prompt = PromptInfo(length=info.past, last=last)
    call.forward = info
    call.masks.clear()


def _coefficients(steering: ActiveSteering, call: CallState, info: ForwardInfo, device: torch.device) -> torch.Tensor:
    """Strength of ``steering`` at each new token, ``[batch, length]`` (zero where it does not steer)."""
    coef = steering.row_strength(info.batch, device)[:, None] * call.mask(steering.positions, device)
    factor = steering.step_factor(call, info, device)
    return coef if factor is None else coef * factor[None, :]


def _steer_hidden(hidden: torch.Tensor, steerings: list[ActiveSteering], layer: int, call: CallState) -> torch.Tensor:
    info = call.forward
    if info is None or hidden.dim() != 3 or hidden.shape[0] != info.batch or hidden.shape[1] != info.length:
        raise RuntimeError(
            f"fv_plugin: layer {layer} produced hidden states of shape {tuple(hidden.shape)} that do not match the "
            f"forward pass it saw ({info}); was the decoder stack called without its base model?"
        )
    device, dtype = hidden.device, hidden.dtype
    total = torch.zeros_like(hidden)
    touched = torch.zeros(info.batch, info.length, dtype=torch.bool, device=device)
    norms: torch.Tensor | None = None
    for steering in steerings:
        mask = call.mask(steering.positions, device)
        coef = _coefficients(steering, call, info, device)
        if steering.normalize == "relative" and norms is None:
            norms = hidden.float().norm(dim=-1)
        for entry in steering.by_layer[layer]:
            vec = entry.on(device, dtype)
            scale = coef * entry.weight
            if steering.normalize == "relative":
                assert norms is not None
                scale = scale * norms / entry.vector.float().norm().clamp_min(1e-12).item()
            total = total + scale.to(dtype)[..., None] * vec
        touched |= mask
    return torch.where(touched[..., None], hidden + total, hidden)


def on_out_proj_input(owner: object, layer: int, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Before layer ``layer``'s attention output projection: write the active head patches for it."""
    active = _ACTIVE.get()
    if not active:
        return None
    here = [s for s in active if s.owner is owner and layer in s.head_patches]
    call = _CALL.get()
    if not here or call is None or call.forward is None:
        return None
    x = args[0]
    info = call.forward
    device = x.device
    out = x
    for steering in here:
        mask = call.mask(steering.positions, device)
        coef = _coefficients(steering, call, info, device)
        for patch in steering.head_patches[layer]:
            dim = patch.value.numel()
            lo, hi = patch.head * dim, (patch.head + 1) * dim
            slot = out[..., lo:hi]
            target = patch.value.to(device=device, dtype=x.dtype)
            moved = slot + (coef * patch.weight).to(x.dtype)[..., None] * (target - slot)
            updated = torch.where(mask[..., None], moved, slot)
            out = torch.cat([out[..., :lo], updated, out[..., hi:]], dim=-1)
    return (out, *args[1:])


def on_layer_output(owner: object, layer: int, output: Any) -> Any:
    """After decoder layer ``layer``: add the active vectors for it; ``None`` (no change) when there are none."""
    active = _ACTIVE.get()
    if not active:
        return None
    here = [s for s in active if s.owner is owner and layer in s.by_layer]
    if not here:
        return None
    call = _CALL.get()
    if call is None:
        return None
    if isinstance(output, torch.Tensor):
        return _steer_hidden(output, here, layer, call)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        steered = _steer_hidden(output[0], here, layer, call)
        return type(output)((steered, *output[1:]))
    raise TypeError(
        f"fv_plugin: decoder layer {layer} returned {type(output).__name__}; expected a tensor or a tuple whose "
        "first item is the hidden states. Point `arch=ArchSpec(layers=...)` at the decoder blocks."
    )
