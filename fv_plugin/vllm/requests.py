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

import base64
import binascii
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fv_plugin.architectures import ResolvedArch
from fv_plugin.merge import Normalize, check_number, merge
from fv_plugin.positions import Positions
from fv_plugin.request import check_options, check_strength, check_vector, split_vectors
from fv_plugin.vector import FunctionVector

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

FORMAT = 1
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
)
_INLINE_KEYS = ("fv_vectors", "fv_layers", "fv_weights", "fv_model_types")
HEAD_PATCH_REFUSAL = (
    "head-level function vectors (method='head_patch' or 'head_difference') act on attention-head slots inside the "
    "attention block, which the vLLM integration does not reach: it adds vectors to the residual stream after "
    "decoder layers. Steer with the vector's residual-stream version instead, "
    "dataclasses.replace(fv, head_values=None), which adds fv.vector (the heads' summed output) after layer fv.layer"
)

VectorSource = FunctionVector | str


def encode_vector(vector: torch.Tensor) -> str:
    """``[hidden]`` tensor -> base64 of its little-endian float32 bytes."""
    data = vector.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
    return base64.b64encode(data).decode("ascii")


def decode_vector(text: str, what: str) -> torch.Tensor:
    """Inverse of :func:`encode_vector`; ``what`` names the value in error messages."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what} is not base64 text ({exc}); encode vectors with fv_plugin.vllm.steering()") from exc
    if not data or len(data) % 4:
        raise ValueError(f"{what} holds {len(data)} bytes, not a whole number of float32 values")
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))


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
    if any(fv.is_head_patch for fv, _ in pairs):
        raise ValueError(HEAD_PATCH_REFUSAL)
    return pairs, [name for name in names if name is not None]


def steering(
    *vectors: FunctionVector | tuple[FunctionVector, float] | str | tuple[str, float],
    strength: float = 1.0,
    positions: Positions = "generated",
    normalize: Normalize = "absolute",
) -> dict[str, Any]:
    """Request arguments that steer one vLLM request as ``fv_plugin.steer`` steers a Hugging Face model.

    Args:
        *vectors: :class:`~fv_plugin.FunctionVector` objects or ``(vector, weight)`` pairs, as in
            ``fv_plugin.steer`` (vectors may sit at different layers; weights carry signs), or the name of a vector
            the server loaded from ``FV_PLUGIN_VECTORS`` (its file stem), alone or as ``(name, weight)``.
        strength: multiplies every vector (one float per request).
        positions: ``"generated"`` (last prompt token and every generated token), ``"last_prompt"`` or ``"all"``.
        normalize: ``"absolute"`` adds ``strength * weight * vector``; ``"relative"`` scales it to
            ``strength * weight`` times the norm of the hidden state it is added to.

    Returns:
        A flat JSON-serializable dict: pass it as ``SamplingParams(extra_args=...)`` or, on the OpenAI-compatible
        server, as ``extra_body={"vllm_xargs": ...}``.

    Example:
        >>> args = steering(fv, (other, -0.5), strength=2.0)  # doctest: +SKIP
        >>> params = SamplingParams(temperature=0, max_tokens=16, extra_args=args)  # doctest: +SKIP
    """
    check_options(positions, normalize)
    args: dict[str, Any] = {
        "fv_format": FORMAT,
        "fv_strength": _scalar_strength(strength),
        "fv_positions": positions,
        "fv_normalize": normalize,
    }
    inline, named = _split_sources(vectors)
    parts = [(layer, part, weight, fv.model_type) for fv, weight in inline for layer, part in fv.parts().items()]
    if parts:  # a vector over several layers travels as one entry per layer
        args["fv_vectors"] = [encode_vector(part) for _, part, _, _ in parts]
        args["fv_layers"] = [layer for layer, _, _, _ in parts]
        args["fv_weights"] = [weight for _, _, weight, _ in parts]
        args["fv_model_types"] = [model_type or "" for _, _, _, model_type in parts]
    if named:
        args["fv_names"] = [name for name, _ in named]
        args["fv_name_weights"] = [weight for _, weight in named]
    return args


@dataclass(frozen=True)
class VllmSteeringRequest:
    """Request arguments parsed into the pairs and options ``fv_plugin.steer`` takes (not yet checked against a
    model)."""

    pairs: tuple[tuple[FunctionVector, float], ...]
    strength: float
    positions: str
    normalize: Normalize


def _typed_list(args: Mapping[str, Any], key: str, kind: type | tuple[type, ...], length: int | None) -> list[Any]:
    value = args.get(key)
    if value is None:
        return [] if length is None else [None] * length
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{key} must be a list, got {type(value).__name__}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, kind):
            raise TypeError(f"{key} must hold {getattr(kind, '__name__', kind)} values, got {item!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{key} has {len(value)} values but fv_vectors has {length}; give one per vector")
    return list(value)


def _inline_pairs(args: Mapping[str, Any]) -> list[tuple[FunctionVector, float]]:
    texts = _typed_list(args, "fv_vectors", str, None)
    if not texts:
        extra = [key for key in _INLINE_KEYS[1:] if args.get(key)]
        if extra:
            raise ValueError(f"{', '.join(extra)} given without fv_vectors")
        return []
    if "fv_layers" not in args:
        raise ValueError("fv_layers is missing: give the layer of each vector in fv_vectors")
    layers = _typed_list(args, "fv_layers", int, len(texts))
    weights = _typed_list(args, "fv_weights", (int, float), len(texts))
    model_types = _typed_list(args, "fv_model_types", str, len(texts))
    pairs = []
    for i, (text, layer, weight, model_type) in enumerate(zip(texts, layers, weights, model_types, strict=True)):
        vector = decode_vector(text, f"fv_vectors[{i}]")
        fv = FunctionVector(vector=vector, layer=layer, model_type=model_type or None)
        pairs.append((fv, 1.0 if weight is None else check_number(weight, f"fv_weights[{i}]")))
    return pairs


def _named_pairs(
    args: Mapping[str, Any], lookup: Callable[[str], FunctionVector]
) -> list[tuple[FunctionVector, float]]:
    names = _typed_list(args, "fv_names", str, None)
    if not names:
        if args.get("fv_name_weights"):
            raise ValueError("fv_name_weights given without fv_names")
        return []
    weights = _typed_list(args, "fv_name_weights", (int, float), None) or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"fv_name_weights has {len(weights)} values for {len(names)} fv_names; give one per name")
    pairs = zip(names, weights, strict=True)
    return [(lookup(name), check_number(w, f"fv_name_weights[{i}]")) for i, (name, w) in enumerate(pairs)]


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
    positions = args.get("fv_positions", "generated")
    normalize = check_options(positions, args.get("fv_normalize", "absolute"))
    strength = check_number(args.get("fv_strength", 1.0), "fv_strength")
    pairs = _inline_pairs(args) + _named_pairs(args, lookup)
    return VllmSteeringRequest(pairs=tuple(pairs), strength=strength, positions=positions, normalize=normalize)


@dataclass(frozen=True)
class ResolvedSteering:
    """A request checked against the served model: one merged float32 vector per layer.

    ``vectors[i]`` (little-endian float32 bytes) is added after layer ``layers[i]``, times ``strength`` at the
    positions the mode selects, and also times the hidden state's norm when ``relative``.
    """

    layers: tuple[int, ...]
    vectors: tuple[bytes, ...]
    strength: float
    positions: str
    relative: bool

    def to_args(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "vectors": list(self.vectors),
            "strength": self.strength,
            "positions": self.positions,
            "relative": self.relative,
        }

    @classmethod
    def from_args(cls, value: Mapping[str, Any]) -> ResolvedSteering:
        return cls(
            layers=tuple(int(layer) for layer in value["layers"]),
            vectors=tuple(bytes(vector) for vector in value["vectors"]),
            strength=float(value["strength"]),
            positions=str(value["positions"]),
            relative=bool(value["relative"]),
        )

    def salt(self, prompt_length: int, existing: str | None = None) -> str:
        """Prefix-cache salt: equal only for requests whose cached tokens are computed the same way.

        The last prompt token is steered in ``"generated"``/``"last_prompt"`` mode, so those salts include the
        prompt length (a longer prompt sharing this one's tokens must not reuse them).
        """
        digest = hashlib.sha256()
        digest.update(repr((FORMAT, self.positions, self.relative, self.strength, self.layers)).encode())
        for vector in self.vectors:
            digest.update(vector)
        if self.positions != "all":
            digest.update(f"|prompt={prompt_length}".encode())
        mark = f"fv_plugin:{digest.hexdigest()}"
        return mark if existing is None else f"{existing}|{mark}"


def resolve(request: VllmSteeringRequest, arch: ResolvedArch, *, max_layers: int) -> ResolvedSteering | None:
    """Check ``request`` against the served model and merge its vectors per layer (``None``: nothing to add).

    Raises:
        ValueError: a vector made for another model, a layer out of range, a head-level vector, or more distinct
            layers than the server steers per request.
    """
    for fv, _ in request.pairs:
        if fv.is_head_patch:
            raise ValueError(HEAD_PATCH_REFUSAL)
        check_vector(fv, arch)
    if request.strength == 0.0:
        return None
    merged = merge(request.pairs, request.normalize)
    if not merged.deltas:
        return None
    if len(merged.deltas) > max_layers:
        raise ValueError(
            f"this request steers {len(merged.deltas)} layers but the server steers at most {max_layers} per "
            "request; start the server with a larger FV_PLUGIN_VLLM_MAX_LAYERS"
        )
    vectors = tuple(delta.to(torch.float32).numpy().astype("<f4").tobytes() for delta in merged.deltas.values())
    return ResolvedSteering(
        layers=merged.layers,
        vectors=vectors,
        strength=request.strength,
        positions=request.positions,
        relative=merged.relative,
    )
