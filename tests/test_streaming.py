"""Streaming, the pattern of Hugging Face chat apps: ``generate`` in a thread feeding a ``TextIteratorStreamer``.

A ``steer`` block belongs to the context that opened it, so a thread started inside it generates unsteered: that
must warn. Each of the ways the warning names must steer the streamed text exactly as a plain steered call.
"""

from __future__ import annotations

import contextvars
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from transformers import TextIteratorStreamer

import fv_plugin
from fv_plugin import FunctionVector, FunctionVectorProcessor, SteeredModel, UnusedSteeringWarning

GEN = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_model("llama")


def _fv() -> FunctionVector:
    return FunctionVector(vector=torch.randn(64, generator=torch.Generator().manual_seed(4)) * 4, layer=1)


def _inputs() -> dict[str, torch.Tensor]:
    return dict(char_tokenizer()("Q: stream\nA:", return_tensors="pt"))


def _stream(target: Callable[..., Any], **kwargs: Any) -> str:
    """Run ``target(**kwargs, streamer=...)`` in a thread and collect what it streams."""
    streamer = TextIteratorStreamer(char_tokenizer(), skip_prompt=True)  # type: ignore[arg-type]
    thread = threading.Thread(target=target, kwargs={**kwargs, "streamer": streamer})
    thread.start()
    text = "".join(streamer)
    thread.join()
    return text


def _decoded(ids: torch.Tensor, prompt_len: int) -> str:
    return char_tokenizer().decode(ids[0, prompt_len:], skip_special_tokens=True)


def test_a_thread_started_inside_steer_is_unsteered_and_the_block_warns(model: torch.nn.Module) -> None:
    inputs, fv = _inputs(), _fv()
    plain = _decoded(model.generate(**inputs, **GEN), inputs["input_ids"].shape[1])
    with pytest.warns(UnusedSteeringWarning, match="copy_context"), fv_plugin.steer(model, fv):
        streamed = _stream(model.generate, **inputs, **GEN)
    assert streamed == plain


def test_every_way_the_warning_names_streams_steered_text(model: torch.nn.Module) -> None:
    inputs, fv = _inputs(), _fv()
    width = inputs["input_ids"].shape[1]
    with fv_plugin.steer(model, fv):
        expected = _decoded(model.generate(**inputs, **GEN), width)
    assert expected != _decoded(model.generate(**inputs, **GEN), width)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedSteeringWarning)
        with fv_plugin.steer(model, fv):  # the thread runs in a copy of this context
            context = contextvars.copy_context()
            assert _stream(lambda **kw: context.run(model.generate, **kw), **inputs, **GEN) == expected
        try:
            steered = SteeredModel(model)  # attaches the model, so the processor works on it too
            assert _stream(steered.generate, **inputs, steering=[fv], **GEN) == expected
            proc = FunctionVectorProcessor(fv)
            assert _stream(model.generate, **inputs, logits_processor=[proc], **GEN) == expected
        finally:
            fv_plugin.detach(model)


def test_a_block_without_forwards_warns_and_one_with_forwards_does_not(model: torch.nn.Module) -> None:
    fv = _fv()
    with pytest.warns(UnusedSteeringWarning), fv_plugin.steer(model, fv):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedSteeringWarning)
        with fv_plugin.steer(model, fv), torch.no_grad():
            model(**_inputs())
        with fv_plugin.steer(model, fv, strength=0.0):  # nothing to steer: nothing to warn about
            pass


@pytest.mark.slow
def test_streaming_example_streams_what_steer_generates() -> None:
    """examples/streaming.py (the README's Streaming section) against steer + generate in this process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, str(root / "examples" / "streaming.py")], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in out.stdout.splitlines() if ":" in line}
    model, tok = fv_plugin.load_model("smollm2-135m-instruct")
    fv = FunctionVector.load(root / "demo" / "vectors" / "smollm2-135m-instruct" / "antonym.safetensors")
    inputs = tok("Q: hot\nA:", return_tensors="pt")
    width = inputs["input_ids"].shape[1]
    for label, vectors in (("unsteered", []), ("steered", [fv])):
        with fv_plugin.steer(model, *vectors):
            ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        expected = tok.decode(ids[0, width:], skip_special_tokens=True).replace("\n", " ")
        assert lines[label].strip() == expected.strip(), label
    assert lines["unsteered"] != lines["steered"]
