"""method="auto": the choice rule, what it records, and that the chosen vector is what it claims to be."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from test_evaluation import reverse_task

import fv_plugin
from fv_plugin import WeakVectorWarning
from fv_plugin.auto import choice, choose, tolerance_for, validation_prompts
from fv_plugin.config import ExtractionConfig
from fv_plugin.records import Candidate


def _c(
    method: str,
    acc: float,
    *,
    layer: int | None = None,
    s: float = 1.0,
    prob: float = 0.1,
    em: float | None = None,
    kl: float | None = None,
    change: float | None = None,
    k: int | None = 10,
) -> Candidate:
    return Candidate(
        method=method,
        strength=s,
        accuracy=acc,
        answer_prob=prob,
        layer=layer,
        k=k if method != "difference" else None,
        exact_match=em,
        side_effect=kl,
        change=change,
    )


def test_choice_prefers_a_good_neighbourhood_then_the_smallest_change() -> None:
    spike = [_c("difference", a, layer=i) for i, a in enumerate([0.1, 0.2, 0.9, 0.1, 0.5, 0.6, 0.6, 0.5])]
    assert spike[choose(spike)].layer == 2  # without smoothing the best layer wins
    assert spike[choose(spike, smooth_layers=1)].layer == 5  # a lone 0.9 between 0.2 and 0.1 loses to 0.6s
    assert spike[choose(spike, smooth_layers=3)].layer == 7  # layers 4-7 average 0.55, the best window
    tie = [_c("head_patch", 0.5, change=9.0), _c("difference", 0.5, layer=3, change=2.0), _c("heads", 0.5, change=5.0)]
    assert tie[choose(tie)].method == "difference"  # ties go to the smallest change, not the largest intervention
    heads = [_c("head_patch", 0.7, change=3.0, k=80), _c("head_patch", 0.7, change=3.0, k=5)]
    assert heads[choose(heads)].k == 5  # then the fewest heads
    probs = [_c("head_patch", 0.7, prob=0.2), _c("head_patch", 0.7, prob=0.4)]
    assert probs[choose(probs)].answer_prob == 0.4


def test_choice_reads_the_whole_answer_then_the_side_effect_budget_then_the_model_without_a_vector() -> None:
    found = [
        _c("head_patch", 1.0, em=0.04, kl=0.5, change=1.0),  # first token perfect, answers wrong
        _c("difference", 0.9, layer=3, em=0.80, kl=3.0, change=2.0),  # the most accurate, over the budget
        _c("head_difference", 0.8, em=0.60, kl=1.0, change=4.0),
        _c("heads", 0.8, em=0.60, kl=0.2, change=5.0),
    ]
    assert found[choose(found)].method == "difference"  # exact match first, not the first token
    assert found[choose(found, budget=1.5)].method == "head_difference"  # the budget; tie: the smaller change
    assert found[choose(found, budget=0.1)].method == "heads"  # none within: the least side effect that beats
    assert found[choose(found, budget=1.5, baseline=0.6)].method == "difference"  # the only one beating 0.6
    # nothing beats the model without a vector: the least harmful (highest exact match, then least side effect)
    assert found[choose(found, budget=1.5, baseline=0.9)].method == "difference"
    weak = [found[0], found[2], found[3]]
    assert weak[choose(weak, baseline=0.9)].method == "heads"
    mixed = [_c("difference", 1.0, layer=1), _c("heads", 0.5, em=0.5, kl=0.1)]  # a small task: all on every query
    assert mixed[choose(mixed, baseline=0.0)].method == "heads"  # only the finalists (exact match scored) compete


def test_the_accuracy_tolerance_trades_a_standard_error_of_exact_match_for_the_least_side_effect() -> None:
    n = 25
    found = [
        dataclasses.replace(c, n_queries=n)
        for c in (
            _c("head_difference", 0.9, em=0.80, kl=5.0, change=4.0),  # the most accurate, the largest side effect
            _c("difference", 0.9, layer=3, em=0.76, kl=1.0, change=2.0),  # one query fewer: within one SE (0.08)
            _c("difference", 0.9, layer=5, em=0.72, kl=0.5, change=1.0),  # two fewer: also within it
            _c("heads", 0.8, em=0.60, kl=0.1, change=5.0),  # far below: never chosen for its side effect
        )
    ]
    se = math.sqrt(0.8 * 0.2 / n)  # the oracle: one standard error of the best exact match, by hand
    assert tolerance_for(found, [0], "se") == pytest.approx(se)
    assert found[choose(found)].method == "head_difference"  # tolerance 0: the most accurate
    assert found[choose(found, tolerance="se")].layer == 5  # within 0.08 of 0.80: the least side effect
    assert found[choose(found, tolerance=0.05)].layer == 3  # 0.72 is outside a tolerance of 0.05
    assert found[choose(found, tolerance=0.5)].method == "heads"  # a wide tolerance reaches the weakest
    index, allowed = choice(found, tolerance="se", budget=0.8)  # the budget first: 0.72 and 0.60 are within it
    assert found[index].layer == 5 and allowed == pytest.approx(math.sqrt(0.72 * 0.28 / n))
    perfect = [dataclasses.replace(c, exact_match=1.0) for c in found[:2]]  # SE of 1.0 is 0: ties as before
    assert perfect[choose(perfect, tolerance="se")].method == "difference"  # the tie goes to the smaller change
    with pytest.raises(ValueError, match="accuracy_tolerance must be"):
        choose(found, tolerance="two")
    with pytest.raises(ValueError, match="accuracy_tolerance must be"):
        ExtractionConfig(accuracy_tolerance=-0.1)


SMALL = dict(n_mean=6, n_aie=2, n_shots=3, k=4, ks=(2, 3), strengths=(1.0, 2.0), head_strengths=(1.0, 4.0))


def test_auto_records_every_candidate_and_returns_the_one_it_scored() -> None:
    model, tok, task = tiny_model("llama"), char_tokenizer(), reverse_task()
    with pytest.warns(WeakVectorWarning, match="does not beat the model without a vector"):
        fv = fv_plugin.extract_function_vector(model, tok, task, **SMALL)  # a random model: nothing beats it
    sel = fv.selection
    assert sel is not None and sel.queries == "valid+train"
    layers = 3
    expected = layers * 2 + 2 * 2 + 2 * 1 + 1 * 2 * 2  # difference, head_difference, head_patch, heads (k, L 0, 2)
    grid, twins = sel.candidates[:expected], sel.candidates[expected:]
    finalists = [c for c in grid if c.exact_match is not None]
    assert finalists and all(c.positions == "generated" for c in finalists)

    # every finalist is scored again steered at the last prompt token only: the same first token, its own answers
    def same(c: Candidate) -> Candidate:
        return dataclasses.replace(c, exact_match=None, side_effect=None, positions=None, answer_prob=0.0)

    assert [same(c) for c in twins] == [same(c) for c in finalists]
    assert [c.answer_prob for c in twins] == pytest.approx([c.answer_prob for c in finalists], rel=1e-4)
    assert all(c.positions == "last_prompt" and c.exact_match is not None for c in twins)
    assert sel.n_queries == len(task.valid) + len(task.train)
    best = sel.best
    assert fv.method == best.method and fv.config is not None and fv.config.method == "auto"
    assert fv.positions == best.positions
    # the oracle: the chosen method's vector built explicitly, scaled by the chosen strength, scored with plain steering
    built = fv_plugin.extract_function_vector(
        model, tok, task, **{**SMALL, "method": best.method, "k": best.k or 4, "layer": best.layer}
    )
    scaled = built if best.method == "head_patch" else best.strength * built
    assert torch.allclose(fv.vector, scaled.vector) and fv.layer == scaled.layer
    prompts = validation_prompts(task, fv.config)
    again = fv_plugin.score_prompts(model, tok, prompts, [fv])
    assert again.accuracy == pytest.approx(best.accuracy) and again.answer_prob == pytest.approx(
        best.answer_prob, rel=1e-4
    )
    assert sel.baseline_accuracy == pytest.approx(fv_plugin.score_prompts(model, tok, prompts).accuracy)


def test_selection_travels_with_the_vector(tmp_path: Path) -> None:
    model, tok, task = tiny_model("llama"), char_tokenizer(), reverse_task()
    with pytest.warns(WeakVectorWarning):
        fv = fv_plugin.extract_function_vector(
            model, tok, task, methods=("difference",), validation="valid", **{**SMALL, "ks": (2,)}
        )
    assert fv.selection is not None and {c.method for c in fv.selection.candidates} == {"difference"}
    assert fv.selection.n_queries == len(task.valid)
    back = fv_plugin.FunctionVector.load(fv.save(tmp_path / "auto.safetensors"))
    assert back.selection == fv.selection and back.config == fv.config and back.positions == fv.positions
    with pytest.raises(ValueError, match="cannot be chosen by 'auto'"):
        fv_plugin.ExtractionConfig(methods=("layer_mean",))


def test_portable_auto_chooses_among_residual_stream_forms_only() -> None:
    model, tok, task = tiny_model("llama"), char_tokenizer(), reverse_task()
    with pytest.warns(WeakVectorWarning):
        fv = fv_plugin.extract_function_vector(model, tok, task, portable=True, **{**SMALL, "ks": (2,)})
    assert fv.selection is not None and not fv.is_head_patch
    assert {c.method for c in fv.selection.candidates} == {"difference", "heads"}  # the default forms, portable
    with pytest.raises(ValueError, match="method='head_patch' is head-level"):
        fv_plugin.ExtractionConfig(method="head_patch", portable=True)
    with pytest.raises(ValueError, match="leaves no method"):
        fv_plugin.ExtractionConfig(methods=("head_patch", "head_difference"), portable=True)


def test_auto_positions_decide_where_finalists_are_scored_and_the_vector_is_steered(tmp_path: Path) -> None:
    model, tok, task = tiny_model("llama"), char_tokenizer(), reverse_task()
    small = {**SMALL, "methods": ("difference",), "validation": "valid", "ks": (2,)}
    with pytest.warns(WeakVectorWarning):
        fv = fv_plugin.extract_function_vector(model, tok, task, auto_positions=("last_prompt",), **small)
    assert fv.selection is not None and fv.positions == "last_prompt"
    finalists = [c for c in fv.selection.candidates if c.exact_match is not None]
    assert finalists and {c.positions for c in finalists} == {"last_prompt"}
    assert "last prompt token" in fv.selection.best.label()
    with pytest.warns(WeakVectorWarning):
        paper = fv_plugin.extract_function_vector(model, tok, task, auto_positions=("generated",), **small)
    assert paper.selection is not None and len(paper.selection.candidates) == len(fv.selection.candidates)
    assert paper.positions == "generated"
    with pytest.warns(WeakVectorWarning):  # chosen for every token, as llama.cpp adds a control vector
        every = fv_plugin.extract_function_vector(model, tok, task, auto_positions=("all",), portable=True, **small)
    assert every.selection is not None and every.positions == "all" and "every token" in every.selection.best.label()
    assert {c.positions for c in every.selection.candidates if c.exact_match is not None} == {"all"}
    for wrong in ((), ("answer",), ("generated", "generated")):
        with pytest.raises(ValueError, match="auto_positions must be"):
            ExtractionConfig(auto_positions=wrong)
    # a file written before vectors carried positions: none, steered at "generated"; finalists scored there only
    path = fv.save(tmp_path / "v.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    meta = json.loads(header["fv_metadata"])
    del meta["positions"], meta["config"]["auto_positions"]
    save_file(tensors, str(path), metadata={**header, "fv_metadata": json.dumps(meta)})
    old = fv_plugin.FunctionVector.load(path)
    assert old.positions is None and old.config is not None and old.config.auto_positions == ("generated",)


def test_fv_extract_scores_both_position_sets_unless_told_the_papers() -> None:
    from fv_plugin.cli import _extract_config, _extract_parser

    argv = ["--task", "antonym", "--out", "v.safetensors"]
    assert _extract_config(_extract_parser().parse_args(argv)).auto_positions == ("generated", "last_prompt")
    paper = _extract_config(_extract_parser().parse_args([*argv, "--paper-positions"]))
    assert paper.auto_positions == ("generated",) and ExtractionConfig.from_dict(paper.to_dict()) == paper
    every = _extract_config(_extract_parser().parse_args([*argv, "--portable", "--every-token"]))
    assert every.auto_positions == ("all",) and every.portable and ExtractionConfig.from_dict(every.to_dict()) == every
    with pytest.raises(SystemExit):  # one or the other
        _extract_parser().parse_args([*argv, "--paper-positions", "--every-token"])
