"""What the server hands its workers for one steered request: :class:`ResolvedSteering` (nothing here imports
vLLM)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fv_plugin.vllm.gate_requests import GateCondition
from fv_plugin.vllm.head_requests import HeadEntry

__all__ = ["FORMAT", "ResolvedSteering", "answer_ends_of"]

FORMAT = 1  # the version of the request arguments steering() writes


@dataclass(frozen=True)
class ResolvedSteering:
    """A request checked against the served model: one merged float32 vector per layer.

    ``vectors[i]`` (little-endian float32 bytes) is added after layer ``layers[i]``, times ``strength`` at the
    positions the mode selects, and also times the hidden state's norm when ``relative``. ``heads``: the head
    slots its head-level vectors act on (see :class:`~fv_plugin.vllm.head_requests.HeadEntry`). A gated request
    has ``conditions``; ``gates[i]`` (and each head entry's ``gate``) is the index of the condition that gates
    ``vectors[i]`` (-1: none). One layer may then appear once per condition. ``answer_ends``
    (``positions="answer"``): little-endian ``int64`` ids of the served tokenizer's tokens that end an answer.
    ``column_positions[i]``: the mode ``vectors[i]`` is steered at (empty: ``positions`` for all); a request
    whose vectors keep different own positions has ``positions="own"``, a column per layer and mode, and each
    head entry's mode in the entry.
    """

    layers: tuple[int, ...]
    vectors: tuple[bytes, ...]
    strength: float
    positions: str
    relative: bool
    heads: tuple[HeadEntry, ...] = ()
    gates: tuple[int, ...] = ()
    conditions: tuple[GateCondition, ...] = ()
    answer_ends: bytes = b""
    column_positions: tuple[str, ...] = ()

    def to_args(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "vectors": list(self.vectors),
            "strength": self.strength,
            "positions": self.positions,
            "relative": self.relative,
            "heads": [entry.to_args() for entry in self.heads],
            "gates": list(self.gates),
            "conditions": [condition.to_args() for condition in self.conditions],
            "answer_ends": self.answer_ends,
            "column_positions": list(self.column_positions),
        }

    @classmethod
    def from_args(cls, value: Mapping[str, Any]) -> ResolvedSteering:
        return cls(
            layers=tuple(int(layer) for layer in value["layers"]),
            vectors=tuple(bytes(vector) for vector in value["vectors"]),
            strength=float(value["strength"]),
            positions=str(value["positions"]),
            relative=bool(value["relative"]),
            heads=tuple(HeadEntry.from_args(entry) for entry in value.get("heads", ())),
            gates=tuple(int(gate) for gate in value.get("gates", ())),
            conditions=tuple(GateCondition.from_args(c) for c in value.get("conditions", ())),
            answer_ends=bytes(value.get("answer_ends", b"")),
            column_positions=tuple(str(mode) for mode in value.get("column_positions", ())),
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
        for entry in self.heads:
            digest.update(repr(entry.to_args()[:4]).encode() + entry.value)
        digest.update(repr(("gates", self.gates, [entry.gate for entry in self.heads])).encode())
        digest.update(repr(("modes", self.column_positions, [entry.positions for entry in self.heads])).encode())
        for condition in self.conditions:
            digest.update(repr(condition.to_args()[:2]).encode() + condition.direction)
        if self.positions != "all":
            digest.update(f"|prompt={prompt_length}".encode())
        mark = f"fv_plugin:{digest.hexdigest()}"
        return mark if existing is None else f"{existing}|{mark}"


def answer_ends_of(positions: str, reader: Callable[[], bytes] | None) -> bytes:
    """The end ids a request with ``positions`` carries (``b""`` unless ``"answer"``), from the server's ``reader``.

    Raises:
        ValueError: ``positions="answer"`` on a server without a tokenizer (``reader`` is ``None``).
    """
    if positions != "answer":
        return b""
    if reader is None:
        raise ValueError(
            "positions='answer' needs the served model's tokenizer to know which tokens end an answer, and this "
            "server has none (skip_tokenizer_init?); start it with its tokenizer, or use positions='generated' with "
            "a stop string such as '\\n'"
        )
    return reader()
