"""Entry points: the processor, SteeredModel and pipelines steer one call; concurrency; hooks never leak."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import char_tokenizer, fresh_model, hook_counts, left_padded, tiny_model
from transformers import pipeline

import fv_plugin
from fv_plugin import FunctionVector, FunctionVectorProcessor, SteeredModel

ROWS = [[5, 9, 14, 3, 22, 41, 7], [11, 12, 13, 60], [70, 71, 72, 73, 74]]
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


def _fv(seed: int, layer: int = 1, scale: float = 2.0, dtype: torch.dtype = torch.float64) -> FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return FunctionVector(vector=(torch.randn(64, generator=gen) * scale).to(dtype), layer=layer)


@pytest.fixture
def model() -> torch.nn.Module:
    return fv_plugin.attach(tiny_model("llama", dtype=torch.float64))


def test_processor_steers_that_call_and_no_other(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS)
    fv = _fv(1)
    with fv_plugin.steer(model, fv, strength=1.5):
        expected = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    proc = FunctionVectorProcessor(fv, strength=1.5)
    got = model.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc], **GEN)
    assert torch.equal(got, expected)
    plain = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert not torch.equal(plain, expected)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, attention_mask=mask).logits,
            tiny_model("llama", dtype=torch.float64)(input_ids=ids, attention_mask=mask).logits,
        )


def test_processor_counts_steps_and_passes_scores_through(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS)
    seen: list[int] = []

    def schedule(step: int) -> float:
        seen.append(step)
        return 1.0

    proc = FunctionVectorProcessor(_fv(1), strength=0.0, schedule=schedule)
    scores = torch.randn(3, 128)
    out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc], **GEN)
    assert out.shape[1] == ids.shape[1] + 6
    with pytest.raises(RuntimeError, match="not attached"):
        proc(ids, scores)  # outside a generate() of an attached model: loud, not a silent no-op
    proc_b = FunctionVectorProcessor(_fv(1), strength=1.0, schedule=schedule)
    model.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc_b], **GEN)
    assert seen[0] == 0 and sorted(set(seen)) == list(range(6))


@pytest.mark.parametrize("use_cache", [True, False])
def test_window_limits_steering_to_chosen_steps(model: torch.nn.Module, use_cache: bool) -> None:
    ids, mask = left_padded(ROWS)
    fv = _fv(2, scale=3.0)
    kw = dict(GEN, use_cache=use_cache)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kw)  # type: ignore[arg-type]
    late = FunctionVectorProcessor(fv, strength=2.0, window=(3, None))
    out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=[late], **kw)  # type: ignore[arg-type]
    start = ids.shape[1]
    # Steps 0..2 produce the first three new tokens; they cannot see any steering.
    assert torch.equal(out[:, : start + 3], plain[:, : start + 3])
    assert not torch.equal(out, plain)
    cached = model.generate(input_ids=ids, attention_mask=mask, logits_processor=[late], **GEN)
    assert torch.equal(out, cached)


def test_schedule_scales_per_step(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS)
    fv = _fv(3)
    half = FunctionVectorProcessor(fv, strength=3.0, schedule=lambda step: 0.5)
    with fv_plugin.steer(model, fv, strength=1.5):
        expected = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, logits_processor=[half], **GEN), expected)


def test_steered_model_wrapper(model: torch.nn.Module) -> None:
    ids, mask = left_padded(ROWS)
    a, b = _fv(4), _fv(5)
    with fv_plugin.steer(model, a, (b, -0.5), strength=1.2):
        expected = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    wrapped = SteeredModel(model)
    assert wrapped.config is model.config and wrapped.device == model.device
    got = wrapped.generate(input_ids=ids, attention_mask=mask, steering=[a, (b, -0.5)], strength=1.2, **GEN)
    assert torch.equal(got, expected)
    assert torch.equal(
        wrapped.generate(input_ids=ids, attention_mask=mask, **GEN),
        model.generate(input_ids=ids, attention_mask=mask, **GEN),
    )
    default = SteeredModel(model, [a, (b, -0.5)], strength=1.2)
    assert torch.equal(default.generate(input_ids=ids, attention_mask=mask, **GEN), expected)
    assert default.wrapped_model is model and default.model is model.model


def test_text_generation_pipeline_with_processor_and_steer() -> None:
    model = fv_plugin.attach(tiny_model("llama"))
    tok = char_tokenizer()
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    fv = _fv(6, scale=4.0, dtype=torch.float32)
    kw = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    plain = pipe("hello world", **kw)[0]["generated_text"]
    proc = FunctionVectorProcessor(fv, strength=2.0)
    by_proc = pipe("hello world", logits_processor=[proc], **kw)[0]["generated_text"]
    with fv_plugin.steer(model, fv, strength=2.0):
        by_ctx = pipe("hello world", **kw)[0]["generated_text"]
    assert by_proc == by_ctx != plain
    assert pipe("hello world", **kw)[0]["generated_text"] == plain


def test_eight_threads_on_one_model_get_what_they_get_alone() -> None:
    model = fv_plugin.attach(tiny_model("llama", dtype=torch.float64))
    ids, mask = left_padded(ROWS)
    jobs: list[tuple[str, FunctionVector | None]] = []
    for i in range(8):
        vector = None if i % 4 == 0 else _fv(10 + i, layer=i % 3)
        jobs.append(("proc" if i % 2 else "steer", vector))

    def run(job: tuple[str, FunctionVector | None], barrier: threading.Barrier | None) -> torch.Tensor:
        kind, vector = job
        if barrier is not None:
            barrier.wait()
        if vector is None:
            return model.generate(input_ids=ids, attention_mask=mask, **GEN)
        if kind == "proc":
            proc = FunctionVectorProcessor(vector, strength=1.5)
            return model.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc], **GEN)
        with fv_plugin.steer(model, vector, strength=1.5):
            return model.generate(input_ids=ids, attention_mask=mask, **GEN)

    serial = [run(job, None) for job in jobs]
    assert len({tuple(s.flatten().tolist()) for s in serial}) > 4, "vectors must differ in effect"
    for _ in range(2):
        barrier = threading.Barrier(len(jobs))
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            parallel = list(pool.map(lambda job, b=barrier: run(job, b), jobs))
        for got, want in zip(parallel, serial, strict=True):
            assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore::fv_plugin.steering.UnusedSteeringWarning")  # blocks without forwards
def test_exceptions_leave_no_steering_and_no_hooks_behind() -> None:
    model = fresh_model("llama")
    before = hook_counts(model)
    ids, mask = left_padded(ROWS)
    plain = model(input_ids=ids, attention_mask=mask).logits
    fv = _fv(20, dtype=torch.float32)
    with pytest.raises(KeyError), fv_plugin.steer(model, fv, strength=5.0):
        # one pre-hook on the base model, one hook per layer, one pre-hook per attention output projection
        assert hook_counts(model) == before + 1 + 3 + 3
        raise KeyError("boom")
    assert hook_counts(model) == before and not fv_plugin.is_attached(model)  # steer leaves the model as it was
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    with fv_plugin.steer(model, fv), pytest.raises(ValueError):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=-3)
    assert hook_counts(model) == before
    fv_plugin.attach(model)
    attached = hook_counts(model)
    assert attached == before + 7
    proc = FunctionVectorProcessor(fv, strength=5.0)
    with pytest.raises(ValueError):
        model.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=-3)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    with fv_plugin.steer(model, fv):  # an explicit attach outlives steer blocks
        pass
    fv_plugin.attach(model)
    fv_plugin.attach(model)
    assert hook_counts(model) == attached
    fv_plugin.detach(model)
    assert hook_counts(model) == before and "generate" not in model.__dict__


@pytest.mark.filterwarnings("ignore::fv_plugin.steering.UnusedSteeringWarning")  # blocks without forwards
def test_nested_and_concurrent_steer_blocks_keep_hooks_until_the_last_exits() -> None:
    model = fresh_model("llama")
    before = hook_counts(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    fv = _fv(23, dtype=torch.float32)
    with fv_plugin.steer(model, fv, strength=2.0):
        inner_plain = model(input_ids=ids).logits
        with fv_plugin.steer(model, fv, strength=1.0):
            pass
        assert torch.equal(model(input_ids=ids).logits, inner_plain)  # outer steering still on
    assert hook_counts(model) == before


def test_hooks_we_did_not_add_are_kept() -> None:
    model = fresh_model("llama")
    calls: list[int] = []
    theirs = model.model.layers[1].register_forward_hook(lambda m, a, o: calls.append(1))
    fv_plugin.attach(model)
    with fv_plugin.steer(model, _fv(21, dtype=torch.float32)):
        model(input_ids=torch.tensor([[5, 6, 7]]))
    fv_plugin.detach(model)
    model(input_ids=torch.tensor([[5, 6, 7]]))
    assert calls == [1, 1]
    theirs.remove()


def test_deep_copy_of_an_attached_model_is_steered_on_its_own() -> None:
    import copy

    model = fv_plugin.attach(fresh_model("llama"))
    clone = copy.deepcopy(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = clone(input_ids=ids).logits
    with fv_plugin.steer(clone, _fv(22, dtype=torch.float32), strength=3.0):
        assert not torch.equal(clone(input_ids=ids).logits, plain)
    assert hook_counts(clone) == hook_counts(model) - 7  # the copied hooks were dropped, steer left none


def test_recording_and_patching_reach_only_the_calling_thread() -> None:
    from fv_plugin.architectures import resolve_architecture
    from fv_plugin.hooks import patch_head_inputs, record_head_inputs, record_layer_outputs

    model = fresh_model("llama")
    before = hook_counts(model)
    resolved = resolve_architecture(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    other: dict[str, torch.Tensor] = {}

    def run_elsewhere() -> None:
        with torch.no_grad():
            other["logits"] = model(input_ids=ids).logits

    def zero(layer: int, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    with (
        record_layer_outputs(model, [0]) as seen,
        record_head_inputs(resolved, [0]) as heads,
        patch_head_inputs(resolved, [0, 1], zero),
    ):
        thread = threading.Thread(target=run_elsewhere)
        thread.start()
        thread.join()
        assert not seen and not heads  # another thread's forward is neither recorded ...
        assert torch.equal(other["logits"], ref)  # ... nor patched
        with torch.no_grad():
            mine = model(input_ids=ids).logits
        assert 0 in seen and 0 in heads and not torch.allclose(mine, ref)
    assert hook_counts(model) == before
