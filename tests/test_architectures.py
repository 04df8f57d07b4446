"""What must hold 7 and 8: every family from the table, fallbacks, overrides, dtypes, layer output types."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, decoder_layers, fresh_model, left_padded, next_layer_input, tiny_model
from torch import nn

import fv_plugin
from fv_plugin import ArchSpec, FunctionVector
from fv_plugin.architectures import ARCHITECTURES, resolve_architecture

ROWS = [[5, 9, 14, 3, 22], [11, 12, 13]]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_steered_exactly(family: str) -> None:
    assert family in ARCHITECTURES
    model = tiny_model(family)
    ids, mask = left_padded(ROWS)
    fv = FunctionVector(
        vector=torch.randn(64, generator=torch.Generator().manual_seed(0)),
        layer=1,
        model_type=model.config.model_type,
        hidden_size=64,
    )
    with torch.no_grad(), next_layer_input(model, 1) as plain:
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), next_layer_input(model, 1) as steered, fv_plugin.steer(model, fv, strength=2.0):
        model(input_ids=ids, attention_mask=mask)
    diff = steered[0] - plain[0]
    torch.testing.assert_close(diff[:, -1], (2.0 * fv.vector).expand(2, -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(steered[0][:, :-1], plain[0][:, :-1])
    out = fv_plugin.SteeredModel(model).generate(
        input_ids=ids, attention_mask=mask, steering=[fv], max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, ids.shape[1] + 3)
    arch = resolve_architecture(model)
    assert isinstance(arch.out_proj(0), nn.Module) and arch.num_heads == 4


def test_generic_fallback_finds_layers_of_an_unknown_model_type() -> None:
    model = fresh_model("llama")
    saved = ARCHITECTURES.pop("llama")
    try:
        arch = resolve_architecture(model)
        assert arch.layers is model.model.layers
    finally:
        ARCHITECTURES["llama"] = saved


class _Block(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> object:
        y = self.lin(x)
        if self.kind == "tuple":
            return (y, None)
        if self.kind == "dict":
            return {"hidden": y}
        return y


class _Toy(nn.Module):
    """A model no table knows, with its blocks under an unusual name."""

    class _Config:
        model_type = "toy"
        hidden_size = 8
        num_attention_heads = 2

    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        self.config = self._Config()
        self.stack = nn.Sequential()
        self.stack.blocks = nn.ModuleList([_Block(kind) for _ in range(3)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.one_hot(input_ids, 8).float()
        for block in self.stack.blocks:
            out = block(x)
            x = out if isinstance(out, torch.Tensor) else out[0]
        return x


def test_unknown_model_error_names_the_override() -> None:
    toy = _Toy()
    toy.stack.blocks = nn.ModuleList()  # nothing to fall back on
    with pytest.raises(ValueError, match=r"arch=fv_plugin\.ArchSpec"):
        resolve_architecture(toy)
    with (
        pytest.raises(ValueError, match="register_architecture"),
        fv_plugin.steer(toy, FunctionVector(vector=torch.ones(8), layer=0)),
    ):
        pass


def _runner(kind: str) -> nn.Module:
    class Base(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([_Block(kind) for _ in range(3)])

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.one_hot(input_ids, 8).float()
            for block in self.blocks:
                out = block(x)
                x = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) else out["hidden"]
            return x

    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = _Toy._Config()
            self.base = Base()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.base(input_ids=input_ids)

    return Top()


@pytest.mark.parametrize("kind", ["tensor", "tuple"])
def test_user_override_with_tensor_and_tuple_layer_outputs(kind: str) -> None:
    model = _runner(kind)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    plain = model(ids)
    fv = FunctionVector(vector=torch.arange(8.0), layer=2)  # the last block: its output is the model's output
    with fv_plugin.steer(model, fv, strength=0.5, positions="all", arch=ArchSpec(layers="base.blocks")):
        steered = model(ids)
    torch.testing.assert_close(steered - plain, (0.5 * fv.vector).expand(2, 3, -1))


def test_layer_output_of_another_type_raises() -> None:
    model = _runner("dict")
    fv = FunctionVector(vector=torch.ones(8), layer=0)
    with (
        fv_plugin.steer(model, fv, arch=ArchSpec(layers="base.blocks")),
        pytest.raises(TypeError, match="returned dict"),
    ):
        model(torch.tensor([[1, 2]]))


def test_registered_architecture_is_used() -> None:
    model = _runner("tensor")
    fv_plugin.register_architecture("toy", ArchSpec(layers="base.blocks"))
    try:
        assert resolve_architecture(model).num_layers == 3
    finally:
        ARCHITECTURES.pop("toy")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_take_dtype_from_the_activation(dtype: torch.dtype) -> None:
    model = tiny_model("llama", dtype=dtype)
    ids, mask = left_padded(ROWS)
    fv = FunctionVector(vector=torch.randn(64, dtype=torch.float64), layer=1)  # made elsewhere, in float64
    with torch.no_grad(), next_layer_input(model, 1) as plain:
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), next_layer_input(model, 1) as steered, fv_plugin.steer(model, fv, strength=1.0):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 2
    assert steered[0].dtype == dtype
    expected = plain[0][:, -1] + fv.vector.to(dtype)
    torch.testing.assert_close(steered[0][:, -1], expected, rtol=1e-2, atol=1e-2)
    with fv_plugin.steer(model, fv, normalize="relative", strength=0.5), torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()


def test_vector_on_meta_device_is_refused() -> None:
    model = fresh_model("llama")
    fv = FunctionVector(vector=torch.zeros(64, device="meta"), layer=1)
    with pytest.raises(ValueError, match="meta"), fv_plugin.steer(model, fv):
        pass
    assert len(decoder_layers(model)[1]._forward_hooks) == 0
