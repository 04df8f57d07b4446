"""One merge of weighted vectors for every runtime: Hugging Face, vLLM (its worker tables, no engine) and GGUF export
add the same vector after each layer, and that vector is the naive weighted sum written here."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import decoder_layers, make_config
from torch import nn
from transformers import AutoModelForCausalLM

import fv_plugin
from fv_plugin import FunctionVector
from fv_plugin.export import to_gguf
from fv_plugin.merge import merge
from fv_plugin.vllm.frontend import served_arch
from fv_plugin.vllm.requests import RESOLVED_KEY, parse_request, resolve, steering
from fv_plugin.vllm.worker import SteeringBuffers, StepState, StepWriter, layer_delta

HIDDEN, LAYERS, TOKENS, STRENGTH = 64, 5, 6, 1.5
Additions = dict[int, np.ndarray]  # layer -> [tokens, hidden] what was added after it (relative: per unit norm)


@functools.cache
def five_layer_model() -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config("llama", num_hidden_layers=LAYERS)).eval()


def weighted_vectors() -> list[tuple[FunctionVector, float]]:
    """Several layers, negative weights, multi-layer vectors, a layer reached by three vectors, a zero weight."""
    g = torch.Generator().manual_seed(7)

    def r() -> torch.Tensor:
        return torch.randn(HIDDEN, generator=g) * float(torch.rand(1, generator=g) * 3 + 0.1)

    spread = FunctionVector.from_layers({1: r(), 3: r()}, model_type="llama")
    pair = FunctionVector.from_layers({2: r(), 3: r()})
    single = FunctionVector(vector=r(), layer=3, model_type="llama")
    other = FunctionVector(vector=r(), layer=2)
    unused = FunctionVector(vector=r(), layer=1)
    return [(spread, 1.0), (pair, -0.75), (single, -2.0), (other, 0.5), (unused, 0.0)]


def naive_sum(pairs: list[tuple[FunctionVector, float]], normalize: str) -> Additions:
    """The oracle: sum of weight * part (relative: weight * part / |part|) per layer, in numpy float64."""
    out: Additions = {}
    for fv, weight in pairs:
        if weight == 0.0:
            continue
        for layer, part in fv.parts().items():
            values = part.numpy().astype(np.float64)
            if normalize == "relative":
                values = values / np.linalg.norm(values)
            out[layer] = out.get(layer, np.zeros(HIDDEN)) + weight * values
    return out


@contextlib.contextmanager
def added_after_layers(model: nn.Module) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Per layer: its ``"raw"`` output (a forward hook of ours that runs before any other) and the hidden states
    ``"entering"`` the next layer (a forward pre-hook on it)."""
    layers = decoder_layers(model)
    seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(layers) - 1)}

    def raw(i: int) -> object:
        def hook(module: nn.Module, args: object, output: object) -> None:
            hidden = output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]
            seen[i]["raw"] = hidden.detach().clone()

        return hook

    def entering(i: int) -> object:
        def hook(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i]["entering"] = hidden.detach().clone()  # type: ignore[union-attr]

        return hook

    handles = [layers[i].register_forward_hook(raw(i), prepend=True) for i in seen]  # type: ignore[arg-type]
    handles += [layers[i + 1].register_forward_pre_hook(entering(i), with_kwargs=True) for i in seen]  # type: ignore[arg-type]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def hugging_face(pairs: list[tuple[FunctionVector, float]], normalize: str) -> Additions:
    model = five_layer_model()
    ids = torch.arange(3, 3 + TOKENS)[None, :]
    with (
        added_after_layers(model) as seen,
        fv_plugin.steer(model, *pairs, strength=STRENGTH, positions="all", normalize=normalize),
    ):
        model(input_ids=ids)
    out: Additions = {}
    for layer, hidden in seen.items():
        raw = hidden["raw"]
        added = (hidden["entering"] - raw)[0].double()
        if normalize == "relative":
            added = added / raw[0].double().norm(dim=-1, keepdim=True)
        if added.abs().max() > 0:
            out[layer] = (added / STRENGTH).numpy()
    return out


def no_names(name: str) -> FunctionVector:
    raise ValueError(f"no vector named {name!r}")


def vllm_worker(pairs: list[tuple[FunctionVector, float]], normalize: str) -> Additions:
    """What the worker's tables add: the request arguments parsed and resolved as the server does, then written
    into the worker's buffers and summed by its hook body (``layer_delta``) for one prefill of TOKENS tokens."""
    arch = served_arch(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=4, model_type="llama")
    request = parse_request(steering(*pairs, strength=STRENGTH, positions="all", normalize=normalize), no_names)
    assert request is not None
    resolved = resolve(request, arch, max_layers=4)
    assert resolved is not None
    buffers = SteeringBuffers.allocate(slots=4, hidden=HIDDEN, tokens=TOKENS, columns=4, device=torch.device("cpu"))
    module = nn.Module()
    buffers.register_on(module)
    state = StepState()
    params = SimpleNamespace(extra_args={RESOLVED_KEY: resolved.to_args()})
    batch = SimpleNamespace(
        num_reqs=1, req_ids=["r"], num_computed_tokens_cpu=np.array([0]), num_prompt_tokens=np.array([TOKENS])
    )
    runner = SimpleNamespace(
        input_batch=batch,
        requests={"r": SimpleNamespace(sampling_params=params)},
        query_start_loc=SimpleNamespace(np=np.array([0, TOKENS])),
    )
    StepWriter(buffers, state, hidden=HIDDEN).prepare(runner)
    stream = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1)) * 3
    out: Additions = {}
    for layer, columns in state.layers.items():
        added = layer_delta(module, layer, stream, state.any_relative, columns).double()
        if normalize == "relative":
            added = added / stream.double().norm(dim=-1, keepdim=True)
        out[layer] = (added / STRENGTH).numpy()
    return out


def gguf_file(pairs: list[tuple[FunctionVector, float]], path: Path) -> Additions:
    """The ``direction.N`` tensors of the exported file, read back with the gguf package's own reader (llama.cpp
    adds them at every token, with no strength: repeated over the tokens here)."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(to_gguf(pairs, path)))
    out: Additions = {}
    for tensor in reader.tensors:
        layer = int(tensor.name.removeprefix("direction."))
        out[layer] = np.tile(np.asarray(tensor.data, dtype=np.float64).reshape(1, -1), (TOKENS, 1))
    return out


@pytest.mark.parametrize("normalize", ["absolute", "relative"])
def test_hugging_face_vllm_and_gguf_add_the_same_vectors(tmp_path: Path, normalize: str) -> None:
    pairs = weighted_vectors()
    expected = naive_sum(pairs, normalize)
    assert sorted(expected) == [1, 2, 3]
    runtimes = {"hugging face": hugging_face(pairs, normalize), "vllm": vllm_worker(pairs, normalize)}
    if normalize == "absolute":  # llama.cpp adds a fixed vector: it has no relative mode
        runtimes["gguf"] = gguf_file(pairs, tmp_path / "merged.gguf")
    for name, added in runtimes.items():
        assert sorted(added) == sorted(expected), name
        for layer, rows in added.items():
            assert rows.shape == (TOKENS, HIDDEN), name
            tolerance = 2e-5 * float(np.abs(expected[layer]).max())
            np.testing.assert_allclose(rows, np.broadcast_to(expected[layer], rows.shape), atol=tolerance, err_msg=name)


def test_the_merge_itself() -> None:
    pairs = weighted_vectors()
    for normalize in ("absolute", "relative"):
        merged = merge(pairs, normalize)  # type: ignore[arg-type]
        assert merged.relative == (normalize == "relative") and merged.layers == (1, 2, 3)
        for layer, delta in merged.deltas.items():
            assert delta.dtype == torch.float64
            np.testing.assert_allclose(delta.numpy(), naive_sum(pairs, normalize)[layer], rtol=1e-6, atol=1e-9)
    assert merge([(pairs[-1][0], 0.0)]).deltas == {}  # a zero weight names no layer
    zero = FunctionVector(vector=torch.zeros(HIDDEN), layer=2)
    assert not merge([(zero, 1.0)], "relative").deltas[2].any()  # a zero vector stays zero, never NaN
    head = FunctionVector(
        vector=torch.ones(HIDDEN), layer=1, heads=((1, 0),), head_values=torch.ones(1, 16), method="head_patch"
    )
    with pytest.raises(ValueError, match="head-level"):
        merge([(head, 1.0)])
    with pytest.raises(ValueError, match="normalize must be one of"):
        merge(pairs, "norm")  # type: ignore[arg-type]
