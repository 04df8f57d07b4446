"""auto's choice on the answer a user reads and on what else changes: the cheap exact match and side effect against
naive references, the model without a vector as the bar, and what ``fv extract`` does when nothing clears it."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import string
import warnings
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, decoder_layers, tiny_model

import fv_plugin
from fv_plugin import FunctionVector, Pair, Task
from fv_plugin.cli import main
from fv_plugin.prompts import encode_prompts
from fv_plugin.records import Selection
from fv_plugin.scoring import kl_divergence, starts_with_answer
from fv_plugin.selection import neutral_kl, score_answers

SMALL = dict(n_mean=6, n_aie=2, n_shots=3, k=4, ks=(2, 3), strengths=(1.0, 2.0), head_strengths=(1.0, 4.0))


@functools.cache
def echo_task() -> Task:
    """A task the plain tiny model answers right by construction: each answer is the start of its own greedy
    continuation, cut where :func:`starts_with_answer` accepts it (so exact match without a vector is 1.0)."""
    model, tok = tiny_model("llama"), char_tokenizer()
    rng = random.Random(3)
    words = sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(4)) for _ in range(160)})
    prompts = fv_plugin.make_prompts(Task("words", tuple(Pair(w, w) for w in words)), n_shots=0, split="train")
    prompts += fv_plugin.make_prompts(Task("words", tuple(Pair(w, w) for w in words)), n_shots=0, split="test")
    enc = encode_prompts(tok, prompts)
    out = model.generate(
        input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    pairs = []
    for prompt, row in zip(prompts, out[:, enc.input_ids.shape[1] :], strict=True):
        text = tok.decode(row, skip_special_tokens=True)
        answer = text.strip()[:1]
        budget = len(" " + answer) + 1  # the char tokenizer: one token a character
        if answer.strip() and answer.isprintable() and starts_with_answer(text[:budget], [answer]):
            pairs.append(Pair(prompt.query.input, answer))
    assert len(pairs) >= 30, len(pairs)
    return Task("echo", tuple(pairs[:40]))


def _fv(seed: int, layer: int, scale: float) -> FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return FunctionVector(vector=torch.randn(64, generator=gen) * scale, layer=layer)


@pytest.mark.parametrize(
    "positions",
    ["generated", "last_prompt", "all", ("generated", "last_prompt"), ("last_prompt", "all", "generated")],
)
def test_exact_match_of_cached_greedy_answers_equals_steer_and_generate(positions: str | tuple[str, ...]) -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    prompts = fv_plugin.make_prompts(echo_task(), n_shots=0, split="train")[:8]
    gen = torch.Generator().manual_seed(5)
    patch = FunctionVector(
        vector=torch.zeros(64), layer=1, heads=((1, 2), (2, 0)), head_values=torch.randn(2, 16, generator=gen) * 2
    )
    candidates = [[], [_fv(1, 0, 1.0)], [(_fv(2, 2, 2.0), -0.5)], [_fv(3, 1, 0.7), (_fv(4, 0, 1.0), 0.5)], [patch]]
    fast = score_answers(model, tok, prompts, candidates, rows_per_batch=3, positions=positions)
    modes = [positions] if isinstance(positions, str) else list(positions)
    assert len(fast) == len(modes) * len(candidates)  # one score per (positions, candidate), positions-major
    for mode, candidate, got in zip([m for m in modes for _ in candidates], candidates * len(modes), fast, strict=True):
        hits = []
        for prompt in prompts:  # the naive reference: steer + generate, one query at a time, the text rule
            enc = encode_prompts(tok, [prompt])
            budget = max(len(a) for a in enc.answer_tokens[0]) + 1
            with fv_plugin.steer(model, *candidate, positions=mode):
                out = model.generate(
                    input_ids=enc.input_ids, max_new_tokens=budget, do_sample=False, pad_token_id=0, eos_token_id=2
                )
            hits.append(
                starts_with_answer(
                    tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True), prompt.answers
                )
            )
        assert got.exact_match == pytest.approx(sum(hits) / len(hits)), (mode, candidate)
        with fv_plugin.steer(model, *candidate, positions="all" if mode == "all" else "last_prompt"):
            first = fv_plugin.score_prompts(model, tok, prompts, [])  # the next token, steered where the mode does
        assert got.accuracy == pytest.approx(first.accuracy)
        assert got.answer_prob == pytest.approx(first.answer_prob, rel=1e-4, abs=1e-6)
    differ = 2 if modes == ["all"] else 3  # the candidates really differ (at every token, all but one answer 0)
    assert fast[0].exact_match == 1.0 and len({s.exact_match for s in fast}) >= differ
    if len(modes) > 1:  # the two position sets answer differently here, or the fork is not tested
        assert [s.exact_match for s in fast[: len(candidates)]] != [s.exact_match for s in fast[len(candidates) :]]


@pytest.mark.parametrize("positions", ["generated", "last_prompt", "all", ("all", "generated", "last_prompt")])
def test_neutral_kl_equals_a_naive_per_paragraph_computation(positions: str | tuple[str, ...]) -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    texts = ["The river ran slowly past the old mill.", "We bought bread and apples at the market today."]
    candidates = [[], [_fv(1, 0, 1.0)], [(_fv(2, 2, 2.0), 1.5)], [_fv(3, 1, 0.5)]]
    run = dict(texts=texts, prompt_tokens=10, steered_tokens=3, rows_per_batch=3, positions=positions)
    fast = neutral_kl(model, tok, candidates, **run)
    modes = [positions] if isinstance(positions, str) else list(positions)
    assert len(fast) == len(modes) * len(candidates)  # positions-major
    layers = decoder_layers(model)
    for k, (mode, candidate) in enumerate((m, c) for m in modes for c in candidates):
        start, stop = (0 if mode == "all" else 9), (10 if mode == "last_prompt" else 13)  # last prompt token: 9
        total = 0.0
        for text in texts:  # the oracle: our own hook adds the vector at positions 9 to stop of one full forward
            ids = torch.tensor([tok(text)["input_ids"][:13]])
            handles = []
            for item in candidate:
                fv, weight = item if isinstance(item, tuple) else (item, 1.0)

                def add(
                    module: object,
                    args: object,
                    output: object,
                    fv: FunctionVector = fv,
                    w: float = weight,
                    start: int = start,
                    stop: int = stop,
                ) -> object:
                    hidden = output[0] if isinstance(output, tuple) else output
                    hidden = hidden.clone()
                    hidden[:, start:stop] += w * fv.vector.to(hidden.dtype)
                    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

                handles.append(layers[fv.layer].register_forward_hook(add))
            with torch.no_grad():
                steered = model(input_ids=ids).logits[0, 9:].float().softmax(-1)
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                plain = model(input_ids=ids).logits[0, 9:].float().softmax(-1)
            total += float(kl_divergence(steered, plain).mean())
        assert fast[k] == pytest.approx(total / len(texts), rel=1e-4, abs=1e-6), (mode, k)
    assert fast[0] == pytest.approx(0.0, abs=1e-6) and min(fast[1 : len(candidates)]) > 1e-4


def test_when_no_vector_beats_the_model_auto_warns_and_returns_the_least_harmful(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok, task = tiny_model("llama"), char_tokenizer(), echo_task()  # the model alone is right on every query
    with pytest.warns(fv_plugin.WeakVectorWarning, match=r"exact match \d\.\d\d.*without a vector \(exact match 1\.00"):
        fv = fv_plugin.extract_function_vector(model, tok, task, **SMALL)
    sel = fv.selection
    assert sel is not None and sel.baseline_exact_match == 1.0 and not sel.beats_zero_shot
    finalists = [c for c in sel.candidates if c.exact_match is not None]
    assert all(c.side_effect is not None and c.change is not None for c in finalists)
    top = max(c.exact_match or 0.0 for c in finalists)
    least = min(c.side_effect or 0.0 for c in finalists if c.exact_match == top)
    assert sel.best.exact_match == top and sel.best.side_effect == least
    back = Selection.from_dict(sel.to_dict())
    assert back == sel
    old = sel.to_dict()  # a file written before exact match and side effects were scored still loads
    for key in ("baseline_exact_match", "side_effect_budget", "accuracy_tolerance"):
        del old[key]
    old["candidates"] = [
        {k: v for k, v in c.items() if k not in ("exact_match", "side_effect", "change")} for c in old["candidates"]
    ]
    assert Selection.from_dict(old).best.exact_match is None and Selection.from_dict(old).beats_zero_shot is not None

    monkeypatch.setattr(fv_plugin.models, "load_model", lambda *a, **k: (model, tok))
    monkeypatch.setattr(fv_plugin.extraction, "extract_function_vector", lambda *a, **k: fv)  # made above
    task_file = tmp_path / "echo.json"
    task_file.write_text(json.dumps([{"input": p.input, "output": p.output} for p in task.pairs]))
    out = tmp_path / "echo.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error", fv_plugin.WeakVectorWarning)  # the command says it in its own line
        assert main(["extract", "--task", str(task_file), "--out", str(out)]) == 1
    assert not out.exists()
    assert main(["extract", "--task", str(task_file), "--out", str(out), "--keep-weak"]) == 0
    assert fv_plugin.FunctionVector.load(out).selection is not None


def test_plot_choice_marks_the_chosen_candidate() -> None:
    pytest.importorskip("matplotlib")
    from fv_plugin.records import Candidate
    from fv_plugin.viz import plot_choice

    found = (
        Candidate("difference", 1.0, 0.9, 0.3, layer=2, exact_match=0.8, side_effect=2.5, change=3.0),
        Candidate("heads", 2.0, 0.7, 0.2, k=10, exact_match=0.6, side_effect=0.4, change=5.0),
        Candidate("heads", 4.0, 0.5, 0.2, k=10, n_queries=3),
    )
    sel = Selection(found, 1, 0.1, 20, "valid", "rule", baseline_exact_match=0.05, side_effect_budget=1.0)
    fig = plot_choice(sel)
    marked = [c for c in fig.axes[0].collections if c.get_label() == "chosen"]
    assert len(marked) == 1 and marked[0].get_offsets().tolist() == [[0.4, 0.6]]
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections if c.get_label() != "chosen") == 2
    with pytest.raises(ValueError, match="no selection"):
        plot_choice(dataclasses.replace(_fv(1, 0, 1.0), selection=None))
