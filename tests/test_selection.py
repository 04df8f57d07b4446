"""Scoring many candidate vectors by re-running only the last token equals steering each one in full."""

from __future__ import annotations

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from test_evaluation import reverse_task

import fv_plugin
from fv_plugin import FunctionVector
from fv_plugin.selection import score_candidates


def _fv(seed: int, layer: int, scale: float = 4.0) -> FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return FunctionVector(vector=torch.randn(64, generator=gen) * scale, layer=layer)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_replayed_candidates_score_like_full_steered_forwards(family: str) -> None:
    model, tok = tiny_model(family), char_tokenizer()
    task = reverse_task()
    prompts = fv_plugin.make_prompts(task, n_shots=0, split="test") + fv_plugin.make_prompts(task, n_shots=0)
    gen = torch.Generator().manual_seed(9)
    patch = FunctionVector(
        vector=torch.zeros(64), layer=1, heads=((1, 2), (2, 0)), head_values=torch.randn(2, 16, generator=gen) * 3
    )
    layered = FunctionVector.from_layers({0: torch.randn(64, generator=gen) * 3, 2: torch.randn(64, generator=gen)})
    candidates = [
        [],
        [_fv(1, 0)],
        [(_fv(2, 2), -1.5)],
        [_fv(3, 1), (_fv(4, 0), 0.5)],
        [(patch, 1.0)],
        [(patch, 0.5), _fv(5, 2)],
        [(layered, 2.0)],
    ]
    fast = score_candidates(model, tok, prompts, candidates, rows_per_batch=3)
    for candidate, got in zip(candidates, fast, strict=True):
        full = fv_plugin.score_prompts(model, tok, prompts, candidate)  # one steered forward per prompt batch
        assert got.accuracy == pytest.approx(full.accuracy)
        assert got.answer_prob == pytest.approx(full.answer_prob, rel=1e-4, abs=1e-6)
    assert len({round(s.answer_prob, 6) for s in fast}) > 3  # the candidates really differ
