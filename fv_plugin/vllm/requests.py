"""Per-request steering arguments: what :func:`steering` writes, and how the server checks and resolves them.

Nothing here imports vLLM. The request travels in three shapes:

1. **Request arguments** (``SamplingParams.extra_args`` offline, ``vllm_xargs`` on the OpenAI-compatible server): a
   flat, JSON-serializable dict whose keys start with ``fv_``. Vectors go inline (base64 of little-endian float32,
   with their layer, weight and model type) or by name (vectors the server loaded from ``FV_PLUGIN_VECTORS``).
2. :class:`VllmSteeringRequest`: the arguments parsed into ``(FunctionVector, weight)`` pairs, like
   ``fv_plugin.steer``'s.
3. :class:`ResolvedSteering`: checked against the served model, with the vectors at each layer merged into one
   by :func:`fv_plugin.merge.merge` (the rule ``fv_plugin.steer`` and GGUF export use). This is what the server
   hands to its workers, under the key :data:`RESOLVED_KEY`, as a list of ``(layer, vector)`` entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fv_plugin.architectures import ResolvedArch
from fv_plugin.merge import Normalize, check_number, merge
from fv_plugin.positions import Positions, vector_positions
from fv_plugin.request import check_options, check_strength, check_vector, split_vectors
from fv_plugin.vector import FunctionVector
from fv_plugin.vllm.gate_requests import (
    GATE_KEYS,
    check_vllm_positions,
    encode_gate,
    group_by_condition,
    parse_conditions,
    require_condition,
)
from fv_plugin.vllm.head_requests import (
    HEAD_KEYS,
    HeadVector,
    encode_head_vectors,
    head_vector_of,
    parse_head_vectors,
    resolve_heads,
)
from fv_plugin.vllm.position_args import OWN, POSITION_KEYS, parse_own_positions, request_mode, sent_positions
from fv_plugin.vllm.resolved import FORMAT, ResolvedSteering, answer_ends_of
from fv_plugin.vllm.vector_args import decode_vector, encode_vector, inline_pairs, named_pairs

__all__ = [
    "ARGUMENT_KEYS",
    "FORMAT",
    "RESOLVED_KEY",
    "ResolvedSteering",
    "VllmSteeringRequest",
    "decode_vector",
    "encode_vector",
    "parse_request",
    "resolve",
    "steering",
]

RESOLVED_KEY = "fv_plugin_steering"
ARGUMENT_KEYS: tuple[str, ...] = (
    "fv_format",
    "fv_vectors",
    "fv_layers",
    "fv_weights",
    "fv_model_types",
    "fv_names",
    "fv_name_weights",
    "fv_strength",
    "fv_positions",
    "fv_normalize",
    *HEAD_KEYS,
    *GATE_KEYS,
    *POSITION_KEYS,
)
HEAD_RELATIVE_REFUSAL = (
    "normalize='relative' applies to added vectors, not to head-level (head_patch, head_difference) vectors"
)

VectorSource = FunctionVector | str


def _scalar_strength(strength: object) -> float:
    checked = check_strength(strength)
    if isinstance(checked, torch.Tensor):
        raise ValueError(
            "vLLM steers each request on its own: give each request one strength (a float), not a tensor "
            f"of shape {tuple(checked.shape)}"
        )
    return checked


def _as_name(item: object) -> tuple[str, float] | None:
    """``(name, weight)`` when ``item`` names a server-side vector (``"name"`` or ``("name", weight)``)."""
    if isinstance(item, str):
        return item, 1.0
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[0], check_number(item[1], "a vector's weight")
    return None


def _split_sources(vectors: Sequence[object]) -> tuple[list[tuple[FunctionVector, float]], list[tuple[str, float]]]:
    names = [_as_name(item) for item in vectors]
    pairs = split_vectors([item for item, name in zip(vectors, names, strict=True) if name is None])
    return pairs, [name for name in names if name is not None]


def steering(
    *vectors: FunctionVector | tuple[FunctionVector, float] | str | tuple[str, float],
    strength: float = 1.0,
    positions: Positions | None = None,
    normalize: Normalize = "absolute",
    gate: bool = False,
) -> dict[str, Any]:
    """Request arguments that steer one vLLM request as ``fv_plugin.steer`` steers a Hugging Face model.

    Args:
        *vectors: :class:`~fv_plugin.FunctionVector` objects or ``(vector, weight)`` pairs, as in
            ``fv_plugin.steer`` (vectors may sit at different layers; weights carry signs; head-level vectors,
            ``method="head_difference"`` or ``"head_patch"``, act on their heads' slots as they do there), or the
            name of a vector the server loaded from ``FV_PLUGIN_VECTORS`` (its file stem), alone or as
            ``(name, weight)``.
        strength: multiplies every vector (one float per request).
        positions: ``"generated"`` (last prompt token and every generated token), ``"last_prompt"``, ``"all"`` or
            ``"answer"`` (as ``"generated"``, until the first generated newline or end of sequence; the server knows
            those tokens from its tokenizer). ``None``: each vector's own (``fv.positions``, a named vector's from
            its file; ``"generated"`` for a vector without one), as ``fv_plugin.steer`` does, also when they differ.
        normalize: ``"absolute"`` adds ``strength * weight * vector``; ``"relative"`` scales it to
            ``strength * weight`` times the norm of the hidden state it is added to (not for head-level vectors).
        gate: steer with each vector only if the request's prompt passes the vector's condition (``fv.condition``,
            decided at the prompt's last token, as ``fv_plugin.steer(..., gate=True)`` does); every vector needs
            one (a named vector, the one in its file). Not with ``positions="all"`` (see docs/vllm.md).

    Returns:
        A flat JSON-serializable dict: pass it as ``SamplingParams(extra_args=...)`` or, on the OpenAI-compatible
        server, as ``extra_body={"vllm_xargs": ...}``.

    Example:
        >>> args = steering(fv, (other, -0.5), strength=2.0)  # doctest: +SKIP
        >>> params = SamplingParams(temperature=0, max_tokens=16, extra_args=args)  # doctest: +SKIP
    """
    check_options(positions, normalize)
    inline, named = _split_sources(vectors)
    for mode in [positions] if positions is not None else [vector_positions(fv) for fv, _ in inline]:
        check_vllm_positions(gate, mode)
    args: dict[str, Any] = {"fv_format": FORMAT, "fv_strength": _scalar_strength(strength), "fv_normalize": normalize}
    args.update(sent_positions(positions, inline, bool(named)))
    if normalize == "relative" and any(fv.is_head_patch for fv, _ in inline):
        raise ValueError(HEAD_RELATIVE_REFUSAL)
    args.update(encode_head_vectors([(fv, weight) for fv, weight in inline if fv.is_head_patch]))
    inline = [(fv, weight) for fv, weight in inline if not fv.is_head_patch]
    parts = [(layer, part, weight, fv.model_type) for fv, weight in inline for layer, part in fv.parts().items()]
    if parts:  # a vector over several layers travels as one entry per layer
        args["fv_vectors"] = [encode_vector(part) for _, part, _, _ in parts]
        args["fv_layers"] = [layer for layer, _, _, _ in parts]
        args["fv_weights"] = [weight for _, _, weight, _ in parts]
        args["fv_model_types"] = [model_type or "" for _, _, _, model_type in parts]
    if named:
        args["fv_names"] = [name for name, _ in named]
        args["fv_name_weights"] = [weight for _, weight in named]
    if gate:
        heads = [fv for fv, _ in _split_sources(vectors)[0] if fv.is_head_patch]
        args.update(encode_gate([fv for fv, _ in inline for _ in fv.parts()], heads))
    return args


@dataclass(frozen=True)
class VllmSteeringRequest:
    """Request arguments parsed into the pairs and options ``fv_plugin.steer`` takes (not yet checked against a
    model)."""

    pairs: tuple[tuple[FunctionVector, float], ...]
    strength: float
    positions: str | None  # None: each vector's own (its ``positions``), which differ
    normalize: Normalize
    head_pairs: tuple[tuple[HeadVector, float], ...] = ()  # inline head-level vectors (named ones are in pairs)
    gate: bool = False  # each vector (its ``condition``, or its head vector's) gates on its own


def _check_keys(args: Mapping[str, Any]) -> None:
    if RESOLVED_KEY in args:
        raise ValueError(f"{RESOLVED_KEY} is set by the server itself; send the fv_* arguments of steering() instead")
    unknown = sorted(key for key in args if key.startswith("fv_") and key not in ARGUMENT_KEYS)
    if unknown:
        raise ValueError(f"unknown steering argument(s) {unknown}; fv_plugin's are {list(ARGUMENT_KEYS)}")
    version = args.get("fv_format", FORMAT)
    if version != FORMAT:
        raise ValueError(f"fv_format {version!r} is not supported by this server (it reads format {FORMAT})")


def parse_request(
    args: Mapping[str, Any] | None, lookup: Callable[[str], FunctionVector]
) -> VllmSteeringRequest | None:
    """Parse request arguments (``None`` when they hold no ``fv_`` key: a plain request).

    ``lookup`` returns the server's vector of a given name, or raises ``ValueError`` naming the known ones.

    Raises:
        ValueError, TypeError: a malformed argument, with what is wrong and how to fix it.
    """
    if not args or not any(key.startswith("fv_") for key in args):
        return None
    _check_keys(args)
    normalize = check_options(args.get("fv_positions"), args.get("fv_normalize", "absolute"))
    strength = check_number(args.get("fv_strength", 1.0), "fv_strength")
    inline, named = inline_pairs(args), named_pairs(args, lookup)
    head_pairs = parse_head_vectors(args, decode_vector, check_number)
    own, own_heads = parse_own_positions(args, len(inline), len(head_pairs))
    inline = [(dataclasses.replace(fv, positions=p), w) for (fv, w), p in zip(inline, own, strict=True)]
    head_pairs = [(dataclasses.replace(hv, positions=p), w) for (hv, w), p in zip(head_pairs, own_heads, strict=True)]
    modes = [vector_positions(fv) for fv, _ in inline + named] + [vector_positions(hv) for hv, _ in head_pairs]
    positions = request_mode(args.get("fv_positions"), modes)
    gated = parse_conditions(args, len(inline), len(head_pairs), decode_vector, check_number)
    for mode in [positions] if positions is not None else modes:
        check_vllm_positions(gated is not None, mode)
    if gated is not None:
        inline, named, head_pairs = _with_conditions(args, gated, inline, named, head_pairs)
    return VllmSteeringRequest(
        pairs=tuple(inline + named),
        strength=strength,
        positions=positions,
        normalize=normalize,
        head_pairs=tuple(head_pairs),
        gate=gated is not None,
    )


Pairs = list[tuple[FunctionVector, float]]


def _with_conditions(
    args: Mapping[str, Any],
    gated: tuple[list[Any], list[Any]],
    inline: Pairs,
    named: Pairs,
    head_pairs: list[tuple[HeadVector, float]],
) -> tuple[Pairs, Pairs, list[tuple[HeadVector, float]]]:
    """A gated request's vectors, each with its condition (refused, with the gate's words, when one has none)."""
    residual, heads = gated
    inline = [
        (dataclasses.replace(fv, condition=require_condition(c, f"fv_vectors[{i}] (layer {fv.layer})")), w)
        for i, ((fv, w), c) in enumerate(zip(inline, residual, strict=True))
    ]
    names = args.get("fv_names") or []
    for name, (fv, _) in zip(names, named, strict=True):
        require_condition(fv.condition, f"the server's vector {name!r}")
    head_pairs = [
        (dataclasses.replace(hv, condition=require_condition(c, f"fv_head_values[{i}]")), w)
        for i, ((hv, w), c) in enumerate(zip(head_pairs, heads, strict=True))
    ]
    return inline, named, head_pairs


def resolve(
    request: VllmSteeringRequest,
    arch: ResolvedArch,
    *,
    max_layers: int,
    max_heads: int = 64,
    head_dim: int | None = None,
    answer_ends: Callable[[], bytes] | None = None,
) -> ResolvedSteering | None:
    """Check ``request`` against the served model and merge its vectors per layer (``None``: nothing to add).

    Head-level vectors become one entry per head slot (``max_heads`` at most; ``head_dim``: the model's, checked
    when given). ``answer_ends`` gives the ids that end an answer (little-endian ``int64`` bytes), which
    ``positions="answer"`` needs.

    Raises:
        ValueError: a vector made for another model, a layer or head out of range, ``normalize="relative"`` with
            a head-level vector, more distinct layers (heads) than the server steers per request, or
            ``positions="answer"`` without ``answer_ends``.
    """
    head_pairs = [*request.head_pairs, *((head_vector_of(fv), w) for fv, w in request.pairs if fv.is_head_patch)]
    residual = [pair for pair in request.pairs if not pair[0].is_head_patch]
    for fv, _ in residual:
        check_vector(fv, arch)
    if head_pairs and request.normalize == "relative":
        raise ValueError(HEAD_RELATIVE_REFUSAL)
    gate_of = [fv.condition for fv, _ in residual] + [hv.condition for hv, _ in head_pairs]
    conditions, gates = group_by_condition(gate_of if request.gate else [None] * len(gate_of))
    modes = [request.positions or vector_positions(v) for v, _ in [*residual, *head_pairs]]
    heads = resolve_heads(
        head_pairs,
        arch,
        strength=request.strength,
        head_dim=head_dim,
        max_heads=max_heads,
        gates=gates[len(residual) :],
        positions=modes[len(residual) :],
    )
    if request.strength == 0.0:
        return None
    columns = _columns(residual, gates[: len(residual)], modes[: len(residual)], request.normalize)
    if not columns and not heads:
        return None
    _check_sizes(len(columns), len(conditions), max_layers)
    return ResolvedSteering(
        layers=tuple(column.layer for column in columns),
        vectors=tuple(column.delta.to(torch.float32).numpy().astype("<f4").tobytes() for column in columns),
        strength=request.strength,
        positions=request.positions or OWN,
        relative=request.normalize == "relative",
        heads=heads,
        gates=tuple(column.gate for column in columns) if conditions else (),
        conditions=conditions,
        answer_ends=answer_ends_of(request.positions or OWN, answer_ends),
        column_positions=tuple(column.positions for column in columns),
    )


@dataclass(frozen=True)
class _Column:
    layer: int
    delta: torch.Tensor
    gate: int
    positions: str


def _columns(
    pairs: Sequence[tuple[FunctionVector, float]], gates: Sequence[int], modes: Sequence[str], normalize: Normalize
) -> list[_Column]:
    """The vectors at one layer merged into one column, separately per condition and per positions mode."""
    columns = []
    for group in sorted(set(zip(gates, modes, strict=True))):
        chosen = [pair for pair, *key in zip(pairs, gates, modes, strict=True) if tuple(key) == group]
        merged = merge(chosen, normalize)
        columns += [_Column(layer, delta, *group) for layer, delta in merged.deltas.items()]
    return columns


def _check_sizes(columns: int, conditions: int, max_layers: int) -> None:
    if columns > max_layers:
        raise ValueError(
            f"this request steers {columns} layers (per condition and positions mode) but the server steers at most "
            f"{max_layers} per request; start the server with a larger FV_PLUGIN_VLLM_MAX_LAYERS"
        )
    if conditions > max_layers:
        raise ValueError(
            f"this request gates on {conditions} distinct conditions but the server gates on at most {max_layers} "
            "per request; start the server with a larger FV_PLUGIN_VLLM_MAX_LAYERS"
        )
