"""Per-row vectors: one ``generate`` in which every input row has its own vectors, checked row by row against that
row generated alone, against a hand-written oracle of the hidden states, and through all three entry points."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, next_layer_input, tiny_model

import fv_plugin
from fv_plugin import FunctionVector, FunctionVectorProcessor, SteeredModel

ROWS = [[5, 9, 14, 3, 22, 41, 7], [11, 12, 13, 60], [70, 71, 72, 73, 74], [30, 31, 32]]
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


def _fv(seed: int, layer: int = 1, scale: float = 3.0) -> FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return FunctionVector(vector=(torch.randn(64, generator=gen) * scale).double(), layer=layer)


A, B, C, D = _fv(1), _fv(2, layer=2), _fv(3, layer=0), _fv(4)
PER_ROW = [[A], [], [(B, -1.0), C], [(A, 0.5), (A, 0.5)]]


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_model("llama", dtype=torch.float64)


def _alone(model: torch.nn.Module, row: list[int], vectors: list[object], **kw: object) -> list[int]:
    ids = torch.tensor([row])
    with fv_plugin.steer(model, *vectors, **kw):  # type: ignore[arg-type]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GEN)
    return out[0, len(row) :].tolist()


@pytest.mark.parametrize("positions", ["generated", "last_prompt", "all"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_each_row_gets_what_it_gets_alone(model: torch.nn.Module, positions: str, use_cache: bool) -> None:
    ids, mask = left_padded(ROWS)
    with fv_plugin.steer(model, rows=PER_ROW, strength=1.5, positions=positions):  # type: ignore[arg-type]
        batch = model.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, **GEN)
    for i, row in enumerate(ROWS):
        alone = _alone(model, row, PER_ROW[i], strength=1.5, positions=positions)
        assert batch[i, ids.shape[1] :].tolist() == alone, f"row {i}"
    plain = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert torch.equal(batch[1], plain[1]) and not torch.equal(batch[0], plain[0])


def test_hidden_states_get_each_rows_weighted_sum(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS)
    strengths = torch.tensor([1.0, 2.0, -0.5, 3.0])
    rows = [[A], [], [(A, -1.0), D], [(A, 0.5), (A, 0.5)]]  # every vector after layer 1
    with torch.no_grad(), next_layer_input(model, 1) as plain:
        model(input_ids=ids, attention_mask=mask)
    with (
        torch.no_grad(),
        next_layer_input(model, 1) as steered,
        fv_plugin.steer(model, rows=rows, strength=strengths, positions="all"),  # type: ignore[arg-type]
    ):
        model(input_ids=ids, attention_mask=mask)
    expected = {0: A.vector, 1: torch.zeros(64, dtype=torch.float64), 2: D.vector - A.vector, 3: A.vector}
    real = mask.bool()
    for row, vector in expected.items():
        added = (steered[0] - plain[0])[row][real[row]]
        want = (strengths[row] * vector).expand_as(added)
        torch.testing.assert_close(added, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(steered[0][~real], plain[0][~real])


def test_relative_normalize_per_row(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS[:2])
    with torch.no_grad(), next_layer_input(model, 1) as plain:
        model(input_ids=ids, attention_mask=mask)
    with (
        torch.no_grad(),
        next_layer_input(model, 1) as steered,
        fv_plugin.steer(model, rows=[[], [A]], strength=0.3, positions="all", normalize="relative"),
    ):
        model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    added = (steered[0] - plain[0])[1][real[1]]
    expected = 0.3 * plain[0][1][real[1]].norm(dim=-1, keepdim=True) * A.vector / A.vector.norm()
    torch.testing.assert_close(added, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(steered[0][0], plain[0][0])


def test_processor_and_steered_model_take_rows_too(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS)
    with fv_plugin.steer(model, rows=PER_ROW, strength=1.5):  # type: ignore[arg-type]
        expected = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    attached = fv_plugin.attach(model)
    try:
        proc = FunctionVectorProcessor(rows=PER_ROW, strength=1.5)  # type: ignore[arg-type]
        got = attached.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc], **GEN)
        assert torch.equal(got, expected)
        wrapped = SteeredModel(model, strength=1.5)
        assert torch.equal(wrapped.generate(input_ids=ids, attention_mask=mask, rows=PER_ROW, **GEN), expected)
    finally:
        fv_plugin.detach(model)


def test_rows_repeat_for_beams_and_return_sequences(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS[:2])
    rows = [[], [A]]
    kw = dict(GEN, num_beams=2, num_return_sequences=2)
    with fv_plugin.steer(model, rows=rows, strength=2.0):  # type: ignore[arg-type]
        batch = model.generate(input_ids=ids, attention_mask=mask, **kw)  # type: ignore[arg-type]
    for i, row in enumerate(ROWS[:2]):
        one = torch.tensor([row])
        with fv_plugin.steer(model, *rows[i], strength=2.0):
            alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw)  # type: ignore[arg-type]
        assert batch[2 * i : 2 * i + 2, ids.shape[1] :].tolist() == alone[:, len(row) :].tolist()


def test_head_level_vectors_per_row(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(5)
    patch = FunctionVector(
        vector=torch.zeros(64, dtype=torch.float64),
        layer=1,
        heads=((1, 0), (2, 3)),
        head_values=torch.randn(2, 16, generator=gen, dtype=torch.float64) * 4,
        method="head_patch",
    )
    ids, mask = left_padded(ROWS[:3])
    rows = [[patch], [], [A, (patch, 0.5)]]
    with fv_plugin.steer(model, rows=rows):  # type: ignore[arg-type]
        batch = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    for i, row in enumerate(ROWS[:3]):
        assert batch[i, ids.shape[1] :].tolist() == _alone(model, row, rows[i]), f"row {i}"


def test_bad_rows_are_refused_before_anything_runs(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS)
    with pytest.raises(ValueError, match="not both"), fv_plugin.steer(model, A, rows=[[A]]):
        pass
    with pytest.raises(TypeError, match="one list of vectors per input row"), fv_plugin.steer(model, rows=[]):
        pass
    with pytest.raises(TypeError, match=r"rows\[1\]"), fv_plugin.steer(model, rows=[[A], A]):  # type: ignore[list-item]
        pass
    with (
        pytest.raises(ValueError, match="3 values for 2 rows"),
        fv_plugin.steer(model, rows=[[A], []], strength=torch.tensor([1.0, 2.0, 3.0])),
    ):
        pass
    with pytest.raises(ValueError, match="3 rows but the batch has 4"), fv_plugin.steer(model, rows=[[A], [], [B]]):
        model(input_ids=ids, attention_mask=mask)
