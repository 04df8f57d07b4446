"""Vectors spread over several layers (``FunctionVector.from_layers``): each part after its own layer."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from conftest import left_padded, reference_steering, tiny_model

import fv_plugin
from fv_plugin import FunctionVector

ROWS = [[5, 9, 14, 3, 22, 41, 7], [11, 12, 13, 60]]


def _parts(seed: int = 0, layers: tuple[int, ...] = (0, 2)) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(64, generator=gen, dtype=torch.float64) * 3 for layer in layers}


def test_a_vector_over_several_layers_holds_its_parts_and_their_sum(tmp_path: Path) -> None:
    parts = _parts()
    fv = FunctionVector.from_layers(parts, task="t", method="heads_own_layer")
    assert fv.layer == 0 and fv.layers == (0, 2) and torch.allclose(fv.vector, (parts[0] + parts[2]).float())
    back = FunctionVector.load(fv.save(tmp_path / "parts.safetensors"))
    assert back.layers == (0, 2) and all(torch.equal(back.parts()[at], parts[at]) for at in parts)
    doubled = 2 * fv - fv / 2
    assert torch.allclose(doubled.parts()[2], 1.5 * parts[2]) and doubled.layers == (0, 2)
    assert torch.allclose((-fv).parts()[0], -parts[0])
    with pytest.raises(ValueError, match="different layers"):
        fv + FunctionVector(vector=torch.ones(64, dtype=torch.float64), layer=0)
    with pytest.raises(ValueError, match="its lowest"):
        FunctionVector(vector=torch.ones(64), layer=2, layer_vectors={0: torch.ones(64), 2: torch.ones(64)})
    with pytest.raises(ValueError, match=r"layer_vectors\[1\] must be"):
        FunctionVector(vector=torch.ones(64), layer=1, layer_vectors={1: torch.ones(3)})
    with (
        pytest.raises(ValueError, match="out of range"),
        fv_plugin.steer(tiny_model("llama", dtype=torch.float64), FunctionVector.from_layers(_parts(layers=(1, 7)))),
    ):
        pass


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_part_is_added_after_its_own_layer(use_cache: bool) -> None:
    """Against plain-torch hooks adding each part at the final prompt token and every generated token."""
    model = tiny_model("llama", dtype=torch.float64)
    parts = _parts(1)
    ids, mask = left_padded(ROWS)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with fv_plugin.steer(model, FunctionVector.from_layers(parts), strength=1.5):
        steered = model.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, **kw)  # type: ignore[arg-type]
    width = ids.shape[1]

    def select(batch: int, seq: int) -> torch.Tensor:  # uncached: every forward sees the whole sequence
        where = torch.zeros(batch, seq, dtype=torch.bool)
        where[:, width - 1 :] = True  # left padding: the last prompt token is at width - 1 in every row
        return where

    with contextlib.ExitStack() as stack:
        for layer, part in parts.items():
            stack.enter_context(reference_steering(model, layer, 1.5 * part, select))
        reference = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)  # type: ignore[arg-type]
    assert torch.equal(steered, reference)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kw)  # type: ignore[arg-type]
    assert not torch.equal(steered, plain)
