"""bitsandbytes 8-bit and 4-bit (nf4, fp4) models on the CPU: steering entry points and extraction.

Tiny random checkpoints are saved once and loaded through ``load_model(..., quantization=...)``, so the
projections are real ``Linear8bitLt`` / ``Linear4bit`` modules.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, generate_cached_and_uncached, left_padded, next_layer_input, tiny_model
from torch import nn

import fv_plugin
from fv_plugin import models
from fv_plugin.architectures import resolve_architecture
from fv_plugin.heads import head_vector
from fv_plugin.mediation import average_indirect_effect, average_indirect_effect_naive, mean_head_activations
from fv_plugin.prompts import make_prompts

pytest.importorskip("bitsandbytes")

QUANTS = ["8bit", "nf4", "fp4"]
FAMILIES = ["llama", "gpt2", "qwen2"]
ROWS = [[5, 40, 41, 42, 43], [6, 50, 51]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for family in FAMILIES:
        path = root / family
        tiny_model(family).save_pretrained(path)
        char_tokenizer().save_pretrained(path)
        paths[family] = path
    return paths


def quantized(checkpoints: dict[str, Path], family: str, quant: str) -> nn.Module:
    model, _ = fv_plugin.load_model(str(checkpoints[family]), quantization=quant)  # type: ignore[arg-type]
    return model


def bnb_class(quant: str) -> str:
    return "Linear8bitLt" if quant == "8bit" else "Linear4bit"


def vector(seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_steered_next_layer_input_is_unsteered_plus_vector(
    checkpoints: dict[str, Path], family: str, quant: str
) -> None:
    model = quantized(checkpoints, family, quant)
    arch = resolve_architecture(model)
    assert type(arch.out_proj(1)).__name__ == bnb_class(quant)
    fv = fv_plugin.FunctionVector(vector=vector(0), layer=1)
    ids, mask = left_padded(ROWS)
    with torch.no_grad(), next_layer_input(model, 1) as seen:
        model(input_ids=ids, attention_mask=mask)
        with fv_plugin.steer(model, fv, positions="all", strength=0.5):
            model(input_ids=ids, attention_mask=mask)
    plain, steered = seen
    real = mask.bool()[..., None]
    expected = torch.where(real, plain + 0.5 * fv.vector.to(plain.dtype), plain)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    assert not fv_plugin.is_attached(model)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_cached_equals_uncached_and_every_entry_point_agrees(
    checkpoints: dict[str, Path], family: str, quant: str
) -> None:
    model = quantized(checkpoints, family, quant)
    fv = fv_plugin.FunctionVector(vector=vector(1), layer=0)
    ids, mask = left_padded(ROWS)
    cached, uncached = generate_cached_and_uncached(model, (fv,), ids, mask, strength=2.0)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, cached), "the vector must change the generation"
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    processor = fv_plugin.FunctionVectorProcessor(fv, strength=2.0)
    via_processor = fv_plugin.attach(model).generate(
        input_ids=ids, attention_mask=mask, logits_processor=[processor], **options
    )
    via_wrapper = fv_plugin.SteeredModel(model).generate(
        input_ids=ids, attention_mask=mask, steering=[fv], strength=2.0, **options
    )
    fv_plugin.detach(model)
    torch.testing.assert_close(via_processor, cached, rtol=0, atol=0)
    torch.testing.assert_close(via_wrapper, cached, rtol=0, atol=0)


def dequantized_weight(proj: nn.Module) -> torch.Tensor:
    """The projection's weight ``[out, in]`` in float32, dequantized with bitsandbytes' own functions."""
    import bitsandbytes.functional as bnbf

    weight = proj.weight
    if weight.dtype == torch.int8:  # LLM.int8(): row-wise absmax scales (kept in the layer's state after a forward)
        scales = weight.SCB if weight.SCB is not None else proj.state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data, scales).float()
    return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_vector_through_a_quantized_projection(checkpoints: dict[str, Path], family: str, quant: str) -> None:
    model = quantized(checkpoints, family, quant)
    arch = resolve_architecture(model)
    # Before any forward: on the CPU a 4-bit layer repacks its weight for its kernel on first use.
    weights = {layer: dequantized_weight(arch.out_proj(layer)) for layer in (0, 1)}
    means = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    heads = [(1, 0), (1, 2), (0, 3)]
    got = head_vector(model, means, heads)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    expected = torch.zeros(64)
    for layer, head in heads:
        assert weights[layer].shape == (64, 64)
        expected += weights[layer][:, head * 16 : (head + 1) * 16] @ means[layer, head]
    # 4-bit layers compute in bf16; LLM.int8() also quantizes the input row: a few percent at most.
    assert float((got - expected).norm() / expected.norm()) < 0.03
    dense = head_vector(tiny_model(family), means, heads)
    assert float((dense - expected).norm() / dense.norm()) < 0.25  # and the quantized weight is near the original


@pytest.mark.parametrize("quant", QUANTS)
def test_fast_aie_equals_the_naive_reference_on_a_quantized_model(checkpoints: dict[str, Path], quant: str) -> None:
    model, tok = quantized(checkpoints, "llama", quant), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    clean = make_prompts(task, n=4, n_shots=2, split="train")
    shuffled = make_prompts(task, n=1, n_shots=2, split="train", shuffle_labels=True, seed=1)
    means = mean_head_activations(model, tok, clean, batch_size=2)
    assert means.shape == (3, 4, 16) and bool(torch.isfinite(means).all())
    fast = average_indirect_effect(model, tok, shuffled, means, heads_per_batch=5)
    naive = average_indirect_effect_naive(model, tok, shuffled, means)
    assert float(naive.effects.abs().max()) > 1e-5, "patching must change something"
    torch.testing.assert_close(fast.base_probs, naive.base_probs, rtol=0, atol=2e-3)
    torch.testing.assert_close(fast.effects, naive.effects, rtol=0, atol=2e-3)


@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_difference_vector_of_a_quantized_model_matches_its_hidden_states(
    checkpoints: dict[str, Path], quant: str
) -> None:
    model, tok = quantized(checkpoints, "qwen2", quant), char_tokenizer()
    task = fv_plugin.load_task("capitalize")
    fv = fv_plugin.extract_function_vector(model, tok, task, method="difference", layer=1, n_mean=3, n_shots=2)
    icl = make_prompts(task, n=3, n_shots=2, split="train")
    zero = make_prompts(task, n=3, n_shots=0, split="train")

    def mean_last(prompts: list[fv_plugin.Prompt]) -> torch.Tensor:
        rows = []
        for p in prompts:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([tok(p.text)["input_ids"]]), output_hidden_states=True)
            rows.append(out.hidden_states[2][0, -1].float())
        return torch.stack(rows).mean(0)

    torch.testing.assert_close(fv.vector, mean_last(icl) - mean_last(zero), rtol=1e-3, atol=1e-3)


def test_a_users_own_bitsandbytes_config_and_loaded_model(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16)
    ours, _ = fv_plugin.load_model(str(checkpoints["llama"]), quantization_config=config)
    theirs = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=config)
    assert type(resolve_architecture(ours).out_proj(0)).__name__ == "Linear4bit"
    fv = fv_plugin.FunctionVector(vector=vector(2), layer=2)
    ids, mask = left_padded(ROWS)
    outs = []
    for model in (ours, theirs):
        with torch.no_grad(), fv_plugin.steer(model, fv, positions="all"):
            outs.append(model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_load_model_quantization_errors(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(checkpoints["llama"])
    with pytest.raises(ValueError, match=r"quantization must be one of .*'8bit'.*got '3bit'"):
        fv_plugin.load_model(path, quantization="3bit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        fv_plugin.load_model(path, quantization="8bit", quantization_config=models.bnb_config("4bit"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=re.escape('pip install "fv_plugin[quant]"')):
        fv_plugin.load_model(path, quantization="4bit")


# ------------------------------------------------------------------------------------ real embedded model
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_embedded_model_quantized_steers_like_the_oracle(quant: str) -> None:
    if quant == "8bit":
        # LLM.int8() splits out the activation columns above its threshold over all tokens of a forward, so a cached
        # step (one token) and an uncached one (the whole sequence) may round differently on a real model; with the
        # threshold at 0 every token is quantized on its own and cached generation must equal uncached exactly.
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
        model, tok = fv_plugin.load_model("smollm2-135m-instruct", quantization_config=config)
    else:
        model, tok = fv_plugin.load_model("smollm2-135m-instruct", quantization=quant)  # type: ignore[arg-type]
    assert type(resolve_architecture(model).out_proj(10)).__name__ == bnb_class(quant)
    fv = fv_plugin.FunctionVector(vector=20.0 * torch.randn(576, generator=torch.Generator().manual_seed(0)), layer=10)
    enc = tok(["Q: hot\nA: cold\n\nQ: big\nA:"], return_tensors="pt")
    with torch.no_grad(), next_layer_input(model, 10) as seen:
        model(**enc)
        with fv_plugin.steer(model, fv, positions="all"):
            model(**enc)
    torch.testing.assert_close(seen[1], seen[0] + fv.vector, rtol=1e-5, atol=1e-4)
    cached, uncached = generate_cached_and_uncached(
        model, (fv,), enc["input_ids"], enc["attention_mask"], new=4, positions="last_prompt"
    )
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


def test_quant_bench_compares_each_setting_with_float32_at_its_layer(checkpoints: dict[str, Path]) -> None:
    from fv_plugin.benchmarks.quant import quant_table, run_task

    rows = run_task(str(checkpoints["llama"]), "capitalize", ["nf4"], n_mean=4, n_shots=2)
    assert [r.config for r in rows] == ["fp32", "nf4"]
    assert len({r.layer for r in rows}) == 1 and rows[0].cosine == pytest.approx(1.0)
    for row in rows:
        assert (
            -1.0 - 1e-6 <= row.cosine <= 1.0 + 1e-6
            and 0.0 <= row.steered <= 1.0
            and row.peak_mib > 0
            and row.weights_mib > 0
        )
    assert rows[1].weights_mib < rows[0].weights_mib  # the 4-bit projections take less memory
    table = quant_table(rows)
    assert table.count("\n") == 3 and "+0 pts" in table.splitlines()[2]


@pytest.mark.parametrize("quant", ["8bit", "fp4"])
def test_a_pipeline_with_the_processor_on_a_quantized_model(checkpoints: dict[str, Path], quant: str) -> None:
    from transformers import pipeline

    model, tok = fv_plugin.load_model(str(checkpoints["gpt2"]), quantization=quant)  # type: ignore[arg-type]
    fv = fv_plugin.FunctionVector(vector=vector(3), layer=1)
    prompt = "hello there"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), fv_plugin.steer(model, fv, strength=2.0):
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)[0, ids.shape[1] :]
    pipe = pipeline("text-generation", model=fv_plugin.attach(model), tokenizer=tok)
    processor = fv_plugin.FunctionVectorProcessor(fv, strength=2.0)
    steered = pipe(prompt, logits_processor=[processor], return_full_text=False, **options)[0]["generated_text"]
    plain = pipe(prompt, return_full_text=False, **options)[0]["generated_text"]
    fv_plugin.detach(model)
    assert steered == tok.decode(expected) and plain != steered


def test_quant_diagnosis_reports_every_layer(checkpoints: dict[str, Path]) -> None:
    from fv_plugin.benchmarks.quant import diagnose

    text = diagnose(str(checkpoints["llama"]), "8bit", "capitalize", layer=1, n_mean=3, n_shots=2)
    cosines = re.search(r"per-layer cosine with fp32: (.*)", text)
    assert cosines is not None and len(cosines.group(1).split()) == 3
    assert all(-1.0 <= float(item.split(":")[1]) <= 1.0 for item in cosines.group(1).split())
    assert "8bit model steered at layer 1 by the fp32 vector" in text and "fp32: 2-shot ICL test accuracy" in text


@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_evaluation_and_top_tokens_on_a_quantized_model(checkpoints: dict[str, Path], quant: str) -> None:
    from test_evaluation import reverse_task

    model = quantized(checkpoints, "llama", quant)
    tok = char_tokenizer()
    fv = fv_plugin.FunctionVector(vector=vector(3), layer=1)
    res = fv_plugin.evaluate(model, tok, reverse_task(), vectors=[fv], n=3, max_new_tokens=2)
    zero = fv_plugin.evaluate(model, tok, reverse_task(), vectors=[fv], strength=0.0, n=3, generate=False)
    assert res.kl is not None and res.kl > 0 and zero.kl == pytest.approx(0.0, abs=1e-6)
    assert [r.answer_prob for r in zero.rows] == pytest.approx([r.base_answer_prob for r in res.rows])
    got = fv_plugin.top_tokens(model, tok, fv, k=3)
    norm = model.model.norm
    with torch.no_grad():
        ref = model.lm_head(norm(fv.vector.to(norm.weight.dtype))).float().topk(3).indices.tolist()
    assert [t.token_id for t in got] == ref
