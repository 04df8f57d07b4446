"""The demo's functions, called directly on a tiny random model (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, fresh_model, hook_counts

import fv_plugin

gr = pytest.importorskip("gradio")

from demo.app import NONE, OWN_LAYER, QUEUE_SIZE, DemoApp, build_app, shows_errors  # noqa: E402
from demo.engine import DemoError, Engine, ExtractSettings, Limits, load_vector_set  # noqa: E402

PROMPT = "Q: abc\nA:"


def vector(seed: int, layer: int = 1, scale: float = 30.0) -> fv_plugin.FunctionVector:
    gen = torch.Generator().manual_seed(seed)
    return fv_plugin.FunctionVector(vector=scale * torch.randn(64, generator=gen), layer=layer, model_type="llama")


@pytest.fixture(scope="module")
def engine() -> Engine:
    vectors = {"a": vector(0), "b": vector(1, layer=2), "c": vector(2, layer=0)}
    settings = ExtractSettings(n_mean=4, n_aie=2, n_shots=2, k=3, layer_stride=1)
    return Engine(fresh_model("llama"), char_tokenizer(), model_name="tiny", vectors=vectors, settings=settings)


def plain_and_steered(engine: Engine, pairs: list, strength: float, new: int) -> tuple[str, str]:
    """Oracle: two separate single-row calls, the plain model and ``fv_plugin.steer`` with a float strength."""
    ids = engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    plain = engine.model.generate(ids, **kwargs)
    with fv_plugin.steer(engine.model, *pairs, strength=strength):
        steered = engine.model.generate(ids, **kwargs)
    decode = engine.tokenizer.batch_decode
    return decode(plain[:, ids.shape[1] :], skip_special_tokens=True)[0], decode(
        steered[:, ids.shape[1] :], skip_special_tokens=True
    )[0]


def test_one_batched_call_equals_separate_plain_and_steered_calls(engine: Engine) -> None:
    pairs = engine.resolve([("a", 1.0), ("b", -0.5)])
    result = engine.steer_pair(PROMPT, pairs, strength=1.5, max_new_tokens=6)
    want = plain_and_steered(engine, pairs, 1.5, 6)
    assert (result.unsteered, result.steered) == want
    assert result.steered != result.unsteered  # the vectors are large enough to change greedy tokens


def test_layer_override_moves_every_vector(engine: Engine) -> None:
    pairs = engine.resolve([("a", 1.0)])
    result = engine.steer_pair(PROMPT, pairs, layer=2, max_new_tokens=5)
    moved = [(fv_plugin.FunctionVector(vector=pairs[0][0].vector, layer=2), 1.0)]
    assert result.steered == plain_and_steered(engine, moved, 1.0, 5)[1]


def test_app_steer_callback_reads_the_ui_values(engine: Engine) -> None:
    app = DemoApp(engine)
    got = app.steer(PROMPT, "a", 1.0, "b", -0.5, NONE, 1.0, OWN_LAYER, 1.5, "generated", 6)
    direct = engine.steer_pair(PROMPT, engine.resolve([("a", 1.0), ("b", -0.5)]), strength=1.5, max_new_tokens=6)
    assert got == (direct.unsteered, direct.steered)
    mine = {"mine": vector(5)}
    assert app.steer(PROMPT, "mine", 1.0, NONE, 0, NONE, 0, "1", 1.0, "all", 3, mine)[1] == (
        engine.steer_pair(PROMPT, [(mine["mine"], 1.0)], layer=1, positions="all", max_new_tokens=3).steered
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt="   "), "Type a prompt"),
        (dict(prompt="x" * 3000), "characters; the limit is"),
        (dict(max_new_tokens=500), "New tokens must be between 1 and"),
        (dict(layer=99), "Layer must be between 0 and 2"),
        (dict(positions="middle"), "Positions must be one of"),
        (dict(strength=1e6), "Strength must be within"),
        (dict(pairs=[]), "Pick at least one vector"),
    ],
)
def test_bad_requests_get_readable_errors(engine: Engine, kwargs: dict, message: str) -> None:
    args = dict(prompt=PROMPT, pairs=engine.resolve([("a", 1.0)]))
    args.update(kwargs)
    with pytest.raises(DemoError, match=message):
        engine.steer_pair(args.pop("prompt"), args.pop("pairs"), **args)


def test_vector_choices_are_checked(engine: Engine) -> None:
    with pytest.raises(DemoError, match="Unknown vector 'zzz'"):
        engine.resolve([("zzz", 1.0)])
    with pytest.raises(DemoError, match="outside"):
        engine.resolve([("a", 100.0)])
    small = Engine(engine.model, engine.tokenizer, model_name="t", vectors=engine.vectors, limits=Limits(max_vectors=1))
    with pytest.raises(DemoError, match="at most 1"):
        small.resolve([("a", 1.0), ("b", 1.0)])
    tight = Engine(engine.model, engine.tokenizer, model_name="t", limits=Limits(max_prompt_tokens=4))
    with pytest.raises(DemoError, match="tokens; the limit is 4"):
        tight.check_prompt(PROMPT)


def test_shows_errors_turns_failures_into_messages_in_the_page() -> None:
    def refuse() -> None:
        raise DemoError("Type a prompt first")

    def crash() -> None:
        raise RuntimeError("internal detail")

    with pytest.raises(gr.Error, match="Type a prompt first"):
        shows_errors(refuse)()
    with pytest.raises(gr.Error, match="Something went wrong \\(RuntimeError\\)") as info:
        shows_errors(crash)()
    assert "internal detail" not in str(info.value)


def test_task_files_are_checked(engine: Engine, tmp_path: Path) -> None:
    good = tmp_path / "shout.json"
    good.write_text(json.dumps([{"input": w, "output": w.upper()} for w in ["ab", "cd", "ef", "gh"] * 5]))
    assert len(engine.check_task_file(good)) == 20
    broken = tmp_path / "broken.json"
    broken.write_text("[{'input': 1")
    with pytest.raises(DemoError, match=r"Could not read the task file: broken\.json: not valid JSON"):
        engine.check_task_file(broken)
    big = tmp_path / "big.json"
    big.write_text(" " * 2_000)
    small = Engine(engine.model, engine.tokenizer, model_name="t", limits=Limits(max_upload_bytes=1_000))
    with pytest.raises(DemoError, match="2,000 bytes; the demo accepts up to 1,000"):
        small.check_task_file(big)
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps([{"input": "a", "output": "A"}, {"input": "b", "output": "B"}]))
    with pytest.raises(DemoError, match="at least 10"):
        engine.check_task_file(tiny)


def test_extract_runs_on_a_copy_and_reports_everything(engine: Engine) -> None:
    app = DemoApp(engine)
    before = hook_counts(engine.model)
    out = app.extract("capitalize", None, "heads", {})
    summary, heatmap, curve, tokens, path, mine, *updates = out
    assert hook_counts(engine.model) == before  # the shared model never carried the extraction's hooks
    assert engine._extract_model is not None and engine._extract_model[0] is not engine.model
    (name,) = mine
    fv = mine[name]
    assert fv.method == "heads" and fv.task == "capitalize" and fv.model_name == "tiny" and len(fv.heads or ()) == 3
    assert "capitalize" in summary and "→" in summary
    assert heatmap is not None and curve is not None and len(tokens) == 10
    assert torch.equal(fv_plugin.FunctionVector.load(path).vector, fv.vector)
    assert name in updates[0]["choices"] and NONE in updates[1]["choices"]
    # the user's new vector steers like any other
    assert app.steer(PROMPT, name, 1.0, NONE, 0, NONE, 0, OWN_LAYER, 1.0, "generated", 3, mine)[1]


def test_extract_refuses_bad_uploads_in_the_page(engine: Engine, tmp_path: Path) -> None:
    app = DemoApp(engine)
    bad = tmp_path / "rows.csv"
    bad.write_text("question,answer\nx,y\n")
    with pytest.raises(gr.Error, match="header row with 'input' and 'output'"):
        shows_errors(app.extract)(None, str(bad), "heads", {})
    with pytest.raises(gr.Error, match="Pick a built-in task or upload"):
        shows_errors(app.extract)(None, None, "heads", {})


def test_compare_and_the_cross_model_view(engine: Engine) -> None:
    import numpy as np

    app = DemoApp(engine)
    figure, cross, text = app.compare({})
    assert figure is not None and cross is None and "needs the precomputed vectors of two models" in text
    other = {name: vector(10 + i, scale=1.0) for i, name in enumerate(["a", "b", "c", "d"])}
    mine = dict(engine.vectors)
    _, cross, text = DemoApp(engine, cross_model={"tiny": mine, "other": other}).compare({})

    # oracle: numpy's Pearson correlation of the pairwise cosines of the three shared tasks
    def cosines(vs: dict) -> list[float]:
        units = {k: v.vector.numpy() / np.linalg.norm(v.vector.numpy()) for k, v in vs.items()}
        return [float(units[x] @ units[y]) for x, y in [("a", "b"), ("a", "c"), ("b", "c")]]

    want = np.corrcoef(cosines(mine), cosines(other))[0, 1]
    assert cross is not None and "Pearson correlation of the 3 task-pair similarities" in text
    assert f"**{want:.2f}**" in text
    two = {"a": other["a"], "b": other["b"]}
    _, cross, text = DemoApp(engine, cross_model={"tiny": mine, "other": two}).compare({})
    assert cross is None and "share fewer than three tasks" in text
    empty = DemoApp(Engine(engine.model, engine.tokenizer, model_name="t"))
    with pytest.raises(DemoError, match="no vectors to compare"):
        empty.compare({})


def test_vector_sets_load_and_the_ui_builds(engine: Engine, tmp_path: Path) -> None:
    for name, fv in engine.vectors.items():
        fv.save(tmp_path / f"{name}.safetensors")
    loaded = load_vector_set(tmp_path)
    assert sorted(loaded) == sorted(engine.vectors)
    assert load_vector_set(tmp_path / "missing") == {}
    demo = build_app(DemoApp(engine))
    assert isinstance(demo, gr.Blocks)
    assert demo._queue.max_size == QUEUE_SIZE  # a bounded queue


def test_the_repository_is_a_space() -> None:
    """The README's front matter names the app, and requirements.txt installs what the app imports."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("---\n")
    front = readme.split("---\n")[1]
    fields = dict(line.split(": ", 1) for line in front.splitlines() if ": " in line)
    assert fields["sdk"] == "gradio" and (root / fields["app_file"]).is_file()
    assert len(fields["short_description"]) <= 60  # the Hub's limit
    assert "python demo/app.py" in readme.split("```")[1]  # the main command starts the demo

    def name(requirement: str) -> str:
        return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()

    lines = (root / "requirements.txt").read_text(encoding="utf-8").splitlines()
    installed = {name(line) for line in lines if line.strip() and not line.startswith(("#", "-"))}
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    needed = {name(dep) for dep in project["dependencies"]} | {"matplotlib"}
    assert needed <= installed, f"requirements.txt lacks {sorted(needed - installed)}"
