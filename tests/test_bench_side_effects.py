"""``fv bench side-effects`` against naive computations on a tiny random model, and the gate's public decision
(``fv_plugin.gate_decisions``) against the decision ``steer(..., gate=True)`` takes."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest
import torch
from conftest import char_tokenizer, reference_steering, tiny_model
from test_evaluation import reverse_task
from torch import nn

import fv_plugin
from fv_plugin.benchmarks.side_effect_measures import Corpus, Settings, measure_plain, measure_vector
from fv_plugin.benchmarks.side_effects import gate_table, rows_json, side_effect_table
from fv_plugin.condition import Condition
from fv_plugin.config import EvalConfig
from fv_plugin.side_effects import continuation_perplexity, degenerate
from fv_plugin.tasks import Pair, Task

PARAGRAPHS = ("the cat sat on a mat and slept", "a dog ran by the river in the sun", "we ate bread and soup at noon")
CHAT = ("hello, how are you?", "tell me a joke", "what time is it")
NEW = 5


def _vector(layer: int = 2, scale: float = 6.0) -> fv_plugin.FunctionVector:
    vec = scale * torch.randn(64, generator=torch.Generator().manual_seed(0))
    return fv_plugin.FunctionVector(vector=vec, layer=layer, task="reverse")


def _last_state(model: nn.Module, text: str, layer: int) -> torch.Tensor:
    """Oracle: the prompt's last token after ``layer``, from ``output_hidden_states`` (no hooks)."""
    ids = char_tokenizer()(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, -1]


def _gated(fv: fv_plugin.FunctionVector, model: nn.Module, prompts: list[str]) -> fv_plugin.FunctionVector:
    """``fv`` with a condition at layer 0 whose threshold passes some of ``prompts`` and not others."""
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3))
    probe = Condition(layer=0, direction=direction, threshold=0.0)
    scores = sorted(float(probe.score(_last_state(model, p, 0))) for p in prompts)
    middle = len(scores) // 2
    threshold = (scores[middle - 1] + scores[middle]) / 2
    return dataclasses.replace(fv, condition=Condition(layer=0, direction=direction, threshold=threshold))


def _naive_run(model: nn.Module, prompt: str, fv: fv_plugin.FunctionVector | None) -> list[int]:
    """One prompt alone (no padding, no batch), greedy, steered by ``fv`` at the default positions or plain."""
    ids = char_tokenizer()(prompt, return_tensors="pt")["input_ids"]
    options = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), fv_plugin.steer(model, *([fv] if fv is not None else [])):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)  # type: ignore[operator]
    return out[0, ids.shape[1] :].tolist()


def _from(start: int, batch: int, length: int) -> torch.Tensor:
    return (torch.arange(length) >= start)[None, :].expand(batch, length)


def _naive_perplexity(model: nn.Module, fv: fv_plugin.FunctionVector | None, texts: tuple[str, ...]) -> float:
    """The paragraphs after their first 4 words in one forward each, the vector added by a plain torch hook at the
    opening's last token and every later one."""
    nll, count = 0.0, 0
    for text in texts:
        words = text.split()
        opening = char_tokenizer()(" ".join(words[:4]))["input_ids"]
        rest = char_tokenizer()(" " + " ".join(words[4:]))["input_ids"]
        ids = torch.tensor([opening + rest])
        start = len(opening) - 1
        delta = fv.vector if fv is not None else torch.zeros(64)
        layer = fv.layer if fv is not None else 0
        select = functools.partial(_from, start)
        with torch.no_grad(), reference_steering(model, layer, delta, select):
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        positions = torch.arange(start, ids.shape[1] - 1)
        nll -= float(logp[positions, ids[0, start + 1 :]].sum())
        count += len(positions)
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def measured() -> tuple[nn.Module, fv_plugin.FunctionVector, list[object], object, Corpus]:
    model, tok = tiny_model("llama"), char_tokenizer()
    corpus = Corpus(PARAGRAPHS, CHAT, opening_words=4)
    fv = _gated(_vector(), model, [*corpus.openings, *CHAT])
    task = reverse_task()
    other = Task("upper", tuple(Pair(p.input, p.input.upper()) for p in task.pairs))
    settings = Settings(queries=3, n_shots=1, new_tokens=NEW, modes=("ungated", "gated"))
    plain = measure_plain(model, tok, [other], corpus, settings)
    return model, fv, measure_vector(model, tok, fv, task, [other], corpus, plain, settings), plain, corpus


def test_identical_continuations_and_degeneration_match_a_naive_computation(measured: tuple) -> None:
    model, fv, rows, plain, corpus = measured
    by_mode = {r.mode: r for r in rows}
    prompts = {"neutral": list(corpus.openings), "chat": list(CHAT)}
    passes = {k: [bool(fv.condition.passes(_last_state(model, p, 0))) for p in v] for k, v in prompts.items()}
    assert 0 < sum(passes["neutral"] + passes["chat"]) < 6, "the condition should split the prompts"
    for mode in ("ungated", "gated"):
        runs = {}
        for kind, texts in prompts.items():
            steered = [fv if mode == "ungated" or passed else None for passed in passes[kind]]
            pairs = zip(texts, steered, strict=True)
            runs[kind] = [(_naive_run(model, p, s), _naive_run(model, p, None)) for p, s in pairs]
        row = by_mode[mode]
        assert row.neutral_identical.hits == sum(a == b for a, b in runs["neutral"])
        assert row.chat_identical.hits == sum(a == b for a, b in runs["chat"])
        assert row.degenerate.hits == sum(degenerate(a) for kind in runs for a, _ in runs[kind])
    assert by_mode["ungated"].neutral_identical.hits < len(PARAGRAPHS), "the vector should change some text"
    passed = by_mode["gated"].gate_passes  # the share of prompts the condition lets through, per kind
    assert (passed["neutral"].hits, passed["chat"].hits) == (sum(passes["neutral"]), sum(passes["chat"]))
    assert not by_mode["ungated"].gate_passes and "| reverse | " in gate_table(rows)
    written = json.loads(json.dumps(rows_json(rows)))  # what --out writes, gate passes included
    gated = next(r for r in written if r["mode"] == "gated")
    assert gated["gate_passes"]["neutral"]["hits"] == sum(passes["neutral"])
    assert plain.neutral == tuple(tuple(_naive_run(model, p, None)) for p in corpus.openings)


def test_perplexity_ratio_matches_a_plain_torch_hook(measured: tuple) -> None:
    model, fv, rows, plain, _ = measured
    expected = _naive_perplexity(model, fv, PARAGRAPHS) / _naive_perplexity(model, None, PARAGRAPHS)
    ungated = next(r for r in rows if r.mode == "ungated")
    assert ungated.perplexity_ratio == pytest.approx(expected, rel=1e-4)
    assert abs(expected - 1) > 1e-3
    direct = continuation_perplexity(model, char_tokenizer(), PARAGRAPHS, opening_words=4)
    assert plain.perplexity == pytest.approx(direct)
    assert direct == pytest.approx(_naive_perplexity(model, None, PARAGRAPHS))


def test_own_task_and_icl_figures_are_those_of_evaluate(measured: tuple) -> None:
    model, fv, rows, plain, _ = measured
    task = reverse_task()
    for row in rows:
        vectors = [] if row.mode == "plain" else [fv]
        gate = row.mode == "gated"
        zero = fv_plugin.evaluate(model, char_tokenizer(), task, EvalConfig(n=3, n_shots=1, gate=gate), vectors=vectors)
        assert row.zero_shot.hits == sum(bool(r.first_token_correct) for r in zero.rows) and row.zero_shot.n == 3
        assert row.exact_match.hits == sum(r.exact_match for r in zero.rows)
    table = side_effect_table(rows, plain)
    assert table.count("\n") == len(rows) + 1 and "| reverse | gated |" in table


def test_a_vector_without_a_condition_gets_a_note_not_a_gated_row() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    corpus = Corpus(PARAGRAPHS[:1], CHAT[:1], opening_words=4)
    settings = Settings(queries=2, n_shots=1, new_tokens=2, modes=("gated",))
    plain = measure_plain(model, tok, [], corpus, settings)
    rows = measure_vector(model, tok, _vector(), reverse_task(), [], corpus, plain, settings)
    assert [r.mode for r in rows] == ["plain", "gated"] and "no condition" in rows[1].note
    assert rows[1].zero_shot is None
    with pytest.raises(ValueError, match="unknown modes"):
        Settings(modes=("sometimes",))


def test_gate_decisions_are_the_decisions_steer_takes() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    prompts = [*PARAGRAPHS, *CHAT]
    fv = _gated(_vector(), model, prompts)
    decided = fv_plugin.gate_decisions(model, tok, prompts, fv)
    assert 0 < sum(decided) < len(prompts)
    enc = tok(prompts, return_tensors="pt", padding=True)
    last = enc["attention_mask"].shape[1] - 1  # left padding: every row's last token is the last column
    with torch.no_grad():
        plain = model(**enc).logits[:, last]
        with fv_plugin.steer(model, fv, positions="all"):
            steered = model(**enc).logits[:, last]
        with fv_plugin.steer(model, fv, positions="all", gate=True):
            gated = model(**enc).logits[:, last]
    for row, passed in enumerate(decided):
        torch.testing.assert_close(gated[row], (steered if passed else plain)[row], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(steered, plain, atol=1e-3)
    with pytest.raises(ValueError, match="needs a condition"):
        fv_plugin.gate_decisions(model, tok, prompts, _vector())


def test_evaluate_with_the_gate_steers_the_prompts_that_pass_and_leaves_the_others_plain() -> None:
    model, tok, task = tiny_model("llama"), char_tokenizer(), reverse_task()
    unit = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(5)), dim=0)
    fv = _vector(scale=20.0)
    config = EvalConfig(n=4, generate=True, max_new_tokens=4)

    def rows(vectors: list, **changes: object) -> list[tuple[str, str]]:
        result = fv_plugin.evaluate(model, tok, task, dataclasses.replace(config, **changes), vectors=vectors)
        return [(r.top_token, r.continuation) for r in result.rows]

    steered, plain = rows([fv]), rows([])
    assert steered != plain
    for threshold, expected in ((-2.0, steered), (2.0, plain)):  # a unit direction's score lies in [-1, 1]
        gated = dataclasses.replace(fv, condition=Condition(layer=0, direction=unit, threshold=threshold))
        assert rows([gated], gate=True) == expected
    with pytest.raises(ValueError, match="positions must be one of"):
        EvalConfig(positions="everywhere")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gate must be True or False"):
        EvalConfig(gate="yes")  # type: ignore[arg-type]
