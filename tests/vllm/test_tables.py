"""The worker side without an engine: position rules, the vector table, and the hooks on a toy vLLM-style decoder
(layers return ``(hidden, residual)``) checked against a plain reference written here."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fv_plugin.vllm.head_requests import HeadEntry
from fv_plugin.vllm.requests import RESOLVED_KEY, ResolvedSteering
from fv_plugin.vllm.settings import PluginSettings
from fv_plugin.vllm.tables import SlotTable, build_table, steered_positions
from fv_plugin.vllm.worker import find_decoder_layers, install_steering

HIDDEN, LAYERS, HEAD_DIM = 8, 4, 4


@pytest.mark.parametrize("mode", ["generated", "last_prompt", "all"])
@pytest.mark.parametrize("chunks", [[7], [3, 4], [1, 5, 1], [6, 1]])
def test_chunked_prefill_steers_the_same_tokens_as_one_pass(mode: str, chunks: list[int]) -> None:
    prompt, generated = 7, 3
    whole = steered_positions(mode, 0, prompt + generated, prompt)
    pieces, first = [], 0
    for size in [*chunks, 1, 1, 1]:  # prefill chunks, then one token per decode step
        pieces.append(steered_positions(mode, first, size, prompt))
        first += size
    assert np.array_equal(np.concatenate(pieces)[: prompt + generated], whole)
    expected = {"generated": np.arange(10) >= 6, "last_prompt": np.arange(10) == 6, "all": np.ones(10, bool)}[mode]
    assert np.array_equal(whole, expected)


def test_slots_are_reused_and_the_least_recent_is_replaced() -> None:
    table = SlotTable(3)
    rows, writes = table.assign([(1, b"a"), (2, b"b")])
    assert sorted(rows.values()) == [0, 1] and len(writes) == 2
    rows, writes = table.assign([(1, b"a"), (3, b"c")])
    assert rows[(1, b"a")] == 0 and writes == [(2, (3, b"c"))]
    rows, writes = table.assign([(3, b"c"), (4, b"d")])  # (2, b"b") is the least recent: its row is taken
    assert writes == [(1, (4, b"d"))] and rows[(3, b"c")] == 2
    rows, writes = table.assign([(1, b"a"), (2, b"b"), (4, b"d")])  # never evict a key this step needs
    assert len(set(rows.values())) == 3 and writes == [(2, (2, b"b"))]
    with pytest.raises(RuntimeError, match="table holds 3"):
        table.assign([(i, b"x") for i in range(4)])


def resolved(layers: dict[int, torch.Tensor], strength: float, positions: str, relative: bool) -> ResolvedSteering:
    ordered = sorted(layers)
    vectors = tuple(layers[layer].numpy().astype("<f4").tobytes() for layer in ordered)
    return ResolvedSteering(tuple(ordered), vectors, strength, positions, relative)


def test_the_table_of_a_mixed_step() -> None:
    from fv_plugin.vllm.tables import RequestPlan

    v = torch.ones(HIDDEN)
    plans = [
        None,
        RequestPlan.from_resolved(resolved({1: v, 3: 2 * v}, 0.5, "generated", False)),
        RequestPlan.from_resolved(resolved({2: v}, 2.0, "last_prompt", True)),
    ]
    starts = np.array([0, 4, 5, 8])  # a plain prefill, a decode token, a prefill chunk holding the last prompt token
    table, writes = build_table(plans, starts, np.array([0, 9, 2]), np.array([4, 6, 5]), SlotTable(8), 2)
    assert len(writes) == 3 and table.layers == {1: (0,), 2: (0,), 3: (1,)} and table.any_relative
    assert not table.absolute[:4].any() and not table.relative[:4].any()
    assert table.absolute[4].tolist() == [0.5, 0.5]
    assert table.relative[5:8, 0].tolist() == [0.0, 0.0, 2.0]  # positions 2, 3, 4: only the last prompt token


class ToyLayer(nn.Module):
    """A vLLM-style decoder layer: ``(hidden, residual) -> (f(hidden + residual), hidden + residual)``, whose ``f``
    runs an attention output projection (``self_attn.o_proj``, two heads of ``HEAD_DIM``) on its input."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(seed))
        self.self_attn = nn.Module()
        self.self_attn.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        stream = hidden if residual is None else hidden + residual
        return torch.tanh(self.proj(self.self_attn.o_proj(stream))), stream


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ToyLayer(i) for i in range(LAYERS))
        self.start_layer, self.end_layer = 0, LAYERS

    def forward(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream after every layer (Hugging Face's layer outputs)."""
        residual, streams = None, []
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
            streams.append(hidden + residual)
        return streams


HeadMoves = dict[int, list[tuple[int, int, torch.Tensor, float, bool]]]  # layer -> (token, head, value, c, replace)


def reference(
    model: ToyModel,
    x: torch.Tensor,
    adds: dict[int, list[tuple[int, torch.Tensor, bool]]],
    heads: HeadMoves | None = None,
) -> torch.Tensor:
    """Plain re-implementation: after layer L add, per token, ``coef * v`` (times the stream's norm if relative);
    before layer L's output projection move head slots as ``fv_plugin.steer`` does."""
    stream = x
    for index, layer in enumerate(model.layers):
        inner = stream.clone()
        for token, head, value, c, replace in (heads or {}).get(index, []):
            slot = inner[token, head * HEAD_DIM : (head + 1) * HEAD_DIM]
            inner[token, head * HEAD_DIM : (head + 1) * HEAD_DIM] = slot + c * (value - slot if replace else value)
        attended = nn.functional.linear(inner, layer.self_attn.o_proj.weight)  # the module itself is hooked
        out = stream + torch.tanh(layer.proj(attended))
        norms = out.norm(dim=-1)
        for token, vector, relative in adds.get(index, []):
            out[token] = out[token] + (norms[token] if relative else 1.0) * vector
        stream = out
    return stream


def fake_runner(model: ToyModel, requests: dict[str, Any], batch: list[tuple[str, int, int, int]]) -> Any:
    """Only what the plugin reads of vLLM's model runner; ``batch``: (request, computed, scheduled, prompt)."""
    starts = np.concatenate([[0], np.cumsum([scheduled for _, _, scheduled, _ in batch])])
    return SimpleNamespace(
        _model_forward=lambda *a, **k: None,
        input_batch=SimpleNamespace(
            num_reqs=len(batch),
            req_ids=[name for name, *_ in batch],
            num_computed_tokens_cpu=np.array([computed for _, computed, _, _ in batch]),
            num_prompt_tokens=np.array([prompt for *_, prompt in batch]),
        ),
        query_start_loc=SimpleNamespace(np=starts),
        requests=requests,
        max_num_tokens=32,
        max_num_reqs=4,
        device="cpu",
        get_model=lambda: model,
        model_config=SimpleNamespace(
            hf_text_config=SimpleNamespace(num_hidden_layers=LAYERS, num_attention_heads=2, model_type="llama"),
            get_hidden_size=lambda: HIDDEN,
            get_head_size=lambda: HEAD_DIM,
        ),
    )


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-path"])
def test_hooks_add_each_requests_vectors_at_its_tokens(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    if compiled:  # the branch a compiled graph holds: always computed, zero where nothing is added
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    model = ToyModel()
    a, b = torch.randn(HIDDEN), torch.randn(HIDDEN)
    requests = {
        "plain": SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None)),
        "abs": params(resolved({1: a, 2: b}, 1.5, "generated", False)),
        "rel": params(resolved({1: b}, 0.5, "all", True)),
    }
    batch = [("abs", 9, 1, 5), ("plain", 0, 3, 3), ("rel", 2, 2, 6)]  # a decode token, a prefill, a prefill chunk
    runner = fake_runner(model, requests, batch)
    install_steering(runner, PluginSettings(max_layers=2))
    x = torch.randn(6, HIDDEN)
    runner._model_forward()  # the wrapped forward writes this step's tables
    got = model(x)[-1]
    expected = reference(
        model, x, {1: [(0, 1.5 * a, False), (4, 0.5 * b, True), (5, 0.5 * b, True)], 2: [(0, 1.5 * b, False)]}
    )
    torch.testing.assert_close(got, expected)
    runner.input_batch.req_ids, runner.input_batch.num_reqs = ["plain"], 1  # a plain step clears every coefficient
    runner.query_start_loc.np = np.array([0, 6])
    runner._model_forward()
    torch.testing.assert_close(model(x)[-1], reference(model, x, {}))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-path"])
def test_head_entries_move_each_requests_head_slots(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    from fv_plugin.vllm.head_requests import HeadEntry

    if compiled:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(1)
    model = ToyModel()
    a, u, w = torch.randn(HIDDEN), torch.randn(HEAD_DIM), torch.randn(HEAD_DIM)

    def entry(layer: int, head: int, replace: bool, weight: float, value: torch.Tensor) -> HeadEntry:
        return HeadEntry(layer, head, replace, weight, value.numpy().astype("<f4").tobytes())

    mixed = dataclasses.replace(
        resolved({2: a}, 2.0, "generated", False), heads=(entry(1, 0, False, 0.5, u), entry(1, 1, True, 0.25, w))
    )
    patch = dataclasses.replace(
        resolved({}, 1.0, "all", False), heads=(entry(1, 1, True, 1.0, u), entry(3, 0, False, -1.0, w))
    )
    requests = {"mixed": params(mixed), "patch": params(patch), "plain": params(None)}
    batch = [("patch", 0, 2, 2), ("plain", 0, 2, 2), ("mixed", 3, 2, 4)]  # "mixed": positions 3 (last prompt), 4
    runner = fake_runner(model, requests, batch)
    install_steering(runner, PluginSettings(max_layers=2, max_heads=2))
    x = torch.randn(6, HIDDEN)
    runner._model_forward()
    heads: HeadMoves = {
        1: [(0, 1, u, 1.0, True), (1, 1, u, 1.0, True), *((t, 0, u, 1.0, False) for t in (4, 5))]
        + [(t, 1, w, 0.5, True) for t in (4, 5)],
        3: [(0, 0, w, -1.0, False), (1, 0, w, -1.0, False)],
    }
    expected = reference(model, x, {2: [(4, 2.0 * a, False), (5, 2.0 * a, False)]}, heads)
    torch.testing.assert_close(model(x)[-1], expected)
    runner.input_batch.req_ids, runner.input_batch.num_reqs = ["plain"], 1  # a plain step clears the head table
    runner.query_start_loc.np = np.array([0, 6])
    runner._model_forward()
    torch.testing.assert_close(model(x)[-1], reference(model, x, {}))


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_columns_and_head_entries_keep_their_own_positions(relative: bool) -> None:
    """A request whose vectors keep different own positions: two columns at one layer and a head entry, each
    steered at its mode, in a prefill step (positions 0-3 of a 4-token prompt) and a decode step (position 5)."""
    from fv_plugin.vllm.head_requests import HeadEntry

    torch.manual_seed(2)
    model = ToyModel()
    a, b, u = torch.randn(HIDDEN), torch.randn(HIDDEN), torch.randn(HEAD_DIM)
    own = dataclasses.replace(
        resolved({2: a}, 1.5, "own", relative),
        layers=(2, 2),
        vectors=tuple(v.numpy().astype("<f4").tobytes() for v in (a, b)),
        column_positions=("generated", "last_prompt"),
        heads=(HeadEntry(1, 0, False, 2.0, u.numpy().astype("<f4").tobytes(), positions="last_prompt"),),
    )
    requests = {"prefill": params(own), "decode": params(own)}
    runner = fake_runner(model, requests, [("prefill", 0, 4, 4), ("decode", 5, 1, 4)])
    install_steering(runner, PluginSettings(max_layers=2, max_heads=1))
    x = torch.randn(5, HIDDEN)
    runner._model_forward()
    adds = {2: [(3, 1.5 * a, relative), (3, 1.5 * b, relative), (4, 1.5 * a, relative)]}
    expected = reference(model, x, adds, {1: [(3, 0, u, 3.0, False)]})
    torch.testing.assert_close(model(x)[-1], expected)
    assert not torch.allclose(expected, reference(model, x, {2: [(t, 1.5 * (a + b), relative) for t in (3, 4)]}))


def test_a_tensor_parallel_rank_moves_only_the_heads_it_owns() -> None:
    from fv_plugin.vllm.head_worker import HeadBuffers, HeadState, install_head_hooks, moved_slots

    layer = nn.Module()
    layer.self_attn = nn.Module()
    proj = nn.Linear(HEAD_DIM, HIDDEN, bias=False)  # rank 1 of 2: its input holds head 1 only
    proj.input_is_parallel, proj.tp_rank, proj.input_size_per_partition = True, 1, HEAD_DIM
    layer.self_attn.o_proj = proj
    buffers = HeadBuffers.allocate(rows=2, head_dim=HEAD_DIM, tokens=2, columns=2, device=torch.device("cpu"))
    install_head_hooks({0: layer}, model_type="llama", head_dim=HEAD_DIM, num_heads=2, buffers=buffers)
    assert proj.fv_plugin_local_heads.tolist() == [1]
    buffers.values[:2] = torch.tensor([[1.0] * HEAD_DIM, [2.0] * HEAD_DIM])
    buffers.layer[:2], buffers.head[:2], buffers.replace[:2] = torch.tensor([0, 0]), torch.tensor([0, 1]), 1.0
    buffers.index[:] = torch.tensor([[0, 1], [0, 1]])
    buffers.coef[:] = torch.tensor([[1.0, 0.5], [1.0, 0.0]])
    x = torch.zeros(2, HEAD_DIM)
    moved = moved_slots(proj, 0, x, None)  # head 0 belongs to rank 0: its entries never reach this rank
    assert moved[0].tolist() == [1.0] * HEAD_DIM and moved[1].tolist() == [0.0] * HEAD_DIM
    assert isinstance(HeadState().layers, dict)


def params(steering: ResolvedSteering | None) -> Any:
    if steering is None:
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None))
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args={RESOLVED_KEY: steering.to_args()}))


def test_unchecked_steering_runs_plain_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    model = ToyModel()
    requests = {"raw": SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"fv_names": ["x"]}))}
    runner = fake_runner(model, requests, [("raw", 0, 4, 4)])
    install_steering(runner, PluginSettings())
    runner._model_forward()
    assert "did not check" in caplog.text
    x = torch.randn(4, HIDDEN)
    torch.testing.assert_close(model(x)[-1], reference(model, x, {}))


def test_a_pipeline_stage_steers_only_the_layers_it_owns() -> None:
    model = ToyModel()
    model.start_layer, model.end_layer = 1, 3  # this rank runs layers 1 and 2
    install_steering(fake_runner(model, {}, [("x", 0, 1, 1)]), PluginSettings())
    hooked = [bool(layer._forward_hooks) and hasattr(layer, "fv_plugin_vectors") for layer in model.layers]
    assert hooked == [False, True, True, False]


def test_models_without_a_layer_range_are_refused() -> None:
    with pytest.raises(RuntimeError, match="FV_PLUGIN_VLLM=0"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)), 1)


def test_a_runner_without_the_internals_is_refused_with_the_fix() -> None:
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER"):
        install_steering(SimpleNamespace(get_model=ToyModel), PluginSettings())


def test_the_plugin_chooses_the_v1_runner_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    from fv_plugin.vllm.plugin import prefer_v1_runner

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    prefer_v1_runner(known=())  # vLLM 0.34: only V2, no such variable
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ
    prefer_v1_runner(known=("VLLM_USE_V2_MODEL_RUNNER",))
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    prefer_v1_runner(known=("VLLM_USE_V2_MODEL_RUNNER",))
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"


class FakeV2Runner:
    """Only what the plugin reads of vLLM's Model Runner V2: requests arrive through ``add_requests`` (their
    sampling parameters are not kept), each step's batch comes from ``prepare_inputs``."""

    def __init__(self, model: ToyModel) -> None:
        self.model, self.max_num_tokens, self.max_num_reqs, self.device = model, 32, 4, "cpu"
        self.model_config = fake_runner(model, {}, []).model_config
        self.req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.zeros(4, dtype=np.int32)))
        self.rows: dict[str, int] = {}

    def get_model(self) -> ToyModel:
        return self.model

    def add_requests(self, scheduler_output: Any) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            self.rows[new.req_id] = len(self.rows)
            self.req_states.prompt_len.np[self.rows[new.req_id]] = new.prompt_len

    def _remove_request(self, req_id: str) -> bool:
        return self.rows.pop(req_id, None) is not None

    def prepare_inputs(self, batch: list[tuple[str, int, int]]) -> Any:
        """``batch``: (request, computed, scheduled)."""
        return SimpleNamespace(
            num_reqs=len(batch),
            req_ids=[name for name, _, _ in batch],
            idx_mapping_np=np.array([self.rows[name] for name, _, _ in batch]),
            query_start_loc_np=np.concatenate([[0], np.cumsum([n for _, _, n in batch])]),
            num_computed_tokens_np=np.array([computed for _, computed, _ in batch]),
        )


def test_model_runner_v2_steers_the_same_tokens() -> None:
    torch.manual_seed(2)
    model, a = ToyModel(), torch.randn(HIDDEN)
    runner = FakeV2Runner(model)
    install_steering(runner, PluginSettings(max_layers=2))
    steered = params(resolved({1: a}, 1.5, "generated", False)).sampling_params
    new = [SimpleNamespace(req_id="plain", prompt_len=3, sampling_params=None)]
    new.append(SimpleNamespace(req_id="abs", prompt_len=5, sampling_params=steered))
    runner.add_requests(SimpleNamespace(scheduled_new_reqs=new))
    runner.prepare_inputs([("plain", 0, 3), ("abs", 3, 2)])  # "abs": positions 3 and 4 (its last prompt token)
    x = torch.randn(5, HIDDEN)
    torch.testing.assert_close(model(x)[-1], reference(model, x, {1: [(4, 1.5 * a, False)]}))
    runner._remove_request("abs")  # a finished request is forgotten: a new one with its id runs plain
    runner.add_requests(
        SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id="abs", prompt_len=1, sampling_params=None)])
    )
    runner.prepare_inputs([("abs", 0, 5)])
    torch.testing.assert_close(model(x)[-1], reference(model, x, {}))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-path"])
def test_a_gate_decides_at_the_last_prompt_token_and_keeps_its_decision(
    monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    from fv_plugin.condition import Condition
    from fv_plugin.vllm.gate_requests import GateCondition

    if compiled:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(3)
    model, a, u = ToyModel(), torch.randn(HIDDEN), torch.randn(HEAD_DIM)
    x = torch.randn(8, HIDDEN)
    with torch.no_grad():
        first = model(x)[0]  # layer 0's output: what the condition reads (nothing is added before layer 1)
    direction = first[2] / first[2].norm()
    others = float(first[5] @ direction / first[5].norm())
    assert others < 0.9
    condition = Condition(layer=0, direction=direction, threshold=(1.0 + others) / 2)
    assert [bool(condition.passes(first[t])) for t in (2, 5)] == [True, False]  # the direct computation
    gate = GateCondition.of(condition)
    head = HeadEntry(1, 1, False, 1.0, u.numpy().astype("<f4").tobytes(), gate=0)
    gated = dataclasses.replace(
        resolved({2: a}, 1.5, "generated", False), gates=(0,), conditions=(gate,), heads=(head,)
    )
    requests = {name: params(gated) for name in ("yes", "no", "later")}
    batch = [("yes", 0, 3, 3), ("no", 0, 3, 3), ("later", 0, 2, 5)]  # "later": a first chunk, undecided
    runner = fake_runner(model, requests, batch)
    install_steering(runner, PluginSettings(max_layers=2, max_heads=2))
    runner._model_forward()
    got = model(x)[-1][:8]
    expected = reference(model, x, {2: [(2, 1.5 * a, False)]}, {1: [(2, 1, u, 1.5, False)]})
    torch.testing.assert_close(got, expected)
    # the next step: both decode one token; the decisions are kept (not read again from these tokens)
    runner.input_batch.req_ids, runner.input_batch.num_reqs = ["no", "yes"], 2
    runner.input_batch.num_computed_tokens_cpu = np.array([3, 3])
    runner.input_batch.num_prompt_tokens = np.array([3, 3])
    runner.query_start_loc.np = np.array([0, 1, 2])
    runner._model_forward()
    x2 = x[[2, 5]]  # "no" now holds the token that passed, "yes" the one that failed
    expected = reference(model, x2, {2: [(1, 1.5 * a, False)]}, {1: [(1, 1, u, 1.5, False)]})
    torch.testing.assert_close(model(x2)[-1], expected)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-path"])
def test_an_ungated_step_after_a_gated_one_is_steered_in_full(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """A compiled graph always multiplies by the gate's decision: a step without gated requests must not read the
    gate rows an earlier step's gated tokens left at the same token slots (closed ones would drop its steering)."""
    from fv_plugin.condition import Condition
    from fv_plugin.vllm.gate_requests import GateCondition

    if compiled:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(4)
    model, a, u = ToyModel(), torch.randn(HIDDEN), torch.randn(HEAD_DIM)
    x = torch.randn(3, HIDDEN)
    never = Condition(layer=0, direction=torch.ones(HIDDEN) / HIDDEN**0.5, threshold=2.0)  # a unit score is < 2
    head = HeadEntry(1, 1, False, 1.0, u.numpy().astype("<f4").tobytes(), gate=0)
    closed = dataclasses.replace(
        resolved({2: a}, 1.5, "generated", False), gates=(0,), conditions=(GateCondition.of(never),), heads=(head,)
    )
    ungated = dataclasses.replace(
        resolved({2: a}, 1.5, "generated", False), heads=(dataclasses.replace(head, gate=-1),)
    )
    requests = {"closed": params(closed), "open": params(ungated)}
    runner = fake_runner(model, requests, [("closed", 0, 3, 3)])
    install_steering(runner, PluginSettings(max_layers=2, max_heads=2))
    runner._model_forward()
    torch.testing.assert_close(model(x)[-1], reference(model, x, {}))  # the gate is closed: nothing added
    runner.input_batch.req_ids = ["open"]  # the next step: another request's prompt, at the same token slots
    runner._model_forward()
    expected = reference(model, x, {2: [(2, 1.5 * a, False)]}, {1: [(2, 1, u, 1.5, False)]})
    torch.testing.assert_close(model(x)[-1], expected)


def test_a_gate_row_given_to_another_request_keeps_its_decision_for_its_return() -> None:
    from fv_plugin.vllm.gate_requests import GateCondition
    from fv_plugin.vllm.gate_worker import GateBuffers, GateWriter
    from fv_plugin.vllm.runners import StepBatch
    from fv_plugin.vllm.tables import RequestPlan

    condition = GateCondition(0, 0.0, np.ones(HIDDEN, dtype="<f4").tobytes())
    plan = RequestPlan(keys=(), strength=1.0, positions="generated", relative=False, conditions=(condition,))
    writer = GateWriter(GateBuffers.allocate(rows=1, decisions=1, hidden=HIDDEN, device=torch.device("cpu")))

    def step(req_id: str, computed: int) -> tuple[list[tuple[int, ...]], set[int]]:
        batch = StepBatch([req_id], np.array([0, 1]), np.array([computed]), np.array([3]), {req_id: None})
        return writer.prepare(batch, [plan])

    assert step("a", 2) == ([(1,)], {0})  # "a" decides at its last prompt token
    writer.buffers.open[1] = 1.0  # what the forward pass decided
    assert step("b", 2) == ([(1,)], {0}) and writer.buffers.layer[0] == 0  # "b" takes the only row
    writer.buffers.open[1] = 0.0
    assert step("a", 3) == ([(1,)], set()) and writer.buffers.open[1] == 1.0  # "a" returns: its decision is back
    assert writer.buffers.layer[0] == -1  # nothing to decide this step
    assert step("b", 3) == ([(1,)], set()) and writer.buffers.open[1] == 0.0
