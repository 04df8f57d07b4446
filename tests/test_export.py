"""llama.cpp control-vector export: read back with the gguf package's own reader (an independent parser)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fv_plugin import FunctionVector
from fv_plugin.cli import main as cli_main
from fv_plugin.export import to_gguf

gguf = pytest.importorskip("gguf")


def vector(layer: int, seed: int, *, size: int = 8, model_type: str | None = "llama") -> FunctionVector:
    generator = torch.Generator().manual_seed(seed)
    return FunctionVector(vector=torch.randn(size, generator=generator), layer=layer, model_type=model_type)


def read_back(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.parts[field.data[0]]
        fields[name] = bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]
    tensors = {}
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        tensors[tensor.name] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    return fields, tensors


def test_one_vector_is_direction_of_its_layer(tmp_path: Path) -> None:
    fv = vector(3, 0)
    path = fv.to_gguf(tmp_path / "one.gguf")
    fields, tensors = read_back(path)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == 1
    assert list(tensors) == ["direction.3"]  # llama.cpp adds direction.N to the output of block N (0-based)
    np.testing.assert_array_equal(tensors["direction.3"], fv.vector.numpy())


def test_weighted_vectors_are_summed_per_layer(tmp_path: Path) -> None:
    a, b, c = vector(2, 1), vector(2, 2), vector(5, 3)
    path = to_gguf([(a, 2.0), (b, -0.5), c], tmp_path / "mix.gguf", model_hint="custom")
    fields, tensors = read_back(path)
    assert fields["controlvector.model_hint"] == "custom"
    assert fields["controlvector.layer_count"] == 2
    assert sorted(tensors) == ["direction.2", "direction.5"]
    expected = (2.0 * a.vector.double() - 0.5 * b.vector.double()).float().numpy()
    np.testing.assert_allclose(tensors["direction.2"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(tensors["direction.5"], c.vector.numpy())


def test_unknown_model_type_leaves_the_hint_out(tmp_path: Path) -> None:
    fields, _ = read_back(to_gguf(vector(1, 4, model_type=None), tmp_path / "bare.gguf"))
    assert "controlvector.model_hint" not in fields
    assert fields["controlvector.layer_count"] == 1


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        ([], "at least one"),
        ([vector(0, 0)], "block 0"),
        ([vector(1, 0), vector(2, 1, size=6)], "different sizes"),
        ([vector(1, 0), vector(2, 1, model_type="gemma3_text")], "different model types"),
        ([(vector(1, 0), float("nan"))], "finite"),
    ],
)
def test_bad_input_is_refused(tmp_path: Path, vectors: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_gguf(vectors, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_head_level_vectors_are_refused_with_the_portable_choice_and_its_accuracy(tmp_path: Path) -> None:
    from fv_plugin.records import Candidate, Selection

    fv = dataclasses.replace(vector(1, 0), heads=((1, 0),), head_values=torch.ones(1, 4), method="head_patch")
    with pytest.raises(ValueError, match=r"head_patch.*fv extract --portable.*not known here"):
        fv.to_gguf(tmp_path / "heads.gguf")
    candidates = (
        Candidate("head_patch", 1.0, 0.96, 0.5, k=10),
        Candidate("difference", 2.0, 0.62, 0.3, layer=4),
        Candidate("heads", 4.0, 0.71, 0.2, layer=3, k=10),
        Candidate("head_difference", 2.0, 0.9, 0.4, k=5),
    )
    chosen = dataclasses.replace(fv, selection=Selection(candidates, 0, 0.1, 50, "valid+train", "rule"))
    message = r"portable=True.*best portable candidate \(heads k=10 L3 s=4\) scored 0\.71, against 0\.96"
    with pytest.raises(ValueError, match=message):
        chosen.to_gguf(tmp_path / "heads.gguf")
    assert not (tmp_path / "heads.gguf").exists()
    # with finalists scored on the whole answer: the portable finalist with the best exact match, not a screened
    # candidate whose first token was right on a few queries
    scored = (
        dataclasses.replace(candidates[0], exact_match=0.9),
        dataclasses.replace(candidates[1], exact_match=0.6),
        candidates[2],  # screened only (first token on a few queries): not comparable
        dataclasses.replace(candidates[3], exact_match=0.8),
    )
    sel = Selection(scored, 0, 0.1, 50, "valid+train", "rule", baseline_exact_match=0.05)
    assert sel.best_of(("heads", "difference")) == scored[1]
    message = r"best portable candidate \(difference L4 s=2\) scored 0\.60 by exact match.*0\.90.*0\.05 without"
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(fv, selection=sel).to_gguf(tmp_path / "heads.gguf")


def test_other_objects_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="FunctionVector"):
        to_gguf("antonym.safetensors", tmp_path / "x.gguf")


def test_the_cli_exports_saved_vectors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = vector(4, 5), vector(4, 6)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    out = tmp_path / "ab.gguf"
    files = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    code = cli_main(["export", "--format", "gguf", "--vector", *files, "--weights", "1", "-1", "--out", str(out)])
    assert code == 0 and "every position" in capsys.readouterr().out
    _, tensors = read_back(out)
    np.testing.assert_allclose(tensors["direction.4"], (a.vector - b.vector).numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(SystemExit):
        cli_main(["export", "--vector", str(tmp_path / "a.safetensors"), "--weights", "1", "2", "--out", str(out)])
    heads = dataclasses.replace(a, heads=((1, 0),), head_values=torch.ones(1, 4), method="head_difference")
    heads.save(tmp_path / "heads.safetensors")
    with pytest.raises(SystemExit, match=r"fv export: head-level.*--portable"):
        cli_main(["export", "--vector", str(tmp_path / "heads.safetensors"), "--out", str(tmp_path / "h.gguf")])


def test_a_vector_over_several_layers_gives_one_direction_per_layer(tmp_path: Path) -> None:
    parts = {2: vector(2, 7).vector, 5: vector(5, 8).vector}
    layered = FunctionVector.from_layers(parts, model_type="llama")
    _, tensors = read_back(layered.to_gguf(tmp_path / "layered.gguf"))
    assert sorted(tensors) == ["direction.2", "direction.5"]
    for layer, part in parts.items():
        np.testing.assert_allclose(tensors[f"direction.{layer}"], part.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="block 0"):
        to_gguf(FunctionVector.from_layers({0: parts[2], 2: parts[5]}), tmp_path / "zero.gguf")


def test_a_vector_chosen_for_the_last_prompt_token_warns_that_llama_cpp_adds_it_everywhere(tmp_path: Path) -> None:
    fv = dataclasses.replace(vector(2, 1), positions="last_prompt")
    with pytest.warns(UserWarning, match="adds at every token"):
        path = to_gguf([fv, vector(3, 2)], tmp_path / "last.gguf")
    _, tensors = read_back(path)
    np.testing.assert_array_equal(tensors["direction.2"], fv.vector.numpy())  # exported all the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_gguf(vector(2, 1), tmp_path / "plain.gguf")
