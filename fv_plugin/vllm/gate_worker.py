"""``gate=True`` inside vLLM's workers: each gated request's decision, taken in the forward pass that holds its last
prompt token and kept on the device for its later steps.

Buffers (shared by every hooked layer and attention output projection of a rank):

- ``fv_plugin_gate_open`` ``[rows + 2]`` float32: one decision (1.0 steer, 0.0 not) per (request, condition) in
  use; row 0 is always 1.0 (ungated columns point there) and the last row takes the writes of unused entries;
- the step's decisions to take, ``fv_plugin_decide_*``: for entry ``d``, the gate row it decides (``row``), the
  token of the flattened batch whose hidden state it reads (``token``, the request's last prompt token), the
  condition's ``layer`` (-1: unused), ``threshold`` and ``direction`` ``[hidden]``.

The forward hook of every decoder layer first takes the decisions of its layer, from its output
(``hidden + residual``, Hugging Face's layer output) in float32: ``h · direction >= threshold * ‖h‖``, the rule of
:class:`fv_plugin.condition.Condition`; then it adds its vectors, each column times the decision of its gate row. A
condition's layer is below every layer the vectors it gates touch, so in the forward pass holding the last prompt
token the decision is taken before anything it gates is added, as on Hugging Face. Later steps (decode, or the
rest of a prompt prefilled in chunks, which holds no steered token under ``"generated"``/``"last_prompt"``) read
the kept decision: nothing is read back to the host, except when a row is given to another request (more gated
requests than rows, e.g. with preempted ones): its decision is then kept on the host and written back if its
request returns.

Tensor parallelism: the hidden state after a decoder layer is the same on every rank (the row-parallel projections
end in an all-reduce; the residual is replicated), and every rank builds the same tables from the same batch, so
every rank takes the same decision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from fv_plugin.vllm.gate_requests import GateCondition
from fv_plugin.vllm.runners import StepBatch
from fv_plugin.vllm.tables import RequestPlan

__all__ = ["GateBuffers", "GateWriter", "decide_gates"]

logger = logging.getLogger(__name__)
GateKey = tuple[str, int]  # (request id, condition index)


@dataclass(frozen=True)
class GateBuffers:
    """The device tensors of the gate (see the module docstring)."""

    open: torch.Tensor  # [rows + 2] float32
    row: torch.Tensor  # [decisions] int64
    token: torch.Tensor  # [decisions] int64
    layer: torch.Tensor  # [decisions] int64
    threshold: torch.Tensor  # [decisions] float32
    direction: torch.Tensor  # [decisions, hidden] float32

    @classmethod
    def allocate(cls, *, rows: int, decisions: int, hidden: int, device: torch.device) -> GateBuffers:
        return cls(
            open=torch.ones(rows + 2, dtype=torch.float32, device=device),
            row=torch.full((decisions,), rows + 1, dtype=torch.int64, device=device),
            token=torch.zeros(decisions, dtype=torch.int64, device=device),
            layer=torch.full((decisions,), -1, dtype=torch.int64, device=device),
            threshold=torch.zeros(decisions, dtype=torch.float32, device=device),
            direction=torch.zeros(decisions, hidden, dtype=torch.float32, device=device),
        )

    def register_on(self, module: nn.Module, *, decide: bool) -> None:
        """Give ``module`` the decisions (every module that gates) and the step's decisions to take (``decide``)."""
        module.register_buffer("fv_plugin_gate_open", self.open, persistent=False)
        if decide:
            for name in ("row", "token", "layer", "threshold", "direction"):
                module.register_buffer(f"fv_plugin_decide_{name}", getattr(self, name), persistent=False)


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    return cast(torch.Tensor, getattr(module, f"fv_plugin_{name}"))


def decide_gates(module: nn.Module, layer: int, stream: torch.Tensor) -> None:
    """Take this step's decisions of conditions at ``layer`` from its output ``stream`` (``[tokens, hidden]``)."""
    live = _buffer(module, "decide_layer") == layer
    h = stream[_buffer(module, "decide_token")].float()  # [decisions, hidden]
    passed = (h * _buffer(module, "decide_direction")).sum(dim=-1) >= _buffer(module, "decide_threshold") * h.norm(
        dim=-1
    )
    opened = _buffer(module, "gate_open")
    rows = torch.where(
        live, _buffer(module, "decide_row"), torch.full_like(live, opened.shape[0] - 1, dtype=torch.int64)
    )
    opened.index_put_((rows,), passed.to(torch.float32))  # unused entries all write the last (scratch) row


class GateWriter:
    """Assigns each gated request's conditions a row of the gate table and writes the step's decisions to take.

    Rows are keyed by (request id, condition index). A request always decides in the step that holds its last
    prompt token (vLLM never serves a new request's last prompt token from the prefix cache), so a row whose
    request id is reused only ever serves the new request after it decided again. A request that returns after
    preemption (Model Runner V2 removes and re-adds it) finds its row, or, if the row was given to another
    request meanwhile, its decision kept on the host.
    """

    def __init__(self, buffers: GateBuffers) -> None:
        self.buffers = buffers
        self.size = int(buffers.open.shape[0]) - 1  # rows 1 .. size - 1 hold decisions
        self.decisions = int(buffers.row.shape[0])
        self.owner: list[GateKey | None] = [None] * self.size
        self.where: dict[GateKey, int] = {}
        self.used = np.full(self.size, -1, dtype=np.int64)
        self.used[0] = np.iinfo(np.int64).max  # row 0 is never given out
        self.kept: dict[GateKey, float] = {}  # decisions read back when their row was given to another request
        self.step = 0
        self.pending = False  # the device holds decisions to take

    def prepare(self, batch: StepBatch, plans: Sequence[RequestPlan | None]) -> tuple[list[tuple[int, ...]], set[int]]:
        """Each request's gate rows (per condition) and the layers that take a decision this step."""
        self.step += 1
        rows_of: list[tuple[int, ...]] = []
        decide: list[tuple[int, int, GateCondition]] = []
        for i, (req_id, plan) in enumerate(zip(batch.req_ids, plans, strict=True)):
            if plan is None or not plan.conditions:
                rows_of.append(())
                continue
            last = int(batch.prompt_lengths[i]) - 1 - int(batch.computed[i])
            deciding = 0 <= last < int(batch.starts[i + 1]) - int(batch.starts[i])
            rows = tuple(self._row((req_id, j), deciding) for j in range(len(plan.conditions)))
            if deciding:
                token = int(batch.starts[i]) + last
                decide += [(row, token, c) for row, c in zip(rows, plan.conditions, strict=True)]
            rows_of.append(rows)
        self._upload(decide)
        return rows_of, {condition.layer for _, _, condition in decide}

    def clear(self) -> None:
        self._upload([])

    def _row(self, key: GateKey, deciding: bool) -> int:
        found = self.where.get(key)
        if found is not None:
            self.used[found] = self.step
            return found
        row = self._take()
        self.owner[row], self.where[key], self.used[row] = key, row, self.step
        kept = self.kept.pop(key, None)
        if not deciding:  # its decision was taken in an earlier step, while another row held it
            if kept is None:
                logger.error("fv_plugin: gated request %s has no decision for its condition %d; not steered", *key)
            self.buffers.open[row] = 0.0 if kept is None else kept
        return row

    def _take(self) -> int:
        row = int(np.argmin(self.used))
        if self.used[row] == self.step:
            raise RuntimeError(f"fv_plugin: a step needs more than {self.size - 1} gate rows")
        old = self.owner[row]
        if old is not None:  # keep its decision on the host (one device read), in case its request returns
            del self.where[old]
            self.kept[old] = float(self.buffers.open[row])
            while len(self.kept) > self.size:
                del self.kept[next(iter(self.kept))]  # the oldest
        return row

    def _upload(self, decide: list[tuple[int, int, GateCondition]]) -> None:
        if not decide and not self.pending:
            return
        if len(decide) > self.decisions:
            raise RuntimeError(
                f"fv_plugin: a step takes {len(decide)} gate decisions; the table holds {self.decisions}"
            )
        b = self.buffers
        row = np.full(self.decisions, self.size, dtype=np.int64)
        token = np.zeros(self.decisions, dtype=np.int64)
        layer = np.full(self.decisions, -1, dtype=np.int64)
        threshold = np.zeros(self.decisions, dtype=np.float32)
        for d, (at, tok, condition) in enumerate(decide):
            row[d], token[d], layer[d], threshold[d] = at, tok, condition.layer, condition.threshold
            b.direction[d].copy_(torch.from_numpy(condition.direction_array()))
        for tensor, values in ((b.row, row), (b.token, token), (b.layer, layer), (b.threshold, threshold)):
            tensor.copy_(torch.from_numpy(values))
        self.pending = bool(decide)
