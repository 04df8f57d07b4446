"""One engine step's steering as tables: which vector each token adds at which layer, and how strongly.

Pure numpy (no vLLM), so the position rules are tested without an engine. A step's tokens are the flattened
batch vLLM runs: request ``i`` owns tokens ``starts[i]:starts[i + 1]``, at absolute positions
``computed[i], computed[i] + 1, ...``. The position rules read each request's prompt length and those absolute
positions, never chunk boundaries, so a prompt split over several chunks (chunked prefill) is steered at its real
last token, and a step may mix one request's prefill chunk with other requests' decode tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from fv_plugin.vllm.gate_requests import GateCondition
from fv_plugin.vllm.resolved import ResolvedSteering

__all__ = [
    "HeadKey",
    "HeadTable",
    "RequestPlan",
    "SlotKey",
    "SlotTable",
    "TokenTable",
    "build_head_table",
    "build_table",
    "steered_positions",
]

SlotKey = tuple[int, bytes]  # (layer, little-endian float32 vector)
HeadKey = tuple[int, int, bool, bytes]  # (layer, head, replace, little-endian float32 [head_dim] value)
Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class RequestPlan:
    """One request's steering as a worker applies it: column ``k`` adds vector ``keys[k][1]`` after layer
    ``keys[k][0]``, gated by condition ``gates[k]`` (-1: ungated; head entry ``j`` by ``head_gates[j]``)."""

    keys: tuple[SlotKey, ...]
    strength: float
    positions: str
    relative: bool
    heads: tuple[HeadKey, ...] = ()  # head slot ``heads[j]`` moves by ``strength * head_weights[j]``
    head_weights: tuple[float, ...] = ()
    gates: tuple[int, ...] = ()  # empty: no column is gated
    head_gates: tuple[int, ...] = ()
    conditions: tuple[GateCondition, ...] = ()
    answer_ends: tuple[int, ...] = ()  # positions="answer": the ids that end an answer
    column_positions: tuple[str, ...] = ()  # the mode of each column (empty: ``positions`` for all)
    head_positions: tuple[str, ...] = ()  # the mode of each head entry (empty: ``positions`` for all)

    def column_mode(self, k: int) -> str:
        return self.column_positions[k] if self.column_positions else self.positions

    def head_mode(self, j: int) -> str:
        return self.head_positions[j] if self.head_positions else self.positions

    @property
    def modes(self) -> set[str]:
        """The modes this request's columns and head entries are steered at."""
        found = {self.column_mode(k) for k in range(len(self.keys))}
        found |= {self.head_mode(j) for j in range(len(self.heads))}
        return found or {self.positions}

    @classmethod
    def from_resolved(cls, resolved: ResolvedSteering) -> RequestPlan:
        gated = bool(resolved.conditions)
        own = resolved.column_positions or (resolved.positions,) * len(resolved.layers)
        heads = tuple(entry.positions or resolved.positions for entry in resolved.heads)
        return cls(
            keys=tuple(zip(resolved.layers, resolved.vectors, strict=True)),
            strength=resolved.strength,
            positions=resolved.positions,
            relative=resolved.relative,
            heads=tuple((e.layer, e.head, e.replace, e.value) for e in resolved.heads),
            head_weights=tuple(e.weight for e in resolved.heads),
            gates=resolved.gates if gated else (),
            head_gates=tuple(e.gate for e in resolved.heads) if gated else (),
            conditions=resolved.conditions,
            answer_ends=tuple(int(i) for i in np.frombuffer(resolved.answer_ends, dtype="<i8")),
            column_positions=tuple(own),
            head_positions=heads,
        )


def steered_positions(mode: str, first: int, count: int, prompt_length: int) -> np.ndarray:
    """Which of ``count`` tokens at positions ``first, first + 1, ...`` a mode steers (bool ``[count]``).

    ``"generated"``: the last prompt token and every later one; ``"last_prompt"``: the last prompt token;
    ``"all"``: every token. ``"answer"`` also depends on the tokens (:class:`fv_plugin.vllm.answers.AnswerTracker`):
    here it is ``"generated"``'s positions, the most it may steer.
    """
    if mode == "all":
        return np.ones(count, dtype=bool)
    positions = np.arange(first, first + count)
    if mode == "last_prompt":
        return positions == prompt_length - 1
    if mode in ("generated", "answer"):
        return positions >= prompt_length - 1
    raise ValueError(f"unknown positions mode {mode!r}")


class SlotTable(Generic[Key]):
    """Which key (``(layer, vector)``, or a head entry) each row of a device's vector table holds.

    A key keeps its row while requests use it; a new key takes a free row or the least recently used one that
    the current step does not need. With ``size >= requests per step * columns`` a step always fits.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.keys: list[Key | None] = [None] * size
        self.where: dict[Key, int] = {}
        self.used = np.full(size, -1, dtype=np.int64)
        self.step = 0

    def assign(self, keys: Iterable[Key]) -> tuple[dict[Key, int], list[tuple[int, Key]]]:
        """Row of each key this step, and the ``(row, key)`` pairs that must be written to the device."""
        self.step += 1
        needed = list(dict.fromkeys(keys))
        if len(needed) > self.size:
            raise RuntimeError(f"a step needs {len(needed)} steering vectors but the table holds {self.size}")
        for key in needed:
            if key in self.where:
                self.used[self.where[key]] = self.step
        writes: list[tuple[int, Key]] = []
        for key in needed:
            if key not in self.where:
                row = int(np.argmin(self.used))  # free rows hold -1; rows of this step hold the current step
                old = self.keys[row]
                if old is not None:
                    del self.where[old]
                self.keys[row], self.where[key] = key, row
                self.used[row] = self.step
                writes.append((row, key))
        return {key: self.where[key] for key in needed}, writes


@dataclass(frozen=True)
class TokenTable:
    """Per-token steering of one step: column ``k`` of token ``t`` adds row ``index[t, k]`` of the vector table
    times ``absolute[t, k] + relative[t, k] * |hidden_t|`` (both zero where nothing is added)."""

    index: np.ndarray  # [tokens, columns] int64
    absolute: np.ndarray  # [tokens, columns] float32
    relative: np.ndarray  # [tokens, columns] float32
    layers: Mapping[int, tuple[int, ...]]  # each steered layer -> the columns that may hold one of its vectors
    any_relative: bool
    gate: np.ndarray | None = None  # [tokens, columns] int64 row of the gate table (0: always open); None: no gate


def _live(
    plans: Sequence[RequestPlan | None],
    starts: np.ndarray,
    computed: np.ndarray,
    prompt_lengths: np.ndarray,
    masks: Mapping[int, np.ndarray] | None = None,
) -> list[tuple[int, RequestPlan, dict[str, np.ndarray]]]:
    """``(batch index, plan, steered-token mask of each of its modes)`` of each request that steers at least one
    token this step (``masks``: the masks of answer-mode requests, by batch index)."""
    live = []
    for i, plan in enumerate(plans):
        if plan is None:
            continue
        count = int(starts[i + 1]) - int(starts[i])
        found = {}
        for mode in plan.modes:
            if mode == "answer":
                if masks is None or i not in masks:
                    raise RuntimeError(f"fv_plugin: no answer mask for request {i} of this step")
                found[mode] = masks[i]
            else:
                found[mode] = steered_positions(mode, int(computed[i]), count, int(prompt_lengths[i]))
        if any(mask.any() for mask in found.values()):
            live.append((i, plan, found))
    return live


def build_table(
    plans: Sequence[RequestPlan | None],
    starts: np.ndarray,
    computed: np.ndarray,
    prompt_lengths: np.ndarray,
    slots: SlotTable[SlotKey],
    columns: int,
    gate_rows: Sequence[tuple[int, ...]] | None = None,
    masks: Mapping[int, np.ndarray] | None = None,
) -> tuple[TokenTable, list[tuple[int, SlotKey]]]:
    """The token table of a step with requests ``plans`` (``None``: plain) in batch order, and the vector-table
    rows to write before it runs.

    Args:
        starts: ``[requests + 1]`` first token of each request in the flattened batch (vLLM's query start loc).
        computed: ``[requests]`` tokens of each request already computed before this step.
        prompt_lengths: ``[requests]`` prompt length of each request.
        slots: the vector table's rows; keys of the requests steering this step get one.
        columns: columns of the table (the most layers one request may steer).
        gate_rows: per request, the gate-table row of each of its conditions (gated requests only).
        masks: per answer-mode request (by batch index), which of its tokens are steered.
    """
    live = _live(plans, starts, computed, prompt_lengths, masks)
    rows, writes = slots.assign(key for _, plan, _ in live for key in plan.keys)
    tokens = int(starts[len(plans)])
    index = np.zeros((tokens, columns), dtype=np.int64)
    absolute = np.zeros((tokens, columns), dtype=np.float32)
    relative = np.zeros((tokens, columns), dtype=np.float32)
    gate = np.zeros((tokens, columns), dtype=np.int64)
    layers: dict[int, set[int]] = {}
    for i, plan, mask in live:
        lo, hi = int(starts[i]), int(starts[i + 1])
        target = relative if plan.relative else absolute
        for k, key in enumerate(plan.keys):
            index[lo:hi, k] = rows[key]
            target[lo:hi, k] = np.where(mask[plan.column_mode(k)], np.float32(plan.strength), np.float32(0.0))
            layers.setdefault(key[0], set()).add(k)
            if plan.gates and plan.gates[k] >= 0:
                gate[lo:hi, k] = _gate_row(gate_rows, i, plan.gates[k])
    table = TokenTable(
        index=index,
        absolute=absolute,
        relative=relative,
        layers={layer: tuple(sorted(columns)) for layer, columns in layers.items()},
        any_relative=bool(relative.any()),
        gate=gate if gate.any() else None,
    )
    return table, writes


def _gate_row(gate_rows: Sequence[tuple[int, ...]] | None, request: int, condition: int) -> int:
    if gate_rows is None or condition >= len(gate_rows[request]):
        raise RuntimeError(f"fv_plugin: no gate row for condition {condition} of request {request} in this step")
    return gate_rows[request][condition]


@dataclass(frozen=True)
class HeadTable:
    """Per-token head-level steering of one step: column ``k`` of token ``t`` moves the head slot held by row
    ``index[t, k]`` of the head table, by ``coef[t, k]`` (zero where nothing moves). A request's entries touch
    distinct head slots, so at most one column of a token acts on a given slot."""

    index: np.ndarray  # [tokens, columns] int64
    coef: np.ndarray  # [tokens, columns] float32
    layers: Mapping[int, tuple[int, ...]]  # each layer with head entries -> the columns that may hold them
    gate: np.ndarray | None = None  # [tokens, columns] int64 row of the gate table (0: always open); None: no gate


def build_head_table(
    plans: Sequence[RequestPlan | None],
    starts: np.ndarray,
    computed: np.ndarray,
    prompt_lengths: np.ndarray,
    slots: SlotTable[HeadKey],
    columns: int,
    gate_rows: Sequence[tuple[int, ...]] | None = None,
    masks: Mapping[int, np.ndarray] | None = None,
) -> tuple[HeadTable, list[tuple[int, HeadKey]]]:
    """The head table of a step (arguments as :func:`build_table`'s; ``columns``: head entries per request), and
    the head-table rows to write before it runs. The coefficient is ``float32(strength) * float32(weight)``, the
    product ``fv_plugin.steer`` forms."""
    live = [item for item in _live(plans, starts, computed, prompt_lengths, masks) if item[1].heads]
    rows, writes = slots.assign(key for _, plan, _ in live for key in plan.heads)
    tokens = int(starts[len(plans)])
    index = np.zeros((tokens, columns), dtype=np.int64)
    coef = np.zeros((tokens, columns), dtype=np.float32)
    gate = np.zeros((tokens, columns), dtype=np.int64)
    layers: dict[int, set[int]] = {}
    for i, plan, mask in live:
        lo, hi = int(starts[i]), int(starts[i + 1])
        for k, (key, weight) in enumerate(zip(plan.heads, plan.head_weights, strict=True)):
            index[lo:hi, k] = rows[key]
            value = np.float32(plan.strength) * np.float32(weight)
            coef[lo:hi, k] = np.where(mask[plan.head_mode(k)], value, np.float32(0.0))
            layers.setdefault(key[0], set()).add(k)
            if plan.head_gates and plan.head_gates[k] >= 0:
                gate[lo:hi, k] = _gate_row(gate_rows, i, plan.head_gates[k])
    layers_of = {at: tuple(sorted(ks)) for at, ks in layers.items()}
    table = HeadTable(index=index, coef=coef, layers=layers_of, gate=gate if gate.any() else None)
    return table, writes
