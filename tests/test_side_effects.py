"""The paper's evaluation protocol, confidence intervals, and what a vector changes besides its task."""

from __future__ import annotations

import collections
import math
import random
import string

import pytest
import torch
from conftest import char_tokenizer, reference_steering, tiny_model
from test_evaluation import reverse_task

import fv_plugin
from fv_plugin.evaluation import evaluate, icl_correct_inputs
from fv_plugin.scoring import wilson_interval
from fv_plugin.side_effects import degenerate, rise_strength, specificity, text_effects
from fv_plugin.tasks import Pair, Task


def test_wilson_interval_matches_published_values() -> None:
    # Reference values of the 95% Wilson score interval (z = 1.96), e.g. Newcombe (1998), table I.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _vector(model: torch.nn.Module, layer: int = 1, scale: float = 6.0, seed: int = 0) -> fv_plugin.FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return fv_plugin.FunctionVector(vector=torch.randn(64, generator=gen) * scale, layer=layer, task="reverse")


TEMPLATE = "Q:{x}\nA:{y}\n\n"


def _task_the_model_half_solves(model: torch.nn.Module) -> Task:
    """A task whose every answer is the character the random model most often predicts after its ICL prompts (a
    fixed point, found by iterating), so that in context it gets some queries right and misses others."""
    words = ["".join(random.Random(i).choice(string.ascii_lowercase) for _ in range(3)) for i in range(24)]
    answer = "a"
    for _ in range(5):
        task = Task("half", tuple(Pair(w, answer) for w in words))
        prompts = fv_plugin.make_prompts(task, n_shots=2, split="test", template=TEMPLATE)
        enc = fv_plugin.encode_prompts(char_tokenizer(), prompts)
        with torch.no_grad():
            top = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, -1].argmax(-1)
        answer = collections.Counter(char_tokenizer().decode([int(t)]) for t in top).most_common(1)[0][0]
    return Task("half", tuple(Pair(w, answer) for w in words))


def test_the_papers_protocol_scores_only_the_queries_icl_gets_right() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = _task_the_model_half_solves(model)
    options = {"n_shots": 2, "template": TEMPLATE, "generate": False}
    icl = evaluate(model, tok, task, mode="icl", **options)  # type: ignore[arg-type]
    kept = {r.input for r in icl.rows if r.first_token_correct}  # the oracle: ICL's own per-query outcome
    assert 0 < len(kept) < icl.n, "the tiny model should get some queries right in context and miss others"
    assert icl_correct_inputs(model, tok, task, fv_plugin.EvalConfig(n_shots=2, template=TEMPLATE)) == kept
    fv = _vector(model)
    paper = evaluate(model, tok, task, vectors=[fv], protocol="icl_correct", **options)  # type: ignore[arg-type]
    every = evaluate(model, tok, task, vectors=[fv], **options)  # type: ignore[arg-type]
    assert {r.input for r in paper.rows} == kept and paper.protocol == "icl_correct" and paper.n == len(kept)
    assert paper.accuracy == pytest.approx(sum(bool(r.first_token_correct) for r in paper.rows) / paper.n)
    again = every.restricted(kept)
    assert again.accuracy == pytest.approx(paper.accuracy) and again.answer_prob == pytest.approx(paper.answer_prob)
    correct = sum(bool(r.first_token_correct) for r in every.rows)
    assert every.accuracy_ci == pytest.approx(wilson_interval(correct, every.n))
    low, high = every.accuracy_ci
    assert low <= every.accuracy <= high
    assert math.isnan(every.restricted(set()).accuracy)
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate(model, tok, task, protocol="paper")


def test_degenerate_continuations_are_repetition_loops() -> None:
    assert degenerate([5, 9, 9, 9, 9])  # one token four times
    assert not degenerate([5, 9, 9, 9])
    assert degenerate([1, 2, 7, 8, 7, 8, 7, 8])  # a bigram three times
    assert degenerate([4, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    assert not degenerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert not degenerate([1, 2, 1, 3, 1, 2, 1, 3])  # a 4-gram only twice


def test_rise_strength_interpolates_from_the_plain_model() -> None:
    assert rise_strength([1, 2, 4], [1.0, 1.05, 1.25], 1.1) == pytest.approx(2 + 2 * (0.05 / 0.2))
    assert rise_strength([1, 2], [1.2, 1.3], 1.1) == pytest.approx(0.5)  # between strength 0 (ratio 1) and 1
    assert rise_strength([1, 2], [1.0, 1.05], 1.1) is None


def _naive_perplexity(model: torch.nn.Module, texts: list[str], delta: torch.Tensor, layer: int) -> float:
    """A plain forward per text with a hand-written hook adding ``delta`` at every position."""
    nll, count = 0.0, 0
    for text in texts:
        ids = char_tokenizer()(text, return_tensors="pt")["input_ids"]
        with torch.no_grad(), reference_steering(model, layer, delta, lambda b, s: torch.ones(b, s, dtype=torch.bool)):
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        nll -= float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def test_text_effects_against_a_naive_reference() -> None:
    model = tiny_model("llama")
    fv = _vector(model, scale=3.0)
    texts = ["the cat sat on the mat.", "a short walk by the river, then home."]
    effects = text_effects(model, char_tokenizer(), [fv], [1.0, 2.0], texts=texts, new_tokens=6)
    plain = _naive_perplexity(model, texts, torch.zeros(64), 1)
    assert effects.base_perplexity == pytest.approx(plain, rel=1e-4)
    for strength, ppl in zip(effects.strengths, effects.perplexity, strict=True):
        assert ppl == pytest.approx(_naive_perplexity(model, texts, strength * fv.vector, 1), rel=1e-4)
    assert all(k > 0 for k in effects.kl) and effects.kl[1] > effects.kl[0]
    assert effects.perplexity_ratio[0] == pytest.approx(effects.perplexity[0] / plain, rel=1e-4)
    assert all(0.0 <= d <= 1.0 for d in (*effects.degenerate, effects.base_degenerate)) and effects.n_texts == 2


def test_specificity_puts_each_vector_on_each_task() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    words = ["stone", "river", "cloud", "apple", "grass", "light", "sound", "bread", "chair", "plant", "water", "table"]
    upper = Task("upper", tuple(Pair(w, w.upper()) for w in words))
    tasks = [reverse_task(), upper]
    vectors = {"reverse": _vector(model, seed=1), "upper": _vector(model, seed=2)}
    spec = specificity(model, tok, tasks, vectors, config=fv_plugin.EvalConfig(n_shots=3))
    for mode in ("zero_shot", "icl"):
        for j, task in enumerate(tasks):
            plain = evaluate(model, tok, task, mode=mode, n_shots=3, generate=False).accuracy  # type: ignore[arg-type]
            assert spec.unsteered[mode][j] == pytest.approx(plain)
            for i, name in enumerate(spec.tasks):
                steered = evaluate(model, tok, task, vectors=[vectors[name]], mode=mode, n_shots=3, generate=False)  # type: ignore[arg-type]
                assert spec.steered[mode][i][j] == pytest.approx(steered.accuracy)
        change = spec.change(mode)
        expected = (change.sum() - change.diagonal().sum()) / 2
        assert spec.off_diagonal_change(mode) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="no vector for the tasks"):
        specificity(model, tok, tasks, {"reverse": vectors["reverse"]})


def test_side_effect_records_round_trip_through_json() -> None:
    import json

    from fv_plugin.side_effects import Specificity, TextEffects

    spec = Specificity(("a", "b"), {"icl": (0.5, 1.0)}, {"icl": ((0.5, 0.0), (0.25, 1.0))})
    assert Specificity.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    effects = TextEffects((1.0, 2.0), (0.1, 0.4), (11.0, 13.0), 10.0, (0.0, 0.5), 0.0, 3)
    back = TextEffects.from_dict(json.loads(json.dumps(effects.to_dict())))
    assert back == effects and back.rise_10 == pytest.approx(effects.rise_10)
