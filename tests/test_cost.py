"""What an extraction costs: progress per stage, a cost that does not grow with the task file, the two-round
choice of ``auto``, and the projected work of ``fv bench extract --estimate`` against the work a model runs."""

from __future__ import annotations

import functools
import random
import string
import warnings
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import fv_plugin
from fv_plugin import Pair, Task
from fv_plugin.benchmarks.cost import estimate, model_shape
from fv_plugin.benchmarks.extraction import measure_extraction
from fv_plugin.cli import main
from fv_plugin.progress import progress_enabled, recording, stage
from fv_plugin.prompt_sets import statistics_prompts, validation_prompts

SMALL = dict(n_mean=6, n_aie=2, n_shots=3, k=4, ks=(2, 3), strengths=(1.0, 2.0), head_strengths=(1.0, 4.0))


def _reverse_task(n: int) -> Task:
    rng, seen = random.Random(n), set()
    while len(seen) < n:
        seen.add("".join(rng.choice(string.ascii_lowercase) for _ in range(4)))
    return Task(f"reverse{n}", tuple(Pair(w, w[::-1]) for w in sorted(seen)))


def _layer_work(model: torch.nn.Module, run: object) -> tuple[int, int]:
    """(decoder-layer calls, token-layers) while ``run()`` runs, counted by our own pre-hooks: the oracle."""
    seen = [0, 0]

    def hook(module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        seen[0] += 1
        seen[1] += int(hidden.shape[0]) * int(hidden.shape[1])  # type: ignore[attr-defined]

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        run()  # type: ignore[operator]
    finally:
        for handle in handles:
            handle.remove()
    return seen[0], seen[1]


def test_progress_is_on_unless_turned_off_and_stages_are_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FV_PROGRESS", raising=False)
    assert progress_enabled() and not progress_enabled(False)
    monkeypatch.setenv("FV_PROGRESS", "0")
    assert not progress_enabled() and progress_enabled(True)
    ticks = iter(range(100))
    with recording(lambda: (float(next(ticks)), 0)) as log:
        with stage("first", 3) as bar:
            bar.update(3)
        with pytest.raises(RuntimeError), stage("second"):
            raise RuntimeError("a failing stage is recorded too")
    assert [s.name for s in log.stages] == ["first", "second"] and [s.tokens for s in log.stages] == [1.0, 1.0]
    model, tok = tiny_model("llama"), char_tokenizer()
    with recording() as log, warnings.catch_warnings():
        warnings.simplefilter("ignore", fv_plugin.WeakVectorWarning)
        fv_plugin.extract_function_vector(model, tok, _reverse_task(60), **SMALL)
    names = [s.name.split(" (")[0] for s in log.stages]
    assert names == [
        "ICL prompts",
        "zero-shot prompts",
        "indirect effects",
        "candidates",
        "finalists",  # at both position sets: steered at every generated token, and at the last prompt token only
        "side effects",
        "condition",  # learned by default: a recorded stage like the others
    ], names


def test_a_large_task_file_costs_what_a_small_one_does() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    costs = {}
    fixed = fv_plugin.FunctionVector(vector=torch.ones(64), layer=2, model_type="llama")
    for n in (400, 5000):  # the condition's prompts are capped too: both tasks have more than its 64 valid queries
        task = _reverse_task(n)
        for method in ("auto", "heads"):
            with warnings.catch_warnings():  # a random model: its vector may or may not beat it
                warnings.simplefilter("ignore", fv_plugin.WeakVectorWarning)
                # the condition (run or not, by the layer chosen) is counted on its own below, for a fixed vector
                run = functools.partial(
                    fv_plugin.extract_function_vector, model, tok, task, method=method, condition=False, **SMALL
                )
                costs[n, method] = _layer_work(model, run)
        costs[n, "condition"] = _layer_work(
            model, functools.partial(fv_plugin.learn_condition, model, tok, task, fixed)
        )
        assert len(validation_prompts(task, fv_plugin.ExtractionConfig())) == 64  # capped, a seeded sample
    for method in ("auto", "heads", "condition"):
        (calls_small, tokens_small), (calls_big, tokens_big) = costs[400, method], costs[5000, method]
        # the same passes, but for auto's greedy answers, which stop when their verdict is settled (their words):
        # a batch of answers runs until its slowest is settled, so its forwards vary more than its work
        assert calls_big == calls_small if method != "auto" else 0.75 < calls_big / calls_small < 1.33
        assert 0.9 < tokens_big / tokens_small < 1.1


def test_auto_scores_every_candidate_on_a_few_queries_and_the_finalists_on_all() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = _reverse_task(60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fv_plugin.WeakVectorWarning)
        fv = fv_plugin.extract_function_vector(model, tok, task, screen_queries=5, finalists=3, **SMALL)
    sel = fv.selection
    assert sel is not None
    full = [c for c in sel.candidates if c.n_queries == sel.n_queries and c.positions == "generated"]
    assert {c.n_queries for c in sel.candidates} == {5, sel.n_queries} and 3 <= len(full) <= 3 + 2 * 4
    assert sel.best.n_queries == sel.n_queries and {c.method for c in full} == {c.method for c in sel.candidates}
    # the oracle: the chosen vector, steered plainly on every validation query, scores what was recorded
    again = fv_plugin.score_prompts(model, tok, validation_prompts(task, fv.config), [fv])  # type: ignore[arg-type]
    assert again.accuracy == pytest.approx(sel.best.accuracy) and again.answer_prob == pytest.approx(
        sel.best.answer_prob, rel=1e-4
    )
    # a finalist is at least as good on the first queries as every candidate dropped there
    order = sorted(sel.candidates, key=lambda c: c.n_queries or 0)
    assert order[0].n_queries == 5


def test_the_estimate_counts_the_passes_a_model_runs(tmp_path: Path) -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    config = fv_plugin.ExtractionConfig(method="heads", **SMALL)  # type: ignore[arg-type]
    task = fv_plugin.load_task("capitalize")
    timing = measure_extraction(model, tok, "capitalize", methods=("heads",), config=config, aie_check=False)
    measured = {s.name.split(" (")[0]: s for s in timing.methods[0].stages}
    _, shuffled = statistics_prompts(task, config)
    queries = validation_prompts(task, config)

    def length(prompts: list[fv_plugin.Prompt], batch: int) -> float:  # mean tokens per prompt as batched, padded
        lengths = sorted(len(tok(p.text)["input_ids"]) for p in prompts)
        batches = [lengths[i : i + batch] for i in range(0, len(lengths), batch)]
        return sum(len(b) * b[-1] for b in batches) / len(lengths)

    shape = model_shape(model.config)
    assert (shape.layers, shape.heads, shape.hidden, shape.vocab) == (3, 4, 64, 128)
    projected = {
        s.name: s
        for s in estimate(
            shape, config, queries=len(queries), icl_tokens=length(shuffled, 16), zero_tokens=length(queries, 64)
        )
    }
    for name in ("indirect effects", "layer sweep"):
        assert measured[name].logit_rows == projected[name].logit_rows, name
        assert measured[name].tokens == pytest.approx(projected[name].tokens, rel=1e-6), name
    assert measured["ICL prompts"].logit_rows == projected["ICL prompts"].logit_rows
    assert measured["condition"].logit_rows == 0  # its forwards stop below the vector: the unembedding never runs
    folder = tmp_path / "tiny"
    model.config.save_pretrained(folder)  # a config alone: no weights needed
    assert main(["bench", "extract", "--estimate", str(folder), "--flops", "1e12", "-v"]) == 0


def test_scaling_rows_report_counted_work_next_to_the_projection(tmp_path: Path) -> None:
    import dataclasses
    import json

    from fv_plugin.benchmarks.cost import StageWork
    from fv_plugin.benchmarks.scaling import ScalingRow, load_rows, scaling_table, stage_table
    from fv_plugin.progress import StageRecord

    measured = (
        StageRecord("ICL prompts", 2.0, 100.0, 4, 1.5),
        StageRecord("layer sweep (3 x 4 queries)", 1.0, 30, 9, 0.5),
    )
    projected = (StageWork("ICL prompts", 90.0, 4), StageWork("layer sweep", 36.0, 12))
    row = ScalingRow(
        "random 2x2, hidden 8", 2, 2, 8, StageRecord("plain forwards", 1.0, 50.0, 50, 0.8),
        {"auto": measured, "heads": measured}, {"auto": projected, "heads": projected},
        {"auto": 300.0, "heads": 150.0, "plain": 100.0}, {"auto": "x", "heads": "y"},
    )  # fmt: skip
    assert row.cpu("heads") == 2.0 and row.tokens("heads") == 130.0 and row.projected_tokens("heads") == 126.0
    assert row.projected_cpu("auto") == pytest.approx(0.8 * 3.0)  # plain CPU seconds x FLOPs ratio
    assert "| random 2x2, hidden 8 | 4 | 0.8 | 2.0 (2.4) | 130 (126) | 2.0 (1.2) | 130 (126) |" in scaling_table([row])
    assert "| layer sweep (3 x 4 queries) | 0.5 | 30 | 36 | 9 | 12 |" in stage_table(row, "heads")
    saved = tmp_path / "scaling.json"
    saved.write_text(json.dumps([dataclasses.asdict(row)]), encoding="utf-8")
    assert load_rows(saved) == [row]
