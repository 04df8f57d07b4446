"""Positions in a vLLM request: one mode for every vector, or each vector's own. Nothing here imports vLLM.

``fv_positions`` steers every vector of the request at one mode. Without it each vector is steered at its own
(``fv.positions``, :func:`fv_plugin.positions.vector_positions`), as ``fv_plugin.steer`` does on Hugging Face:

- ``fv_vector_positions``: the positions of each ``fv_vectors`` entry (``"generated"``, ``"last_prompt"`` or ``"all"``);
- ``fv_head_positions``: the same for each ``fv_head_values`` entry;
- a vector named by the server (``fv_names``) carries the positions stored in its file.

:func:`~fv_plugin.vllm.steering` sends ``fv_positions`` when the vectors it sends agree and the request names no
server vector, and the per-entry lists otherwise. A request whose vectors still disagree is steered per column:
the server merges vectors per layer and positions, and each column and head entry carries its mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fv_plugin.config import VECTOR_POSITIONS
from fv_plugin.positions import vector_positions
from fv_plugin.vector import FunctionVector

__all__ = ["OWN", "POSITION_KEYS", "parse_own_positions", "request_mode", "sent_positions"]

POSITION_KEYS: tuple[str, ...] = ("fv_vector_positions", "fv_head_positions")
OWN = "own"  # a resolved request whose columns carry different modes


def sent_positions(positions: str | None, pairs: Sequence[tuple[FunctionVector, float]], named: bool) -> dict[str, Any]:
    """The positions arguments of a request with inline vectors ``pairs`` (and server vectors when ``named``)."""
    if positions is not None:
        return {"fv_positions": positions}
    own = {vector_positions(fv) for fv, _ in pairs}
    if not named and len(own) <= 1:
        return {"fv_positions": own.pop() if own else "generated"}
    residual = [vector_positions(fv) for fv, _ in pairs if not fv.is_head_patch for _ in fv.parts()]
    heads = [vector_positions(fv) for fv, _ in pairs if fv.is_head_patch]
    return {key: value for key, value in zip(POSITION_KEYS, (residual, heads), strict=True) if value}


def _entries(args: Mapping[str, Any], key: str, count: int) -> list[str | None]:
    value = args.get(key)
    if value is None:
        return [None] * count
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{key} must be a list with one positions mode per vector entry ({count})")
    for i, mode in enumerate(value):
        if mode not in VECTOR_POSITIONS:
            raise ValueError(
                f"{key}[{i}] must be one of {VECTOR_POSITIONS} (a vector's own positions), got {mode!r}; "
                "send fv_positions to steer every vector at another mode"
            )
    return list(value)


def parse_own_positions(
    args: Mapping[str, Any], residual_count: int, head_count: int
) -> tuple[list[str | None], list[str | None]]:
    """The own positions of each ``fv_vectors`` and ``fv_head_values`` entry (``None``: not sent)."""
    given = [key for key in POSITION_KEYS if args.get(key) is not None]
    if given and args.get("fv_positions") is not None:
        raise ValueError(
            f"fv_positions steers every vector at one mode and {', '.join(given)} at each one's own; send one of them"
        )
    return _entries(args, POSITION_KEYS[0], residual_count), _entries(args, POSITION_KEYS[1], head_count)


def request_mode(explicit: str | None, own: Sequence[str]) -> str | None:
    """The one mode a request steers at: ``explicit``, or the vectors' ``own`` when they agree; ``None`` when they
    do not (each column then carries its own)."""
    if explicit is not None:
        return explicit
    modes = set(own)
    return modes.pop() if len(modes) == 1 else ("generated" if not modes else None)
