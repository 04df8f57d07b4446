"""What must hold 3 and 4: batches, per-row strengths, beams; several vectors; bit-identity when idle."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded, next_layer_input, reference_steering, tiny_model

import fv_plugin
from fv_plugin import FunctionVector

ROWS = [[5, 9, 14, 3, 22, 41, 7], [11, 12, 13, 60], [70, 71, 72, 73, 74]]
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


def _fv(seed: int, layer: int = 1, scale: float = 2.0) -> FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return FunctionVector(vector=(torch.randn(64, generator=gen) * scale).double(), layer=layer)


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_model("llama", dtype=torch.float64)


def _alone(model: torch.nn.Module, row: list[int], strength: float, fv: FunctionVector, **kw: object) -> torch.Tensor:
    ids = torch.tensor([row])
    with fv_plugin.steer(model, fv, strength=strength):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GEN, **kw)  # type: ignore[arg-type]


def test_each_row_of_a_left_padded_batch_gets_what_it_gets_alone(model: torch.nn.Module) -> None:
    fv = _fv(1)
    ids, mask = left_padded(ROWS)
    with fv_plugin.steer(model, fv, strength=1.5):
        batch = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    for i, row in enumerate(ROWS):
        assert batch[i, ids.shape[1] :].tolist() == _alone(model, row, 1.5, fv)[0, len(row) :].tolist()


def test_per_row_strength_tensor_mixes_steered_and_unsteered_rows(model: torch.nn.Module) -> None:
    fv = _fv(2)
    ids, mask = left_padded(ROWS)
    strengths = torch.tensor([0.0, 1.5, -1.0])
    with fv_plugin.steer(model, fv, strength=strengths):
        batch = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    for i, row in enumerate(ROWS):
        alone = _alone(model, row, float(strengths[i]), fv)
        assert batch[i, ids.shape[1] :].tolist() == alone[0, len(row) :].tolist()
    plain = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert torch.equal(batch[0], plain[0])


@pytest.mark.parametrize("extra", [dict(num_beams=3), dict(num_return_sequences=2, do_sample=False, num_beams=2)])
def test_beams_and_return_sequences_keep_per_row_strengths(model: torch.nn.Module, extra: dict[str, object]) -> None:
    fv = _fv(3)
    ids, mask = left_padded(ROWS[:2])
    strengths = torch.tensor([1.5, 0.0])
    kw = dict(GEN, **extra)
    with fv_plugin.steer(model, fv, strength=strengths):
        batch = model.generate(input_ids=ids, attention_mask=mask, **kw)  # type: ignore[arg-type]
    per = int(extra.get("num_return_sequences", 1))  # type: ignore[call-overload]
    for i, row in enumerate(ROWS[:2]):
        one = torch.tensor([row])
        with fv_plugin.steer(model, fv, strength=float(strengths[i])):
            alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw)  # type: ignore[arg-type]
        got = batch[i * per : (i + 1) * per, ids.shape[1] :]
        assert got.tolist() == alone[:, len(row) :].tolist()


def test_strength_tensor_of_the_wrong_length_is_an_error(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS)
    with fv_plugin.steer(model, _fv(1), strength=torch.tensor([1.0, 2.0])), pytest.raises(ValueError, match="rows"):
        model(input_ids=ids, attention_mask=mask)


def test_several_vectors_with_signs_at_one_and_several_layers(model: torch.nn.Module) -> None:
    a, b, c = _fv(4, layer=0), _fv(5, layer=0), _fv(6, layer=1)
    ids, mask = left_padded(ROWS)
    with fv_plugin.steer(model, (a, 1.0), (b, -0.5), (c, 2.0), strength=0.8, positions="all"):
        ours = model(input_ids=ids, attention_mask=mask).logits

    def everywhere(batch: int, seq: int) -> torch.Tensor:
        return torch.ones(batch, seq, dtype=torch.bool)

    with (
        reference_steering(model, 0, 0.8 * (a.vector - 0.5 * b.vector), everywhere),
        reference_steering(model, 1, 0.8 * 2.0 * c.vector, everywhere),
    ):
        ref = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-6, atol=1e-5)


def test_sum_of_vectors_equals_steering_with_both(model: torch.nn.Module) -> None:
    a, b = _fv(7), _fv(8)
    ids, mask = left_padded(ROWS)
    with torch.no_grad(), next_layer_input(model, 1) as both, fv_plugin.steer(model, a, (b, -1.0)):
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), next_layer_input(model, 1) as diff, fv_plugin.steer(model, a - b):
        model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(both[0], diff[0])


def test_zero_strength_no_vectors_and_after_exit_are_bit_identical(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS)
    plain = model(input_ids=ids, attention_mask=mask).logits
    fv = _fv(9)
    with fv_plugin.steer(model, fv, strength=0.0):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    with fv_plugin.steer(model, (fv, 0.0)):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    with fv_plugin.steer(model):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    with fv_plugin.steer(model, fv, strength=3.0):
        assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    proc = fv_plugin.FunctionVectorProcessor(fv, strength=0.0)
    fv_plugin.attach(model)
    steered = model.generate(
        input_ids=ids,
        attention_mask=mask,
        logits_processor=[proc],
        output_scores=True,
        return_dict_in_generate=True,
        **GEN,
    )
    unsteered = model.generate(
        input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **GEN
    )
    for s, u in zip(steered.scores, unsteered.scores, strict=True):
        assert torch.equal(s, u)
