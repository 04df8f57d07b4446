"""One definition of a correct answer, one home of a task's prompt sets: every path agrees with a direct oracle."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import char_tokenizer, reference_steering, tiny_model
from test_evaluation import WORDS
from torch import nn

import fv_plugin
from fv_plugin import FunctionVector, Pair, Task
from fv_plugin.scoring import first_token_correct, sweep
from fv_plugin.selection import score_answers, score_candidates

TEMPLATE = "Q: {x}\nA:{y}\n\n"  # no separator: an answer's first token is its first character


def _query(word: str) -> str:
    return TEMPLATE[: TEMPLATE.index("{y}")].replace("{x}", word)


@torch.no_grad()
def _top(model: nn.Module, text: str, fv: FunctionVector | None = None, strength: float = 1.0) -> str:
    """Oracle: the most likely next character after ``text`` alone (no padding), the vector added by a plain hook
    at the last position only."""
    tok = char_tokenizer()
    ids = torch.tensor([tok(text)["input_ids"]])
    delta = strength * fv.vector if fv is not None else torch.zeros(model.config.hidden_size)
    layer = fv.layer if fv is not None else 0

    def select(batch: int, seq: int) -> torch.Tensor:
        return (torch.arange(seq) == seq - 1).expand(batch, seq)

    with reference_steering(model, layer, delta, select):
        return tok.decode([int(model(input_ids=ids).logits[0, -1].argmax())])


def alternative_task(model: nn.Module) -> Task:
    """Every pair's main answer starts with a character the plain model does not predict; its alternative starts
    with the one it does."""
    pairs = []
    for word in WORDS:
        predicted = _top(model, _query(word))
        main = "Z" if predicted != "Z" else "Y"
        pairs.append(Pair(word, main + word, alternatives=(predicted + word,)))
    return Task("alternatives", tuple(pairs))


def _oracle(model: nn.Module, pairs: tuple[Pair, ...], fv: FunctionVector | None, *, main_only: bool = False) -> float:
    hits = 0
    for pair in pairs:
        accepted = [pair.output] if main_only else list(pair.answers)
        hits += _top(model, _query(pair.input), fv) in {a[0] for a in accepted}
    return hits / len(pairs)


def _vector(layer: int, seed: int = 3) -> FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return FunctionVector(vector=6 * torch.randn(64, generator=gen), layer=layer)


def test_an_alternative_answer_is_correct_in_every_score() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = alternative_task(model)
    fv = _vector(1)
    test_plain, test_steered = _oracle(model, task.test, None), _oracle(model, task.test, fv)
    assert test_plain == 1.0 and _oracle(model, task.test, None, main_only=True) == 0.0  # the test can fail
    prompts = fv_plugin.make_prompts(task, n_shots=0, split="test", template=TEMPLATE)
    # score_prompts / zero_shot_scores (fv extract's printed figures, side effects, benchmarks)
    assert fv_plugin.score_prompts(model, tok, prompts).accuracy == test_plain
    assert fv_plugin.score_prompts(model, tok, prompts, [fv]).accuracy == pytest.approx(test_steered)
    # the sweep behind fv extract's layer choice and the evaluation sweeps
    swept = sweep(model, tok, prompts, "strength", [0.0, 1.0], lambda s: ([fv], s))
    assert swept.baseline_accuracy == test_plain and swept.accuracy == pytest.approx((test_plain, test_steered))
    # evaluate (fv eval's reports) and the ICL-correct filter
    for vectors, want in (([], test_plain), ([fv], test_steered)):
        result = fv_plugin.evaluate(model, tok, task, vectors=vectors, template=TEMPLATE, generate=False)
        assert result.accuracy == pytest.approx(want)
    assert all(first_token_correct(model, tok, prompts))
    # candidate scoring (auto's choice)
    scores = score_candidates(model, tok, prompts, [[], [fv]])
    assert [s.accuracy for s in scores] == pytest.approx([test_plain, test_steered])


def test_auto_and_the_layer_choice_count_alternatives() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = alternative_task(model)
    small = dict(n_mean=4, n_shots=2, template=TEMPLATE, validation="valid")
    chosen = fv_plugin.extract_function_vector(model, tok, task, method="difference", **small)
    layer_sweep = chosen.layer_sweep
    assert layer_sweep is not None and layer_sweep.baseline_accuracy == 1.0
    per_layer = fv_plugin.layer_vectors(model, tok, task, **small)
    want = [_oracle(model, task.valid, per_layer[at]) for at in range(3)]
    assert list(layer_sweep.accuracy) == pytest.approx(want)
    with pytest.warns(fv_plugin.WeakVectorWarning):  # nothing beats a plain model that is always right
        auto = fv_plugin.extract_function_vector(model, tok, task, methods=("difference",), strengths=(1.0,), **small)
    assert auto.selection is not None and auto.selection.baseline_accuracy == 1.0
    grid = [c for c in auto.selection.candidates if c.positions != "last_prompt"]  # finalists also come twice
    assert [c.accuracy for c in grid] == pytest.approx(want)


class _Recording:
    """A tokenizer that remembers every text it was asked to tokenize."""

    def __init__(self, inner: object) -> None:
        self.inner, self.texts = inner, []  # type: ignore[var-annotated]

    def __call__(self, text: object, *args: object, **kwargs: object) -> object:
        self.texts += [text] if isinstance(text, str) else list(text)  # type: ignore[call-overload]
        return self.inner(text, *args, **kwargs)  # type: ignore[operator]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.mark.parametrize("validation", ["valid", "valid+train"])
def test_every_choice_reads_the_validation_prompts_and_never_the_test_split(
    validation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fv_plugin.auto
    import fv_plugin.extraction
    from fv_plugin.prompt_sets import validation_prompts

    model, tok = tiny_model("llama"), _Recording(char_tokenizer())
    task = alternative_task(model)
    seen: dict[str, list[list[str]]] = {"auto": [], "layer": [], "answers": []}

    def spy(key: str, real: Any = score_candidates) -> object:
        def scored(*args: Any, **kwargs: Any) -> object:
            seen[key].append([p.text for p in args[2]])
            return real(*args, **kwargs)

        return scored

    monkeypatch.setattr(fv_plugin.auto, "score_candidates", spy("auto"))
    monkeypatch.setattr(fv_plugin.auto, "score_answers", spy("answers", score_answers))
    monkeypatch.setattr(fv_plugin.extraction, "score_candidates", spy("layer"))
    small = dict(n_mean=4, n_aie=2, n_shots=2, k=2, ks=(2,), template=TEMPLATE, validation=validation)
    fv_plugin.extract_function_vector(model, tok, task, method="difference", **small)
    with pytest.warns(fv_plugin.WeakVectorWarning):
        fv_plugin.extract_function_vector(model, tok, task, methods=("difference", "head_patch"), **small)
    config = fv_plugin.ExtractionConfig(**small)  # type: ignore[arg-type]
    want = [p.text for p in validation_prompts(task, config)]
    # auto scores every candidate on the first queries by first token, the finalists on every query by their answer
    screen = fv_plugin.ExtractionConfig().screen_queries
    assert seen["auto"] == [want[:screen]] and seen["answers"] == [want] and seen["layer"] == [want]
    queries = {p.input for p in task.valid} | ({p.input for p in task.train} if validation == "valid+train" else set())
    assert {text.split("\n")[-2][3:] for text in want} == queries  # "...Q: {x}\nA:" -> x
    # the test split's queries were never even tokenized while the vectors were chosen
    asked = "\n".join(str(t) for t in tok.texts)
    assert tok.texts and not [p.input for p in task.test if f"Q: {p.input}\n" in asked]
    assert [p.input for p in task.valid if f"Q: {p.input}\n" in asked]  # the check would see them
