"""Head-level steering inside vLLM's workers: buffers and a pre-hook on the attention output projection of every
decoder layer a rank owns.

The projection's input is the attention output, the heads side by side (``[tokens, local heads * head_dim]``).
Under tensor parallelism the projection is row-parallel: rank ``r`` holds heads ``r * local .. (r + 1) * local - 1``
of its input and the projection's all-reduce sums the ranks' parts. Each rank therefore moves the slots of the heads
it owns, before its part of the projection: the same values ``fv_plugin.steer`` writes on Hugging Face, in the same
place, so both forms are exact on any number of ranks (``head_difference`` would also equal the projected vector
added after the attention block, but only up to rounding).

Buffers (shared by every hooked projection of a rank): ``fv_plugin_head_values`` ``[rows, head_dim]`` float32 and,
per row, its layer (-1 where free), head and mode (1.0 replace, 0.0 add); ``fv_plugin_head_index`` and
``fv_plugin_head_coef`` ``[max tokens, columns]`` (see :class:`~fv_plugin.vllm.tables.HeadTable`); and, per
projection, ``fv_plugin_local_heads``, the heads this rank owns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from fv_plugin.architectures import ARCHITECTURES, ArchSpec
from fv_plugin.vllm.gate_worker import GateBuffers
from fv_plugin.vllm.tables import HeadKey, HeadTable, RequestPlan, SlotTable, build_head_table

__all__ = ["HeadBuffers", "HeadState", "HeadWriter", "find_out_proj", "install_head_hooks", "make_head_hook"]


@dataclass(frozen=True)
class HeadBuffers:
    """The device tensors every hooked output projection of a rank reads."""

    values: torch.Tensor  # [rows, head_dim] float32
    layer: torch.Tensor  # [rows] int64, -1 where free
    head: torch.Tensor  # [rows] int64
    replace: torch.Tensor  # [rows] float32
    index: torch.Tensor  # [tokens, columns] int64
    coef: torch.Tensor  # [tokens, columns] float32
    gate: torch.Tensor  # [tokens, columns] int64 row of the gate table (0: always open)

    @classmethod
    def allocate(cls, *, rows: int, head_dim: int, tokens: int, columns: int, device: torch.device) -> HeadBuffers:
        return cls(
            values=torch.zeros(rows, head_dim, dtype=torch.float32, device=device),
            layer=torch.full((rows,), -1, dtype=torch.int64, device=device),
            head=torch.zeros(rows, dtype=torch.int64, device=device),
            replace=torch.zeros(rows, dtype=torch.float32, device=device),
            index=torch.zeros(tokens, columns, dtype=torch.int64, device=device),
            coef=torch.zeros(tokens, columns, dtype=torch.float32, device=device),
            gate=torch.zeros(tokens, columns, dtype=torch.int64, device=device),
        )

    def register_on(self, module: nn.Module, local_heads: torch.Tensor) -> None:
        for name in ("values", "layer", "head", "replace", "index", "coef", "gate"):
            module.register_buffer(f"fv_plugin_head_{name}", getattr(self, name), persistent=False)
        module.register_buffer("fv_plugin_local_heads", local_heads, persistent=False)


@dataclass
class HeadState:
    """What eager hooks read to skip work: the layers with head entries this step, and their table columns."""

    layers: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    gated: bool = False  # some entry is gated this step


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    return cast(torch.Tensor, getattr(module, f"fv_plugin_{name}"))


def moved_slots(
    module: nn.Module, layer: int, x: torch.Tensor, columns: Sequence[int] | None, gated: bool = False
) -> torch.Tensor:
    """``x`` (``[tokens, local heads * head_dim]``) with this step's head entries of ``layer`` applied:
    ``slot + c * (value - replace * slot)`` per (token, owned head), from the table ``columns`` (``None``: all)."""
    count = x.shape[0]
    local = _buffer(module, "local_heads")
    index = _buffer(module, "head_index")[:count]  # [T, C]
    coef = _buffer(module, "head_coef")[:count]
    if gated:  # each entry times its gate's decision
        coef = coef * _buffer(module, "gate_open")[_buffer(module, "head_gate")[:count]]
    if columns is not None:
        index, coef = index[:, list(columns)], coef[:, list(columns)]
    live = (_buffer(module, "head_layer")[index] == layer) & (coef != 0)
    hit = live[:, :, None] & (_buffer(module, "head_head")[index][:, :, None] == local[None, None, :])  # [T, C, H]
    column = hit.to(torch.uint8).argmax(dim=1)  # [T, H]: the (only) column acting on each owned head
    entry = index.gather(1, column)
    c = torch.where(hit.any(dim=1), coef.gather(1, column), torch.zeros_like(coef[:, :1]))
    value = _buffer(module, "head_values")[entry]  # [T, H, D]
    replace = _buffer(module, "head_replace")[entry]
    slots = x.reshape(count, local.shape[0], -1)
    moved = slots + c.to(x.dtype)[..., None] * (value.to(x.dtype) - replace.to(x.dtype)[..., None] * slots)
    return moved.reshape(x.shape)


def make_head_hook(layer: int, state: HeadState) -> Callable[[nn.Module, Any], Any]:
    """Forward pre-hook of layer ``layer``'s attention output projection: move this step's head slots."""

    def hook(module: nn.Module, args: Any) -> Any:
        compiling = torch.compiler.is_compiling()
        if not compiling and layer not in state.layers:
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise TypeError(
                f"fv_plugin: the attention output projection of layer {layer} got {type(x).__name__} input, not "
                "[tokens, heads * head_dim]; head-level steering cannot reach this model's heads"
            )
        columns = None if compiling else state.layers[layer]
        return (moved_slots(module, layer, x, columns, compiling or state.gated), *args[1:])

    return hook


def find_out_proj(layer: nn.Module, model_type: str) -> nn.Module:
    """The attention output projection of a vLLM decoder layer (named as in fv_plugin's architecture table)."""
    spec = ARCHITECTURES.get(model_type) or ArchSpec(layers="model.layers")
    for path in (f"{spec.attn}.{spec.out_proj}", "self_attn.o_proj"):
        try:
            return layer.get_submodule(path)
        except AttributeError:
            continue
    raise RuntimeError(
        f"fv_plugin: no attention output projection {spec.attn}.{spec.out_proj} in vLLM's {type(layer).__name__}; "
        "head-level steering needs it. Set FV_PLUGIN_VLLM=0 to serve this model without steering."
    )


def _local_heads(proj: nn.Module, head_dim: int, num_heads: int, device: torch.device) -> torch.Tensor:
    width = int(getattr(proj, "input_size_per_partition", getattr(proj, "input_size", num_heads * head_dim)))
    rank = int(getattr(proj, "tp_rank", 0)) if getattr(proj, "input_is_parallel", False) else 0
    local = width // head_dim
    if width % head_dim or (rank + 1) * local > num_heads:
        raise RuntimeError(
            f"fv_plugin: the attention output projection takes {width} values per token, not whole heads of "
            f"{head_dim} of {num_heads}; set FV_PLUGIN_VLLM=0 to serve this model without steering"
        )
    return torch.arange(rank * local, (rank + 1) * local, dtype=torch.int64, device=device)


def install_head_hooks(
    layers: Mapping[int, nn.Module],
    *,
    model_type: str,
    head_dim: int,
    num_heads: int,
    buffers: HeadBuffers,
    gates: GateBuffers | None = None,
) -> HeadState:
    """Hook the output projection of each ``layers`` entry (``{layer index: decoder layer}``)."""
    state = HeadState()
    for at, module in layers.items():
        proj = find_out_proj(module, model_type)
        buffers.register_on(proj, _local_heads(proj, head_dim, num_heads, buffers.values.device))
        if gates is not None:
            gates.register_on(proj, decide=False)
        proj.register_forward_pre_hook(make_head_hook(at, state))
    return state


class HeadWriter:
    """Writes each step's head entries into the head buffers, before the model runs."""

    def __init__(self, buffers: HeadBuffers, state: HeadState) -> None:
        self.buffers, self.state = buffers, state
        self.columns = int(buffers.index.shape[1])
        self.head_dim = int(buffers.values.shape[1])
        self.slots: SlotTable[HeadKey] = SlotTable(int(buffers.values.shape[0]))
        self.dirty = 0

    def fits(self, plan: RequestPlan) -> bool:
        return len(plan.heads) <= self.columns and all(len(key[3]) == 4 * self.head_dim for key in plan.heads)

    def prepare(
        self,
        plans: Sequence[RequestPlan | None],
        starts: np.ndarray,
        computed: np.ndarray,
        prompt_lengths: np.ndarray,
        gate_rows: Sequence[tuple[int, ...]] | None = None,
        masks: Mapping[int, np.ndarray] | None = None,
    ) -> None:
        if not any(plan is not None and plan.heads for plan in plans):
            self.clear()
            return
        table, writes = build_head_table(
            plans, starts, computed, prompt_lengths, self.slots, self.columns, gate_rows, masks
        )
        for row, (layer, head, replace, data) in writes:
            self.buffers.values[row].copy_(torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32)))
            self.buffers.layer[row] = layer
            self.buffers.head[row] = head
            self.buffers.replace[row] = 1.0 if replace else 0.0
        self._upload(table)

    def clear(self) -> None:
        if self.dirty:
            self.buffers.coef[: self.dirty].zero_()
            self.dirty = 0
        self.state.layers, self.state.gated = {}, False

    def _upload(self, table: HeadTable) -> None:
        if not table.layers:
            self.clear()
            return
        count = table.index.shape[0]
        self.buffers.index[:count].copy_(torch.from_numpy(table.index))
        self.buffers.coef[:count].copy_(torch.from_numpy(table.coef))
        if table.gate is not None:
            self.buffers.gate[:count].copy_(torch.from_numpy(table.gate))
        else:  # a compiled graph reads the gate rows of every step: none may be left from an earlier one
            self.buffers.gate[:count].zero_()
        if self.dirty > count:
            self.buffers.coef[count : self.dirty].zero_()
        self.dirty = count
        self.state.layers, self.state.gated = table.layers, table.gate is not None
