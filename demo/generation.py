"""One greedy ``generate`` over the rows of several requests, each row with its own vectors.

The ICL rows start with ten demonstrations of a task, about a hundred tokens, while the plain and steered rows
have only the user's prompt; prefilling them all would mostly compute padding, and on a CPU the prefill of a batch
costs as much as prefilling its rows one by one. So the demonstrations are prefilled once per task and kept
(:class:`PrefixCache`), and a batch runs in two passes over one KV cache:

1. a forward pass over every row's prompt except its last token, continuing the cached demonstrations (rows
   without demonstrations have masked slots there);
2. ``generate`` from each row's last prompt token on.

Steering uses ``positions="all"`` (every real token of a pass) on the right passes, which gives the three modes
exactly: ``"all"`` rows are steered in pass 1 and in every step of pass 2; ``"generated"`` rows in every step of
pass 2 (their last prompt token and every generated token); ``"last_prompt"`` rows only in the first step of pass
2 (a :class:`fv_plugin.FunctionVectorProcessor` with ``window=(0, 1)``). Positions come from the attention mask,
so left padding and masked slots in the middle of a row do not move any token. A job with positions ``OWN`` steers
each vector at its own (``fv.positions``, what ``auto`` chose), as ``fv_plugin.steer`` does by default.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

import fv_plugin

Pairs = tuple[tuple[fv_plugin.FunctionVector, float], ...]
OWN = "own"  # a job's positions: each vector's own


@dataclass(frozen=True)
class Prefix:
    """Leading tokens prefilled once (a task's demonstrations) and their keys and values, one
    ``(keys, values)`` pair ``[1, kv_heads, len(ids), head_dim]`` per layer."""

    ids: tuple[int, ...]
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]


class PrefixCache:
    """The last ``size`` prefixes prefilled on ``model`` (unsteered), by their token ids."""

    def __init__(self, model: Any, size: int = 16) -> None:
        self.model, self.size = model, size
        self._items: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, ids: Sequence[int]) -> Prefix:
        key = tuple(ids)
        with self._lock:
            if key not in self._items:
                with torch.inference_mode():
                    out = self.model(input_ids=torch.tensor([key]), use_cache=True)
                self._items[key] = Prefix(key, tuple((k, v) for k, v, *_ in out.cache))
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return self._items[key]


@dataclass(frozen=True)
class Row:
    """One input row: its prompt's token ids after ``prefix`` (if any), and the ``(vector, weight)`` pairs added
    to it (none: unsteered)."""

    ids: tuple[int, ...]
    vectors: Pairs = ()
    prefix: Prefix | None = None

    @property
    def width(self) -> int:
        return len(self.ids) + (len(self.prefix.ids) if self.prefix is not None else 0)


@dataclass(frozen=True)
class Job:
    """One request: its rows, generated greedily with other requests' rows, and its steering options."""

    rows: tuple[Row, ...]
    strength: float = 1.0
    positions: str = "generated"
    max_new_tokens: int = 8

    @property
    def width(self) -> int:
        """The longest prompt among the rows, in tokens (cached ones included)."""
        return max(row.width for row in self.rows)


@dataclass(frozen=True)
class SteeringGroup:
    """The rows of every job with one ``positions`` mode; ``[]`` and strength 0 for the other rows."""

    positions: str
    rows: tuple[Pairs, ...]
    strength: torch.Tensor

    def vectors(self) -> list[list[Any]]:
        return [list(pairs) for pairs in self.rows]


def _mode(job: Job, fv: Any) -> str:
    """Where ``job`` steers with ``fv``: its positions, or (``OWN``) the vector's own."""
    return (fv.positions or "generated") if job.positions == OWN else job.positions


def steering_groups(jobs: Sequence[Job]) -> dict[str, SteeringGroup]:
    """One group per positions mode that some job steers with; a row's vectors go to their modes' groups (one
    mode per job, or each vector's own with ``OWN``)."""
    modes = dict.fromkeys(_mode(job, fv) for job in jobs for row in job.rows for fv, _ in row.vectors)
    groups = {}
    for mode in modes:
        rows: list[Pairs] = []
        strengths: list[float] = []
        for job in jobs:
            for row in job.rows:
                mine = tuple(pair for pair in row.vectors if _mode(job, pair[0]) == mode)
                rows.append(mine)
                strengths.append(job.strength if mine else 0.0)
        groups[mode] = SteeringGroup(mode, tuple(rows), torch.tensor(strengths))
    return groups


@dataclass(frozen=True)
class Layout:
    """A batch as ``[prefix slot | body slot | last token]`` columns: ``ids`` and ``mask`` ``[rows, width]``,
    each slot left-padded; ``cache`` holds the prefixes (``None`` when no row has one)."""

    ids: torch.Tensor
    mask: torch.Tensor
    prefix: int
    body: int
    cache: DynamicCache | None


def layout(model: Any, rows: Sequence[Row], pad_id: int) -> Layout:
    prefix = max(len(row.prefix.ids) if row.prefix is not None else 0 for row in rows)
    body = max(len(row.ids) - 1 for row in rows)
    ids, mask = [], []
    for row in rows:
        head = row.prefix.ids if row.prefix is not None else ()
        fill = [pad_id] * (prefix - len(head)) + list(head) + [pad_id] * (body - len(row.ids) + 1)
        ids.append(fill + list(row.ids))
        mask.append([0] * (prefix - len(head)) + [1] * len(head) + [0] * (body - len(row.ids) + 1) + [1] * len(row.ids))
    return Layout(torch.tensor(ids), torch.tensor(mask), prefix, body, prefix_cache(model, rows, prefix))


def prefix_cache(model: Any, rows: Sequence[Row], width: int) -> DynamicCache | None:
    """Every row's prefix keys and values, right-aligned in a slot of ``width`` (zeros, masked, elsewhere)."""
    known = [row.prefix for row in rows if row.prefix is not None]
    if not known:
        return None
    layers = []
    for layer, (keys, values) in enumerate(known[0].kv):
        slots = [keys.new_zeros(len(rows), keys.shape[1], width, d.shape[-1]) for d in (keys, values)]
        for r, row in enumerate(rows):
            if row.prefix is not None:
                for slot, stored in zip(slots, row.prefix.kv[layer], strict=True):
                    slot[r, :, width - stored.shape[2] :] = stored[0]
        layers.append((slots[0], slots[1]))
    return DynamicCache(layers, config=model.config)


def prefill(model: Any, batch: Layout, groups: dict[str, SteeringGroup]) -> DynamicCache | None:
    """Pass 1: every row's prompt but its last token, after the prefixes; rows in ``"all"`` mode are steered."""
    if batch.body == 0:
        return batch.cache
    upto = batch.prefix + batch.body
    positions = (batch.mask.cumsum(-1) - 1).clamp(min=0)
    group = groups.get("all")
    block = (
        fv_plugin.steer(model, rows=group.vectors(), strength=group.strength, positions="all")
        if group is not None
        else contextlib.nullcontext()
    )
    with block:
        out = model(
            input_ids=batch.ids[:, batch.prefix : upto],
            attention_mask=batch.mask[:, :upto],
            position_ids=positions[:, batch.prefix : upto],
            cache=batch.cache if batch.cache is not None else DynamicCache(config=model.config),
            use_cache=True,
        )
    return out.cache


def processors(groups: dict[str, SteeringGroup], tokenizer: Any = None) -> list[LogitsProcessor]:
    """Pass 2's steering: every step for ``"all"`` and ``"generated"`` rows, the first for ``"last_prompt"``, and
    for ``"answer"`` rows every step until the row's answer ends (the library's own rule, which needs
    ``tokenizer``)."""
    return [
        fv_plugin.FunctionVectorProcessor(
            rows=group.vectors(),
            strength=group.strength,
            positions="answer" if mode == "answer" else "all",
            window=(0, 1) if mode == "last_prompt" else None,
            tokenizer=tokenizer if mode == "answer" else None,
        )
        for mode, group in groups.items()
    ]


def generate_batch(
    model: Any,
    jobs: Sequence[Job],
    *,
    pad_id: int,
    streamer: BaseStreamer | None = None,
    watch: Sequence[LogitsProcessor] = (),
    tokenizer: Any = None,
) -> torch.Tensor:
    """One greedy ``generate`` over every row of ``jobs`` (in order); ``watch``: pass-through processors;
    ``tokenizer``: what ends an answer, for ``"answer"`` jobs.

    ``model`` must be :func:`fv_plugin.attach`-ed (the steering processors need it). Returns the sequences
    ``[rows, width + new tokens]`` in the :class:`Layout`'s columns.
    """
    rows = [row for job in jobs for row in job.rows]
    groups = steering_groups(jobs)
    batch = layout(model, rows, pad_id)
    with torch.inference_mode():
        cache = prefill(model, batch, groups)
        out = model.generate(
            input_ids=batch.ids,
            attention_mask=batch.mask,
            cache=cache,
            max_new_tokens=max(job.max_new_tokens for job in jobs),
            do_sample=False,
            pad_token_id=pad_id,
            streamer=streamer,
            logits_processor=LogitsProcessorList([*watch, *processors(groups, tokenizer)]),
        )
    return out
