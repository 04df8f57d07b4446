"""Evaluation, sweeps and analysis data, each against a naive reference of the test's own."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import char_tokenizer, reference_steering, tiny_model
from torch import nn

import fv_plugin
from fv_plugin.analysis import aie_matrix, head_locations, layer_sweep, similarity_matrix, top_tokens
from fv_plugin.evaluation import contains_answer, evaluate, starts_with_answer, sweep_k, sweep_layers, sweep_strength
from fv_plugin.extraction import extract_function_vector, layer_vectors
from fv_plugin.heads import head_vector
from fv_plugin.mediation import average_indirect_effect, mean_head_activations
from fv_plugin.prompts import make_prompts
from fv_plugin.tasks import Pair, Task

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx", "yz", "ba", "dc", "fe", "hg", "ji"]


def reverse_task() -> Task:
    return Task("reverse", tuple(Pair(w, w[::-1]) for w in WORDS))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_model("llama", dtype=torch.float64)


def _vector(model: nn.Module, layer: int = 1, seed: int = 0) -> fv_plugin.FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return fv_plugin.FunctionVector(vector=3 * torch.randn(model.config.hidden_size, generator=gen), layer=layer)


def _naive_row(model: nn.Module, text: str, fv: fv_plugin.FunctionVector | None, new: int) -> tuple[torch.Tensor, str]:
    """One prompt alone, no padding, no cache: next-token probabilities and the greedy continuation, with the
    vector added by a plain hook at the final prompt token and every later position."""
    tok = char_tokenizer()
    ids = torch.tensor([tok(text)["input_ids"]])
    start = ids.shape[1] - 1
    delta = fv.vector.double() if fv is not None else torch.zeros(model.config.hidden_size, dtype=torch.float64)
    layer = fv.layer if fv is not None else 0

    def select(batch: int, seq: int) -> torch.Tensor:
        return (torch.arange(seq) >= start).expand(batch, seq)

    with torch.no_grad(), reference_steering(model, layer, delta, select):
        probs = model(input_ids=ids).logits[0, -1].softmax(-1)
        out = ids
        eos = model.generation_config.eos_token_id
        for _ in range(new):
            nxt = model(input_ids=out).logits[0, -1].argmax()
            out = torch.cat([out, nxt.view(1, 1)], dim=1)
            if eos is not None and int(nxt) in ([eos] if isinstance(eos, int) else eos):
                break
    return probs, tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("mode", ["zero_shot", "icl", "shuffled", "natural"])
def test_evaluate_matches_a_prompt_by_prompt_reference(model: nn.Module, mode: str) -> None:
    tok = char_tokenizer()
    fv = _vector(model)
    res = evaluate(model, tok, reverse_task(), vectors=[fv], mode=mode, n_shots=3, batch_size=3, max_new_tokens=4, n=4)  # type: ignore[arg-type]
    assert res.mode == mode and res.n == (4 * 3 if mode == "natural" else 4)
    kls, shifts = [], []
    for row in res.rows:
        steered, continuation = _naive_row(model, row.prompt, fv, 4)
        base, _ = _naive_row(model, row.prompt, None, 0)
        first = char_tokenizer()(" ")["input_ids"][0]  # answers start with the separator " " (one char token)
        assert row.answer_prob == pytest.approx(float(steered[first]), rel=1e-6)
        assert row.base_answer_prob == pytest.approx(float(base[first]), rel=1e-6)
        kl = float(torch.nn.functional.kl_div(base.log(), steered, reduction="sum"))  # KL(steered || base)
        assert row.kl == pytest.approx(kl, rel=1e-6, abs=1e-9)
        assert row.continuation == continuation
        assert row.top_token == char_tokenizer().decode([int(steered.argmax())])
        if mode == "natural":
            words = re.findall(r"\w+", continuation.lower())
            assert row.first_token_correct is None and row.exact_match == (row.answers[0] in words)
        else:
            assert row.first_token_correct == (int(steered.argmax()) == first)
            head = re.match(r"\w*", continuation.strip())
            assert head is not None and row.exact_match == (head.group() == row.answers[0])  # one-word answers
        kls.append(kl)
        shifts.append(float(steered[first] - base[first]))
    assert res.kl == pytest.approx(sum(kls) / len(kls), rel=1e-6)
    assert res.prob_shift == pytest.approx(sum(shifts) / len(shifts), rel=1e-5, abs=1e-8)


def test_evaluate_prompts_follow_the_mode(model: nn.Module) -> None:
    tok = char_tokenizer()
    task = reverse_task()
    icl = evaluate(model, tok, task, mode="icl", n_shots=3, n=3, generate=False)
    shuffled = evaluate(model, tok, task, mode="shuffled", n_shots=3, n=3, generate=False)
    zero = evaluate(model, tok, task, mode="zero_shot", generate=False)
    natural = evaluate(model, tok, task, mode="natural", n=2, natural_templates=["{x} backwards is"])
    assert all(r.prompt.count("Q: ") == 4 for r in icl.rows + shuffled.rows)
    assert [r.prompt for r in icl.rows] == [p.text for p in make_prompts(task, n=3, n_shots=3)]
    assert zero.n == len(task.test) and all(r.prompt.count("Q: ") == 1 for r in zero.rows)
    assert [r.prompt for r in natural.rows] == [f"{p.input} backwards is" for p in task.test[:2]]
    assert zero.exact_match is None and zero.kl is None and zero.base_answer_prob is None
    assert natural.exact_match is not None and natural.accuracy == natural.exact_match
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate(model, tok, task, mode="few")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(model, tok, task, mode="natural", natural_templates=["no slot"])


def test_answer_matching() -> None:
    assert starts_with_answer(" cold\n\nQ:", (" cold",)) and not starts_with_answer(" colder", (" cold",))
    assert starts_with_answer(" New York\n", ("New York",)) and not starts_with_answer(" New", ("New York",))
    assert starts_with_answer(" Vienna, the capital", ("Vienna",)) and not starts_with_answer(" JACKJACK", ("JACKET",))
    assert contains_answer(' "outside" of it', (" outside",)) and contains_answer("It is COLD.", ("cold",))
    assert not contains_answer(" outsider", (" outside",))


def test_strength_sweep_matches_evaluate_and_zero_is_the_baseline(model: nn.Module) -> None:
    tok = char_tokenizer()
    task = reverse_task()
    fv = _vector(model)
    sweep = sweep_strength(model, tok, task, fv, [0.0, 1.0, 4.0])
    base = evaluate(model, tok, task, generate=False)
    assert sweep.accuracy[0] == base.accuracy and sweep.answer_prob[0] == pytest.approx(base.answer_prob)
    assert sweep.kl[0] == pytest.approx(0.0, abs=1e-12) and sweep.kl[2] > sweep.kl[1] > 0
    strong = evaluate(model, tok, task, vectors=[fv], strength=4.0, generate=False)
    assert sweep.answer_prob[2] == pytest.approx(strong.answer_prob) and sweep.baseline_accuracy == base.accuracy
    assert sweep.best in sweep.values
    with pytest.raises(ValueError, match="no strength"):
        sweep_strength(model, tok, task, fv, [])


def test_layer_sweep_moves_the_vector_or_remakes_it(model: nn.Module) -> None:
    tok = char_tokenizer()
    task = reverse_task()
    fv = _vector(model, layer=0)
    moved = sweep_layers(model, tok, task, fv, [0, 1, 2])
    at2 = evaluate(model, tok, task, vectors=[_vector(model, layer=2)], generate=False)
    assert moved.values == (0.0, 1.0, 2.0) and moved.answer_prob[2] == pytest.approx(at2.answer_prob)
    per_layer = layer_vectors(model, tok, task, n_mean=6, n_shots=2)
    remade = sweep_layers(model, tok, task, per_layer.__getitem__, [1])
    direct = extract_function_vector(model, tok, task, method="difference", layer=1, n_mean=6, n_shots=2)
    assert torch.allclose(per_layer[1].vector, direct.vector)
    ref = evaluate(model, tok, task, vectors=[direct], generate=False)
    assert remade.answer_prob[0] == pytest.approx(ref.answer_prob)


def test_k_sweep_uses_the_top_k_heads(model: nn.Module) -> None:
    tok = char_tokenizer()
    task = reverse_task()
    stats = fv_plugin.head_statistics(model, tok, task, fv_plugin.ExtractionConfig(n_mean=4, n_aie=3, n_shots=2))
    clean = make_prompts(task, n=4, n_shots=2, split="train")
    assert torch.allclose(stats.means, mean_head_activations(model, tok, clean))  # the recipe: n_mean clean prompts
    shuffled = make_prompts(task, n=3, n_shots=2, split="train", shuffle_labels=True, seed=1)
    assert torch.allclose(stats.aie, average_indirect_effect(model, tok, shuffled, stats.means).aie)  # seed + 1
    sweep = sweep_k(model, tok, task, stats, [1, 3], layer=1)
    top3 = fv_plugin.FunctionVector(vector=head_vector(model, stats.means, stats.top_heads(3)), layer=1)
    ref = evaluate(model, tok, task, vectors=[top3], generate=False)
    assert sweep.answer_prob[1] == pytest.approx(ref.answer_prob)
    with pytest.raises(ValueError, match="number of heads"):
        sweep_k(model, tok, task, stats, [10_000], layer=1)


def test_top_tokens_are_the_vector_through_the_final_norm_and_unembedding() -> None:
    model = tiny_model("llama")
    tok = char_tokenizer()
    fv = _vector(model)
    got = top_tokens(model, tok, fv, k=5)
    logits = model.lm_head(model.model.norm(fv.vector.float()))  # the test's own: norm then unembedding
    ref = logits.topk(5)
    assert [t.token_id for t in got] == ref.indices.tolist()
    assert [t.logit for t in got] == pytest.approx(ref.values.tolist(), rel=1e-5)
    assert got[0].token == tok.decode([int(ref.indices[0])]) and 0 < got[0].prob <= 1
    gemma = tiny_model("gemma3_text")
    gv = _vector(gemma)
    norm = gemma.model.norm
    ref_g = gemma.lm_head(norm(gv.vector.float())).topk(3)
    assert [t.token_id for t in top_tokens(gemma, tok, gv, 3)] == ref_g.indices.tolist()
    with pytest.raises(ValueError, match="hidden size"):
        top_tokens(model, tok, fv_plugin.FunctionVector(vector=torch.ones(3), layer=0))


def test_similarity_matrix_is_pairwise_cosine() -> None:
    vecs = [torch.randn(16, generator=torch.Generator().manual_seed(i)) for i in range(4)] + [torch.zeros(16)]
    fvs = [fv_plugin.FunctionVector(vector=v, layer=0) for v in vecs]
    sim = similarity_matrix(fvs)
    for i in range(4):
        for j in range(4):
            cos = float(vecs[i] @ vecs[j]) / math.sqrt(float(vecs[i] @ vecs[i]) * float(vecs[j] @ vecs[j]))
            assert float(sim[i, j]) == pytest.approx(cos, abs=1e-6)
    assert float(sim[4].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="different sizes"):
        similarity_matrix([fvs[0], torch.ones(3)])


def test_aie_matrix_layer_sweep_and_head_locations_round_trip(model: nn.Module, tmp_path: object) -> None:
    tok = char_tokenizer()
    task = reverse_task()
    fv = extract_function_vector(model, tok, task, method="heads", k=3, n_mean=4, n_aie=3, n_shots=2)
    aie = aie_matrix(fv)
    assert aie is not None and aie.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    flat = aie.flatten().topk(3).indices.tolist()
    assert [h[0] * aie.shape[1] + h[1] for h in fv.heads or ()] == flat
    sweep = layer_sweep(fv)
    assert sweep is not None and sweep.best == fv.layer and len(sweep.values) == model.config.num_hidden_layers
    locations = head_locations(fv)
    assert [(h.layer, h.head) for h in locations] == list(fv.heads or ())
    assert all(h.depth == h.layer / (aie.shape[0] - 1) for h in locations)
    loaded = fv_plugin.FunctionVector.load(fv.save(tmp_path / "v.safetensors"))  # type: ignore[operator]
    assert torch.equal(aie_matrix(loaded), aie)  # type: ignore[arg-type]
    assert loaded.layer_sweep == sweep and loaded.config == fv.config and loaded.config is not None
    assert loaded.config.method == "heads" and loaded.config.k == 3 and not loaded.extra
    plain = extract_function_vector(model, tok, task, method="difference", layer=1, n_mean=4, n_shots=2)
    assert aie_matrix(plain) is None and layer_sweep(plain) is None
    with pytest.raises(ValueError, match="no heads"):
        head_locations(plain)


@pytest.mark.slow
def test_embedded_model_antonym_vector_does_the_task_in_every_mode() -> None:
    model, tok = fv_plugin.load_model("smollm2-135m-instruct")
    task = fv_plugin.load_task("antonym")
    fv = extract_function_vector(model, tok, task, layer=18, n_mean=24)
    zero = evaluate(model, tok, task, vectors=[fv], n=12)
    assert zero.base_answer_prob is not None and zero.prob_shift is not None and zero.kl is not None
    assert zero.accuracy >= 0.5 and zero.prob_shift > 0.1 and zero.kl > 0.1  # unsteered: 0/12 (README tables)
    assert zero.exact_match is not None and zero.exact_match >= 0.4
    base = evaluate(model, tok, task, mode="natural", n=4)
    natural = evaluate(model, tok, task, mode="natural", n=4, vectors=[fv])
    assert natural.accuracy > base.accuracy
