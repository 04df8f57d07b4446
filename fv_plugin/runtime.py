"""What is being steered right now, per thread: the state our hooks read, and the hooks' bodies.

Steering belongs to a call, not to a model: the active steerings and the state of the current call live in
:mod:`contextvars`, so threads (and asyncio tasks) sharing one model never see each other's vectors. The hook
bodies here are registered by :mod:`fv_plugin.hooks`; when nothing is active they return at once.

A steering adds, after each layer it touches, one precomputed ``[rows, hidden]`` matrix scaled per token: row
``r`` is the weighted sum of the vectors input row ``r`` asked for (one row when every input row gets the same
vectors). The hot path is therefore a few tensor operations per forward and per steered layer, whatever the
number of vectors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from fv_plugin.condition import Condition
from fv_plugin.positions import ForwardInfo, PromptInfo, forward_info, generation_steps, position_mask
from fv_plugin.row_state import decide_gate, gate_rows, track_answer

__all__ = [
    "ActiveSteering",
    "CallState",
    "HeadPatch",
    "LayerDelta",
    "Usage",
    "activate",
    "expand_rows",
    "generate_call",
    "hook_scope",
]


def expand_rows(values: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``values`` ``[rows, ...]`` for a batch of ``batch`` rows: as is (one row broadcasts), or each row repeated
    ``batch // rows`` times (``num_beams`` / ``num_return_sequences`` repeat every input row that way)."""
    rows = values.shape[0]
    if rows == 1 or rows == batch:
        return values
    if rows > 0 and batch % rows == 0:
        return values.repeat_interleave(batch // rows, dim=0)
    raise ValueError(f"{what} has {rows} rows but the batch has {batch} rows; give one per input row")


@dataclass(frozen=True, eq=False)
class LayerDelta:
    """What one steering adds after one layer, before scaling: ``rows`` ``[R, hidden]`` float64 (``R == 1``: the
    same for every input row). Copies on each activation's device and dtype are made once and reused."""

    layer: int
    rows: torch.Tensor
    _copies: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The rows on the activation's device and dtype."""
        return self.for_batch(0, device, dtype)

    def for_batch(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[batch or 1, hidden]`` on ``device`` in ``dtype`` (``batch=0``: the rows as they are)."""
        key = (device, dtype, batch)
        copy = self._copies.get(key)
        if copy is None:
            rows = self.rows if batch == 0 else expand_rows(self.rows, batch, "the steering")
            copy = rows.to(device=device, dtype=dtype)
            self._copies[key] = copy
        return copy


@dataclass(frozen=True, eq=False)
class HeadPatch:
    """Move head ``head``'s slot of a layer's output-projection input towards ``value`` (``add=False``) or add
    ``value`` to it (``add=True``), by ``weights`` per input row (``[R]``; ``R == 1``: the same for every row)."""

    head: int
    value: torch.Tensor  # [head_dim]
    weights: torch.Tensor  # [R] float32
    add: bool = False


@dataclass
class Usage:
    """How many forward passes of its model a steering has seen (0 at the end of a block: it steered nothing)."""

    forwards: int = 0


@dataclass(frozen=True, eq=False)
class ActiveSteering:
    """A validated steering request bound to one attached model."""

    owner: object  # the Attachment of the model it steers
    deltas: Mapping[int, LayerDelta]
    strength: float | torch.Tensor  # scalar, or one value per input row
    positions: str
    normalize: str
    window: tuple[int, int] | None = None
    schedule: Callable[[int], float] | None = None
    clock: object | None = None  # the logits processor counting this call's steps
    head_patches: Mapping[int, tuple[HeadPatch, ...]] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    gate: Condition | None = None  # steer only the rows whose prompt passes it (fv_plugin.gating)
    answer_end: torch.Tensor | None = None  # positions="answer": the token ids that end an answer
    _strengths: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict, repr=False)

    def row_strength(self, batch: int, device: torch.device) -> torch.Tensor:
        """Strength per row, shape ``[batch]`` (per-row strengths repeated for beams / return sequences)."""
        key = (batch, device)
        found = self._strengths.get(key)
        if found is None:
            if isinstance(self.strength, torch.Tensor):
                found = expand_rows(self.strength.to(device=device, dtype=torch.float32), batch, "strength")
            else:
                found = torch.full((batch,), float(self.strength), device=device)
            self._strengths[key] = found
        return found

    def step_factor(self, call: CallState, info: ForwardInfo, device: torch.device) -> torch.Tensor | None:
        """Multiplier per new token from ``window``/``schedule``, shape ``[length]``; ``None`` when both unset."""
        if self.window is None and self.schedule is None:
            return None
        if call.prompt is None:
            raise RuntimeError("fv_plugin: a steered forward ran before its prompt was recorded")
        clock = call.clocks.get(id(self.clock)) if self.clock is not None else None
        factors = []
        for step in generation_steps(info, call.prompt, clock, device).tolist():
            value = 1.0
            if self.window is not None and not (self.window[0] <= step < self.window[1]):
                value = 0.0
            if self.schedule is not None and value != 0.0:
                value *= float(self.schedule(int(step)))
            factors.append(value)
        return torch.tensor(factors, device=device, dtype=torch.float32)


@dataclass(eq=False)
class CallState:
    """The current call: one ``generate`` (``in_generate``), or the plain forwards inside one ``steer``.

    ``masks`` and ``coefficients`` are per forward pass (cleared when a new one starts).
    """

    in_generate: bool
    prompt: PromptInfo | None = None
    forward: ForwardInfo | None = None
    clocks: dict[int, int] = field(default_factory=dict)
    masks: dict[tuple[str, torch.device], torch.Tensor | None] = field(default_factory=dict)
    coefficients: dict[tuple[int, torch.device], torch.Tensor | None] = field(default_factory=dict)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)  # per gated steering: 1/0 per row, per prompt
    ended: torch.Tensor | None = None  # positions="answer": new tokens past their row's answer, this forward
    answer_state: tuple[int, torch.Tensor] | None = None  # (tokens seen, each row's answer over after them)

    def mask(self, mode: str, device: torch.device) -> torch.Tensor | None:
        key = (mode, device)
        if key not in self.masks:
            if self.forward is None or self.prompt is None:
                raise RuntimeError("fv_plugin: a steered forward ran before its positions were recorded")
            self.masks[key] = position_mask(mode, self.forward, self.prompt, device, self.ended)
        return self.masks[key]

    def coefficient(self, steering: ActiveSteering, device: torch.device) -> torch.Tensor | None:
        """Strength of ``steering`` at each new token, ``[batch, length]`` float32; ``None`` where it touches none."""
        key = (id(steering), device)
        if key not in self.coefficients:
            self.coefficients[key] = _coefficients(steering, self, device)
        return self.coefficients[key]


def _coefficients(steering: ActiveSteering, call: CallState, device: torch.device) -> torch.Tensor | None:
    mask = call.mask(steering.positions, device)
    if mask is None or call.forward is None:
        return None
    coef = steering.row_strength(call.forward.batch, device)[:, None] * mask
    if steering.gate is not None:
        coef = coef * gate_rows(steering, call, device)[:, None]
    factor = steering.step_factor(call, call.forward, device)
    return coef if factor is None else coef * factor[None, :]


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
def activate(steerings: tuple[ActiveSteering, ...], *, replay: tuple[int, int] | None = None) -> Iterator[None]:
    """Make ``steerings`` active in the current context until the block exits (even on error).

    ``replay=(rows, position)``: the block's forwards re-run only the last prompt token, at ``position``, for
    ``rows`` batch rows, layer by layer and without the base model, so their positions are set here rather than
    by the base-model pre-hook.
    """
    call = None
    if replay is not None:
        info = ForwardInfo(batch=replay[0], length=1, past=replay[1], mask=None)
        call = CallState(in_generate=False, prompt=PromptInfo.from_forward(info), forward=info)
    elif _CALL.get() is None:
        call = CallState(in_generate=False)
    call_token = _CALL.set(call) if call is not None else None
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
    mine = [s for s in active if s.owner is owner] if active else ()
    call = _CALL.get()
    if not mine or call is None:  # activate() always sets a call; be safe if a forward escapes it
        return
    for steering in mine:
        steering.usage.forwards += 1
    info = forward_info(args, kwargs)
    if (info.past == 0 or call.in_generate) and (call.prompt is None or not call.in_generate):
        # a call's prompt: from the start, or (generate on a cache filled before it) the prompt's uncached end
        call.prompt = PromptInfo.from_forward(info)
        call.gates.clear()
    elif call.prompt is None:  # plain forwards continuing a cache we never saw: everything cached is the prompt
        last = torch.full((info.batch,), info.past - 1, dtype=torch.long)
        call.prompt = PromptInfo(length=info.past, last=last)
    call.forward = info
    call.masks.clear()
    call.coefficients.clear()
    ends = [s.answer_end for s in mine if s.positions == "answer" and s.answer_end is not None]
    if ends:
        track_answer(call, info, torch.unique(torch.cat(ends)))


def _steer_hidden(hidden: torch.Tensor, steerings: list[ActiveSteering], layer: int, call: CallState) -> torch.Tensor:
    info = call.forward
    if info is None or hidden.dim() != 3 or hidden.shape[0] != info.batch or hidden.shape[1] != info.length:
        raise RuntimeError(
            f"fv_plugin: layer {layer} produced hidden states of shape {tuple(hidden.shape)} that do not match the "
            f"forward pass it saw ({info}); was the decoder stack called without its base model?"
        )
    out = hidden
    for steering in steerings:
        coef = call.coefficient(steering, hidden.device)
        if coef is None:
            continue
        if steering.normalize == "relative":
            coef = coef * hidden.float().norm(dim=-1)
        delta = steering.deltas[layer].for_batch(info.batch, hidden.device, hidden.dtype)
        out = out + coef.to(hidden.dtype)[..., None] * delta[:, None, :]
    return out


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
    out = x
    for steering in here:
        coef = call.coefficient(steering, x.device)
        if coef is None:
            continue
        for patch in steering.head_patches[layer]:
            dim = patch.value.numel()
            lo, hi = patch.head * dim, (patch.head + 1) * dim
            slot = out[..., lo:hi]
            weights = expand_rows(patch.weights.to(x.device), call.forward.batch, "the steering")
            target = patch.value.to(device=x.device, dtype=x.dtype)
            moved = slot + (coef * weights[:, None]).to(x.dtype)[..., None] * (target if patch.add else target - slot)
            out = torch.cat([out[..., :lo], moved, out[..., hi:]], dim=-1)
    return (out, *args[1:])


def on_layer_output(owner: object, layer: int, output: Any) -> Any:
    """After decoder layer ``layer``: take the gates read here, then add the active vectors for it; ``None`` (no
    change) when there are none."""
    active = _ACTIVE.get()
    if not active:
        return None
    here = [s for s in active if s.owner is owner and (layer in s.deltas or s.gate is not None)]
    call = _CALL.get()
    if not here or call is None:
        return None
    hidden = output[0] if isinstance(output, (tuple, list)) and output else output
    for steering in here:
        if steering.gate is not None and steering.gate.layer == layer and isinstance(hidden, torch.Tensor):
            decide_gate(steering, hidden, call, layer)
    here = [s for s in here if layer in s.deltas]
    if not here:
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
