"""A steering request: checked against the model before anything is touched, then bound to its hooks.

Every front end (:func:`~fv_plugin.steer`, :class:`~fv_plugin.FunctionVectorProcessor`,
:class:`~fv_plugin.SteeredModel`, and the vLLM plugin) takes the same arguments with the same meanings, and
refuses a bad value with the same message; they all go through :func:`validate`. What a request adds after each
layer is merged by :func:`fv_plugin.merge.merge`, the rule vLLM and GGUF export use too. On Hugging Face models
the front ends, and candidate scoring (:func:`~fv_plugin.selection.score_candidates`), steer through one context,
:func:`steering_context`: validate, keep the model attached, bind, make active for the block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import nn

from fv_plugin.architectures import ArchSpec, ResolvedArch, resolve_architecture
from fv_plugin.devices import input_dtype
from fv_plugin.gating import bind_all, check_gate
from fv_plugin.hooks import Attachment, attached, get_attachment
from fv_plugin.merge import NORMALIZE_MODES, Normalize, check_normalize, check_number, merge
from fv_plugin.positions import POSITION_MODES, vector_positions
from fv_plugin.runtime import ActiveSteering, HeadPatch, LayerDelta, activate
from fv_plugin.vector import FunctionVector

__all__ = [
    "NORMALIZE_MODES",
    "Normalize",
    "Pairs",
    "SteeringRequest",
    "VectorLike",
    "bind",
    "by_positions",
    "check_number",
    "check_options",
    "check_representable",
    "check_rows",
    "check_strength",
    "check_vector",
    "model_arch",
    "split_vectors",
    "steering_context",
    "validate",
]

VectorLike: TypeAlias = "FunctionVector | tuple[FunctionVector, float]"
Pairs: TypeAlias = "tuple[tuple[FunctionVector, float], ...]"


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


def check_options(positions: str | None, normalize: str) -> Normalize:
    """Check both options (``positions=None``: each vector's own, :func:`by_positions`);
    returns ``normalize`` as a :data:`~fv_plugin.merge.Normalize`."""
    if positions is not None and positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    return check_normalize(normalize)


def split_vectors(vectors: Sequence[object]) -> list[tuple[FunctionVector, float]]:
    """``FunctionVector`` or ``(FunctionVector, weight)`` items -> ``(vector, weight)`` pairs."""
    pairs: list[tuple[FunctionVector, float]] = []
    for item in vectors:
        if isinstance(item, FunctionVector):
            pairs.append((item, 1.0))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], FunctionVector):
            pairs.append((item[0], check_number(item[1], "a vector's weight")))
        else:
            raise TypeError(
                f"vectors must be FunctionVector objects or (FunctionVector, weight) pairs, got {type(item).__name__}"
            )
    return pairs


def check_rows(rows: object) -> list[list[tuple[FunctionVector, float]]]:
    """``rows``: one sequence of vectors (or ``(vector, weight)`` pairs) per input row; an empty one: unsteered."""
    if isinstance(rows, (str, bytes, FunctionVector)) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise TypeError(
            "rows must be a non-empty list with one list of vectors per input row, e.g. [[fv_a], [], [fv_b]]"
        )
    checked = []
    for index, row in enumerate(rows):
        pair = isinstance(row, tuple) and len(row) == 2 and isinstance(row[0], FunctionVector)
        if pair or isinstance(row, (FunctionVector, str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"rows[{index}] must be a list of vectors (use [] for an unsteered row), got {row!r}")
        checked.append(split_vectors(row))
    return checked


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
    for layer, part in fv.parts().items():
        if not 0 <= layer < arch.num_layers:
            raise ValueError(f"function vector layer {layer} is out of range: the model has {arch.num_layers} layers")
        if part.device.type == "meta" or not bool(torch.isfinite(part).all()):
            raise ValueError("function vector contains NaN, inf or meta values")
    if fv.head_values is not None and fv.heads is not None:
        heads = arch.num_heads
        for layer, head in fv.heads:
            if not 0 <= layer < arch.num_layers or heads is None or not 0 <= head < heads:
                raise ValueError(f"head ({layer}, {head}) of the function vector does not exist in this model")


def model_arch(model: nn.Module, arch: ArchSpec | None) -> ResolvedArch:
    """The model's architecture (the attached one, if it is attached)."""
    if not issubclass(type(model), nn.Module):  # type(): a SteeredModel reports its wrapped model's class
        raise TypeError(f"expected a transformers model (torch.nn.Module), got {type(model).__name__}")
    owner = get_attachment(model)
    return owner.arch if owner is not None else resolve_architecture(model, arch)


@dataclass(frozen=True)
class SteeringRequest:
    """A steering request validated against one model, not yet bound to its hooks.

    ``rows`` holds one tuple of ``(vector, weight)`` pairs per input row; a request without per-row vectors has
    a single row that every input row shares.
    """

    rows: tuple[Pairs, ...]
    per_row: bool
    strength: float | torch.Tensor
    positions: str | None  # None: each vector at its own (see by_positions)
    normalize: Normalize


def validate(
    model: nn.Module,
    vectors: Sequence[object],
    *,
    rows: object = None,
    strength: object,
    positions: str | None,
    normalize: str,
    arch: ArchSpec | None,
) -> SteeringRequest:
    """Check everything against ``model`` before touching it (``positions=None``: the vectors' own)."""
    mode = check_options(positions, normalize)
    checked_strength = check_strength(strength)
    if rows is not None and vectors:
        raise ValueError("give the vectors either for every row (positional) or per row (rows=[...]), not both")
    groups = check_rows(rows) if rows is not None else [split_vectors(vectors)]
    if rows is not None and isinstance(checked_strength, torch.Tensor) and len(checked_strength) != len(groups):
        raise ValueError(f"strength has {len(checked_strength)} values for {len(groups)} rows; give one per row")
    resolved = model_arch(model, arch)
    for fv, _ in (pair for group in groups for pair in group):
        check_vector(fv, resolved)
        if fv.is_head_patch and mode == "relative":
            raise ValueError("normalize='relative' applies to added vectors, not to head-level (head_patch) vectors")
    frozen = tuple(tuple(group) for group in groups)
    request = SteeringRequest(frozen, rows is not None, checked_strength, positions, mode)
    check_representable(request, input_dtype(model))
    return request


def _magnitudes(fv: FunctionVector, normalize: str) -> tuple[float, float]:
    """(largest entry, norm) of what ``fv`` adds at weight 1 (a unit vector with ``normalize="relative"``)."""
    if fv.head_values is not None:  # written into head slots; nothing added after the layer
        values = fv.head_values.detach().double()
        return float(values.abs().max()), float(values.norm())
    if normalize == "relative":
        return 1.0, 1.0
    parts = [part.detach().double() for part in fv.parts().values()]
    return max(float(p.abs().max()) for p in parts), max(float(p.norm()) for p in parts)


def check_representable(request: SteeringRequest, dtype: torch.dtype) -> None:
    """Refuse a request whose added vector could be non-finite in ``dtype`` (the model's) before anything runs.

    Per row, the strength times the weighted sum of its vectors bounds what is added: its entries must fit
    ``dtype``, and its squared norm (what the next layer's normalization computes, in float32 at least) must be
    finite too. With ``normalize="relative"`` a vector counts as unit length (the hidden state's norm is unknown).
    """
    if not dtype.is_floating_point:
        return
    largest = float(torch.finfo(dtype).max)
    squares = float(torch.finfo(torch.promote_types(dtype, torch.float32)).max)
    strength = request.strength
    scale = float(strength.abs().max()) if isinstance(strength, torch.Tensor) else abs(strength)
    for group in request.rows:
        entries = norms = 0.0
        for fv, weight in group:
            entry, norm = _magnitudes(fv, request.normalize)
            entries, norms = entries + abs(weight) * entry, norms + abs(weight) * norm
        limit = min(largest / max(entries, 1e-300), math.sqrt(squares) / max(norms, 1e-300))
        if scale > limit:
            raise ValueError(
                f"strength {scale:g} times these vectors (and weights) adds values up to {entries * scale:.3g} "
                f"(norm {norms * scale:.3g}), more than {dtype} can hold: the model would compute inf or NaN. "
                f"Use a strength (times weight) below {limit:.3g}"
            )


def _deltas(request: SteeringRequest, hidden: int) -> dict[int, LayerDelta]:
    """Each row's vectors merged (:func:`~fv_plugin.merge.merge`), stacked per layer into ``[rows, hidden]``."""
    added = [[(fv, weight) for fv, weight in group if not fv.is_head_patch] for group in request.rows]
    merged = [merge(pairs, request.normalize) for pairs in added]
    deltas = {}
    for layer in sorted({layer for row in merged for layer in row.deltas}):
        rows = torch.zeros(len(merged), hidden, dtype=torch.float64)
        for r, row in enumerate(merged):
            if layer in row.deltas:
                rows[r] = row.deltas[layer]
        deltas[layer] = LayerDelta(layer=layer, rows=rows)
    return deltas


def _head_patches(request: SteeringRequest) -> dict[int, tuple[HeadPatch, ...]]:
    weights: dict[tuple[int, int, int, int], torch.Tensor] = {}  # (vector, row in it, layer, head) -> per-row weights
    values: dict[tuple[int, int, int, int], tuple[torch.Tensor, bool]] = {}
    for r, group in enumerate(request.rows):
        for fv, weight in group:
            if weight == 0.0 or fv.head_values is None or fv.heads is None:
                continue
            for i, (layer, head) in enumerate(fv.heads):
                key = (id(fv), i, layer, head)
                weights.setdefault(key, torch.zeros(len(request.rows)))[r] += weight
                values[key] = (fv.head_values[i], fv.head_mode == "add")
    patches: dict[int, list[HeadPatch]] = {}
    for key, row_weights in weights.items():
        value, add = values[key]
        patches.setdefault(key[2], []).append(HeadPatch(head=key[3], value=value, weights=row_weights, add=add))
    return {layer: tuple(items) for layer, items in patches.items()}


def by_positions(request: SteeringRequest) -> list[SteeringRequest]:
    """``request`` as one request per positions mode: itself when it has one; else one per mode its vectors carry
    (``fv.positions``), with each row's vectors of that mode. What each adds is computed from the same hidden state
    (:mod:`fv_plugin.runtime`), so the parts add up to the whole request, also with ``normalize="relative"``."""
    if request.positions is not None:
        return [request]
    modes = sorted({vector_positions(fv) for group in request.rows for fv, _ in group})
    return [
        dataclasses.replace(
            request,
            rows=tuple(tuple(pair for pair in group if vector_positions(pair[0]) == mode) for group in request.rows),
            positions=mode,
        )
        for mode in modes
    ]


def bind(
    owner: Attachment,
    request: SteeringRequest,
    *,
    window: tuple[int, int] | None = None,
    schedule: Callable[[int], float] | None = None,
    clock: object | None = None,
) -> ActiveSteering | None:
    """The active steering of ``request`` on an attached model (``None`` when it would add nothing)."""
    if request.positions is None:
        raise ValueError("a request whose vectors carry different positions is bound per mode; see by_positions")
    if isinstance(request.strength, float) and request.strength == 0.0:
        return None
    deltas = _deltas(request, owner.arch.hidden_size)
    patches = _head_patches(request)
    if patches and not owner.head_hooks:
        raise ValueError(
            "this model's attention output projections were not found; head-level steering needs "
            "ArchSpec(attn=..., out_proj=...)"
        )
    if not deltas and not patches:
        return None
    return ActiveSteering(
        owner=owner,
        deltas=deltas,
        head_patches=patches,
        strength=request.strength,
        positions=request.positions,
        normalize=request.normalize,
        window=window,
        schedule=schedule,
        clock=clock,
    )


@contextlib.contextmanager
def steering_context(
    model: nn.Module,
    vectors: Sequence[object] = (),
    *,
    rows: object = None,
    strength: object = 1.0,
    positions: str | None = "generated",
    normalize: str = "absolute",
    arch: ArchSpec | None = None,
    window: tuple[int, int] | None = None,
    schedule: Callable[[int], float] | None = None,
    clock: object | None = None,
    replay: tuple[int, int] | None = None,
    gate: bool = False,
    answer_end: torch.Tensor | None = None,
) -> Iterator[ActiveSteering | None]:
    """Steer ``model``'s forwards in the current context for the block; yields the active steering (``None`` when
    the request adds nothing).

    The request is validated before the model is touched; the model stays attached for the block and the
    steering is removed when it exits, even on error. ``window``, ``schedule`` and ``clock`` are a
    :class:`~fv_plugin.FunctionVectorProcessor`'s; ``replay=(rows, position)`` marks forwards that re-run only
    the last prompt token layer by layer (:class:`~fv_plugin.mediation.LastTokenReplay`). ``gate``: one gated
    steering per vector (:mod:`fv_plugin.gating`; the first is yielded); ``answer_end``: for ``positions="answer"``.
    ``positions=None``: each vector at its own (``fv.positions``; one steering per mode when they differ).
    """
    request = validate(
        model, vectors, rows=rows, strength=strength, positions=positions, normalize=normalize, arch=arch
    )
    if gate is True:
        check_gate(fv for group in request.rows for fv, _ in group)
    with attached(model, arch=arch) as owner:
        steerings = tuple(
            steering
            for part in by_positions(request)
            for steering in bind_all(
                owner, part, bind, gate=gate, window=window, schedule=schedule, clock=clock, answer_end=answer_end
            )
        )
        with activate(steerings, replay=replay):
            yield steerings[0] if steerings else None
