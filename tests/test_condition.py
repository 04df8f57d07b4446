"""Learning a condition: the fit against labelled synthetic data, the prompt sets (never the test split), the
extraction that stores it."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import fv_plugin
from fv_plugin.activations import RecordedStates, prompt_means
from fv_plugin.condition_fit import LabelledPrompts, condition_negatives, condition_prompts, fit_condition
from fv_plugin.prompt_sets import clean_prompts


def _clusters(n: int, shift: float, seed: int) -> tuple[torch.Tensor, list[bool]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, 16, generator=gen)
    x[:n, 3] += shift  # positives differ along one axis
    x[:, 0] += 10.0  # away from the origin, so normalising keeps the difference
    return x, [True] * n + [False] * n


def test_fit_chooses_the_separable_layer_and_reports_rates() -> None:
    x_train, y_train = _clusters(40, 6.0, 0)
    x_valid, y_valid = _clusters(30, 6.0, 1)
    noise_train = torch.randn_like(x_train)
    noise_valid = torch.randn_like(x_valid)
    data = (LabelledPrompts(), LabelledPrompts())
    for target, labels in zip(data, (y_train, y_valid), strict=True):
        target.add(["p"] * sum(labels), True, "zero_shot")
        target.add(["n"] * (len(labels) - sum(labels)), False, "corpus")
    condition = fit_condition({0: noise_train, 1: x_train}, {0: noise_valid, 1: x_valid}, data)
    assert condition.layer == 1
    passed = condition.passes(x_valid)
    assert passed.tolist() == y_valid  # separable: the validation split is classified exactly
    assert condition.false_positive is not None and condition.false_positive.errors == 0
    assert condition.false_positive.n == 30 and 0 < condition.false_positive.interval[1] < 0.2
    assert condition.false_negative is not None and condition.false_negative.rate == 0.0
    assert set(condition.false_positive_by_kind) == {"corpus"}
    x_test, y_test = _clusters(50, 6.0, 2)  # fresh samples: it generalises
    assert (condition.passes(x_test) == torch.tensor(y_test)).float().mean() > 0.95


def test_prompt_sets_never_read_the_test_split() -> None:
    task = fv_plugin.load_task("antonym")
    train, valid = condition_prompts(task, char_tokenizer())
    texts = " ".join(train.texts + valid.texts)
    own = [t for t, label in zip(train.texts + valid.texts, train.labels + valid.labels, strict=True) if label]
    for pair in task.test:
        assert f"Q: {pair.input}\nA:" not in own and f'"{pair.input}"' not in " ".join(own)
    assert set(train.kinds) >= {"zero_shot", "natural", "corpus", "other_icl"}
    # another task's bare query says nothing of which task is meant: never a negative, only with demonstrations
    assert "other_task" not in train.kinds + valid.kinds
    others = [t for t, k in zip(train.texts, train.kinds, strict=True) if k == "other_icl"]
    assert others and all(t.count("\nA:") == 3 for t in others)  # two demonstrations and the query
    assert any(line in texts for line in condition_negatives())
    assert len(set(train.texts) & set(valid.texts)) == 0


def test_extraction_learns_and_stores_a_condition(tmp_path: object) -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    options = {"method": "difference", "layer": 2, "n_mean": 8, "n_shots": 3}
    fv = fv_plugin.extract_function_vector(
        model, tok, task, condition=True, condition_negatives=("my own text",), **options
    )
    assert fv.condition is not None and 0 <= fv.condition.layer < 2
    fp, fn = fv.condition.false_positive, fv.condition.false_negative
    assert fp is not None and fn is not None and 0 <= fp.rate <= 1 and fn.n > 0
    assert "false positives" in fv.condition.describe()
    back = fv_plugin.FunctionVector.load(fv.save(tmp_path / "v.safetensors"))  # type: ignore[operator]
    assert back.condition is not None and back.condition.false_positive_by_kind == fv.condition.false_positive_by_kind
    assert fv_plugin.extract_function_vector(model, tok, task, condition=False, **options).condition is None


def _alone_last_state(model: torch.nn.Module, tok: object, text: str, layer: int) -> torch.Tensor:
    """Oracle: the prompt run alone (no padding, no hooks); its last token's state after ``layer``."""
    ids = tok(text, return_tensors="pt")["input_ids"]  # type: ignore[operator]
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, -1].double()


def test_a_default_extraction_learns_a_condition_whose_decisions_are_the_rule(tmp_path: Path) -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    small = {"n_mean": 8, "n_aie": 2, "n_shots": 3, "ks": (2,), "strengths": (1.0,), "head_strengths": (1.0,)}
    with warnings.catch_warnings():  # a random model: its vector may or may not beat it
        warnings.simplefilter("ignore", fv_plugin.WeakVectorWarning)
        # condition: the default; residual-stream methods at layers 1-2 only, so the vector has a layer below it
        fv = fv_plugin.extract_function_vector(model, tok, task, layers=(1, 2), methods=("difference",), **small)
    condition = fv.condition
    assert condition is not None and 0 <= condition.layer < fv.first_layer
    assert condition.false_negative is not None and condition.false_positive is not None
    # the stored validation rates, recounted by the rule computed here on states of prompts run alone
    zero = [p.text for p in clean_prompts(task, fv.config, n_shots=0)]  # type: ignore[arg-type]
    _, valid = condition_prompts(task, tok, zero_shot=zero)
    direction, threshold = condition.direction.double(), condition.threshold
    passed, margin = [], []
    for text in valid.texts:
        h = _alone_last_state(model, tok, text, condition.layer)
        passed.append(bool(h @ direction >= threshold * h.norm()))
        margin.append(abs(float(h @ direction / h.norm()) - threshold))
    labels = valid.labels
    fn = sum(1 for p, y in zip(passed, labels, strict=True) if y and not p)
    fp = sum(1 for p, y in zip(passed, labels, strict=True) if p and not y)
    assert min(margin) > 1e-5  # no prompt so close to the threshold that padding noise could flip it
    assert (fn, sum(labels)) == (condition.false_negative.errors, condition.false_negative.n)
    assert (fp, len(labels) - sum(labels)) == (condition.false_positive.errors, condition.false_positive.n)
    # the gate steers exactly the rows the rule passes (against the same rows steered alone or left plain)
    passing = [t for t, p in zip(valid.texts, passed, strict=True) if p]
    failing = [t for t, p in zip(valid.texts, passed, strict=True) if not p]
    texts = passing[:4] + failing[:4]
    rule = [passed[valid.texts.index(t)] for t in texts]
    assert any(rule) and not all(rule)
    loud = dataclasses.replace(fv, vector=fv.vector * 50 / fv.vector.norm())  # a change the logits show
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad(), fv_plugin.steer(model, loud, gate=True, positions="all"):
        gated = model(**enc).logits[:, -1]
    with torch.no_grad():
        plain = model(**enc).logits[:, -1]
    changed = (gated - plain).abs().amax(-1) > 1e-3
    assert changed.tolist() == rule
    back = fv_plugin.FunctionVector.load(fv.save(tmp_path / "v.safetensors"))
    assert back.condition is not None and torch.equal(back.condition.direction, condition.direction)


def test_hand_made_vectors_and_older_files_have_no_condition(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    made = fv_plugin.FunctionVector(vector=torch.ones(64), layer=2, model_type="llama")
    assert made.condition is None
    assert fv_plugin.FunctionVector.load(made.save(tmp_path / "made.safetensors")).condition is None
    header = {"format": "fv_plugin.FunctionVector", "format_version": "1", "fv_metadata": json.dumps({"layer": 2})}
    save_file({"vector": torch.ones(4)}, str(tmp_path / "old.safetensors"), metadata=header)
    assert fv_plugin.FunctionVector.load(tmp_path / "old.safetensors").condition is None


def test_the_condition_reuses_recorded_states_and_stops_below_the_vector() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    fv = fv_plugin.FunctionVector(vector=torch.ones(64), layer=2, model_type="llama")
    zero = clean_prompts(task, fv_plugin.ExtractionConfig(n_mean=20), n_shots=0)
    rows = prompt_means(model, tok, zero, rows=[0, 1], progress=False).rows
    for i in (0, 7):  # a prompt's recorded row is its own state (oracle: the prompt alone)
        torch.testing.assert_close(
            rows[1][i].double(), _alone_last_state(model, tok, zero[i].text, 1), atol=1e-4, rtol=0
        )
    recorded = RecordedStates(tuple(p.text for p in zero), rows)
    work = {}
    for name, given in (("recorded", recorded), ("fresh", None)):
        calls = []
        handles = [
            layer.register_forward_pre_hook(lambda m, a, i=i, c=calls: c.append(i))
            for i, layer in enumerate(model.model.layers)
        ]
        try:
            fitted = fv_plugin.learn_condition(model, tok, task, fv, recorded=given)
        finally:
            for handle in handles:
                handle.remove()
        assert fitted.layer < 2
        work[name] = calls
    assert set(work["fresh"]) == set(work["recorded"]) == {0, 1}  # the last layer (and the head) never run
    unique = len(set(recorded.texts))
    assert len(work["fresh"]) > len(work["recorded"]) and unique > 0


def test_threshold_weighs_misses_against_a_brute_force_oracle() -> None:
    """The chosen cut minimises ``(w * FNR + FPR) / (w + 1)`` over every cut a brute force tries, and a heavier
    weight on misses never lets more task prompts fail."""
    from fv_plugin.condition_fit import best_threshold

    gen = torch.Generator().manual_seed(3)
    scores = torch.cat([torch.randn(30, generator=gen) + 1.0, torch.randn(50, generator=gen)])
    y = torch.cat([torch.ones(30, dtype=torch.bool), torch.zeros(50, dtype=torch.bool)])

    def weighted(cut: float, w: float) -> float:
        passed = scores >= cut
        fnr = float((~passed & y).sum()) / 30
        fpr = float((passed & ~y).sum()) / 50
        return (w * fnr + fpr) / (w + 1)

    grid = [float(v) for v in torch.linspace(-4, 5, 2001)]
    for w in (1.0, 3.0):
        error, cut = best_threshold(scores, y, w)
        assert error == pytest.approx(weighted(cut, w))
        assert error <= min(weighted(c, w) for c in grid) + 1e-6
    misses = [int((scores[y] < best_threshold(scores, y, w)[1]).sum()) for w in (1.0, 3.0)]
    assert misses[1] <= misses[0]
