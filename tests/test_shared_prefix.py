"""The last-token replay of many prompts at once: each row's logits against the model run on that row's prompt alone
(no padding, no cache, no replay), for every family; rows attend to their prompts' prefixes in place where the
family's attention allows it, and the model's configuration is left as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_model

from fv_plugin.architectures import resolve_architecture
from fv_plugin.mediation import LastTokenReplay, cache_kwarg
from fv_plugin.shared_prefix import row_groups

ROWS = [[5, 9, 17, 33, 12, 7], [40, 41, 42], [8, 60, 3, 90, 91, 92, 93, 94], [70, 71]]


def _padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    return ids, mask


def _alone(model: torch.nn.Module, row: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([row])).logits[0, -1].float()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_replayed_rows_equal_each_prompt_run_alone(family: str) -> None:
    model = tiny_model(family)
    resolved = resolve_architecture(model)
    ids, mask = _padded(ROWS)
    replay = LastTokenReplay(model, resolved, ids, cache_kwarg(model), mask)
    assert replay.usable, family
    expected = torch.stack([_alone(model, row) for row in ROWS])
    orders = {
        "blocked": torch.arange(4).repeat_interleave(3),  # runs of one prompt (the AIE's order)
        "tiled": torch.arange(4).repeat(3),  # every prompt in turn (the candidates' order)
        "any": torch.tensor([2, 0, 0, 3, 1, 2, 3, 1, 0]),
    }
    for name, index in orders.items():
        for start in (0, resolved.num_layers - 1):
            found = replay.logits(start, index)
            scale = expected.abs().max()
            assert ((found - expected[index]).abs().max() / scale) < 1e-4, (family, name, start)
    full = replay.full_logits(orders["any"])
    assert ((full - expected[orders["any"]]).abs().max() / expected.abs().max()) < 1e-4, family


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "gemma2", "gemma3_text"])
@torch.no_grad()
def test_prefixes_are_shared_where_the_attention_allows_and_the_config_is_restored(family: str) -> None:
    model = tiny_model(family)
    before = model.config._attn_implementation
    ids, mask = _padded(ROWS)
    replay = LastTokenReplay(model, resolve_architecture(model), ids, cache_kwarg(model), mask)
    # Gemma 2 and 3's sliding-window layers share them while the prefix and the new token fit in the window (here
    # 8 tokens in 4096); Gemma 2's soft-capped scores are capped as its own attention caps them
    assert replay.shared, family
    assert model.config._attn_implementation == before


@torch.no_grad()
def test_soft_capped_scores_are_capped_in_the_shared_attention() -> None:
    rows = [[5, 9, 17, 33, 12, 7, 40, 41], [8, 60, 3, 90], [70, 71, 72]]
    for cap in (50.0, 0.05):  # Gemma 2's default, and one so small that every score is capped hard
        model = tiny_model("gemma2", attn_logit_softcapping=cap)
        ids, mask = _padded(rows)
        replay = LastTokenReplay(model, resolve_architecture(model), ids, cache_kwarg(model), mask)
        assert replay.usable and replay.shared, cap
        expected = torch.stack([_alone(model, row) for row in rows])
        index = torch.tensor([2, 0, 1, 1, 0])
        for start in (0, 1):
            found = replay.logits(start, index)
            assert ((found - expected[index]).abs().max() / expected.abs().max()) < 1e-4, (cap, start)


@torch.no_grad()
def test_a_prefix_longer_than_the_sliding_window_is_copied_and_still_exact() -> None:
    rows = [[5, 9, 17, 33, 12, 7, 40, 41], [8, 60, 3, 90, 91, 92, 93, 94]]  # no padding: the window is unambiguous
    for window, shared in ((9, True), (8, True), (7, False), (4, False)):  # prefix 7 + the new token fit in 8
        model = tiny_model("gemma3_text", sliding_window=window)
        ids, mask = _padded(rows)
        replay = LastTokenReplay(model, resolve_architecture(model), ids, cache_kwarg(model), mask)
        assert replay.usable and replay.shared == shared, window
        expected = torch.stack([_alone(model, row) for row in rows])
        index = torch.tensor([1, 0, 0, 1])
        found = replay.logits(1, index)
        assert ((found - expected[index]).abs().max() / expected.abs().max()) < 1e-4, window


def test_row_groups_use_slices_for_the_usual_orders() -> None:
    tiled = row_groups(torch.arange(3).repeat(4), 3).groups
    assert tiled == ((0, slice(0, 12, 3)), (1, slice(1, 12, 3)), (2, slice(2, 12, 3)))
    blocked = row_groups(torch.arange(3).repeat_interleave(2), 3).groups
    assert blocked == ((0, slice(0, 2)), (1, slice(2, 4)), (2, slice(4, 6)))
    scattered = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    groups = dict(row_groups(scattered, 2).groups)
    assert groups[0].tolist() == list(range(1, 18, 2)) and groups[1].tolist() == list(range(0, 18, 2))
