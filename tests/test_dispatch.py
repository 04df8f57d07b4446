"""accelerate-dispatched models: layers offloaded to disk or CPU memory, and layers executing on another device.

Without a GPU, "another device" is accelerate's own mechanism pointed at ``meta``: ``AlignDevicesHook`` moves a
layer's inputs to its execution device before it runs, exactly as it does for ``cuda:1``, and a layer whose
weights are on ``meta`` computes shapes only. So forward passes there check shapes and where every tensor we
add or patch lives, not values; values are checked on the layers that execute on the CPU and on offloaded
models, against the same model without offload.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import char_tokenizer, generate_cached_and_uncached, left_padded, next_layer_input, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

import fv_plugin
from fv_plugin.architectures import resolve_architecture
from fv_plugin.devices import execution_device, input_device
from fv_plugin.heads import head_vector
from fv_plugin.mediation import average_indirect_effect, mean_head_activations
from fv_plugin.prompts import make_prompts
from fv_plugin.runtime import LayerDelta

ROWS = [[5, 40, 41, 42, 43], [6, 50, 51]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def vector(seed: int, layer: int, scale: float = 3.0) -> fv_plugin.FunctionVector:
    return fv_plugin.FunctionVector(
        vector=scale * torch.randn(64, generator=torch.Generator().manual_seed(seed)), layer=layer
    )


def run_on_meta(model: nn.Module, names: list[str]) -> None:
    """Have accelerate execute these submodules on ``meta`` (weights there too), the rest staying on the CPU."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for name in names:
        module = model.get_submodule(name)
        module.to("meta")
        add_hook_to_module(module, AlignDevicesHook(execution_device="meta"))


@pytest.fixture
def split_model(checkpoint: Path) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    run_on_meta(model, ["model.layers.1", "model.layers.2", "model.norm", "lm_head"])
    return model


def test_vectors_and_patches_follow_the_device_each_layer_executes_on(
    split_model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = split_model
    assert execution_device(model.model.layers[1]) == torch.device("meta")
    assert execution_device(model.model.layers[0]) == torch.device("cpu") == input_device(model)
    delivered: list[tuple[int, torch.device]] = []
    original = LayerDelta.for_batch

    def spy(self: LayerDelta, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        copy = original(self, batch, device, dtype)
        delivered.append((self.layer, copy.device))
        return copy

    monkeypatch.setattr(LayerDelta, "for_batch", spy)
    arch = resolve_architecture(model)
    head = fv_plugin.FunctionVector(
        vector=torch.zeros(64), layer=2, heads=((2, 1),), head_values=torch.ones(1, 16), method="head_patch"
    )
    outputs: dict[str, torch.device] = {}

    def after(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs[name] = (output if isinstance(output, torch.Tensor) else output[0]).device

        return hook

    ids, mask = left_padded(ROWS)
    with fv_plugin.steer(model, vector(0, 0), vector(1, 1), head, positions="all"):
        # registered after ours, so these see what our hooks returned
        handles = [model.model.layers[i].register_forward_hook(after(f"layer{i}")) for i in (0, 1)]
        handles.append(arch.out_proj(2).register_forward_pre_hook(lambda m, a: outputs.update(o_proj2=a[0].device)))
        try:
            with torch.no_grad(), next_layer_input(model, 0) as seen:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
    assert logits.shape == (2, 5, 128) and logits.device.type == "meta"
    assert sorted(delivered) == [(0, torch.device("cpu")), (1, torch.device("meta"))]
    assert outputs == {"layer0": torch.device("cpu"), "layer1": torch.device("meta"), "o_proj2": torch.device("meta")}
    # the CPU layer's values: the next layer's input is the plain output plus the vector
    with torch.no_grad(), next_layer_input(model, 0) as plain:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    torch.testing.assert_close(seen[0], plain[0] + vector(0, 0).vector * mask[..., None], rtol=1e-5, atol=1e-5)


def test_cached_forwards_and_every_position_mode_work_across_the_split(split_model: nn.Module) -> None:
    ids, mask = left_padded(ROWS)
    for positions in ("all", "last_prompt", "generated"):
        with torch.no_grad(), fv_plugin.steer(split_model, vector(0, 1), positions=positions, normalize="relative"):
            out = split_model(input_ids=ids, attention_mask=mask, use_cache=True)
        assert out.logits.shape == (2, 5, 128) and out.logits.device.type == "meta"


def offloaded(checkpoint: Path, tmp_path: Path, how: str) -> nn.Module:
    if how == "disk":
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu"}
        device_map.update({"model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"})
        model, _ = fv_plugin.load_model(str(checkpoint), device_map=device_map, offload_folder=tmp_path / "off")
        assert model.model.layers[1].self_attn.o_proj.weight.device.type == "meta"
        return model
    if how == "auto":  # max_memory too small for the whole model: accelerate decides what goes to disk
        model, _ = fv_plugin.load_model(
            str(checkpoint), device_map="auto", max_memory={"cpu": "300KB"}, offload_folder=tmp_path / "off"
        )
        assert "disk" in set(model.hf_device_map.values())
        return model
    from accelerate import cpu_offload

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    cpu_offload(model, execution_device=torch.device("cpu"))  # weights wait in CPU memory, on meta in the modules
    assert model.model.layers[1].self_attn.o_proj.weight.device.type == "meta"
    return model


@pytest.mark.parametrize("how", ["disk", "auto", "cpu_offload"])
def test_offloaded_model_steers_and_generates_like_the_plain_one(checkpoint: Path, tmp_path: Path, how: str) -> None:
    model, plain = offloaded(checkpoint, tmp_path, how), tiny_model("llama")
    ids, mask = left_padded(ROWS)
    fv = vector(2, 1)
    seen = []
    for m in (model, plain):
        with torch.no_grad(), next_layer_input(m, 1) as inputs, fv_plugin.steer(m, fv, positions="all"):
            logits = m(input_ids=ids, attention_mask=mask).logits
        seen.append((inputs[0], logits))
    torch.testing.assert_close(seen[0][0], seen[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[0][1], seen[1][1], rtol=1e-5, atol=1e-5)
    cached, uncached = generate_cached_and_uncached(model, (fv,), ids, mask, strength=2.0)
    reference, _ = generate_cached_and_uncached(plain, (fv,), ids, mask, strength=2.0)
    assert torch.equal(cached, uncached) and torch.equal(cached, reference)
    processor = fv_plugin.FunctionVectorProcessor(fv, strength=2.0)
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    via_processor = fv_plugin.attach(model).generate(
        input_ids=ids, attention_mask=mask, logits_processor=[processor], **options
    )
    via_wrapper = fv_plugin.SteeredModel(model).generate(
        input_ids=ids, attention_mask=mask, steering=[fv], strength=2.0, **options
    )
    fv_plugin.detach(model)
    assert torch.equal(via_processor, reference) and torch.equal(via_wrapper, reference)


def test_extraction_on_a_disk_offloaded_model_matches_the_plain_one(checkpoint: Path, tmp_path: Path) -> None:
    model, plain, tok = offloaded(checkpoint, tmp_path, "disk"), tiny_model("llama"), char_tokenizer()
    task = fv_plugin.load_task("antonym")
    clean = make_prompts(task, n=4, n_shots=2, split="train")
    shuffled = make_prompts(task, n=1, n_shots=2, split="train", shuffle_labels=True, seed=1)
    means = mean_head_activations(model, tok, clean, batch_size=2)
    torch.testing.assert_close(means, mean_head_activations(plain, tok, clean, batch_size=2), rtol=1e-5, atol=1e-5)
    heads = [(1, 0), (2, 3)]  # projections offloaded to disk (weights on meta until they run)
    torch.testing.assert_close(head_vector(model, means, heads), head_vector(plain, means, heads), rtol=1e-5, atol=1e-5)
    effects = average_indirect_effect(model, tok, shuffled, means, heads_per_batch=5).effects
    expected = average_indirect_effect(plain, tok, shuffled, means, heads_per_batch=5).effects
    torch.testing.assert_close(effects, expected, rtol=0, atol=1e-5)
    capital = fv_plugin.load_task("capitalize")
    options: dict[str, Any] = dict(method="difference", layer=2, n_mean=3, n_shots=2)
    got = fv_plugin.extract_function_vector(model, tok, capital, **options)
    torch.testing.assert_close(got.vector, fv_plugin.extract_function_vector(plain, tok, capital, **options).vector)


def test_load_model_placement_errors(checkpoint: Path) -> None:
    path = str(checkpoint)
    with pytest.raises(ValueError, match=r"max_memory only applies .* device_map='auto'"):
        fv_plugin.load_model(path, max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match=re.escape("pass offload_folder=")):
        fv_plugin.load_model(path, device_map={"model": "disk", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="offload_folder only applies"):
        fv_plugin.load_model(path, offload_folder="somewhere")
