"""Every PyTorch hook fv_plugin registers is registered here, returns a handle, and is removed by us alone.

``attach(model)`` adds one forward pre-hook on the base model (to learn each forward's token positions) and
one forward hook per decoder layer (to add vectors), and routes ``model.generate`` through a thin wrapper that
marks the call so the first forward is known to be the prompt. The hooks do nothing unless a steering is active
in the calling thread (see :mod:`fv_plugin.runtime`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fv_plugin.architectures import ArchSpec, ResolvedArch, resolve_architecture
from fv_plugin.runtime import (
    generate_call,
    hook_scope,
    on_base_forward,
    on_layer_output,
    on_out_proj_input,
)

__all__ = [
    "Attachment",
    "ForwardStopped",
    "attach",
    "attached",
    "count_forward_work",
    "detach",
    "get_attachment",
    "is_attached",
    "patch_head_inputs",
    "record_head_inputs",
    "record_layer_calls",
    "record_layer_outputs",
    "scoped_hooks",
]

_ATTR = "_fv_plugin_attachment"
_LOCK = threading.RLock()  # guards attaching, detaching and the user counts


class _Binds(Protocol):
    def _fv_plugin_context(self, model: nn.Module) -> contextlib.AbstractContextManager[object]: ...


@dataclass(eq=False)
class Attachment:
    """Our hooks on one model. ``owner`` identity is what active steerings are matched against."""

    arch: ResolvedArch
    model_id: int
    handles: list[RemovableHandle] = field(default_factory=list)
    wrapped_generate: bool = False
    head_hooks: bool = False  # pre-hooks on the attention output projections (head-level steering)
    permanent: bool = False  # attach() was called: stays until detach()
    users: int = 0  # steer() blocks currently relying on it

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def _layer_hook(owner: Attachment, index: int) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        return on_layer_output(owner, index, output)

    return hook


def _out_proj_hook(owner: Attachment, index: int) -> Callable[[nn.Module, tuple[Any, ...]], Any]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
        return on_out_proj_input(owner, index, args)

    return hook


def _base_hook(owner: Attachment) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        on_base_forward(owner, args, kwargs)

    return hook


def _find_processors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[_Binds]:
    # GenerationMixin.generate(inputs, generation_config, logits_processor, ...)
    procs = kwargs.get("logits_processor")
    if procs is None and len(args) >= 3:
        procs = args[2]
    return [p for p in (procs or []) if hasattr(p, "_fv_plugin_context")]


def _steered_generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    unbound: Callable[..., Any] = getattr(type(model), "generate")  # noqa: B009 - nn.Module has no stub for it
    generate = functools.partial(unbound, model)
    with generate_call(), contextlib.ExitStack() as stack:
        for processor in _find_processors(args, kwargs):
            stack.enter_context(processor._fv_plugin_context(model))
        return generate(*args, **kwargs)


def get_attachment(model: nn.Module) -> Attachment | None:
    found = model.__dict__.get(_ATTR)
    return found if isinstance(found, Attachment) and found.model_id == id(model) else None


def is_attached(model: nn.Module) -> bool:
    """Whether :func:`attach` has been called on ``model`` (and :func:`detach` has not)."""
    return get_attachment(model) is not None


def attach(model: nn.Module, *, arch: ArchSpec | None = None) -> nn.Module:
    """Prepare ``model`` for steering; idempotent, returns the model.

    Registers our hooks (idle until a steering is active) and routes ``model.generate`` so that a
    :class:`~fv_plugin.FunctionVectorProcessor` in ``logits_processor`` steers that call. Needed before
    passing a processor to ``generate`` or a pipeline. :func:`~fv_plugin.steer` does not need it: it attaches
    for the duration of its block and leaves the model as it found it.

    Example:
        >>> import fv_plugin  # doctest: +SKIP
        >>> model = fv_plugin.attach(model)  # doctest: +SKIP
    """
    with _LOCK:
        _ensure(model, arch).permanent = True
    return model


@contextlib.contextmanager
def attached(model: nn.Module, *, arch: ArchSpec | None = None) -> Iterator[Attachment]:
    """Keep ``model`` attached for the block; if nothing else needs the hooks afterwards, remove them."""
    with _LOCK:
        owner = _ensure(model, arch)
        owner.users += 1
    try:
        yield owner
    finally:
        with _LOCK:
            owner.users -= 1
            if owner.users == 0 and not owner.permanent and get_attachment(model) is owner:
                _remove(model, owner)


def _is_wrapper(model: object) -> bool:
    return "wrapped_model" in getattr(model, "__dict__", {})


def _ensure(model: nn.Module, arch: ArchSpec | None) -> Attachment:
    if not issubclass(type(model), nn.Module):  # type(): a SteeredModel reports its wrapped model's class
        hint = "; a SteeredModel is attached already: pass its .wrapped_model" if _is_wrapper(model) else ""
        raise TypeError(f"attach() expects a torch.nn.Module (a transformers model), got {type(model).__name__}{hint}")
    existing = get_attachment(model)
    if existing is not None:
        if arch is not None and arch.layers != existing.arch.spec.layers and arch != existing.arch.spec:
            raise ValueError("model is already attached with another ArchSpec; call fv_plugin.detach(model) first")
        return existing
    stale = model.__dict__.get(_ATTR)
    if isinstance(stale, Attachment):  # a copy of an attached model (copy.deepcopy): drop the copied hooks
        _drop_copied_hooks(model, stale)
    resolved = resolve_architecture(model, arch)
    owner = Attachment(arch=resolved, model_id=id(model))
    try:
        owner.handles.append(resolved.base.register_forward_pre_hook(_base_hook(owner), with_kwargs=True))
        for index, layer in enumerate(resolved.layers):
            owner.handles.append(layer.register_forward_hook(_layer_hook(owner, index)))
        projections = _out_projections(resolved)
        for index, proj in enumerate(projections or ()):
            owner.handles.append(proj.register_forward_pre_hook(_out_proj_hook(owner, index)))
        owner.head_hooks = projections is not None
    except BaseException:
        owner.remove()
        raise
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = types.MethodType(_steered_generate, model)
        owner.wrapped_generate = True
    model.__dict__[_ATTR] = owner
    return owner


def _out_projections(resolved: ResolvedArch) -> list[nn.Module] | None:
    try:
        return [resolved.out_proj(i) for i in range(resolved.num_layers)]
    except AttributeError:  # no attention projection where the ArchSpec says: head-level steering unavailable
        return None


def _drop_copied_hooks(model: nn.Module, stale: Attachment) -> None:
    ids = {h.id for h in stale.handles}
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k in hooks if k in ids]:
                del hooks[key]
            for extra in (getattr(module, "_forward_hooks_with_kwargs", {}), module._forward_pre_hooks_with_kwargs):
                for key in [k for k in extra if k in ids]:
                    del extra[key]
    model.__dict__.pop(_ATTR, None)
    model.__dict__.pop("generate", None)


def detach(model: nn.Module) -> nn.Module:
    """Remove everything :func:`attach` added (only our own hooks); nothing to do on a model never attached.

    Steering blocks still running on the model lose their hooks: detach when no ``steer`` block is open.
    """
    with _LOCK:
        owner = get_attachment(model)
        if owner is not None:
            _remove(model, owner)
    return model


def _remove(model: nn.Module, owner: Attachment) -> None:
    owner.remove()
    if owner.wrapped_generate:
        model.__dict__.pop("generate", None)
    model.__dict__.pop(_ATTR, None)


# ------------------------------------------------------------------------------------ read and patch hooks
# Read and patch hooks act only on forward passes run in the context (thread, asyncio task) that opened them, so
# recording or patching on a shared model never reaches other users' calls.
HookKind = Literal["forward", "pre", "pre_kwargs"]


@contextlib.contextmanager
def scoped_hooks(hooks: Sequence[tuple[nn.Module, Callable[..., Any]]], kind: HookKind) -> Iterator[None]:
    """Register ``hook`` on each ``module`` for the block; each acts only on forwards run inside this scope.

    ``kind`` is ``"forward"`` (``hook(module, args, output)``), ``"pre"`` (``hook(module, args)``) or
    ``"pre_kwargs"`` (``hook(module, args, kwargs)``). Outside the scope a hook returns ``None`` (no change).
    Every handle is removed on exit, also when the block raises.
    """
    with hook_scope() as inside:
        handles: list[RemovableHandle] = []
        try:
            for module, hook in hooks:
                handles.append(_register(module, _only_inside(hook, inside), kind))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _only_inside(hook: Callable[..., Any], inside: Callable[[], bool]) -> Callable[..., Any]:
    def scoped(*args: Any) -> Any:
        return hook(*args) if inside() else None

    return scoped


def _register(module: nn.Module, hook: Callable[..., Any], kind: HookKind) -> RemovableHandle:
    if kind == "forward":
        return module.register_forward_hook(hook)
    if kind == "pre":
        return module.register_forward_pre_hook(hook)
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _check_layers(resolved: ResolvedArch, layers: Sequence[int]) -> None:
    for layer in layers:
        if not 0 <= layer < resolved.num_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {resolved.num_layers} layers")


class ForwardStopped(Exception):
    """Raised by :func:`record_layer_outputs` with ``stop=True`` once the highest recorded layer has run: the
    caller catches it (the layers above were not needed)."""


@contextlib.contextmanager
def record_layer_outputs(
    model: nn.Module, layers: Sequence[int], *, arch: ArchSpec | None = None, stop: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the hidden states each of ``layers`` outputs (after any steering); removed on exit.

    Yields a dict that maps a layer index to its latest output ``[batch, seq, hidden]``. With ``stop``, the
    forward pass ends with :class:`ForwardStopped` right after the highest of ``layers`` (the rest of the model
    and the unembedding never run); the caller catches it around the model call.
    """
    resolved = resolve_architecture(model, arch)
    _check_layers(resolved, layers)
    seen: dict[int, torch.Tensor] = {}
    top = max(layers, default=-1) if stop else -1

    def make(index: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen[index] = (output if isinstance(output, torch.Tensor) else output[0]).detach()
            if index == top:
                raise ForwardStopped(f"stopped after layer {index}")

        return hook

    with scoped_hooks([(resolved.layers[layer], make(layer)) for layer in layers], "forward"):
        yield seen


@contextlib.contextmanager
def count_forward_work(model: nn.Module, resolved: ResolvedArch) -> Iterator[Callable[[], tuple[float, int]]]:
    """Count the work of forwards run in this context: yields ``() -> (tokens, logit_rows)`` so far, where a
    token run through ``m`` of the ``L`` decoder layers counts ``m / L`` and ``logit_rows`` are the rows the
    unembedding produced."""
    totals = [0, 0]  # token-layers, logit rows

    def on_layer(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        totals[0] += int(hidden.shape[0]) * int(hidden.shape[1])

    def on_unembed(module: nn.Module, args: Any, output: Any) -> None:
        totals[1] += output.numel() // output.shape[-1]

    hooks: list[tuple[nn.Module, Callable[..., Any]]] = [(layer, on_layer) for layer in resolved.layers]
    unembed: Any = getattr(model, "get_output_embeddings")()  # noqa: B009
    with scoped_hooks(hooks, "pre_kwargs"), scoped_hooks([(unembed, on_unembed)], "forward"):
        yield lambda: (totals[0] / resolved.num_layers, totals[1])


@contextlib.contextmanager
def record_layer_calls(resolved: ResolvedArch) -> Iterator[dict[int, tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Record each decoder layer's latest call (positional and keyword arguments); removed on exit."""
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def make(index: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[index] = (args, dict(kwargs))

        return hook

    with scoped_hooks([(layer, make(i)) for i, layer in enumerate(resolved.layers)], "pre_kwargs"):
        yield calls


@contextlib.contextmanager
def record_head_inputs(resolved: ResolvedArch, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the last position of each layer's attention output-projection input (the heads, concatenated).

    Yields a dict that maps a layer to its latest ``[batch, heads * head_dim]``; removed on exit.
    """
    seen: dict[int, torch.Tensor] = {}

    def make(index: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen[index] = args[0][:, -1].detach()

        return hook

    with scoped_hooks([(resolved.out_proj(layer), make(layer)) for layer in layers], "pre"):
        yield seen


@contextlib.contextmanager
def patch_head_inputs(
    resolved: ResolvedArch, layers: Sequence[int], patch: Callable[[int, torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace each listed layer's output-projection input by ``patch(layer, input)``; removed on exit."""

    def make(index: int) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (patch(index, args[0]), *args[1:])

        return hook

    with scoped_hooks([(resolved.out_proj(layer), make(layer)) for layer in layers], "pre"):
        yield
