"""Prompts, mean head activations, the exact fast AIE against a naive reference, head vectors, extraction."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, decoder_layers, generate_cached_and_uncached, tiny_model
from torch import nn

import fv_plugin
from fv_plugin.architectures import resolve_architecture
from fv_plugin.benchmarks.extraction import measure_extraction
from fv_plugin.extraction import extract_function_vector
from fv_plugin.heads import head_vector
from fv_plugin.mediation import average_indirect_effect, mean_head_activations, statistics_prompts
from fv_plugin.prompts import PromptTemplate, encode_prompts, make_prompts
from fv_plugin.scoring import zero_shot_scores

FAST_FAMILIES = ["llama", "gpt2", "gemma3_text", "falcon", "gpt_neox", "olmo2"]


def test_prompts_have_demos_queries_and_answers() -> None:
    task = fv_plugin.load_task("antonym")
    prompts = make_prompts(task, n=5, n_shots=3, split="test", seed=0)
    assert len(prompts) == 5 and all(p.text.endswith(f"Q: {p.query.input}\nA:") for p in prompts)
    for p in prompts:
        assert p.answer == " " + p.query.output and p.text.count("Q: ") == 4
        assert p.query not in p.demos and all(d in task.train for d in p.demos)
    shuffled = make_prompts(task, n=20, n_shots=5, split="test", shuffle_labels=True, seed=0)
    for p in shuffled:
        labels = [line[3:] for line in p.text.split("\n") if line.startswith("A: ")]
        assert sorted(labels) == sorted(d.output for d in p.demos)
    assert any(
        [line[3:] for line in p.text.split("\n") if line.startswith("A: ")] != [d.output for d in p.demos]
        for p in shuffled
    )
    zero = make_prompts(task, n_shots=0, split="valid")
    assert len(zero) == len(task.valid) and zero[0].text == f"Q: {zero[0].query.input}\nA:"
    assert make_prompts(task, n=4, seed=3) == make_prompts(task, n=4, seed=3)
    with pytest.raises(ValueError, match="template"):
        PromptTemplate("{y} then {x}")


def test_encoded_answers_are_the_next_tokens() -> None:
    tok = char_tokenizer()
    prompts = make_prompts(fv_plugin.load_task("capitalize"), n=4, n_shots=2)
    enc = encode_prompts(tok, prompts)
    assert enc.input_ids.shape[0] == 4 and bool(enc.attention_mask[:, -1].all())  # left padded
    for i, p in enumerate(prompts):
        assert "".join(tok.convert_ids_to_tokens(list(enc.answer_tokens[i][0]))) == p.answer
        assert int(enc.answer_ids[i]) == tok(p.answer, add_special_tokens=False)["input_ids"][0]


def _patched_prob(
    model: nn.Module, ids: torch.Tensor, answer: int, layer: int, head: int, value: torch.Tensor
) -> float:
    """Probability of ``answer`` after a full forward with head ``(layer, head)``'s slice of the output
    projection's input at the last token set to ``value`` (a hook of the test's own)."""
    dim = value.numel()

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x[0, -1, head * dim : (head + 1) * dim] = value
        return (x,)

    handle = resolve_architecture(model).out_proj(layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            return float(model(input_ids=ids).logits[0, -1].softmax(-1)[answer])
    finally:
        handle.remove()


def _naive_effects(model: nn.Module, tok: object, prompts: list, means: torch.Tensor) -> torch.Tensor:
    """The paper's way, written here independently: a full forward per (prompt, layer, head)."""
    n_layers, n_heads, _ = means.shape
    out = torch.zeros(len(prompts), n_layers, n_heads)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok(prompt.text)["input_ids"]])  # type: ignore[operator]
        answer = tok(prompt.answer, add_special_tokens=False)["input_ids"][0]  # type: ignore[operator]
        with torch.no_grad():
            base = float(model(input_ids=ids).logits[0, -1].softmax(-1)[answer])
        for layer in range(n_layers):
            for head in range(n_heads):
                out[i, layer, head] = _patched_prob(model, ids, answer, layer, head, means[layer, head]) - base
    return out


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_fast_exact_aie_equals_the_naive_reference(family: str) -> None:
    model, tok = tiny_model(family), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    clean = make_prompts(task, n=6, n_shots=3, split="train")
    shuffled = make_prompts(task, n=2, n_shots=3, split="train", shuffle_labels=True, seed=1)
    means = mean_head_activations(model, tok, clean, batch_size=4)
    fast = average_indirect_effect(model, tok, shuffled, means, heads_per_batch=5)
    naive = _naive_effects(model, tok, shuffled, means)
    assert naive.abs().max() > 1e-5, "patching must change something"
    assert float((fast.effects - naive).abs().max()) <= 1e-4


def test_mean_head_activations_match_a_manual_average() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    prompts = make_prompts(fv_plugin.load_task("antonym"), n=5, n_shots=2)
    means = mean_head_activations(model, tok, prompts, batch_size=2)
    arch = resolve_architecture(model)
    seen: list[torch.Tensor] = []
    handle = arch.out_proj(2).register_forward_pre_hook(lambda m, a: seen.append(a[0][0, -1].clone()))
    try:
        for p in prompts:
            with torch.no_grad():
                model(input_ids=torch.tensor([tok(p.text)["input_ids"]]))
    finally:
        handle.remove()
    torch.testing.assert_close(means[2].flatten(), torch.stack(seen).mean(0), rtol=1e-5, atol=1e-5)


def test_head_vector_counts_the_bias_once_and_goes_through_the_post_norm() -> None:
    model = tiny_model("gpt2")  # c_proj has a bias
    means = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    heads = [(1, 0), (1, 2), (0, 3)]
    got = head_vector(model, means, heads)
    expected = torch.zeros(64)
    for layer, head in heads:
        proj = model.transformer.h[layer].attn.c_proj
        w = proj.weight  # Conv1D: [in, out]
        expected += means[layer, head] @ w[head * 16 : (head + 1) * 16]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    gemma = tiny_model("gemma3_text")
    layer = decoder_layers(gemma)[1]
    full = means[1].reshape(1, 64)
    without = full.clone()
    without[:, 16:32] = 0
    with torch.no_grad():
        want = layer.post_attention_layernorm(layer.self_attn.o_proj(full)) - layer.post_attention_layernorm(
            layer.self_attn.o_proj(without)
        )
    torch.testing.assert_close(head_vector(gemma, means, [(1, 1)]), want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["heads", "difference", "layer_mean"])
def test_extract_function_vector_on_a_tiny_model(method: str) -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = fv_plugin.load_task("capitalize")
    fv = extract_function_vector(model, tok, task, method=method, n_mean=6, n_aie=2, n_shots=3, k=3)
    assert fv.method == method and 0 <= fv.layer < 3 and fv.task == "capitalize" and fv.model_type == "llama"
    assert fv.layer_sweep is not None and fv.layer_sweep.split == "valid+train"  # the validation prompts
    if method == "heads":
        assert fv.k == 3 and fv.heads is not None and len(fv.heads) == 3 and fv.aie is not None
    again = extract_function_vector(model, tok, task, method=method, n_mean=6, n_aie=2, n_shots=3, k=3)
    assert torch.equal(fv.vector, again.vector) and fv.layer == again.layer  # seeded
    fixed = extract_function_vector(model, tok, task, method=method, n_mean=6, n_aie=2, n_shots=3, k=3, layer=1)
    assert fixed.layer == 1 and "layer_sweep" not in fixed.extra
    acc, prob = zero_shot_scores(model, tok, make_prompts(task, n_shots=0), [fixed])
    assert 0.0 <= acc <= 1.0 and 0.0 <= prob <= 1.0


def test_extraction_errors() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    with pytest.raises(ValueError, match="method"):
        extract_function_vector(model, tok, task, method="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        extract_function_vector(model, tok, task, layer=7)


@pytest.mark.slow
def test_fast_aie_equals_naive_on_the_embedded_model() -> None:
    model, tok = fv_plugin.load_model("smollm2-135m-instruct")
    task = fv_plugin.load_task("antonym")
    clean = make_prompts(task, n=8, n_shots=10, split="train")
    shuffled = make_prompts(task, n=1, n_shots=10, split="train", shuffle_labels=True, seed=1)
    means = mean_head_activations(model, tok, clean, batch_size=8)
    fast = average_indirect_effect(model, tok, shuffled, means, heads_per_batch=64)
    # Naive reference on a few heads (a full forward each), chosen across depth.
    ids = torch.tensor([tok(shuffled[0].text)["input_ids"]])
    answer = tok(shuffled[0].answer, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        base = float(model(input_ids=ids).logits[0, -1].softmax(-1)[answer])
    for layer, head in [(0, 0), (9, 4), (17, 8), (29, 2), tuple(fast.top_heads(1)[0])]:
        prob = _patched_prob(model, ids, answer, layer, head, means[layer, head])
        assert abs(prob - base - float(fast.effects[0, layer, head])) <= 1e-4


def test_cli_extract_and_bench_extract_on_a_tiny_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    out = tmp_path / "fv.safetensors"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fv_plugin.cli",
            "extract",
            "--model",
            str(folder),
            "--task",
            "capitalize",
            "--out",
            str(out),
            "--k",
            "3",
            "--method",
            "heads",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    fv = fv_plugin.FunctionVector.load(out)
    assert fv.task == "capitalize" and fv.k == 3 and "accuracy" in run.stdout
    model, tok = fv_plugin.load_model(str(folder))
    small = fv_plugin.ExtractionConfig(n_mean=6, n_aie=2, n_shots=3, ks=(2, 3), strengths=(1.0,), head_strengths=(1.0,))
    timing = measure_extraction(model, tok, "capitalize", config=small, naive_prompts=1)
    assert timing.aie is not None and timing.aie.max_abs_diff <= 1e-4 and "speed-up" in timing.report()
    assert timing.ratio("heads") > 0 and timing.ratio("auto") > 0
    heads = next(m for m in timing.methods if m.method == "heads")
    names = [s.name for s in heads.stages]
    assert names[:2] == ["ICL prompts", "indirect effects"] and names[2].startswith("layer sweep"), names
    assert names[3:] == ["condition"], names  # learned by default, recorded as its own stage
    # the plain forwards' tokens: every token of the 8 ICL prompts through every layer
    tokens = sum(
        int(fv_plugin.encode_prompts(tok, [p]).input_ids.shape[1])
        for group in statistics_prompts(fv_plugin.load_task("capitalize"), small)
        for p in group
    )
    assert timing.plain.tokens >= tokens and timing.plain.logit_rows > 0


@pytest.mark.slow
def test_extract_example_runs() -> None:
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, str(root / "examples" / "extract_and_steer.py")], capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "zero-shot first-token accuracy" in run.stdout


def _head_fv(model: nn.Module, heads: list[tuple[int, int]], seed: int = 0) -> fv_plugin.FunctionVector:
    values = torch.randn(len(heads), 16, generator=torch.Generator().manual_seed(seed)) * 3
    return fv_plugin.FunctionVector(
        vector=torch.zeros(64),
        layer=min(h[0] for h in heads),
        heads=tuple(heads),
        head_values=values,
        method="head_patch",
    )


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_head_patch_vectors_write_the_heads_own_slots(strength: float) -> None:
    model = tiny_model("llama", dtype=torch.float64)
    heads = [(0, 1), (2, 3)]
    fv = _head_fv(model, heads).to(dtype=torch.float64)
    ids = torch.tensor([[5, 9, 14, 3, 22], [11, 12, 13, 60, 61]])
    arch = resolve_architecture(model)
    handles = []
    for (layer, head), value in zip(heads, fv.head_values, strict=True):  # type: ignore[arg-type]

        def hook(module: nn.Module, args: tuple, head: int = head, value: torch.Tensor = value) -> tuple:
            x = args[0].clone()
            slot = x[:, -1, head * 16 : (head + 1) * 16]
            x[:, -1, head * 16 : (head + 1) * 16] = slot + strength * (value - slot)
            return (x,)

        handles.append(arch.out_proj(layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            reference = model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), fv_plugin.steer(model, fv, strength=strength, positions="last_prompt"):
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, reference)
    plain = model(input_ids=ids).logits
    assert not torch.allclose(ours[:, -1], plain[:, -1]) and torch.equal(ours[:, :-1], plain[:, :-1])
    cached, uncached = generate_cached_and_uncached(model, (fv,), ids, torch.ones_like(ids), new=4, strength=strength)
    assert torch.equal(cached, uncached)


def test_head_patch_vectors_round_trip_and_refuse_what_does_not_apply(tmp_path: Path) -> None:
    model = tiny_model("llama")
    fv = _head_fv(model, [(1, 2), (0, 0)])
    back = fv_plugin.FunctionVector.load(fv.save(tmp_path / "h.safetensors"))
    assert back.is_head_patch and torch.equal(back.head_values, fv.head_values) and back.heads == fv.heads
    for op in (lambda: fv + fv, lambda: -fv, lambda: 2.0 * fv):
        with pytest.raises(TypeError, match="head_patch"):
            op()
    with pytest.raises(ValueError, match="relative"), fv_plugin.steer(model, fv, normalize="relative"):
        pass
    bad = fv_plugin.FunctionVector(vector=torch.zeros(64), layer=0, heads=((0, 9),), head_values=torch.ones(1, 16))
    with pytest.raises(ValueError, match="does not exist"), fv_plugin.steer(model, bad):
        pass
    with pytest.raises(ValueError, match="heads"):
        fv_plugin.FunctionVector(vector=torch.zeros(64), layer=0, head_values=torch.ones(1, 16))


def test_extract_head_patch_form() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    fv = extract_function_vector(
        model, tok, fv_plugin.load_task("capitalize"), method="head_patch", n_mean=6, n_aie=2, n_shots=3, k=4
    )
    assert fv.is_head_patch and fv.heads is not None and len(fv.heads) == 4
    assert fv.head_values is not None and fv.head_values.shape == (4, 16) and fv.layer == min(h[0] for h in fv.heads)
    torch.testing.assert_close(
        fv.vector,
        head_vector(
            model,
            mean_head_activations(
                model,
                tok,
                make_prompts(fv_plugin.load_task("capitalize"), n=6, n_shots=3, split="train"),
                batch_size=16,
            ),
            list(fv.heads),
        ),
    )


def test_quality_bench_reports_every_form_on_both_protocols(tmp_path: Path) -> None:
    from fv_plugin.benchmarks.quality import COLUMNS, load_rows, measure_quality, quality_table
    from fv_plugin.scoring import wilson_interval

    model, tok = tiny_model("llama"), char_tokenizer()
    base = fv_plugin.ExtractionConfig(n_mean=4, n_aie=2, n_shots=3, k=3, ks=(2,), strengths=(1.0,))
    with warnings.catch_warnings():  # a random model: auto may warn that no vector beats it, or find one that does
        warnings.simplefilter("ignore", fv_plugin.WeakVectorWarning)
        row = measure_quality(model, tok, "first-letter", base=base)
    assert set(COLUMNS) == set(row.scores)
    task = fv_plugin.load_task("first-letter")
    icl = fv_plugin.evaluate(model, tok, task, mode="icl", n_shots=3, generate=False)
    assert row.scores["ICL"].accuracy == pytest.approx(icl.accuracy) and row.scores["ICL"].n == icl.n
    kept = row.scores["ICL"].icl_correct_n
    assert kept == sum(bool(r.first_token_correct) for r in icl.rows)
    if kept:  # ICL on the queries ICL gets right is right by definition
        assert row.scores["ICL"].icl_correct == 1.0
    table = quality_table([row])
    assert table.count("\n") == 5 and "first-letter" in table and "% of ICL" in table
    saved = tmp_path / "quality.json"  # what --out writes, and --render reads back
    saved.write_text(json.dumps({"model": "tiny", "rows": [dataclasses.asdict(row)]}), encoding="utf-8")
    assert load_rows(saved) == [row]
    with pytest.raises(ValueError, match="not a file written by fv bench quality"):
        load_rows(tmp_path)
    paper = quality_table([row], protocol="icl_correct")
    assert "first-letter" in paper
    icl_cell = paper.splitlines()[2].split(" | ")[3]  # task, n, zero-shot, ICL
    if kept:  # 1.00 with the Wilson interval of kept out of kept
        low, high = wilson_interval(kept, kept)
        assert icl_cell == f"1.00 ({low:.2f}–{high:.2f})"
    else:
        assert icl_cell == "–"


def test_attribution_patching_is_the_first_order_term_of_the_exact_effect() -> None:
    from fv_plugin.attribution import attribution_patching, rank_agreement

    model, tok = tiny_model("llama", dtype=torch.float64), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    means = mean_head_activations(model, tok, make_prompts(task, n=6, n_shots=3, split="train"))
    prompt = make_prompts(task, n=1, n_shots=3, split="train", shuffle_labels=True, seed=1)[0]
    approx = attribution_patching(model, tok, [prompt], means)
    ids = torch.tensor([tok(prompt.text)["input_ids"]])
    answer = tok(prompt.answer, add_special_tokens=False)["input_ids"][0]
    arch = resolve_architecture(model)
    acts: dict[int, torch.Tensor] = {}
    handles = [
        arch.out_proj(i).register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__(i, a[0][0, -1].clone()))
        for i in range(3)
    ]
    try:
        with torch.no_grad():
            base = float(model(input_ids=ids).logits[0, -1].softmax(-1)[answer])
    finally:
        for handle in handles:
            handle.remove()
    eps = 1e-3  # small enough for the first-order term, large enough for the forward's rounding
    for layer, head in [(0, 1), (1, 3), (2, 0)]:
        slot = acts[layer][head * 16 : (head + 1) * 16]
        nudged = slot + eps * (means[layer, head] - slot)
        finite_difference = (_patched_prob(model, ids, answer, layer, head, nudged) - base) / eps
        assert abs(finite_difference - float(approx.effects[0, layer, head])) <= 1e-6 + 1e-2 * abs(finite_difference)
    spearman, overlap = rank_agreement(approx.aie, approx.aie, k=3)
    assert spearman == pytest.approx(1.0) and overlap == 1.0
    assert rank_agreement(approx.aie, -approx.aie, k=3)[0] == pytest.approx(-1.0)


def test_head_difference_adds_each_heads_icl_minus_zero_shot_mean_in_its_slot() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    task = fv_plugin.load_task("capitalize")
    config = fv_plugin.ExtractionConfig(method="head_difference", n_mean=6, n_aie=2, n_shots=3, k=3)
    fv = extract_function_vector(model, tok, task, config)
    assert fv.is_head_patch and fv.head_mode == "add" and fv.heads is not None and len(fv.heads) == 3
    icl = mean_head_activations(model, tok, make_prompts(task, n=6, n_shots=3, split="train"))
    zero = mean_head_activations(model, tok, make_prompts(task, n=6, n_shots=0, split="train"))
    assert fv.head_values is not None
    torch.testing.assert_close(fv.head_values, torch.stack([icl[h] - zero[h] for h in fv.heads]))
    arch = resolve_architecture(model)
    ids = torch.tensor([[5, 9, 14, 3, 22], [11, 12, 13, 60, 61]])
    handles = []
    for (layer, head), value in zip(fv.heads, fv.head_values, strict=True):

        def hook(module: nn.Module, args: tuple, head: int = head, value: torch.Tensor = value) -> tuple:
            x = args[0].clone()
            x[:, -1, head * 16 : (head + 1) * 16] += 2.0 * value
            return (x,)

        handles.append(arch.out_proj(layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            reference = model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), fv_plugin.steer(model, fv, strength=2.0, positions="last_prompt"):
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, reference)
    with torch.no_grad(), fv_plugin.steer(model, 2.0 * fv, positions="last_prompt"):  # additive: scales like one
        torch.testing.assert_close(model(input_ids=ids).logits, reference)
    with pytest.raises(TypeError, match="arithmetic"):
        fv + fv


def test_quality_table_of_a_task_the_model_cannot_do_even_with_demonstrations() -> None:
    from fv_plugin.benchmarks.quality import COLUMNS, QualityRow, Score, quality_table

    zero = Score(0.0, (0.0, 0.15), 22, float("nan"), 0)  # ICL gets no query right: no paper-protocol queries
    row = QualityRow("synonym", {c: zero for c in COLUMNS}, {}, 1.0)
    table = quality_table([row])
    share = table.splitlines()[4]  # header, rule, task, mean, % of ICL
    assert share.startswith("| **% of ICL** |") and "%" not in share.removeprefix("| **% of ICL** |")
    assert "| synonym | 0 | – | – |" in quality_table([row], protocol="icl_correct")


def test_quality_table_of_some_forms_and_of_exact_match() -> None:
    from fv_plugin.benchmarks.quality import QualityRow, Score, quality_table

    icl = Score(0.8, (0.5, 0.9), 10, 1.0, 8, exact_match=0.6, icl_correct_exact_match=0.75)
    auto = Score(0.4, (0.2, 0.6), 10, 0.5, 8, exact_match=0.3, icl_correct_exact_match=0.25)
    row = QualityRow("antonym", {"zero-shot": auto, "ICL": icl, "auto": auto}, {"auto": "x"}, 1.0)
    first = quality_table([row])
    assert first.splitlines()[0] == "| task | n | zero-shot | ICL | auto |" and "layer_mean" not in first
    assert first.splitlines()[4] == "| **% of ICL** | |  |  | 50% |"  # 0.4 / 0.8
    exact = quality_table([row], metric="exact_match")
    assert "| antonym | 10 | 0.30 | 0.60 | 0.30 |" in exact and exact.splitlines()[4].endswith("| 50% |")
    paper = quality_table([row], protocol="icl_correct", metric="exact_match")
    assert "| antonym | 8 | 0.25 | 0.75 | 0.25 |" in paper and paper.splitlines()[4].endswith("| 33% |")
