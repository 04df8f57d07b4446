"""Learning a condition: the fit against labelled synthetic data, the prompt sets (never the test split), the
extraction that stores it."""

from __future__ import annotations

import torch
from conftest import char_tokenizer, tiny_model

import fv_plugin
from fv_plugin.condition_fit import LabelledPrompts, condition_negatives, condition_prompts, fit_condition


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
    assert set(train.kinds) >= {"zero_shot", "natural", "corpus", "other_task", "other_icl"}
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
