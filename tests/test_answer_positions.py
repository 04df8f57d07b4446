"""positions="answer": the last prompt token and each generated token until the row's answer ends, checked
against plain-torch steering of the same rows at explicit positions (with the KV cache, without, padding,
per-row vectors)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from conftest import VOCAB, decoder_layers, left_padded, tiny_model
from torch import nn

import fv_plugin
from fv_plugin.condition import Condition
from fv_plugin.positions import ForwardInfo, PromptInfo, answer_ended, position_mask

PROMPTS = [[5, 9, 13, 17, 21], [7, 3, 40], [60, 61, 62, 63, 64, 65, 66], [30, 31]]
NEW = 6


class EndsAt:
    """A stand-in tokenizer whose ``ends`` ids decode to a newline (which ends an answer)."""

    def __init__(self, ends: set[int]) -> None:
        self.ends = ends
        self.eos_token_id = None

    def __len__(self) -> int:
        return VOCAB

    def batch_decode(self, seqs: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return ["\n" if seq[0] in self.ends else "x" for seq in seqs]


def _vector(seed: int) -> fv_plugin.FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return fv_plugin.FunctionVector(vector=8 * torch.randn(64, generator=gen), layer=1, model_type="llama")


def _generate(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool, **kwargs: object
) -> torch.Tensor:
    return model.generate(
        **kwargs,  # type: ignore[arg-type]
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        eos_token_id=None,
    )


def _oracle_positions(out: torch.Tensor, mask: torch.Tensor, ends: set[int]) -> list[set[int]]:
    """Per row: the last prompt position, then each generated position before the first end token."""
    width = mask.shape[1]
    steered = []
    for row in range(len(out)):
        last = int(torch.where(mask[row].bool(), torch.arange(width), -1).max())
        chosen = {last}
        for pos in range(width, out.shape[1]):
            if int(out[row, pos]) in ends:
                break
            chosen.add(pos)
        steered.append(chosen)
    return steered


@contextlib.contextmanager
def _explicit(model: nn.Module, deltas: torch.Tensor, steered: list[set[int]]) -> Iterator[None]:
    """Plain torch: add ``deltas[row]`` after layer 1 at exactly the ``steered`` positions (no fv_plugin)."""

    def hook(module: nn.Module, args: object, output: object) -> object:
        hidden = output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]
        add = torch.zeros_like(hidden)
        for row, positions in enumerate(steered):
            for pos in positions:
                if pos < hidden.shape[1]:
                    add[row, pos] = deltas[row]
        return hidden + add if isinstance(output, torch.Tensor) else (hidden + add, *output[1:])  # type: ignore[index]

    handle = decoder_layers(model)[1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("use_cache", [True, False])
def test_answer_positions_match_explicit_positions(use_cache: bool) -> None:
    model = tiny_model("llama")
    a, b = _vector(0), _vector(1)
    ids, mask = left_padded(PROMPTS)
    with fv_plugin.steer(model, rows=[[a], [b], [a], [b]]):
        free = _generate(model, ids, mask, True)[:, ids.shape[1] :]
    ends = {int(free[0, 1]), int(free[2, 3])}  # two rows' answers end mid-way
    rows = [[a], [b], [a], []]
    with fv_plugin.steer(model, rows=rows, positions="answer", tokenizer=EndsAt(ends)):
        out = _generate(model, ids, mask, use_cache)
    steered = _oracle_positions(out, mask, ends)
    assert any(len(s) < NEW for s in steered[:3])  # some answer ended before the last step
    deltas = torch.stack([a.vector, b.vector, a.vector, torch.zeros(64)])
    with _explicit(model, deltas, steered):
        expected = _generate(model, ids, mask, False)
    assert torch.equal(out, expected)
    with fv_plugin.steer(model, rows=rows):
        generated = _generate(model, ids, mask, use_cache)
    assert not torch.equal(out, generated)  # steering past the answer's end changes something


@pytest.mark.parametrize("mode", ["last_prompt", "generated", "answer", "gated"])
def test_generate_on_a_cache_filled_before_it_steers_as_without(mode: str) -> None:
    """A prompt's first tokens prefilled outside the steering block, then ``generate`` on that cache: the call's
    prompt is all of it, so every mode (and the gate, decided at the prompt's last token) steers the same tokens
    as ``generate`` on the whole prompt."""
    model = tiny_model("llama", dtype=torch.float64)  # a cache filled in two calls then agrees to ~1e-15
    a = dataclasses.replace(_vector(0), layer=0).to(dtype=torch.float64)  # later layers see the prompt's tokens
    ids, mask = left_padded(PROMPTS)
    with fv_plugin.steer(model, a):
        free = _generate(model, ids, mask, True)[:, ids.shape[1] :]
    options: dict = {"positions": mode, "tokenizer": EndsAt({int(free[0, 1]), int(free[2, 3])})}
    if mode == "gated":
        hidden = torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        condition = Condition(layer=0, direction=hidden / hidden.norm(), threshold=0.0)
        a = dataclasses.replace(a, layer=1, condition=condition)  # the gate reads a layer below the vector's
        options = {"gate": True}
    outs = []
    for prefix in (0, 3):  # 3: the first three columns (left padding included) cached before the call
        cache = None
        if prefix:
            with torch.no_grad():
                part = mask[:, :prefix]  # positions from the mask, as generate counts them
                position_ids = (part.cumsum(-1) - 1).clamp(min=0)
                cache = model(input_ids=ids[:, :prefix], attention_mask=part, position_ids=position_ids, use_cache=True)
            cache = cache.past_key_values
        with fv_plugin.steer(model, a, strength=0.1, **options):
            kwargs = {"past_key_values": cache} if cache is not None else {}
            outs.append(_generate(model, ids, mask, True, **kwargs))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], _generate(model, ids, mask, True))  # the vector changes tokens


def test_answer_mask_unit() -> None:
    prompt = PromptInfo(length=3, last=torch.tensor([2, 1]))
    ids = torch.tensor([[9, 9, 9, 4, 10, 4], [9, 9, 0, 10, 4, 4]])
    mask = torch.tensor([[1] * 6, [1, 1, 0, 1, 1, 1]])
    info = ForwardInfo(batch=2, length=6, past=0, mask=mask, ids=ids)
    ended = answer_ended(info, prompt, torch.tensor([10]), None)
    got = position_mask("answer", info, prompt, torch.device("cpu"), ended)
    assert got is not None
    assert got.tolist() == [[False, False, True, True, False, False], [False, True, False, False, False, False]]
    step = ForwardInfo(batch=2, length=1, past=6, mask=None, ids=torch.tensor([[4], [4]]))
    carried = answer_ended(step, prompt, torch.tensor([10]), ended[:, -1])
    assert carried.tolist() == [[True], [True]]


def test_answer_needs_a_tokenizer() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="tokenizer"), fv_plugin.steer(model, _vector(0), positions="answer"):
        pass
    with pytest.raises(ValueError, match="tokenizer"):
        fv_plugin.SteeredModel(model, [_vector(0)], positions="answer")
    with pytest.raises(TypeError, match="tokenizer"):
        fv_plugin.FunctionVectorProcessor(_vector(0), positions="answer", tokenizer="gpt2")


def test_answer_end_ids_are_newlines_and_end_of_sequence() -> None:
    from conftest import char_tokenizer

    from fv_plugin.answer_span import answer_end_ids

    assert answer_end_ids(char_tokenizer()).tolist() == [2, 10]  # "</s>" and "\n"
