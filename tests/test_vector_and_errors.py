"""What must hold 9, and the FunctionVector value: arithmetic, files, Hub folders."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import fresh_model, hook_counts

import fv_plugin
from fv_plugin import FunctionVector, FunctionVectorProcessor, SteeredModel
from fv_plugin.vector import WEIGHTS_NAME


def _fv(**meta: Any) -> FunctionVector:
    return FunctionVector(vector=torch.linspace(-1, 1, 64), layer=meta.pop("layer", 1), **meta)


BAD_STEER: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("wrong size", dict(vectors=[FunctionVector(vector=torch.ones(32), layer=1)]), ValueError, "hidden size"),
    ("other model type", dict(vectors=[_fv(model_type="gpt2")]), ValueError, "gpt2"),
    (
        "other hidden size",
        dict(vectors=[FunctionVector(vector=torch.ones(65), layer=1, hidden_size=65)]),
        ValueError,
        "65",
    ),
    ("layer out of range", dict(vectors=[_fv(layer=3)]), ValueError, "out of range"),
    ("nan strength", dict(strength=float("nan")), ValueError, "finite"),
    ("inf strength", dict(strength=float("inf")), ValueError, "finite"),
    ("nan in strength tensor", dict(strength=torch.tensor([1.0, float("nan")])), ValueError, "NaN"),
    ("strength of a wrong type", dict(strength="2"), TypeError, "number"),
    ("unknown positions", dict(positions="every"), ValueError, "positions"),
    ("unknown normalize", dict(normalize="l2"), ValueError, "normalize"),
    ("not a vector", dict(vectors=[torch.ones(64)]), TypeError, "FunctionVector"),
    ("nan pair weight", dict(vectors=[(_fv(), float("nan"))]), ValueError, "finite"),
]


@pytest.mark.parametrize(("label", "kwargs", "error", "match"), BAD_STEER, ids=[b[0] for b in BAD_STEER])
def test_bad_input_is_a_clear_error_and_leaves_the_model_untouched(
    label: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = fresh_model("llama")
    before = hook_counts(model)
    vectors = kwargs.pop("vectors", [_fv()])
    with pytest.raises(error, match=match), fv_plugin.steer(model, *vectors, **kwargs):
        pass
    assert hook_counts(model) == before and not fv_plugin.is_attached(model)
    with pytest.raises(error, match=match):
        SteeredModel(model, vectors, **kwargs).generate(input_ids=torch.tensor([[3, 4]]), max_new_tokens=1)
    assert hook_counts(model) == before and not fv_plugin.is_attached(model)


def test_bad_processor_arguments_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="positions"):
        FunctionVectorProcessor(_fv(), positions="first")
    with pytest.raises(ValueError, match="window"):
        FunctionVectorProcessor(_fv(), window=(3, 1))
    with pytest.raises(TypeError, match="schedule"):
        FunctionVectorProcessor(_fv(), schedule=3)  # type: ignore[arg-type]
    model = fv_plugin.attach(fresh_model("llama"))
    proc = FunctionVectorProcessor(_fv(layer=7))
    with pytest.raises(ValueError, match="out of range"):
        model.generate(input_ids=torch.tensor([[3, 4]]), logits_processor=[proc], max_new_tokens=2)


def test_construction_checks() -> None:
    with pytest.raises(ValueError, match="NaN"):
        FunctionVector(vector=torch.tensor([1.0, float("nan")]), layer=0)
    with pytest.raises(ValueError, match="shape"):
        FunctionVector(vector=torch.ones(2, 3), layer=0)
    with pytest.raises(ValueError, match="layer"):
        FunctionVector(vector=torch.ones(3), layer=-1)
    with pytest.raises(TypeError, match="Tensor"):
        FunctionVector(vector=[1.0, 2.0], layer=0)  # type: ignore[arg-type]
    assert FunctionVector(vector=torch.ones(3), layer=3).layer == 3


def test_a_vector_made_by_auto_says_it_carries_a_strength(tmp_path: Path) -> None:
    def chosen(method: str, strength: float) -> fv_plugin.Selection:
        best = fv_plugin.Candidate(method, strength, 0.9, 0.5, layer=1)
        return fv_plugin.Selection((best,), 0, 0.1, 10, "valid", "best accuracy")

    made = FunctionVector(vector=torch.ones(4), layer=1, method="difference", selection=chosen("difference", 4.0))
    assert made.builtin_strength == 4.0
    assert "built-in strength 4 (chosen by auto)" in repr(made) == str(made)
    assert FunctionVector.load(made.save(tmp_path / "auto.safetensors")).builtin_strength == 4.0
    plain = FunctionVector(vector=torch.ones(4), layer=1, method="difference")
    assert plain.builtin_strength is None and "built-in" not in repr(plain)
    selection = chosen("head_patch", 1.0)
    patch = FunctionVector(
        vector=torch.ones(4), layer=1, heads=((1, 0),), head_values=torch.ones(1, 2), selection=selection
    )
    assert patch.builtin_strength is None  # head_patch: strength interpolates, auto builds none in


def test_records_and_settings_named_form_still_load(tmp_path: Path) -> None:
    """Files written before "form" became "method" (selection candidates, ``config.forms``) load with the new names;
    the old Python names still work for one release, with a DeprecationWarning."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    best = fv_plugin.Candidate("difference", 2.0, 0.9, 0.5, layer=1)
    selection = fv_plugin.Selection((best,), 0, 0.1, 10, "valid", "best accuracy")
    config = fv_plugin.ExtractionConfig(methods=("difference",))
    path = FunctionVector(vector=torch.ones(4), layer=1, selection=selection, config=config).save(tmp_path / "v.st")
    with safe_open(str(path), framework="pt") as handle:
        header, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    meta = json.loads(header["fv_metadata"])
    meta["selection"]["candidates"] = [{"form": "difference", **c} for c in meta["selection"]["candidates"]]
    for c in meta["selection"]["candidates"]:
        del c["method"]
    meta["config"]["forms"] = meta["config"].pop("methods")
    save_file(tensors, str(path), metadata={**header, "fv_metadata": json.dumps(meta)})
    back = FunctionVector.load(path)
    assert back.selection == selection and back.config == config
    with pytest.warns(DeprecationWarning, match="Candidate.method"):
        assert best.form == "difference"
    with pytest.warns(DeprecationWarning, match="methods="):
        assert fv_plugin.ExtractionConfig(forms=("heads",)).methods == ("heads",)  # type: ignore[call-arg]


def test_every_method_is_listed_with_auto_first() -> None:
    assert fv_plugin.METHODS[0] == "auto" == fv_plugin.ExtractionConfig().method
    for method in fv_plugin.METHODS:
        assert fv_plugin.ExtractionConfig(method=method).method == method  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method must be one of"):
        fv_plugin.ExtractionConfig(method="form")  # type: ignore[arg-type]


def test_arithmetic_reads_naturally_and_refuses_mismatches() -> None:
    a = FunctionVector(vector=torch.tensor([1.0, 2.0]), layer=2, model_type="llama", task="antonym")
    b = FunctionVector(vector=torch.tensor([0.5, -1.0]), layer=2, model_type="llama", task="capital")
    assert (a + b).vector.tolist() == [1.5, 1.0]
    assert (a - b).vector.tolist() == [0.5, 3.0]
    assert (-a).vector.tolist() == [-1.0, -2.0]
    assert (2.0 * a).vector.tolist() == (a * 2).vector.tolist() == [2.0, 4.0]
    assert (a / 2).vector.tolist() == [0.5, 1.0]
    assert (a + b).model_type == "llama" and (a + b).layer == 2 and (2.0 * a).task == "antonym"
    with pytest.raises(ValueError, match="different layers"):
        a + FunctionVector(vector=torch.ones(2), layer=3)
    with pytest.raises(ValueError, match="different models"):
        a + FunctionVector(vector=torch.ones(2), layer=2, model_type="gpt2")
    with pytest.raises(TypeError):
        a + 1.0  # type: ignore[operator]
    with pytest.raises(ZeroDivisionError):
        a / 0
    with pytest.raises(ValueError, match="scale"):
        a * float("inf")


def test_save_and_load_round_trip_with_metadata(tmp_path: Path) -> None:
    fv = FunctionVector(
        vector=torch.randn(64),
        layer=4,
        model_type="llama",
        hidden_size=64,
        model_name="tiny",
        task="antonym",
        heads=((1, 2), (3, 0)),
        head_scores=(0.5, 0.25),
        k=2,
        prompt_template="Q: {x}\nA: {y}\n\n",
        method="heads",
        extra={"seed": "0"},
    )
    back = FunctionVector.load(fv.save(tmp_path / "fv.safetensors"))
    assert torch.equal(back.vector, fv.vector)
    for name in (
        "layer",
        "model_type",
        "hidden_size",
        "model_name",
        "task",
        "heads",
        "head_scores",
        "k",
        "prompt_template",
        "method",
        "extra",
    ):
        assert getattr(back, name) == getattr(fv, name), name
    assert back.library_version == fv_plugin.__version__
    folder = fv.save_pretrained(tmp_path / "hubdir")
    assert (folder / WEIGHTS_NAME).is_file() and (folder / "fv_config.json").is_file()
    assert torch.equal(FunctionVector.from_pretrained(folder).vector, fv.vector)


def test_files_of_the_first_format_load_with_typed_metadata() -> None:
    """fv_plugin 0.1 stored the layer sweep, the AIE and the settings as strings in ``extra``."""
    import json

    from safetensors.torch import save_file

    legacy = {
        "layer": 2,
        "method": "heads",
        "k": 2,
        "extra": {
            "seed": "3",
            "n_shots": "5",
            "n_mean": "7",
            "aie": json.dumps([[0.1, 0.2], [0.3, -0.4], [0.0, 0.5]]),
            "layer_sweep": json.dumps({"layers": [1, 2], "accuracy": [0.2, 0.6], "probability": [0.1, 0.3]}),
            "mine": "kept",
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "old.safetensors"
        header = {"format": "fv_plugin.FunctionVector", "format_version": "1", "fv_metadata": json.dumps(legacy)}
        save_file({"vector": torch.ones(4)}, str(path), metadata=header)
        fv = FunctionVector.load(path)
    assert fv.extra == {"mine": "kept"}
    assert fv.aie is not None and fv.aie.tolist()[1] == pytest.approx([0.3, -0.4])
    assert fv.layer_sweep is not None and fv.layer_sweep.values == (1.0, 2.0) and fv.layer_sweep.best == 2.0
    assert fv.config is not None and (fv.config.seed, fv.config.n_shots, fv.config.n_mean) == (3, 5, 7)
    assert fv.config.method == "heads" and fv.config.k == 2 and fv.config.layer is None


def test_files_that_are_not_ours_are_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "evil.safetensors"
    pickled.write_bytes(pickle.dumps({"vector": torch.ones(3)}))
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(
        torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    good = _fv().save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.ones(3)}, str(foreign))
    for path in (pickled, noise, truncated, foreign):
        with pytest.raises(ValueError, match="not"):
            FunctionVector.load(path)
    with pytest.raises(FileNotFoundError):
        FunctionVector.load(tmp_path / "missing.safetensors")


def test_from_pretrained_without_the_hub_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="neither a local folder"):
        FunctionVector.from_pretrained("someone/no-such-vector")


def test_push_to_hub_uploads_the_save_pretrained_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {}

    class FakeApi:
        def __init__(self, token: str | None = None) -> None:
            calls["token"] = token

        def create_repo(self, **kwargs: Any) -> None:
            calls["create"] = kwargs

        def upload_folder(self, **kwargs: Any) -> str:
            folder = Path(kwargs["folder_path"])
            calls["files"] = sorted(p.name for p in folder.iterdir())
            calls["loaded"] = FunctionVector.from_pretrained(folder)
            return "https://example.invalid/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    fv = _fv(task="antonym")
    assert fv.push_to_hub("me/antonym-fv", token="t") == "https://example.invalid/commit/1"
    assert calls["create"]["repo_id"] == "me/antonym-fv" and calls["token"] == "t"
    assert calls["files"] == ["function_vector.safetensors", "fv_config.json"]
    assert torch.equal(calls["loaded"].vector, fv.vector) and calls["loaded"].task == "antonym"
