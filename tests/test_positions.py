"""What must hold 1 and 2: positions are absolute; the hidden state after the layer is h + strength * v."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import (
    decoder_layers,
    generate_cached_and_uncached,
    left_padded,
    next_layer_input,
    reference_steering,
    right_padded,
    tiny_model,
)

import fv_plugin
from fv_plugin import FunctionVector

ROWS = [[5, 9, 14, 3, 22, 41, 7], [11, 12, 13, 60], [70, 71, 72, 73, 74]]
LAYER = 1


def _vector(seed: int = 0, scale: float = 3.0) -> FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return FunctionVector(vector=torch.randn(64, generator=gen) * scale, layer=LAYER)


def _expected_mask(mode: str, mask: torch.Tensor) -> torch.Tensor:
    """Independent of fv_plugin: which positions a plain forward of this batch should steer."""
    real = mask.bool()
    last = torch.zeros_like(real)
    for row in range(mask.shape[0]):
        last[row, int(real[row].nonzero().max())] = True
    return real if mode == "all" else last  # a plain forward has no generated tokens


@pytest.mark.parametrize("padding", [left_padded, right_padded])
@pytest.mark.parametrize("mode", ["last_prompt", "generated", "all"])
def test_hidden_state_is_unsteered_plus_vector_exactly_where_asked(padding: object, mode: str) -> None:
    model = tiny_model("llama")
    ids, mask = padding(ROWS)  # type: ignore[operator]
    fv = _vector()
    with torch.no_grad(), next_layer_input(model, LAYER) as plain:
        model(input_ids=ids, attention_mask=mask)
    with (
        torch.no_grad(),
        next_layer_input(model, LAYER) as steered,
        fv_plugin.steer(model, fv, strength=2.5, positions=mode),
    ):
        model(input_ids=ids, attention_mask=mask)
    where = _expected_mask(mode, mask)
    diff = steered[0] - plain[0]
    torch.testing.assert_close(diff[where], (2.5 * fv.vector).expand(int(where.sum()), -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(steered[0][~where], plain[0][~where])


def test_relative_normalize_scales_to_the_hidden_state_norm() -> None:
    model = tiny_model("llama")
    ids, mask = left_padded(ROWS)
    fv = _vector()
    with torch.no_grad(), next_layer_input(model, LAYER) as plain:
        model(input_ids=ids, attention_mask=mask)
    with (
        torch.no_grad(),
        next_layer_input(model, LAYER) as steered,
        fv_plugin.steer(model, fv, strength=0.3, positions="all", normalize="relative"),
    ):
        model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    added = (steered[0] - plain[0])[real]
    expected = 0.3 * plain[0][real].norm(dim=-1, keepdim=True) * fv.vector / fv.vector.norm()
    torch.testing.assert_close(added, expected, rtol=1e-4, atol=1e-4)


def _reference_generate(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    fv: FunctionVector,
    strength: float,
    mode: str,
    new: int,
) -> torch.Tensor:
    """Naive reference: greedy loop without cache, our own hook adds the vector at the positions of ``mode``."""
    prompt_len = ids.shape[1]
    last = torch.tensor([int(r.nonzero().max()) for r in mask.bool()])

    def select(batch: int, seq: int) -> torch.Tensor:
        pos = torch.arange(seq)[None, :]
        at_last = pos == last[:, None]
        if mode == "last_prompt":
            return at_last
        if mode == "generated":
            return at_last | (pos >= prompt_len)
        real = torch.cat([mask.bool(), torch.ones(batch, seq - prompt_len, dtype=torch.bool)], dim=1)
        return real

    with reference_steering(model, fv.layer, strength * fv.vector, select):
        return _greedy_without_cache(model, ids, mask, new)


def _greedy_without_cache(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    """``new`` greedy tokens, every step a full forward of the whole sequence (no KV cache)."""
    seq, att = ids.clone(), mask.clone()
    with torch.no_grad():
        for _ in range(new):
            position_ids = (att.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=att, position_ids=position_ids).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            att = torch.cat([att, torch.ones_like(nxt)], dim=1)
    return seq


@pytest.mark.parametrize("mode", ["last_prompt", "generated", "all"])
def test_generation_matches_naive_reference_with_and_without_cache(mode: str) -> None:
    model = tiny_model("llama", dtype=torch.float64)
    ids, mask = left_padded(ROWS)
    fv = _vector(seed=3, scale=2.0).to(dtype=torch.float64)
    reference = _reference_generate(model, ids, mask, fv, 1.5, mode, new=6)
    outs = {}
    for use_cache in (True, False):
        with fv_plugin.steer(model, fv, strength=1.5, positions=mode):
            outs[use_cache] = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=6,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=0,
                eos_token_id=None,
            )
    assert torch.equal(outs[True], outs[False])
    assert torch.equal(outs[True], reference)
    unsteered = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert not torch.equal(unsteered, reference), "the vector must change something, or the test proves nothing"


def test_generated_mode_steers_every_generated_token_under_cache() -> None:
    """Each cached step's next-layer input equals a one-shot replay of the sequence steered by a naive hook."""
    model = tiny_model("llama", dtype=torch.float64)
    ids, mask = left_padded(ROWS)
    fv = _vector().to(dtype=torch.float64)
    with torch.no_grad(), next_layer_input(model, LAYER) as seen, fv_plugin.steer(model, fv, strength=2.0):
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    prompt_len = ids.shape[1]
    full = out[:, :-1]
    full_mask = torch.cat([mask, torch.ones(3, full.shape[1] - prompt_len, dtype=torch.long)], dim=1)

    def select(batch: int, seq: int) -> torch.Tensor:
        pos = torch.arange(seq)[None, :].expand(batch, -1)
        return pos >= prompt_len - 1

    with (
        torch.no_grad(),
        next_layer_input(model, LAYER) as replay,
        reference_steering(model, LAYER, 2.0 * fv.vector, select),
    ):
        model(input_ids=full, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0))
    assert len(seen) == 4  # the prompt pass and three generated-token passes
    torch.testing.assert_close(seen[0][:, -1], replay[0][:, prompt_len - 1])
    for step, hidden in enumerate(seen[1:], start=1):
        torch.testing.assert_close(hidden[:, 0], replay[0][:, prompt_len + step - 1])


@pytest.mark.parametrize("mode", ["last_prompt", "generated", "all"])
def test_right_padded_generation_same_with_and_without_cache(mode: str) -> None:
    model = tiny_model("llama", dtype=torch.float64)
    ids, mask = right_padded(ROWS)
    fv = _vector(seed=4).to(dtype=torch.float64)
    cached, uncached = generate_cached_and_uncached(model, (fv,), ids, mask, strength=1.5, positions=mode)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("own", [None, "generated", "last_prompt"])
def test_every_entry_point_steers_a_vector_at_its_own_positions_unless_told(own: str | None) -> None:
    model = tiny_model("llama", dtype=torch.float64)
    ids, mask = left_padded(ROWS)
    fv = dataclasses.replace(_vector(seed=3, scale=2.0).to(dtype=torch.float64), positions=own)
    expected = _reference_generate(model, ids, mask, fv, 1.0, own or "generated", new=6)
    other = "generated" if own == "last_prompt" else "last_prompt"
    told = _reference_generate(model, ids, mask, fv, 1.0, other, new=6)
    assert not torch.equal(expected, told), "the two position modes must differ here, or the test proves nothing"
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    options["eos_token_id"] = None
    with fv_plugin.steer(model, fv):
        assert torch.equal(model.generate(**options), expected)
    with fv_plugin.steer(model, fv, positions=other):  # an explicit mode wins over the vector's
        assert torch.equal(model.generate(**options), told)
    assert torch.equal(fv_plugin.SteeredModel(model, [fv]).generate(**options), expected)
    processor = fv_plugin.FunctionVectorProcessor(fv)
    assert torch.equal(fv_plugin.attach(model).generate(**options, logits_processor=[processor]), expected)
    twin = dataclasses.replace(fv, positions=other)
    with fv_plugin.steer(model, fv, twin, positions="all"):  # told: every vector there
        model(input_ids=ids, attention_mask=mask)


def _reference_generate_each(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, adds: list[tuple], new: int, relative: bool = False
) -> torch.Tensor:
    """Naive reference for several vectors, each at its own positions and rows: a greedy loop without cache and
    one plain hook per decoder layer adding, for each ``(layer, vector, weight, mode, rows)``, ``weight * vector``
    (``relative``: ``weight * |h| * vector / |vector|``, with ``h`` the layer's own output) where ``mode`` and
    ``rows`` (bool ``[batch]``) select."""
    prompt_len = ids.shape[1]
    last = torch.tensor([int(r.nonzero().max()) for r in mask.bool()])
    layers = decoder_layers(model)

    def hook_for(layer: int):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: object, output: object) -> object:
            hidden = output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]
            pos = torch.arange(hidden.shape[1])[None, :]
            out = hidden
            for at, vector, weight, mode, rows in adds:
                if at != layer:
                    continue
                where = (pos == last[:, None]) | ((pos >= prompt_len) & (mode == "generated"))
                where = where & rows[:, None]
                size = hidden.norm(dim=-1, keepdim=True) / vector.norm() if relative else 1.0
                out = out + where[..., None].to(hidden.dtype) * weight * size * vector.to(hidden.dtype)
            return out if isinstance(output, torch.Tensor) else (out, *output[1:])  # type: ignore[index]

        return hook

    handles = [layers[layer].register_forward_hook(hook_for(layer)) for layer in {add[0] for add in adds}]
    try:
        return _greedy_without_cache(model, ids, mask, new)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("normalize", ["absolute", "relative"])
@pytest.mark.parametrize("b_layer", [LAYER, LAYER + 1])
def test_vectors_with_different_positions_are_each_steered_at_their_own(normalize: str, b_layer: int) -> None:
    model = tiny_model("llama", dtype=torch.float64)
    ids, mask = left_padded(ROWS)
    a = dataclasses.replace(_vector(seed=5, scale=2.0).to(dtype=torch.float64), positions="last_prompt")
    raw = _vector(seed=6, scale=2.0).to(dtype=torch.float64).vector
    b = FunctionVector(vector=raw, layer=b_layer, positions="generated")
    wa, wb = (1.0, 0.7) if normalize == "absolute" else (0.4, 0.3)
    every = torch.ones(len(ROWS), dtype=torch.bool)
    adds = [(LAYER, a.vector, wa, "last_prompt", every), (b_layer, b.vector, wb, "generated", every)]
    relative = normalize == "relative"
    expected = _reference_generate_each(model, ids, mask, adds, new=6, relative=relative)
    at_one = _reference_generate_each(model, ids, mask, [(*add[:3], "generated", every) for add in adds], 6, relative)
    assert not torch.equal(expected, at_one), "steering both at one mode must differ here, or the test proves nothing"
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    options["eos_token_id"] = None
    pairs = [(a, wa), (b, wb)]
    if b_layer == LAYER:  # one forward of the prompts: both add at the last token, from the same hidden state
        with torch.no_grad(), next_layer_input(model, LAYER) as plain:
            model(input_ids=ids, attention_mask=mask)
        with (
            torch.no_grad(),
            next_layer_input(model, LAYER) as steered,
            fv_plugin.steer(model, *pairs, normalize=normalize),
        ):
            model(input_ids=ids, attention_mask=mask)
        h = plain[0][:, -1]  # left padded: every row's last token
        unit = (lambda v: v / v.norm()) if relative else (lambda v: v)
        size = h.norm(dim=-1, keepdim=True) if relative else 1.0
        torch.testing.assert_close(steered[0][:, -1], h + size * (wa * unit(a.vector) + wb * unit(b.vector)))
        assert torch.equal(steered[0][:, :-1], plain[0][:, :-1])
    with fv_plugin.steer(model, *pairs, normalize=normalize):
        assert torch.equal(model.generate(**options), expected)
    assert torch.equal(fv_plugin.SteeredModel(model, pairs, normalize=normalize).generate(**options), expected)
    processor = fv_plugin.FunctionVectorProcessor(*pairs, normalize=normalize)
    assert torch.equal(fv_plugin.attach(model).generate(**options, logits_processor=[processor]), expected)
    with fv_plugin.steer(model, *pairs, positions="generated", normalize=normalize):  # an explicit mode wins
        assert torch.equal(model.generate(**options), at_one)
    # per row: a alone, b alone, both
    rows = [[(a, wa)], [(b, wb)], [(a, wa), (b, wb)]]
    per_row = [
        (LAYER, a.vector, wa, "last_prompt", torch.tensor([True, False, True])),
        (b_layer, b.vector, wb, "generated", torch.tensor([False, True, True])),
    ]
    expected_rows = _reference_generate_each(model, ids, mask, per_row, new=6, relative=relative)
    with fv_plugin.steer(model, rows=rows, normalize=normalize):
        assert torch.equal(model.generate(**options), expected_rows)


def test_a_vector_refuses_positions_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="positions must be one of"):
        dataclasses.replace(_vector(), positions="answer")
    a, b = dataclasses.replace(_vector(1), positions="last_prompt"), dataclasses.replace(_vector(2), positions=None)
    assert (a + a).positions == "last_prompt" and (a + b).positions is None and (2.0 * a).positions == "last_prompt"
