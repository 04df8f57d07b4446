"""Plots (checked by the data they draw), cross-model maps, report folders and the ``fv eval``/``fv compare`` CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from test_evaluation import reverse_task
from transformers import PreTrainedTokenizerFast

import fv_plugin
from fv_plugin import viz
from fv_plugin.analysis import TokenScore, aie_matrix, head_locations
from fv_plugin.compare import aligned_hidden_states, compare_models, fit_linear_map, neutral_texts, solve_ridge
from fv_plugin.evaluation import evaluate
from fv_plugin.experiments import ExperimentConfig, evaluate_tasks
from fv_plugin.extraction import extract_function_vector
from fv_plugin.records import Sweep
from fv_plugin.report import write_comparison_report, write_eval_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def heads_fv() -> fv_plugin.FunctionVector:
    model = tiny_model("llama")
    return extract_function_vector(
        model, char_tokenizer(), reverse_task(), method="heads", k=3, n_mean=4, n_aie=3, n_shots=2
    )


def test_aie_heatmap_draws_the_matrix_and_boxes_the_chosen_heads(heads_fv: fv_plugin.FunctionVector) -> None:
    fig = viz.plot_aie(heads_fv)
    ax = fig.axes[0]
    assert torch.allclose(torch.tensor(ax.images[0].get_array().data), aie_matrix(heads_fv))  # type: ignore[arg-type]
    boxed = sorted((int(p.get_y() + 0.5), int(p.get_x() + 0.5)) for p in ax.patches)
    assert boxed == sorted(heads_fv.heads or ())
    with pytest.raises(ValueError, match="no AIE matrix"):
        viz.plot_aie(fv_plugin.FunctionVector(vector=torch.ones(4), layer=0))


def test_curves_plot_the_sweep_values(heads_fv: fv_plugin.FunctionVector, tmp_path: Path) -> None:
    sweep = Sweep("t", "strength", (0.0, 1.0, 2.0), (0.1, 0.5, 0.7), (0.2, 0.3, 0.4), (0.0, 1.0, 2.0), 0.1)
    ax = viz.plot_sweep(sweep).axes[0]
    assert list(ax.lines[0].get_xdata()) == [0.0, 1.0, 2.0] and list(ax.lines[0].get_ydata()) == [0.1, 0.5, 0.7]
    assert list(ax.lines[1].get_ydata()) == [0.2, 0.3, 0.4] and ax.get_xlabel() == "strength"
    layer_ax = viz.plot_layer_curve(heads_fv).axes[0]  # the validation sweep stored with the vector
    stored = fv_plugin.analysis.layer_sweep(heads_fv)
    assert stored is not None and list(layer_ax.lines[0].get_ydata()) == list(stored.accuracy)
    fig = viz.plot_top_tokens([TokenScore("a", 1, 3.0, 0.5), TokenScore("b", 2, 1.0, 0.1)])
    assert [b.get_width() for b in fig.axes[0].patches] == [3.0, 1.0]
    fig.savefig(tmp_path / "tokens.png")
    assert (tmp_path / "tokens.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="plot_sweep"):
        viz.plot_layer_curve(sweep)


def test_similarity_and_depth_plots_draw_their_data(heads_fv: fv_plugin.FunctionVector) -> None:
    fvs = [fv_plugin.FunctionVector(vector=torch.randn(8), layer=0, task=f"t{i}") for i in range(3)]
    ax = viz.plot_similarity(fvs).axes[0]
    assert torch.allclose(torch.tensor(ax.images[0].get_array().data).float(), fv_plugin.similarity_matrix(fvs))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["t0", "t1", "t2"]
    assert len(ax.texts) == 9
    depths = viz.plot_head_depths({"m": head_locations(heads_fv)}).axes[0]
    xs = [float(x) for x, _ in depths.collections[0].get_offsets()]
    assert xs == pytest.approx([h.depth for h in head_locations(heads_fv)])
    bars = viz.plot_transfer(["a", "b"], {"own": [0.5, 0.25], "mapped": [0.75, 0.0]}).axes[0]
    assert [p.get_height() for p in bars.patches] == [0.5, 0.25, 0.75, 0.0]
    with pytest.raises(ValueError, match="labels"):
        viz.plot_similarity(torch.eye(2), ["only one"])


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer (words and punctuation runs; unknown words share one id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "the": 2, "a": 3, ".": 4, ",": 5}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_alignment_pairs_states_where_both_tokenizers_end_a_token() -> None:
    a, b = tiny_model("llama"), tiny_model("gpt2")
    texts = ["The cat sat, then it ran.", "A dog!"]
    (src, xs), (src_b, ys) = aligned_hidden_states([(a, char_tokenizer(), 1), (b, word_tokenizer(), 0)], texts)
    words = [m.end() for t in texts for m in re.finditer(r"\w+|[^\w\s]+", t)]
    assert xs.shape[0] == ys.shape[0] == len(words) and torch.equal(src, src_b)
    with torch.no_grad():
        first = a(input_ids=torch.tensor([char_tokenizer()(texts[0])["input_ids"]]), output_hidden_states=True)
    ends = [m.end() for m in re.finditer(r"\w+|[^\w\s]+", texts[0])]
    assert torch.allclose(xs[: len(ends)], first.hidden_states[2][0, [e - 1 for e in ends]], atol=1e-6)


def test_least_squares_map_recovers_a_known_map() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen)
    w, bias = torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen)
    weight, b = solve_ridge(x, x @ w + bias, ridge=0.0)
    assert torch.allclose(weight, w, atol=1e-4) and torch.allclose(b, bias, atol=1e-4)
    model = tiny_model("llama")
    identity = fit_linear_map(model, char_tokenizer(), 1, model, char_tokenizer(), 1, ridge=0.0)
    assert identity.r2 == pytest.approx(1.0, abs=1e-4) and identity.n_fit > 64 and identity.n_heldout > 0
    fv = fv_plugin.FunctionVector(vector=torch.randn(64, generator=gen), layer=1, task="t")
    mapped = identity.apply(fv, target=model)
    assert torch.allclose(mapped.vector, fv.vector, atol=1e-3) and mapped.layer == 1 and mapped.method == "mapped"
    with pytest.raises(ValueError, match="layer 1"):
        identity.apply(fv_plugin.FunctionVector(vector=torch.randn(64), layer=0))
    assert len(neutral_texts()) >= 30


def test_compare_models_and_its_report(tmp_path: Path) -> None:
    a, b = tiny_model("llama"), tiny_model("qwen2", seed=1)
    tok, task = char_tokenizer(), reverse_task()
    fa = extract_function_vector(a, tok, task, method="difference", layer=1, n_mean=4, n_shots=2)
    fb = extract_function_vector(b, tok, task, method="difference", layer=0, n_mean=4, n_shots=2)
    ha = extract_function_vector(a, tok, task, method="heads", layer=1, k=2, n_mean=4, n_aie=2, n_shots=2)
    result = compare_models(
        a, tok, b, tok, [task], {"reverse": fa}, {"reverse": fb}, head_vectors_a={"reverse": ha}, names=("A", "B")
    )
    row = result.rows[0]
    assert (row.layer_a, row.layer_b) == (1, 0) and row.heads_a and not row.heads_b
    assert row.accuracy["own"] == evaluate(b, tok, task, vectors=[fb], generate=False).accuracy
    assert row.accuracy_a["zero-shot"] == evaluate(a, tok, task, generate=False).accuracy
    summary = write_comparison_report(result, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["rows"][0]["cosine"] == pytest.approx(row.cosine)
    for path in data["plots"].values():
        assert (tmp_path / path).read_bytes()[:8] == PNG
    text = summary.read_text()
    assert "| reverse | 1 → 0 |" in text and "head_depths.png" in text
    with pytest.raises(ValueError, match="vectors_b has no vector"):
        compare_models(a, tok, b, tok, [task], {"reverse": fa}, {})


def test_eval_report_folder_holds_every_number_and_plot(tmp_path: Path) -> None:
    model, tok, task = tiny_model("llama"), char_tokenizer(), reverse_task()
    other = fv_plugin.Task("shout", tuple(fv_plugin.Pair(p.input, p.input.upper()) for p in task.pairs))
    config = ExperimentConfig(
        extraction=fv_plugin.ExtractionConfig(method="difference", n_mean=4, n_aie=2, n_shots=2),
        modes=("zero_shot", "natural"),
        strengths=(0.0, 1.0),
        ks=(1, 2),
        n=3,
        n_natural=1,
    )
    report = evaluate_tasks(model, tok, [task, other], config, model_name="tiny")
    summary = write_eval_report(report, tmp_path)
    text = summary.read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    got = data["tasks"][0]
    base, steered = report.tasks[0].results["zero_shot"]
    assert got["results"]["zero_shot"]["steered"]["accuracy"] == steered.accuracy
    assert got["results"]["zero_shot"]["unsteered"]["rows"][0]["prompt"] == base.rows[0].prompt
    assert got["results"]["zero_shot"]["steered"]["accuracy_ci"] == list(steered.accuracy_ci)
    assert got["strength_sweep"]["values"] == [0.0, 1.0] and got["k_sweep"]["values"] == [1.0, 2.0]
    assert len(got["aie"]) == model.config.num_hidden_layers and got["head_locations"]
    paper = report.tasks[0].results_for("icl_correct")["zero_shot"][1]
    assert got["results_icl_correct"]["zero_shot"]["steered"]["n"] == paper.n == len(got["icl_correct_queries"])
    assert got["text_effects"]["strengths"] == [1.0] and got["text_effects"]["perplexity"][0] > 0
    assert set(data["plots"]["reverse"]) == {"aie", "layers", "strength", "k", "tokens", "text"}
    assert set(data["plots"]["report"]) == {"similarity", "specificity_zero_shot", "specificity_icl"}
    assert data["specificity"]["tasks"] == ["reverse", "shout"] and len(data["specificity"]["steered"]["icl"]) == 2
    for path in [*data["plots"]["reverse"].values(), *data["plots"]["report"].values()]:
        assert (tmp_path / path).read_bytes()[:8] == PNG and f"]({path})" in text
    assert "| reverse | difference (" in text and "## The paper's protocol" in text
    assert "## Side effects on neutral text" in text and "## Specificity" in text


def test_cli_eval_and_compare_write_reports(tmp_path: Path) -> None:
    from fv_plugin.cli import main

    model, tok = tiny_model("llama"), char_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [{"input": w, "output": w[::-1]} for w in ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st"]]
    (tmp_path / "rev.json").write_text(json.dumps(rows))
    common = ["--tasks", str(tmp_path / "rev.json"), "--n", "2", "--n-shots", "2"]
    args = ["eval", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e"), "--modes", "zero_shot"]
    args += ["--method", "difference"]
    assert main([*args, *common, "--strengths", "1", "--ks", "1", "--n-mean", "3", "--n-aie", "2"]) == 0
    assert (tmp_path / "e" / "summary.md").exists() and (tmp_path / "e" / "vectors" / "rev.safetensors").exists()
    vectors = str(tmp_path / "e" / "vectors")
    args = ["compare", "--model-a", str(tmp_path / "m"), "--model-b", str(tmp_path / "m"), "--no-heads"]
    assert main([*args, "--vectors-a", vectors, "--vectors-b", vectors, "--out", str(tmp_path / "c"), *common]) == 0
    data = json.loads((tmp_path / "c" / "report.json").read_text())
    assert data["rows"][0]["cosine"] == pytest.approx(1.0, abs=1e-3)  # a model mapped onto itself
