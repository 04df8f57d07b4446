"""Export function vectors to llama.cpp's control-vector GGUF files.

llama.cpp (``--control-vector FILE``) reads tensors named ``direction.N``, one-dimensional float32 of the
model's hidden size, and adds ``direction.N`` to the output of decoder block ``N`` (0-based), the same place
fv_plugin adds a vector with ``layer=N``. Its loader refuses ``direction.0`` and has no slot for block 0, so a
vector at layer 0 cannot be exported. It adds the vector at every position of the sequence (prompt included),
which is fv_plugin's ``positions="all"``, with no per-token strength, and with no condition: a control vector
cannot be gated (it is added at every token of every prompt), and a vector ``method="auto"`` chose to steer at the
last prompt token only (``fv.positions == "last_prompt"``) is then added at every token too (a warning says so).
Head-level vectors cannot be exported (llama.cpp has no head slots): make a portable one with ``fv extract
--portable`` (``ExtractionConfig(portable=True)``), and add ``--every-token`` (``auto_positions=("all",)``) for one
chosen as llama.cpp will add it, at every token.

The metadata follows the files llama.cpp users share: ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (the vectors' ``model_type``, when known) and ``controlvector.layer_count`` (the
number of ``direction`` tensors).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from fv_plugin.merge import Additive, check_number, merge

__all__ = ["GGUF_INSTALL", "control_vector_directions", "head_level_refusal", "to_gguf"]

logger = logging.getLogger(__name__)
GGUF_INSTALL = 'pip install "fv_plugin[gguf]"'
ARCHITECTURE = "controlvector"


@runtime_checkable
class Exported(Additive, Protocol):
    """What export reads of a :class:`~fv_plugin.FunctionVector` (a protocol: ``FunctionVector.to_gguf`` calls
    this module, which therefore does not import the vector's class)."""

    @property
    def size(self) -> int: ...

    @property
    def model_type(self) -> str | None: ...

    @property
    def method(self) -> str | None: ...


def _pair(item: object) -> tuple[Exported, float]:
    if isinstance(item, Exported):
        return item, 1.0
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Exported):
        return item[0], check_number(item[1], "a vector's weight")
    raise TypeError(
        f"to_gguf takes a FunctionVector, a (FunctionVector, weight) pair, or a list of them; got {type(item).__name__}"
    )


def _pairs(vectors: object) -> list[tuple[Exported, float]]:
    single = isinstance(vectors, Exported) or (
        isinstance(vectors, tuple) and len(vectors) == 2 and isinstance(vectors[0], Exported)
    )
    if not single and isinstance(vectors, (list, tuple)):
        return [_pair(item) for item in vectors]
    return [_pair(vectors)]


def _check(pairs: list[tuple[Exported, float]]) -> None:
    if not pairs:
        raise ValueError("to_gguf needs at least one function vector")
    sizes = {fv.size for fv, _ in pairs}
    if len(sizes) > 1:
        raise ValueError(f"the vectors have different sizes {sorted(sizes)}: one file serves one model")
    types = {fv.model_type for fv, _ in pairs if fv.model_type is not None}
    if len(types) > 1:
        raise ValueError(f"the vectors were made on different model types {sorted(types)}: one file serves one model")
    for fv, _ in pairs:
        if fv.is_head_patch:
            raise ValueError(head_level_refusal(fv))
        if 0 in fv.parts():
            raise ValueError(
                "llama.cpp control vectors have no slot for the output of block 0 (its loader refuses "
                "direction.0); steer at layer 1 or later to export"
            )


def head_level_refusal(fv: Exported) -> str:
    """Why a head-level vector cannot be exported, and the portable choice with its measured validation accuracy
    (from the candidates ``auto`` scored, ``fv.selection``, when the vector has them)."""
    from fv_plugin.config import PORTABLE_METHODS
    from fv_plugin.records import Selection

    what = f"head-level function vectors (method={fv.method!r}) write attention-head slots, which a llama.cpp "
    what += "control vector (one vector added to a block's output) cannot express. Extract a portable vector: "
    what += "`fv extract --portable` or ExtractionConfig(portable=True) makes method='auto' choose among "
    what += f"the residual-stream forms {PORTABLE_METHODS} only"
    found = getattr(fv, "selection", None)
    selection = found if isinstance(found, Selection) else None
    best = selection.best_of(PORTABLE_METHODS) if selection is not None else None
    if selection is None or best is None:
        return what + " (this vector holds no record of portable candidates, so their accuracy is not known here)"
    chosen = selection.best
    if best.exact_match is not None and chosen.exact_match is not None:
        return (
            f"{what}. On this vector's {selection.n_queries} validation queries the best portable candidate "
            f"({best.label()}) scored {best.exact_match:.2f} by exact match of the answer, against "
            f"{chosen.exact_match:.2f} for the chosen {chosen.label()} and "
            f"{selection.baseline_exact_match or 0.0:.2f} without a vector"
        )
    return (
        f"{what}. On this vector's {selection.n_queries} validation queries the best portable candidate "
        f"({best.label()}) scored {best.accuracy:.2f}, against {chosen.accuracy:.2f} for the chosen "
        f"{chosen.label()} and {selection.baseline_accuracy:.2f} zero-shot"
    )


def control_vector_directions(vectors: object) -> dict[int, torch.Tensor]:
    """The ``direction.N`` tensors of a control vector: ``{N: float32 [hidden]}``, the weighted vectors merged per
    layer by :func:`fv_plugin.merge.merge` as ``fv_plugin.steer`` merges them with ``normalize="absolute"`` (``N``
    is the layer: llama.cpp adds ``direction.N`` to the output of block ``N``; a vector over several layers gives
    one direction per layer).

    Raises:
        ValueError: no vectors, vectors of different sizes or model types, a head-level vector, layer 0, or only
            weights of 0 (the file would add nothing).
    """
    pairs = _pairs(vectors)
    _check(pairs)
    merged = merge(pairs, "absolute")
    if not merged.deltas:
        raise ValueError("every vector has weight 0, so the control vector would add nothing; give a non-zero weight")
    return {layer: delta.to(torch.float32) for layer, delta in merged.deltas.items()}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise ImportError(
            f"writing llama.cpp GGUF files needs the gguf package. Install it with:\n    {GGUF_INSTALL}"
        ) from exc
    return gguf


def to_gguf(vectors: object, path: str | Path, *, model_hint: str | None = None) -> Path:
    """Write ``vectors`` as one llama.cpp control-vector GGUF file.

    Args:
        vectors: a :class:`FunctionVector`, a ``(FunctionVector, weight)`` pair, or a list of them (weights carry
            signs); vectors at the same layer are summed into one ``direction`` tensor.
        path: the ``.gguf`` file to write.
        model_hint: ``controlvector.model_hint``; defaults to the vectors' ``model_type`` (omitted when unknown).

    Returns:
        ``path``. Use it with ``llama-cli -m model.gguf --control-vector path``; llama.cpp adds the vector at every
        position, like ``fv_plugin.steer(..., positions="all")``.

    Example:
        >>> to_gguf([(antonym, 2.0), (other, -0.5)], "steer.gguf")  # doctest: +SKIP
    """
    directions = control_vector_directions(vectors)
    if any(getattr(fv, "positions", None) == "last_prompt" for fv, _ in _pairs(vectors)):
        warnings.warn(
            "a vector chosen to steer the last prompt token only (fv.positions='last_prompt') is exported as a "
            "control vector, which llama.cpp adds at every token: it will act more strongly than in fv_plugin; "
            "a vector chosen for every token: fv extract --portable --every-token "
            "(ExtractionConfig(portable=True, auto_positions=('all',)))",
            UserWarning,
            stacklevel=2,
        )
    known = sorted({fv.model_type for fv, _ in _pairs(vectors) if fv.model_type is not None})
    hint = model_hint if model_hint is not None else (known[0] if known else None)
    gguf = _gguf()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(target), arch=ARCHITECTURE)
    try:
        if hint is not None:
            writer.add_string(f"{ARCHITECTURE}.model_hint", hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(directions))
        for layer, direction in directions.items():
            writer.add_tensor(f"direction.{layer}", direction.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    logger.info("wrote %s: layers %s", target, list(directions))
    return target
