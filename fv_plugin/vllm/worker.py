"""Steering inside vLLM's workers: buffers and hooks on the decoder layers a rank owns, filled before each forward.

Right after the model runner loads the model (before vLLM compiles it or captures CUDA graphs), every decoder
layer this rank owns gets the same persistent buffers and a forward hook:

- ``fv_plugin_vectors`` ``[slots, hidden]`` float32 and ``fv_plugin_slot_layer`` ``[slots]``: the vectors in use
  and the layer each one belongs to;
- ``fv_plugin_index``, ``fv_plugin_absolute``, ``fv_plugin_relative`` ``[max tokens, columns]``: per token, which
  vectors it adds and with which coefficient (see :class:`~fv_plugin.vllm.tables.TokenTable`).

The hook adds ``sum_k coef[t, k] * vectors[index[t, k]]`` (over the columns whose vector belongs to this layer) to
the layer's output. Compiled graphs and CUDA graphs read the buffers, so only their contents change: the model
runner (v1 or V2, :mod:`fv_plugin.vllm.runners`) is wrapped to write each step's tables (from each request's
resolved steering, its prompt length and its computed-token count) before the model runs, outside any captured
region. Head-level vectors have buffers and pre-hooks of their own on the attention output projections
(:mod:`fv_plugin.vllm.head_worker`). In eager mode the hooks return at once on layers nothing steers this step, so
plain batches pay almost nothing.

vLLM's decoder layers return ``(hidden, residual)`` and leave the add to the next layer's fused norm: Hugging
Face's layer output is their sum, and adding the vector to ``hidden`` adds it to that sum.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from fv_plugin.vllm.answers import AnswerTracker
from fv_plugin.vllm.gate_worker import GateBuffers, GateWriter, decide_gates
from fv_plugin.vllm.head_worker import HeadBuffers, HeadWriter, install_head_hooks
from fv_plugin.vllm.requests import RESOLVED_KEY
from fv_plugin.vllm.resolved import ResolvedSteering
from fv_plugin.vllm.runners import StepBatch, check_runner, wrap_runner
from fv_plugin.vllm.settings import PluginSettings
from fv_plugin.vllm.tables import RequestPlan, SlotKey, SlotTable, TokenTable, build_table

__all__ = ["SteeringBuffers", "StepState", "StepWriter", "find_decoder_layers", "install_steering", "install_worker"]

logger = logging.getLogger(__name__)
_PATCHED = "fv_plugin_patched"


@dataclass(frozen=True)
class SteeringBuffers:
    """The device tensors every hooked layer reads (shared by all layers of a rank)."""

    vectors: torch.Tensor  # [slots, hidden] float32
    slot_layer: torch.Tensor  # [slots] int64, -1 where free
    index: torch.Tensor  # [tokens, columns] int64
    absolute: torch.Tensor  # [tokens, columns] float32
    relative: torch.Tensor  # [tokens, columns] float32
    gate: torch.Tensor  # [tokens, columns] int64 row of the gate table (0: always open)

    @classmethod
    def allocate(cls, *, slots: int, hidden: int, tokens: int, columns: int, device: torch.device) -> SteeringBuffers:
        return cls(
            vectors=torch.zeros(slots, hidden, dtype=torch.float32, device=device),
            slot_layer=torch.full((slots,), -1, dtype=torch.int64, device=device),
            index=torch.zeros(tokens, columns, dtype=torch.int64, device=device),
            absolute=torch.zeros(tokens, columns, dtype=torch.float32, device=device),
            relative=torch.zeros(tokens, columns, dtype=torch.float32, device=device),
            gate=torch.zeros(tokens, columns, dtype=torch.int64, device=device),
        )

    def register_on(self, module: nn.Module) -> None:
        for name in ("vectors", "slot_layer", "index", "absolute", "relative"):
            module.register_buffer(f"fv_plugin_{name}", getattr(self, name), persistent=False)
        module.register_buffer("fv_plugin_gate_index", self.gate, persistent=False)


@dataclass
class StepState:
    """What eager hooks read to skip work: the layers steered in the current step, with the table columns that
    may hold their vectors."""

    layers: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    any_relative: bool = False
    any_gated: bool = False  # some column is gated this step
    gate_layers: set[int] = field(default_factory=set)  # layers that take a gate decision this step


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    return cast(torch.Tensor, getattr(module, f"fv_plugin_{name}"))


def layer_delta(
    module: nn.Module,
    layer: int,
    stream: torch.Tensor,
    with_norm: bool,
    columns: Sequence[int],
    gated: bool = False,
) -> torch.Tensor:
    """What to add to the output of ``layer`` (``stream`` is its residual stream, ``[tokens, hidden]``), float32,
    from the table ``columns`` (all of them in a compiled graph; the ones this step uses in eager mode), each
    column times its gate's decision when ``gated``."""
    count = stream.shape[0]
    index = _buffer(module, "index")[:count]
    vectors = _buffer(module, "vectors")
    coef = _buffer(module, "absolute")[:count]
    if with_norm:
        coef = coef + _buffer(module, "relative")[:count] * stream.float().norm(dim=-1, keepdim=True)
    coef = torch.where(_buffer(module, "slot_layer")[index] == layer, coef, torch.zeros_like(coef))
    if gated:
        coef = coef * _buffer(module, "gate_open")[_buffer(module, "gate_index")[:count]]
    first, *rest = columns
    delta = coef[:, first : first + 1] * vectors[index[:, first]]
    for k in rest:
        delta = delta + coef[:, k : k + 1] * vectors[index[:, k]]
    return delta


def _split_output(output: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], torch.Tensor):
        residual = output[1]
        if residual is None or (isinstance(residual, torch.Tensor) and residual.shape == output[0].shape):
            return output[0], residual
    raise TypeError(
        f"fv_plugin: vLLM decoder layer {layer} returned {type(output).__name__}; the vLLM integration steers layers "
        "that return the hidden states or a (hidden, residual) pair. Set FV_PLUGIN_VLLM=0 to serve this model "
        "without steering."
    )


def make_layer_hook(layer: int, state: StepState) -> Callable[[nn.Module, Any, Any], Any]:
    """Forward hook of decoder layer ``layer``: add this step's vectors to its output."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden, residual = _split_output(output, layer)
        compiling = torch.compiler.is_compiling()
        if compiling or layer in state.gate_layers:  # first the gate decisions read here, as on Hugging Face
            decide_gates(module, layer, hidden if residual is None else hidden + residual)
        if not compiling and layer not in state.layers:
            return None  # eager and nothing to add here this step
        with_norm = compiling or state.any_relative
        columns = range(_buffer(module, "index").shape[1]) if compiling else state.layers[layer]
        stream = hidden if residual is None or not with_norm else hidden + residual
        delta = layer_delta(module, layer, stream, with_norm, columns, compiling or state.any_gated)
        steered = hidden + delta.to(hidden.dtype)
        return steered if isinstance(output, torch.Tensor) else (steered, residual)

    return hook


def _plan_of(req_id: str, params: Any, hidden: int, columns: int, heads: HeadWriter) -> RequestPlan | None:
    args = getattr(params, "extra_args", None)
    if not args:
        return None
    resolved = args.get(RESOLVED_KEY)
    if resolved is None:
        if any(key.startswith("fv_") for key in args):
            logger.error(
                "fv_plugin: request %s carries steering arguments the server did not check (was it added as a "
                "ready EngineCoreRequest?); it runs unsteered",
                req_id,
            )
        return None
    try:
        plan = RequestPlan.from_resolved(ResolvedSteering.from_args(resolved))
    except (KeyError, TypeError, ValueError) as exc:
        logger.error("fv_plugin: request %s has damaged steering (%s); it runs unsteered", req_id, exc)
        return None
    if len(plan.keys) > columns or any(len(vector) != 4 * hidden for _, vector in plan.keys) or not heads.fits(plan):
        logger.error("fv_plugin: request %s does not fit this worker's steering tables; it runs unsteered", req_id)
        return None
    return plan


class StepWriter:
    """Writes each step's steering into the buffers, from the runner's batch, before the model runs."""

    def __init__(
        self,
        buffers: SteeringBuffers,
        state: StepState,
        *,
        hidden: int,
        heads: HeadWriter,
        gates: GateWriter | None = None,
    ) -> None:
        self.buffers, self.state, self.hidden, self.heads = buffers, state, hidden, heads
        if gates is None:  # a writer that gates nothing
            device = buffers.vectors.device
            gates = GateWriter(GateBuffers.allocate(rows=1, decisions=1, hidden=hidden, device=device))
        self.gates = gates
        self.columns = int(buffers.index.shape[1])
        self.slots: SlotTable[SlotKey] = SlotTable(int(buffers.vectors.shape[0]))
        self.plans: dict[str, tuple[int, RequestPlan | None]] = {}  # request -> (id of its params, plan)
        self.dirty = 0  # rows of the coefficient buffers that may hold non-zero values
        self.answers = AnswerTracker()

    def plan(self, req_id: str, requests: Mapping[str, Any]) -> RequestPlan | None:
        params = getattr(requests.get(req_id), "sampling_params", None)
        found = self.plans.get(req_id)
        if found is None or found[0] != id(params):  # new, or a new request that reuses a finished one's id
            if len(self.plans) > 2 * len(requests) + 64:  # forget finished requests
                self.plans = {key: plan for key, plan in self.plans.items() if key in requests}
            found = (id(params), _plan_of(req_id, params, self.hidden, self.columns, self.heads))
            self.plans[req_id] = found
        return found[1]

    def prepare(self, batch: StepBatch) -> None:
        plans = [self.plan(req_id, batch.requests) for req_id in batch.req_ids]
        if not any(plans):
            self.clear()
            return
        starts, computed, prompt_lengths = batch.starts, batch.computed, batch.prompt_lengths
        gate_rows, self.state.gate_layers = self.gates.prepare(batch, plans)
        masks = self.answers.masks(batch, plans)
        table, writes = build_table(plans, starts, computed, prompt_lengths, self.slots, self.columns, gate_rows, masks)
        self._write_vectors(writes)
        self._upload(table)
        self.heads.prepare(plans, starts, computed, prompt_lengths, gate_rows, masks)

    def clear(self) -> None:
        self.heads.clear()
        self.gates.clear()
        self.state.gate_layers = set()
        self._clear_residual()

    def _clear_residual(self) -> None:
        if self.dirty:
            self.buffers.absolute[: self.dirty].zero_()
            self.buffers.relative[: self.dirty].zero_()
            self.dirty = 0
        self.state.layers, self.state.any_relative, self.state.any_gated = {}, False, False

    def _write_vectors(self, writes: list[tuple[int, SlotKey]]) -> None:
        for row, (layer, data) in writes:
            self.buffers.vectors[row].copy_(torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32)))
            self.buffers.slot_layer[row] = layer

    def _upload(self, table: TokenTable) -> None:
        if not table.layers:
            self._clear_residual()
            return
        count = table.index.shape[0]
        self.buffers.index[:count].copy_(torch.from_numpy(table.index))
        self.buffers.absolute[:count].copy_(torch.from_numpy(table.absolute))
        self.buffers.relative[:count].copy_(torch.from_numpy(table.relative))
        if table.gate is not None:
            self.buffers.gate[:count].copy_(torch.from_numpy(table.gate))
        else:  # a compiled graph reads the gate rows of every step: none may be left from an earlier one
            self.buffers.gate[:count].zero_()
        if self.dirty > count:
            self.buffers.absolute[count : self.dirty].zero_()
            self.buffers.relative[count : self.dirty].zero_()
        self.dirty = count
        self.state.layers, self.state.any_relative = table.layers, table.any_relative
        self.state.any_gated = table.gate is not None


def find_decoder_layers(model: nn.Module, num_layers: int) -> tuple[nn.ModuleList, int, int]:
    """The decoder layers of a vLLM model and the range ``[start, end)`` this rank owns (pipeline parallel)."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) == num_layers and hasattr(module, "end_layer"):
            end: Any = module.end_layer
            return layers, int(getattr(module, "start_layer", 0)), int(end)
    raise RuntimeError(
        f"fv_plugin: no list of {num_layers} decoder layers with a start_layer/end_layer range in "
        f"{type(model).__name__}; set FV_PLUGIN_VLLM=0 to serve this model without steering"
    )


def _head_writer(
    runner: Any, settings: PluginSettings, layers: nn.ModuleList, span: range, gates: GateBuffers
) -> HeadWriter:
    """Head-level buffers and the output-projection pre-hooks of the layers this rank owns (``span``)."""
    text_config = runner.model_config.hf_text_config
    buffers = HeadBuffers.allocate(
        rows=int(runner.max_num_reqs) * settings.max_heads,
        head_dim=int(runner.model_config.get_head_size()),
        tokens=int(runner.max_num_tokens),
        columns=settings.max_heads,
        device=torch.device(runner.device),
    )
    state = install_head_hooks(
        {at: layers[at] for at in span},
        model_type=str(text_config.model_type),
        head_dim=int(buffers.values.shape[1]),
        num_heads=int(text_config.num_attention_heads),
        buffers=buffers,
        gates=gates,
    )
    return HeadWriter(buffers, state)


def install_steering(runner: Any, settings: PluginSettings) -> StepWriter:
    """Give the layers of ``runner``'s model this rank owns their buffers and hooks; wrap its forward."""
    check_runner(runner)
    model = runner.get_model()
    text_config = runner.model_config.hf_text_config
    layers, start, end = find_decoder_layers(model, int(text_config.num_hidden_layers))
    hidden = int(runner.model_config.get_hidden_size())
    buffers = SteeringBuffers.allocate(
        slots=int(runner.max_num_reqs) * settings.max_layers,
        hidden=hidden,
        tokens=int(runner.max_num_tokens),
        columns=settings.max_layers,
        device=torch.device(runner.device),
    )
    rows = int(runner.max_num_reqs) * settings.max_layers  # a request gates on at most max_layers conditions
    gates = GateBuffers.allocate(rows=rows, decisions=rows, hidden=hidden, device=torch.device(runner.device))
    state = StepState()
    for layer in range(start, end):
        buffers.register_on(layers[layer])
        gates.register_on(layers[layer], decide=True)
        layers[layer].register_forward_hook(make_layer_hook(layer, state))
    heads = _head_writer(runner, settings, layers, range(start, end), gates)
    writer = StepWriter(buffers, state, hidden=hidden, heads=heads, gates=GateWriter(gates))
    runner.fv_plugin_writer = writer  # a reloaded model gets a new writer; the runner calls the latest
    wrap_runner(runner, lambda batch: runner.fv_plugin_writer.prepare(batch))
    logger.info("fv_plugin: steering hooks on decoder layers %d..%d", start, end - 1)
    return writer


def _compile_cache_factor() -> str:
    """The plugin's part of the compile-cache key: its version and the shape of its tables."""
    from fv_plugin.version import __version__

    settings = PluginSettings.from_env()
    return f"fv_plugin-steering-{__version__}-gate-1-columns-{settings.max_layers}-heads-{settings.max_heads}"


def _separate_compile_cache() -> None:
    """Key vLLM's ahead-of-time compile cache on the plugin too: an artifact compiled without the hooks (vLLM alone,
    or ``FV_PLUGIN_VLLM=0``) skips tracing when loaded, so it must never be loaded with steering on."""
    from vllm.compilation import caching

    original = caching.aot_compile_hash_factors
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def aot_compile_hash_factors(vllm_config: Any) -> list[str]:
        return [*original(vllm_config), _compile_cache_factor()]

    setattr(aot_compile_hash_factors, _PATCHED, True)
    setattr(caching, "aot_compile_hash_factors", aot_compile_hash_factors)  # noqa: B010


def install_worker() -> None:
    """Make every vLLM worker install steering right after it loads its model, and key the compile cache on the
    plugin (once per process; the settings are read from the environment when the model loads)."""
    from vllm.v1.worker.gpu_worker import Worker

    _separate_compile_cache()
    if getattr(Worker, _PATCHED, False):
        return
    original = Worker.load_model

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        settings = PluginSettings.from_env()
        if settings.enabled:
            install_steering(self.model_runner, settings)

    setattr(Worker, "load_model", load_model)  # noqa: B010
    setattr(Worker, _PATCHED, True)
