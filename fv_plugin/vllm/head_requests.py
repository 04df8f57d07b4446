"""Head-level vectors in a vLLM request: how :func:`~fv_plugin.vllm.steering` writes them, and how the server checks
them and turns them into per-head entries for its workers. Nothing here imports vLLM.

A head-level vector (``method="head_difference"`` or ``"head_patch"``) acts on its heads' own slots of the attention
output projection's input, as ``fv_plugin.steer`` does on Hugging Face: ``slot + c * value`` (``head_mode="add"``)
or ``slot + c * (value - slot)`` (``"replace"``), with ``c = strength * weight`` at the steered positions.

In a request, each head-level vector travels as one entry of ``fv_head_values`` (base64 of its ``[k, head_dim]``
values, little-endian float32), ``fv_head_counts`` (its number of heads ``k``), ``fv_head_modes`` (``"add"`` or
``"replace"``), ``fv_head_weights`` and ``fv_head_model_types``; ``fv_head_heads`` holds every vector's heads in
turn as one flat ``[layer, head, layer, head, ...]`` list (``vllm_xargs`` takes flat lists only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fv_plugin.architectures import ResolvedArch
from fv_plugin.condition import Condition
from fv_plugin.vector import FunctionVector

__all__ = [
    "HEAD_KEYS",
    "HeadEntry",
    "HeadVector",
    "encode_head_vectors",
    "head_vector_of",
    "parse_head_vectors",
    "resolve_heads",
]

HEAD_KEYS: tuple[str, ...] = (
    "fv_head_values",
    "fv_head_heads",
    "fv_head_counts",
    "fv_head_modes",
    "fv_head_weights",
    "fv_head_model_types",
)


@dataclass(frozen=True)
class HeadVector:
    """A head-level vector as the server sees it: ``values[i]`` (``[head_dim]``) acts on head ``heads[i]``."""

    heads: tuple[tuple[int, int], ...]
    values: torch.Tensor  # [k, head_dim] float32
    replace: bool
    model_type: str | None = None
    condition: Condition | None = None  # gate=True: which prompts it steers
    positions: str | None = None  # its own positions (None: "generated"), where the request does not set them


@dataclass(frozen=True)
class HeadEntry:
    """One head slot a request acts on: ``slot + strength * weight * (value - replace * slot)`` at its positions
    (``gate``: the index of the request's condition that gates it, -1: none; ``positions``: its mode, ``""``: the
    request's)."""

    layer: int
    head: int
    replace: bool
    weight: float
    value: bytes  # little-endian float32 [head_dim]
    gate: int = -1
    positions: str = ""

    def to_args(self) -> list[Any]:
        return [self.layer, self.head, self.replace, self.weight, self.value, self.gate, self.positions]

    @classmethod
    def from_args(cls, value: Sequence[Any]) -> HeadEntry:
        layer, head, replace, weight, data, *rest = value
        gate, positions = (int(rest[0]) if rest else -1), (str(rest[1]) if len(rest) > 1 else "")
        return cls(int(layer), int(head), bool(replace), float(weight), bytes(data), gate, positions)


def head_vector_of(fv: FunctionVector) -> HeadVector:
    """The head-level part of ``fv`` (which must have ``head_values``)."""
    if fv.head_values is None or fv.heads is None:
        raise ValueError("not a head-level function vector: it has no head_values")
    values = fv.head_values.detach().to("cpu", torch.float32)
    replace = fv.head_mode == "replace"
    return HeadVector(
        tuple(fv.heads), values, replace, model_type=fv.model_type, condition=fv.condition, positions=fv.positions
    )


def _encode(values: torch.Tensor) -> str:
    import base64

    return base64.b64encode(values.contiguous().numpy().astype("<f4").tobytes()).decode("ascii")


def encode_head_vectors(pairs: Sequence[tuple[FunctionVector, float]]) -> dict[str, Any]:
    """Request arguments for head-level ``(vector, weight)`` pairs (empty when there are none)."""
    if not pairs:
        return {}
    vectors = [(head_vector_of(fv), weight) for fv, weight in pairs]
    return {
        "fv_head_values": [_encode(hv.values) for hv, _ in vectors],
        "fv_head_heads": [index for hv, _ in vectors for pair in hv.heads for index in pair],
        "fv_head_counts": [len(hv.heads) for hv, _ in vectors],
        "fv_head_modes": ["replace" if hv.replace else "add" for hv, _ in vectors],
        "fv_head_weights": [weight for _, weight in vectors],
        "fv_head_model_types": [hv.model_type or "" for hv, _ in vectors],
    }


def _list(args: Mapping[str, Any], key: str, count: int) -> list[Any]:
    value = args.get(key)
    if value is None:
        return [None] * count
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{key} must be a list with one value per entry of fv_head_values ({count})")
    return list(value)


def _ints(value: object, key: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in value):
        raise TypeError(f"{key} must be a list of ints, got {value!r}")
    return [int(x) for x in value]


def _heads(args: Mapping[str, Any], count: int) -> list[tuple[tuple[int, int], ...]]:
    flat = _ints(args.get("fv_head_heads"), "fv_head_heads")
    counts = _ints(_list(args, "fv_head_counts", count), "fv_head_counts")
    if any(k < 1 for k in counts) or len(flat) != 2 * sum(counts):
        raise ValueError(
            f"fv_head_heads must hold one [layer, head] pair per head of each vector: {2 * sum(counts)} ints for "
            f"fv_head_counts {counts}, got {len(flat)}"
        )
    out, start = [], 0
    for k in counts:
        out.append(tuple((int(flat[j]), int(flat[j + 1])) for j in range(start, start + 2 * k, 2)))
        start += 2 * k
    return out


def parse_head_vectors(args: Mapping[str, Any], decode: Any, check_number: Any) -> list[tuple[HeadVector, float]]:
    """The head-level ``(vector, weight)`` pairs of request arguments (``decode``/``check_number``: the request
    module's own checks, so both kinds of vector are refused with the same words)."""
    texts = args.get("fv_head_values")
    if not texts:
        extra = [key for key in HEAD_KEYS[1:] if args.get(key)]
        if extra:
            raise ValueError(f"{', '.join(extra)} given without fv_head_values")
        return []
    if not isinstance(texts, (list, tuple)) or not all(isinstance(text, str) for text in texts):
        raise TypeError("fv_head_values must be a list of base64 strings")
    heads, modes = _heads(args, len(texts)), _list(args, "fv_head_modes", len(texts))
    weights, types = _list(args, "fv_head_weights", len(texts)), _list(args, "fv_head_model_types", len(texts))
    pairs = []
    for i, text in enumerate(texts):
        flat = decode(text, f"fv_head_values[{i}]")
        if flat.numel() % len(heads[i]):
            raise ValueError(f"fv_head_values[{i}] holds {flat.numel()} values for {len(heads[i])} heads")
        if modes[i] not in ("add", "replace"):
            raise ValueError(f"fv_head_modes[{i}] must be 'add' or 'replace', got {modes[i]!r}")
        if types[i] is not None and not isinstance(types[i], str):
            raise TypeError(f"fv_head_model_types[{i}] must be a string, got {types[i]!r}")
        weight = 1.0 if weights[i] is None else check_number(weights[i], f"fv_head_weights[{i}]")
        values = flat.reshape(len(heads[i]), -1)
        pairs.append((HeadVector(heads[i], values, modes[i] == "replace", types[i] or None), weight))
    return pairs


def _check(vector: HeadVector, arch: ResolvedArch, head_dim: int | None) -> None:
    if vector.model_type is not None and vector.model_type != arch.model_type:
        raise ValueError(
            f"function vector was made on a {vector.model_type!r} model but this model is {arch.model_type!r}"
        )
    if head_dim is not None and vector.values.shape[1] != head_dim:
        raise ValueError(
            f"the head-level vector's head values have size {vector.values.shape[1]} but this model's heads have "
            f"size {head_dim}; was it made on another model?"
        )
    if not bool(torch.isfinite(vector.values).all()):
        raise ValueError("the head-level vector's head values contain NaN or inf values")
    for layer, head in vector.heads:
        if not 0 <= layer < arch.num_layers or arch.num_heads is None or not 0 <= head < arch.num_heads:
            raise ValueError(f"head ({layer}, {head}) of the function vector does not exist in this model")
    condition, first = vector.condition, min(layer for layer, _ in vector.heads)
    if condition is not None and (condition.direction.numel() != arch.hidden_size or condition.layer >= first):
        raise ValueError(
            f"a condition reads layer {condition.layer} with size {condition.direction.numel()}; this vector "
            f"needs a layer below {first} (the first it touches) and size {arch.hidden_size}"
        )


def _folded(entries: list[tuple[bool, float, np.ndarray]], strength: float) -> tuple[bool, float, np.ndarray]:
    """Several entries on one head slot, applied in order, as one (``slot -> a * slot + b``, in float64)."""
    a, b = 1.0, np.zeros_like(entries[0][2], dtype=np.float64)
    for replace, weight, value in entries:
        c = strength * weight
        keep = 1.0 - c if replace else 1.0
        a, b = a * keep, b * keep + c * value.astype(np.float64)
    if a == 1.0:  # only adds, or replacements that cancel: slot + b
        return False, 1.0, b / strength
    return True, (1.0 - a) / strength, b / (1.0 - a)


def _check_slot(first: tuple[int, str], other: tuple[int, str], slot: tuple[int, int]) -> None:
    """Refuse a second vector on a head slot with another condition or positions mode than the first's."""
    if first[0] != other[0]:
        raise ValueError(
            f"two head-level vectors with different conditions act on head {slot}; with gate=True the server "
            "gates each head slot by one condition: send them in separate requests"
        )
    if first[1] != other[1]:
        raise ValueError(
            f"two head-level vectors steered at different positions ({first[1]} and {other[1]}, their own) act on "
            f"head {slot}; the server moves each head slot at one positions mode per request: pass positions=... "
            "to steer them all at one, or send them in separate requests"
        )


def resolve_heads(
    pairs: Sequence[tuple[HeadVector, float]],
    arch: ResolvedArch,
    *,
    strength: float,
    head_dim: int | None,
    max_heads: int,
    gates: Sequence[int] | None = None,
    positions: Sequence[str] | None = None,
) -> tuple[HeadEntry, ...]:
    """Check head-level pairs against the served model; one entry per head slot they touch (``strength != 0``).

    Entries of the same vector and weight on one slot merge their weights, as ``fv_plugin.steer`` does; different
    entries on one slot are folded into one that applies them in order (equal up to float rounding). ``gates``:
    the condition index of each pair (gated requests); ``positions``: each pair's mode, where the request's
    vectors keep their own. Entries under different conditions or modes cannot be folded.

    Raises:
        ValueError: a vector made for another model, a head that does not exist, more head slots than the server
            steers per request, or two differently gated (or positioned) vectors on one head slot.
    """
    for vector, _ in pairs:
        _check(vector, arch, head_dim)
    if strength == 0.0:
        return ()
    gate_of = list(gates) if gates is not None else [-1] * len(pairs)
    mode_of = list(positions) if positions is not None else [""] * len(pairs)
    merged: dict[tuple[int, int, bool, bytes], float] = {}
    slot_gates: dict[tuple[int, int], tuple[int, str]] = {}
    for (vector, weight), gate, mode in zip(pairs, gate_of, mode_of, strict=True):
        if weight == 0.0:
            continue
        for (layer, head), value in zip(vector.heads, vector.values, strict=True):
            _check_slot(slot_gates.setdefault((layer, head), (gate, mode)), (gate, mode), (layer, head))
            key = (layer, head, vector.replace, value.numpy().astype("<f4").tobytes())
            merged[key] = float(np.float32(merged.get(key, 0.0)) + np.float32(weight))
    slots: dict[tuple[int, int], list[tuple[bool, float, np.ndarray]]] = {}
    for (layer, head, replace, data), weight in merged.items():
        slots.setdefault((layer, head), []).append((replace, weight, np.frombuffer(data, dtype="<f4")))
    if len(slots) > max_heads:
        raise ValueError(
            f"this request steers {len(slots)} attention heads but the server steers at most {max_heads} per "
            "request; start the server with a larger FV_PLUGIN_VLLM_MAX_HEADS"
        )
    out = []
    for (layer, head), items in sorted(slots.items()):
        replace, weight, value = items[0] if len(items) == 1 else _folded(items, strength)
        data = np.asarray(value, dtype="<f4").tobytes()
        out.append(HeadEntry(layer, head, replace, weight, data, *slot_gates[(layer, head)]))
    return tuple(out)
