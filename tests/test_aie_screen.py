"""The AIE's screen (``ExtractionConfig.aie_screen``): every head on the first prompts, the best on the rest.

The oracle is the full exact AIE (itself checked against one full forward per head and prompt in
test_extraction.py): a screened run must give the same effects wherever it ran a head, run exactly the heads
the first prompts rank best, and rank them first.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import fv_plugin
from fv_plugin.architectures import resolve_architecture
from fv_plugin.benchmarks.cost import estimate, model_shape
from fv_plugin.hooks import count_forward_work
from fv_plugin.mediation import (
    average_indirect_effect,
    head_statistics,
    mean_head_activations,
    statistics_prompts,
)
from fv_plugin.prompts import make_prompts

SMALL = dict(n_mean=6, n_shots=3, condition=False)


def _inputs() -> tuple[torch.nn.Module, object, list[fv_plugin.Prompt], torch.Tensor]:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    clean = make_prompts(task, n=6, n_shots=3, split="train")
    shuffled = make_prompts(task, n=5, n_shots=3, split="train", shuffle_labels=True, seed=1)
    return model, tok, shuffled, mean_head_activations(model, tok, clean, batch_size=4)


def test_a_screened_aie_runs_the_best_heads_of_the_first_prompts_on_the_rest() -> None:
    model, tok, shuffled, means = _inputs()
    full = average_indirect_effect(model, tok, shuffled, means, heads_per_batch=7, prompts_per_batch=2)
    screened = average_indirect_effect(
        model, tok, shuffled, means, heads_per_batch=7, prompts_per_batch=2, screen=2, finalists=5
    )
    grid = full.effects.shape[1] * full.effects.shape[2]
    assert not full.effects.isnan().any() and grid == 12
    flat, exact = screened.effects.view(5, grid), full.effects.view(5, grid)
    torch.testing.assert_close(flat[:2], exact[:2], rtol=0, atol=1e-5)  # every head on the screening prompts
    kept = set(exact[:2].mean(0).topk(5).indices.tolist())
    ran = {i for i in range(grid) if not flat[2:, i].isnan().any()}
    assert ran == kept and flat[2:, sorted(set(range(grid)) - kept)].isnan().all()
    torch.testing.assert_close(flat[2:, sorted(kept)], exact[2:, sorted(kept)], rtol=0, atol=1e-5)
    torch.testing.assert_close(screened.base_probs, full.base_probs, rtol=0, atol=1e-6)
    # the kept heads rank first, by their mean over every prompt; the others after, by the screen's mean
    heads = full.effects.shape[2]
    top = [layer * heads + head for layer, head in screened.top_heads(grid)]
    assert set(top[:5]) == kept and top[:5] == sorted(kept, key=lambda i: -float(exact[:, i].mean()))
    assert top[5:] == sorted(set(range(grid)) - kept, key=lambda i: -float(exact[:2, i].mean()))
    assert not screened.aie.isnan().any() and int(screened.complete.sum()) == 5


def test_a_screen_runs_fewer_rows_and_needs_both_settings() -> None:
    model, tok, shuffled, means = _inputs()
    rows = {}
    for screen, finalists in ((None, None), (2, 3)):
        with count_forward_work(model, resolve_architecture(model)) as counter:
            average_indirect_effect(model, tok, shuffled, means, screen=screen, finalists=finalists)
        rows[screen] = counter()[1]  # logit rows: one per replayed (prompt, head) and the references
    assert rows[None] - rows[2] == 3 * (12 - 3)  # three prompts past the screen, nine heads fewer on each
    with pytest.raises(ValueError, match="together"):
        average_indirect_effect(model, tok, shuffled, means, screen=2)
    with pytest.raises(ValueError, match="together"):
        average_indirect_effect(model, tok, shuffled, means, screen=0, finalists=3)


def test_the_heads_kept_follow_the_most_heads_a_vector_uses() -> None:
    config = fv_plugin.ExtractionConfig
    assert config(method="heads").aie_finalists(270) == 80  # SmolLM2: the paper's k = 10, kept 8x
    assert config().aie_finalists(270) is None  # auto tries k up to 80: 640 >= 270, every head
    assert config().aie_finalists(1024) == 640  # a 7B model with 32 x 32 heads
    assert config(method="head_difference", k=20).aie_finalists(270) == 160
    assert config(method="difference").aie_finalists(270) is None  # no head in the vector
    assert config(method="heads", aie_screen=None).aie_finalists(270) is None
    assert config(method="heads", n_aie=12).aie_finalists(270) is None  # the screen would be every prompt
    assert config(method="heads", aie_keep=2, k=5).aie_finalists(270) == 10
    with pytest.raises(ValueError, match="aie_screen"):
        config(aie_screen=0)
    with pytest.raises(ValueError, match="aie_keep"):
        config(aie_keep=0)


def test_screened_statistics_stand_in_only_for_a_config_that_keeps_no_more_heads() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    settings = fv_plugin.ExtractionConfig(method="heads", k=1, n_aie=4, aie_screen=2, aie_keep=4, **SMALL)
    stats = head_statistics(model, tok, task, settings, zero_shot=False)
    assert int(stats.effects.complete.sum()) == 4 and stats.effects.effects.isnan().any()
    assert stats.matches(settings) and stats.matches(dataclasses.replace(settings, aie_keep=2))
    assert not stats.matches(dataclasses.replace(settings, k=2))  # 8 heads wanted, 4 kept
    assert not stats.matches(dataclasses.replace(settings, aie_screen=3))
    assert not stats.matches(dataclasses.replace(settings, aie_screen=None))
    exact = dataclasses.replace(settings, aie_screen=None)
    assert head_statistics(model, tok, task, exact, zero_shot=False).matches(settings)  # every head: always
    with pytest.raises(ValueError, match="recompute"):
        fv_plugin.extract_function_vector(model, tok, task, dataclasses.replace(settings, k=2), statistics=stats)
    fv = fv_plugin.extract_function_vector(model, tok, task, settings, statistics=stats, layer=1)
    assert fv.heads == tuple(stats.top_heads(1)) and stats.effects.complete[fv.heads[0]]


def test_the_estimate_counts_a_screened_aie() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    config = fv_plugin.ExtractionConfig(method="heads", k=1, n_aie=5, aie_screen=2, aie_keep=3, **SMALL)
    shape = model_shape(model.config)
    _, shuffled = statistics_prompts(task, config)
    means = mean_head_activations(model, tok, shuffled)
    with count_forward_work(model, resolve_architecture(model)) as counter:
        found = average_indirect_effect(model, tok, shuffled, means, screen=2, finalists=3)
    tokens, logit_rows = counter()
    lengths = [len(tok(p.text)["input_ids"]) for p in shuffled]
    padded = (2 * max(lengths[:2]) + 3 * max(lengths[2:])) / 5  # each stage's prompts run as one padded batch
    (projected,) = [s for s in estimate(shape, config, icl_tokens=padded) if s.name == "indirect effects"]
    assert projected.logit_rows == logit_rows == 5 * 3 + 2 * 12 + 3 * 3
    # the estimate assumes the kept heads spread over the layers as all heads are (a row from layer l runs
    # (3 - l) / 3 of the stack, 2/3 on average); the kept heads are the model's choice
    kept = found.complete.nonzero()[:, 0].tolist()
    assert len(kept) == 3
    assert tokens == pytest.approx(projected.tokens + 3 * sum((3 - layer) / 3 - 2 / 3 for layer in kept), rel=1e-6)


def test_fv_extract_screens_unless_told_to_run_the_full_aie() -> None:
    from fv_plugin.cli import _extract_config, _extract_parser

    argv = ["--task", "antonym", "--out", "v.safetensors", "--method", "heads"]
    screened = _extract_config(_extract_parser().parse_args(argv))
    full = _extract_config(_extract_parser().parse_args([*argv, "--full-aie"]))
    assert screened.aie_screen == 12 and screened.aie_finalists(270) == 80
    assert full.aie_screen is None and full.aie_finalists(270) is None
    again = fv_plugin.ExtractionConfig.from_dict(screened.to_dict())  # kept with the vector's settings
    assert again == screened
