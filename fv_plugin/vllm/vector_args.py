"""How a vLLM request carries its vectors: inline (base64 of little-endian float32, with layer, weight and model
type) or by the name of a vector the server loaded. Nothing here imports vLLM."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fv_plugin.merge import check_number
from fv_plugin.vector import FunctionVector

__all__ = ["INLINE_KEYS", "decode_vector", "encode_vector", "inline_pairs", "named_pairs"]

INLINE_KEYS = ("fv_vectors", "fv_layers", "fv_weights", "fv_model_types")


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


def inline_pairs(args: Mapping[str, Any]) -> list[tuple[FunctionVector, float]]:
    texts = _typed_list(args, "fv_vectors", str, None)
    if not texts:
        extra = [key for key in INLINE_KEYS[1:] if args.get(key)]
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


def named_pairs(args: Mapping[str, Any], lookup: Callable[[str], FunctionVector]) -> list[tuple[FunctionVector, float]]:
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
