"""gate=True: the decision against a direct computation of the condition, gated rows against the same rows
steered or left plain alone, per-row vectors, padding, generation under the KV cache, every entry point."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import decoder_layers, left_padded, next_layer_input, right_padded, tiny_model
from torch import nn

import fv_plugin
from fv_plugin.condition import Condition

PROMPTS = [[5, 9, 13, 17, 21], [7, 3, 40], [60, 61, 62, 63, 64, 65, 66], [30, 31], [90, 4, 77, 12]]


def _vector(seed: int, layer: int = 2, scale: float = 6.0) -> fv_plugin.FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return fv_plugin.FunctionVector(vector=scale * torch.randn(64, generator=gen), layer=layer, model_type="llama")


def _plain_last_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """Oracle: each row's final real token's state after ``layer`` from ``output_hidden_states`` (no hooks)."""
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    last = torch.where(mask.bool(), torch.arange(mask.shape[1]), -1).amax(1)
    return states[torch.arange(len(ids)), last]


def _gated(fv: fv_plugin.FunctionVector, model: nn.Module, layer: int, seed: int) -> fv_plugin.FunctionVector:
    """``fv`` with a random condition at ``layer`` whose threshold splits PROMPTS in two."""
    direction = torch.randn(64, generator=torch.Generator().manual_seed(seed))
    ids, mask = left_padded(PROMPTS)
    scores = Condition(layer=layer, direction=direction, threshold=0.0).score(
        _plain_last_states(model, ids, mask, layer)
    )
    ordered = torch.sort(scores).values
    threshold = float(ordered[2:4].mean())  # between two rows' scores, far from either
    return dataclasses.replace(fv, condition=Condition(layer=layer, direction=direction, threshold=threshold))


def _last_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, *vectors: object, **options: object):
    with torch.no_grad(), fv_plugin.steer(model, *vectors, **options):  # type: ignore[arg-type]
        logits = model(input_ids=ids, attention_mask=mask).logits
    last = torch.where(mask.bool(), torch.arange(mask.shape[1]), -1).amax(1)
    return logits[torch.arange(len(ids)), last]


@pytest.mark.parametrize("pad", [left_padded, right_padded])
def test_gate_decision_and_rows_match_oracles(pad: object) -> None:
    model = tiny_model("llama")
    fv = _gated(_vector(0), model, layer=1, seed=1)
    ids, mask = pad(PROMPTS)  # type: ignore[operator]
    expected = fv.condition.passes(_plain_last_states(model, ids, mask, 1))  # type: ignore[union-attr]
    assert 0 < int(expected.sum()) < len(PROMPTS)
    with next_layer_input(model, 1) as seen:
        gated = _last_logits(model, ids, mask, fv, gate=True, positions="all")
    last = torch.where(mask.bool(), torch.arange(mask.shape[1]), -1).amax(1)
    entering = seen[0][torch.arange(len(ids)), last]  # pre-hook oracle: what the gate's layer handed on
    assert torch.equal(fv.condition.passes(entering), expected)  # type: ignore[union-attr]
    for row, passed in enumerate(expected.tolist()):
        alone_ids, alone_mask = ids[row : row + 1], mask[row : row + 1]
        alone = _last_logits(model, alone_ids, alone_mask, *([fv] if passed else []), positions="all")
        torch.testing.assert_close(gated[row], alone[0], atol=1e-4, rtol=1e-4)
    plain = _last_logits(model, ids, mask)
    changed = (gated - plain).abs().amax(-1) > 1e-3
    assert torch.equal(changed, expected)


def test_several_vectors_gate_independently_per_row() -> None:
    model = tiny_model("llama")
    a = _gated(_vector(3), model, layer=0, seed=4)
    b = _gated(_vector(5, layer=2), model, layer=1, seed=6)
    ids, mask = left_padded(PROMPTS)
    rows = [[a], [b], [a, (b, -0.5)], [], [(a, 2.0), b]]
    gated = _last_logits(model, ids, mask, rows=rows, gate=True)
    pass_a = a.condition.passes(_plain_last_states(model, ids, mask, 0))  # type: ignore[union-attr]
    pass_b = b.condition.passes(_plain_last_states(model, ids, mask, 1))  # type: ignore[union-attr]
    for row, wanted in enumerate(rows):
        kept = []
        for item in wanted:
            vec = item[0] if isinstance(item, tuple) else item
            if bool((pass_a if vec is a else pass_b)[row]):
                kept.append(item)
        alone = _last_logits(model, ids[row : row + 1], mask[row : row + 1], rows=[kept])
        torch.testing.assert_close(gated[row], alone[0], atol=1e-4, rtol=1e-4)


def _generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool, **options: object):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        eos_token_id=None,
        **options,
    )


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_keeps_the_decision(use_cache: bool) -> None:
    model = tiny_model("llama")
    fv = _gated(_vector(7, scale=10.0), model, layer=1, seed=8)
    ids, mask = left_padded(PROMPTS)
    expected = fv.condition.passes(_plain_last_states(model, ids, mask, 1))  # type: ignore[union-attr]
    with fv_plugin.steer(model, fv, gate=True):
        gated = _generate(model, ids, mask, use_cache)
    steered = fv_plugin.SteeredModel(model, [fv], gate=True).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    proc = fv_plugin.FunctionVectorProcessor(fv, gate=True)
    attached = fv_plugin.attach(model)
    try:
        processed = _generate(attached, ids, mask, use_cache, logits_processor=[proc])
    finally:
        fv_plugin.detach(model)
    for row, passed in enumerate(expected.tolist()):
        with fv_plugin.steer(model, *([fv] if passed else [])):
            alone = _generate(model, ids[row : row + 1], mask[row : row + 1], use_cache)
        assert torch.equal(gated[row], alone[0])
        assert torch.equal(steered[row], alone[0]) and torch.equal(processed[row], alone[0])


def test_gated_vectors_keep_their_own_positions() -> None:
    model = tiny_model("llama")
    a = dataclasses.replace(_gated(_vector(9, scale=10.0), model, layer=1, seed=10), positions="last_prompt")
    b = dataclasses.replace(_gated(_vector(11, scale=10.0), model, layer=0, seed=12), positions="generated")
    ids, mask = left_padded(PROMPTS)
    pass_a = a.condition.passes(_plain_last_states(model, ids, mask, 1))  # type: ignore[union-attr]
    pass_b = b.condition.passes(_plain_last_states(model, ids, mask, 0))  # type: ignore[union-attr]
    assert not torch.equal(pass_a, pass_b), "the two gates must split the rows differently here"
    with fv_plugin.steer(model, a, b, gate=True):
        gated = _generate(model, ids, mask, True)
    for row in range(len(PROMPTS)):
        kept = [fv for fv, passed in ((a, pass_a[row]), (b, pass_b[row])) if bool(passed)]
        with fv_plugin.steer(model, *kept):  # each at its own positions, ungated
            alone = _generate(model, ids[row : row + 1], mask[row : row + 1], True)
        assert torch.equal(gated[row], alone[0])


def test_gate_needs_a_condition_and_a_layer_before_the_vector() -> None:
    model = tiny_model("llama")
    fv = _vector(0)
    ids, mask = left_padded(PROMPTS[:1])
    with pytest.raises(ValueError, match="learn_condition"), fv_plugin.steer(model, fv, gate=True):
        pass
    with pytest.raises(ValueError, match="condition"):
        fv_plugin.SteeredModel(model, [fv], gate=True)
    proc = fv_plugin.FunctionVectorProcessor(fv, gate=True)
    with pytest.raises(ValueError, match="condition"):
        _generate(fv_plugin.attach(model), ids, mask, True, logits_processor=[proc])
    fv_plugin.detach(model)
    with pytest.raises(ValueError, match="below 2"):
        dataclasses.replace(fv, condition=Condition(layer=2, direction=torch.ones(64), threshold=0.0))
    with pytest.raises(TypeError, match="gate"), fv_plugin.steer(model, fv, gate="yes"):  # type: ignore[arg-type]
        pass
    assert len(decoder_layers(model)) == 3


def test_condition_survives_save_and_load(tmp_path: object) -> None:
    model = tiny_model("llama")
    fv = _gated(_vector(0), model, layer=1, seed=1)
    path = fv.save(tmp_path / "v.safetensors")  # type: ignore[operator]
    back = fv_plugin.FunctionVector.load(path)
    assert back.condition is not None and back.condition.layer == 1
    assert torch.equal(back.condition.direction, fv.condition.direction)  # type: ignore[union-attr]
    assert back.condition.threshold == fv.condition.threshold  # type: ignore[union-attr]
    plain = fv_plugin.FunctionVector.load(_vector(0).save(tmp_path / "w.safetensors"))  # type: ignore[operator]
    assert plain.condition is None
